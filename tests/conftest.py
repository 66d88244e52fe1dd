"""Shared fixtures, found by name in every test folder.

- ``mlflow_server``: a real ``mlflow server`` on 127.0.0.1 (module scope), see tests/mlflow_server.py.
- ``slurm_cluster``: the real local Slurm cluster (session scope), see tests/slurm_cluster.py.

Layout: ``unit/`` (pure functions and single components), ``methods/`` (the pruning methods in
in-process training runs), ``distributed/`` (several processes: DeepSpeed on gloo, checkpoints,
resume), ``integration/`` (data pipelines, MLflow, Slurm, the benchmark suite, the GPU).
"""

from tests.mlflow_server import mlflow_server  # noqa: F401
from tests.slurm_cluster import slurm_cluster  # noqa: F401
