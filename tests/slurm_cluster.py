"""Session-scoped pytest fixture: a real Slurm cluster (with accounting) on this machine.

The cluster is brought up with ``--nodes 2``: this host's node (partition ``debug``, the default, at
127.0.0.1) and two namespaced nodes ``pnode1``/``pnode2`` (partition ``multi``) for the multi-node
tests; ``multi_partition()`` says whether they exist (a machine that forbids network namespaces gets
the one-node cluster, and the multi-node tests skip naming why).

Usage in a test module (the fixture is registered in tests/conftest.py)::

    import pytest

    @pytest.mark.slurm
    def test_something(slurm_cluster):
        subprocess.run(["sbatch", ...], env={**os.environ, **slurm_cluster}, check=True)

The fixture runs ``slurm/local_cluster.sh up`` once per session and yields a dict of the
environment variables a Slurm client needs (``SLURM_CONF``, ``PATH``, ``PYTHONPATH`` with the
repo root so submitit jobs can import ``tests.*``, ``PARSIMONY_SLURM_DIR``).  For the length of
the session these are also set in ``os.environ``, so submitit (which shells out to
sbatch/sacct/scancel with the process environment) works without extra plumbing.  At the end of
the session it runs ``local_cluster.sh down`` -- unless the cluster was already up before the
session started (a developer's own cluster is left alone) or ``PARSIMONY_SLURM_KEEP=1``.

The tests are skipped (with the reason) only when the Debian packages cannot be installed
(``local_cluster.sh`` exits 3: no apt-get, no root/sudo, no registry).  Any other failure to
bring the cluster up is an error, with the daemon logs' path in the message.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "local_cluster.sh"
# Packages missing or not installable; network namespaces not allowed; another checkout's cluster
# holds this machine's ports (see local_cluster.sh).
EXIT_NO_PACKAGES = 3
EXIT_NO_NAMESPACES = 4
EXIT_TAKEN = 5
#: namespaced nodes of the session's cluster
NODES = 2
_NO_MULTI: list[str] = []


def _run(cmd: str, timeout: float, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), cmd, *args], capture_output=True, text=True, timeout=timeout
    )


def multi_partition() -> str:
    """The namespaced nodes' partition, or skip the calling test naming why there is none."""
    if _NO_MULTI:
        pytest.skip(_NO_MULTI[0])
    return os.environ.get("PARSIMONY_SLURM_MULTI_PARTITION", "") or pytest.skip("no multi-node partition")


def state_dir() -> str:
    """This checkout's cluster state dir (per user and checkout, or ``$PARSIMONY_SLURM_DIR``)."""
    return cluster_env().get("PARSIMONY_SLURM_DIR", "?")


def cluster_env() -> dict[str, str]:
    """The variables a Slurm client needs, as printed by ``local_cluster.sh env``."""
    out = _run("env", 30).stdout
    env: dict[str, str] = {}
    for line in out.splitlines():
        if line.startswith("export ") and "=" in line:
            key, value = line[len("export "):].split("=", 1)
            env[key] = value
    path = os.environ.get("PATH", "")
    # sbatch & co. live in /usr/bin; the job's python must be this interpreter's venv.
    extra = [str(Path(sys.executable).parent), "/usr/bin", "/usr/sbin"]
    env["PATH"] = os.pathsep.join([*extra, path])
    pp = os.environ.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), pp] if pp else [str(REPO)])
    return env


@pytest.fixture(scope="session")
def slurm_cluster():
    if shutil.which("bash") is None or not SCRIPT.exists():
        pytest.skip(f"cannot run {SCRIPT}")
    if os.environ.get("PYTEST_XDIST_WORKER") and os.getpriority(os.PRIO_PROCESS, 0) > 0:
        try:  # the daemons, and so every job, take this priority (tests/conftest.py: the Slurm group first)
            os.setpriority(os.PRIO_PROCESS, 0, 0)
        except PermissionError:  # only root may lower a niceness; the jobs then share the worker's
            pass
    was_up = _run("status", 60).returncode == 0
    try:
        up = _run("up", 900, "--nodes", str(NODES))
        if up.returncode == EXIT_NO_NAMESPACES:
            _NO_MULTI.append(f"this machine forbids network namespaces: {up.stderr.strip()[-300:]}")
            up = _run("up", 900)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"local_cluster.sh up timed out; logs in {state_dir()}/log: {exc}")
    if up.returncode == EXIT_NO_PACKAGES:
        pytest.skip(f"Slurm Debian packages cannot be installed: {up.stderr.strip()[-500:]}")
    if up.returncode != 0:
        pytest.fail(
            f"local_cluster.sh up failed (rc={up.returncode}); logs in {state_dir()}/log\n"
            f"{up.stderr[-3000:]}"
        )
    env = cluster_env()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield dict(env)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if not was_up and os.environ.get("PARSIMONY_SLURM_KEEP") != "1":
            down = _run("down", 300)
            if down.returncode != 0:
                print(f"local_cluster.sh down failed: {down.stderr[-2000:]}")
