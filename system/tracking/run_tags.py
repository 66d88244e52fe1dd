"""The standard tags of a run: who started it, from what code, where (MLflow's ``mlflow.*``
conventions, plus the Slurm job and its log files when the run is a Slurm job), and the code's
version for the ``code_version`` tag."""

from __future__ import annotations

import getpass
import os
import subprocess
import sys
from pathlib import Path

# MLflow's own tag names (mlflow.utils.mlflow_tags), which its UI shows as "Created by", "Source"...
USER = "mlflow.user"
SOURCE_NAME = "mlflow.source.name"
SOURCE_TYPE = "mlflow.source.type"
GIT_COMMIT = "mlflow.source.git.commit"
GIT_BRANCH = "mlflow.source.git.branch"
SLURM_JOB_ID = "slurm.job_id"
SLURM_NODES = "slurm.nodes"
LOG_STDOUT = "slurm.log.stdout"
LOG_STDERR = "slurm.log.stderr"

_REPO = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=_REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def code_version(repo: str | Path | None = None) -> str:
    """``git describe --always --dirty --tags`` of the code, or ``"unknown"`` outside a checkout."""
    cwd = Path(repo) if repo else _REPO
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=cwd,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def _source() -> str:
    """The entry point: its path in the repository (``launch/train.py``), else its file name."""
    if not sys.argv or sys.argv[0] in ("", "-c", "-m"):
        return "python"
    path = Path(sys.argv[0]).resolve()
    try:
        return path.relative_to(_REPO).as_posix()
    except ValueError:
        return path.name


def standard_tags(environ: dict[str, str] | None = None) -> dict[str, str]:
    """``mlflow.user``, ``mlflow.source.*`` (entry point, git commit and branch) and, under Slurm,
    the job id, its nodes and (for a submitit job) its stdout / stderr files."""
    env = dict(os.environ if environ is None else environ)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = env.get("USER", "unknown")
    tags = {USER: user, SOURCE_NAME: _source(),
            SOURCE_TYPE: "JOB" if env.get("SLURM_JOB_ID") else "LOCAL"}
    commit, branch = _git("rev-parse", "HEAD"), _git("rev-parse", "--abbrev-ref", "HEAD")
    if commit:
        tags[GIT_COMMIT] = commit
    if branch and branch != "HEAD":
        tags[GIT_BRANCH] = branch
    if env.get("SLURM_JOB_ID"):
        job = env["SLURM_JOB_ID"]
        if env.get("SLURM_ARRAY_JOB_ID"):
            job = f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
        tags[SLURM_JOB_ID] = job
        if env.get("SLURM_JOB_NODELIST"):
            tags[SLURM_NODES] = env["SLURM_JOB_NODELIST"]
        if env.get("SUBMITIT_FOLDER"):
            try:
                import submitit

                paths = submitit.JobEnvironment().paths
                tags[LOG_STDOUT], tags[LOG_STDERR] = str(paths.stdout), str(paths.stderr)
            except Exception:
                pass
    return tags
