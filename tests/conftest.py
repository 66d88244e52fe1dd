"""Shared fixtures, found by name in every test folder.

- ``mlflow_server``: a real ``mlflow server`` on 127.0.0.1 (module scope), see tests/mlflow_server.py.
- ``slurm_cluster``: the real local Slurm cluster (session scope), see tests/slurm_cluster.py.

Layout: ``unit/`` (pure functions and single components), ``methods/`` (the pruning methods in
in-process training runs), ``distributed/`` (several processes: DeepSpeed on gloo, checkpoints,
resume), ``integration/`` (data pipelines, MLflow, Slurm, the benchmark suite, the GPU).

``make test TEST_WORKERS=N`` runs the suite on N pytest-xdist workers (``--dist loadgroup``); the hook below
decides what may run apart.  A test module is one unit of work, so its module-scoped fixtures (a
trained run, a 2-node job, a server) are built once, on one worker.  Every module that uses the
``slurm_cluster`` fixture joins one group, ``slurm``: the cluster holds this machine's Slurm ports and
namespaces (``slurm/local_cluster.sh`` refuses a second one), so one worker brings it up, runs every
Slurm test and takes it down.  Each worker starts its own MLflow server on a free port.

The Slurm group is the suite's longest path (its jobs run one after another on the cluster), so under
xdist it runs first in line for the CPU: a worker lowers its own priority (``nice`` +NICE_OTHERS, inherited
by the processes its tests start) when it runs a test outside that group, and the ``slurm_cluster``
fixture raises it back before it starts the cluster's daemons, whose jobs inherit the daemons' priority.
Without xdist nothing is reniced.
"""

import os

import pytest

from tests.mlflow_server import mlflow_server  # noqa: F401
from tests.slurm_cluster import slurm_cluster  # noqa: F401

#: read by the product as defaults (tracking.uri / tracking.experiment); ``mlflow.set_tracking_uri``
#: writes the first, so a test that calls it would steer every later test's runs elsewhere
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")


#: the pytest-xdist group of the tests that need the session's Slurm cluster (one worker runs them all)
SLURM_GROUP = "slurm"


#: the niceness of a worker running tests outside the Slurm group (xdist only): enough for the Slurm jobs
#: to win a contended core (nice 4 weighs 423 against nice 0's 1024), little enough that the other tests'
#: processes still get a share their own timeouts (8 s collectives and up) allow
NICE_OTHERS = 4


def _group(item) -> str | None:
    mark = item.get_closest_marker("xdist_group")
    return mark.args[0] if mark and mark.args else None


def pytest_runtest_setup(item):
    if os.environ.get("PYTEST_XDIST_WORKER") and _group(item) != SLURM_GROUP:
        current = os.getpriority(os.PRIO_PROCESS, 0)
        if current < NICE_OTHERS:
            os.setpriority(os.PRIO_PROCESS, 0, NICE_OTHERS)


def pytest_collection_modifyitems(config, items):
    """Give every test its xdist group: its module's, or ``slurm`` for modules that use the cluster.

    Without xdist the marks are inert.  The group is per module, not per test, so that a module's
    tests never share a fixture across two workers; a module joins ``slurm`` when any of its tests
    asks for ``slurm_cluster`` (directly or through another fixture).
    """
    def module(item) -> str:
        return item.nodeid.split("::", 1)[0]

    slurm_modules = {module(item) for item in items if "slurm_cluster" in getattr(item, "fixturenames", ())}
    for item in items:
        item.add_marker(pytest.mark.xdist_group(SLURM_GROUP if module(item) in slurm_modules else module(item)))


@pytest.fixture(autouse=True)
def _mlflow_env_stays_put():
    before = {k: os.environ.get(k) for k in MLFLOW_ENV}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
