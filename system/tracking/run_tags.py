"""The standard tags of a run: who started it, from what code, where (MLflow's ``mlflow.*``
conventions, plus the Slurm job and its log files when the run is a Slurm job), the code's version for the
``code_version`` tag and the processor for the ``parsimony.hardware`` tag."""

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


def hardware(device: str) -> str:
    """What computed a run's numbers: the processor model (on a CPU with its widest vector ISA of avx512f,
    avx2, sse4_2) and the torch version, for example ``cpu: AMD EPYC 7B13, avx2 (torch 2.13.0)`` or
    ``cuda: NVIDIA H100 80GB HBM3 (torch 2.13.0)``.

    Two runs of one seed share initial weights and data order, but their floating-point sums follow
    the kernels of the processor and the torch build, and a training run amplifies a last-bit difference
    into a different network: ``launch.compare --budgets`` flags pairs whose runs differ here (or in
    ``code_version``), which are paired in seed only."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index
        name = torch.cuda.get_device_name(torch.cuda.current_device() if index is None else index)
        return f"cuda: {name} (torch {torch.__version__})"
    import platform

    name, flags = "", set[str]()
    try:  # a virtual machine may show only the vendor's family name: its vector ISA tells kernels apart too
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for ln in f:
                key, _, value = ln.partition(":")
                if key.strip().lower() == "model name" and not name:
                    name = value.strip()
                elif key.strip().lower() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    isa = next((i for i in ("avx512f", "avx2", "sse4_2") if i in flags), None)
    cpu = (name or platform.processor() or platform.machine()) + (f", {isa}" if isa else "")
    return f"{device.split(':')[0]}: {cpu} (torch {torch.__version__})"


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
