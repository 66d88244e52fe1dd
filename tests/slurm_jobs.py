"""Functions submitted to the local Slurm cluster by tests/integration/test_slurm_cluster.py.

submitit pickles a function by reference, so it must be importable inside the job
(the fixture puts the repo root on PYTHONPATH, which sbatch passes to the job).
"""
from __future__ import annotations

import os
import socket


def add(a: int, b: int) -> int:
    return a + b


def whoami() -> dict[str, str]:
    """This task's Slurm identity, as srun/submitit set it."""
    keys = ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_NODEID")
    return {"host": socket.gethostname(), **{k: os.environ.get(k, "") for k in keys}}


try:  # submitit is a project dependency; keep this module importable without it anyway
    from submitit.helpers import Checkpointable
except ImportError:  # pragma: no cover
    Checkpointable = object  # type: ignore[misc,assignment]


class WaitForPreemption(Checkpointable):
    """First run: mark ``started`` and sleep until preempted.  After submitit's requeue the
    job runs again (``checkpoint()`` of Checkpointable resubmits the same call) and returns
    how many times Slurm restarted it."""

    def __call__(self, marker: str, sleep_s: float = 240.0) -> int:
        import time
        from pathlib import Path

        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if restarts == 0:
            Path(marker).write_text(os.environ.get("SLURM_JOB_ID", ""))
            time.sleep(sleep_s)
        return restarts
