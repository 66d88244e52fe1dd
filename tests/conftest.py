"""Shared fixtures, found by name in every test folder.

- ``mlflow_server``: a real ``mlflow server`` on 127.0.0.1 (module scope), see tests/mlflow_server.py.
- ``slurm_cluster``: the real local Slurm cluster (session scope), see tests/slurm_cluster.py.

Layout: ``unit/`` (pure functions and single components), ``methods/`` (the pruning methods in
in-process training runs), ``distributed/`` (several processes: DeepSpeed on gloo, checkpoints,
resume), ``integration/`` (data pipelines, MLflow, Slurm, the benchmark suite, the GPU).

``make test TEST_WORKERS=N`` runs the suite on N pytest-xdist workers (``--dist loadgroup``; 0 by default), with
the scheduler below: a test module is one unit of work, so its module-scoped fixtures (a trained run, a
2-node job, a server) are built once, on one worker; every module that uses the ``slurm_cluster`` fixture
joins one unit, ``slurm``: the cluster holds this machine's Slurm ports and namespaces
(``slurm/local_cluster.sh`` refuses a second one) and its tests kill nodes, so one worker brings it up, runs
every Slurm test and takes it down.  (xdist's own ``xdist_group`` marks do not group under pytest 9: xdist
3.8 writes the group into ``item._nodeid``, which pytest 9 no longer reads.)  Each worker starts its own
MLflow server on a free port.

The Slurm unit is the suite's longest path, so it goes first for the CPU: a worker lowers its own priority
(``nice`` +NICE_OTHERS, inherited by the processes its tests start) when it runs a test outside that unit,
and the ``slurm_cluster`` fixture raises it back before it starts the cluster's daemons, whose jobs inherit
the daemons' priority.  Without xdist nothing is reniced.
"""

import os
from functools import cache
from pathlib import Path

import pytest

from tests.mlflow_server import mlflow_server  # noqa: F401
from tests.slurm_cluster import slurm_cluster  # noqa: F401

#: read by the product as defaults (tracking.uri / tracking.experiment); ``mlflow.set_tracking_uri``
#: writes the first, so a test that calls it would steer every later test's runs elsewhere
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")


#: the unit of work of the tests that need the session's Slurm cluster (one worker runs them all)
SLURM_GROUP = "slurm"


#: the niceness of a worker running tests outside the Slurm group (xdist only): enough for the Slurm jobs
#: to win a contended core (nice 4 weighs 423 against nice 0's 1024), little enough that the other tests'
#: processes still get a share their own timeouts (8 s collectives and up) allow
NICE_OTHERS = 4


TESTS = Path(__file__).resolve().parent


@cache
def slurm_modules() -> frozenset[str]:
    """The test modules (node-id paths, ``tests/...``) whose source names the ``slurm_cluster`` fixture:
    read from the files, since xdist's controller schedules before any worker has collected a test.
    ``pytest_collection_modifyitems`` checks it against the fixtures each test really uses."""
    return frozenset(str(p.relative_to(TESTS.parent)) for p in TESTS.rglob("test_*.py")
                     if "slurm_cluster" in p.read_text())


def _module(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup``: one unit of work per test module, the Slurm modules together."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    slurm = slurm_modules()

    class ModuleOrSlurm(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = _module(nodeid)
            return SLURM_GROUP if module in slurm else module

    return ModuleOrSlurm(config, log)


def pytest_collection_modifyitems(config, items):
    """A test that uses the Slurm cluster must be in a module the scheduler puts in the Slurm unit."""
    slurm = slurm_modules()
    stray = sorted({_module(i.nodeid) for i in items if "slurm_cluster" in getattr(i, "fixturenames", ())} - slurm)
    if stray:
        raise pytest.UsageError(f"{', '.join(stray)}: its tests use the slurm_cluster fixture through another "
                                "fixture; name slurm_cluster in the module (tests/conftest.py: slurm_modules)")


def pytest_runtest_setup(item):
    if os.environ.get("PYTEST_XDIST_WORKER") and _module(item.nodeid) not in slurm_modules():
        current = os.getpriority(os.PRIO_PROCESS, 0)
        if current < NICE_OTHERS:
            os.setpriority(os.PRIO_PROCESS, 0, NICE_OTHERS)


@pytest.fixture(autouse=True)
def _mlflow_env_stays_put():
    before = {k: os.environ.get(k) for k in MLFLOW_ENV}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
