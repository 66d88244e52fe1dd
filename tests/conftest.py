"""Shared fixtures, found by name in every test folder.

- ``mlflow_server``: a real ``mlflow server`` on 127.0.0.1 (module scope), see tests/mlflow_server.py.
- ``slurm_cluster``: the real local Slurm cluster (session scope), see tests/slurm_cluster.py.

Layout: ``unit/`` (pure functions and single components), ``methods/`` (the pruning methods in
in-process training runs), ``distributed/`` (several processes: DeepSpeed on gloo, checkpoints,
resume), ``integration/`` (data pipelines, MLflow, Slurm, the benchmark suite, the GPU).
"""

import os

import pytest

from tests.mlflow_server import mlflow_server  # noqa: F401
from tests.slurm_cluster import slurm_cluster  # noqa: F401

#: read by the product as defaults (tracking.uri / tracking.experiment); ``mlflow.set_tracking_uri``
#: writes the first, so a test that calls it would steer every later test's runs elsewhere
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")


@pytest.fixture(autouse=True)
def _mlflow_env_stays_put():
    before = {k: os.environ.get(k) for k in MLFLOW_ENV}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
