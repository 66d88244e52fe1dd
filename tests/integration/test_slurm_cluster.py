"""The local Slurm cluster is real: sbatch runs jobs, sacct accounts for them, submitit works."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests import slurm_jobs

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]


def _sacct_state(job_id: str, timeout: float = 60) -> str:
    """The job's final accounting state (sacct lags the job by a moment)."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        out = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State"],
            capture_output=True, text=True, check=True,
        ).stdout.split()
        state = out[0] if out else ""
        if state and state not in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED"):
            return state
        time.sleep(0.5)
    return state


def test_sbatch_job_runs_and_is_accounted(slurm_cluster, tmp_path: Path):
    out = tmp_path / "hello.out"
    job_id = subprocess.run(
        ["sbatch", "--parsable", "-N1", "-n1", "-t", "2", "-o", str(out),
         "--wrap", "echo hello from $SLURM_JOB_ID on $(hostname)"],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    ).stdout.strip().split(";")[0]
    assert job_id.isdigit()
    assert _sacct_state(job_id) == "COMPLETED"
    assert out.read_text().startswith(f"hello from {job_id} on ")


def test_srun_two_tasks(slurm_cluster, tmp_path: Path):
    out = tmp_path / "ranks.out"
    job_id = subprocess.run(
        ["sbatch", "--parsable", "-N1", "--ntasks-per-node=2", "-t", "2", "-o", str(out),
         "--wrap", "srun bash -c 'echo rank=$SLURM_PROCID'"],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    ).stdout.strip().split(";")[0]
    assert _sacct_state(job_id) == "COMPLETED"
    assert sorted(out.read_text().split()) == ["rank=0", "rank=1"]


def _executor(folder: Path, **params):
    import submitit

    executor = submitit.AutoExecutor(folder=folder)
    assert executor.cluster == "slurm"  # sbatch/srun are on PATH
    executor.update_parameters(timeout_min=5, slurm_partition="debug", **params)
    return executor


def test_submitit_job_completes(slurm_cluster, tmp_path: Path):
    job = _executor(tmp_path / "submitit").submit(slurm_jobs.add, 2, 3)
    assert job.result() == 5
    deadline = time.monotonic() + 60
    while job.state != "COMPLETED" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert job.state == "COMPLETED"


def test_submitit_two_tasks_distinct_ranks(slurm_cluster, tmp_path: Path):
    job = _executor(tmp_path / "submitit", tasks_per_node=2, nodes=1, cpus_per_task=1).submit(
        slurm_jobs.whoami
    )
    results = job.results()
    assert len(results) == 2
    assert sorted(r["SLURM_PROCID"] for r in results) == ["0", "1"]
    assert len({r["SLURM_JOB_ID"] for r in results}) == 1


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.5)


def test_submitit_preemption_requeues_and_resumes(slurm_cluster, tmp_path: Path):
    """submitit's --signal=USR2@90 path: preempt (SIGTERM + USR2), checkpoint, requeue, rerun."""
    marker = tmp_path / "started"
    job = _executor(tmp_path / "submitit").submit(slurm_jobs.WaitForPreemption(), str(marker))
    _wait_for(marker.exists, 120, "the job to start")
    time.sleep(2)  # let submitit's signal handlers settle in the job
    # what Slurm does on preemption: SIGTERM, then USR2 to the task.  (job._interrupt() sends both at
    # once; on a loaded machine the SIGTERM then arrived after USR2 had started `scontrol requeue`, and
    # killed it.)  Wait until the job has handled the SIGTERM before the USR2.
    subprocess.run(["scancel", job.job_id, "--signal", "SIGTERM"], check=True)
    _wait_for(lambda: "Bypassing signal SIGTERM" in Path(job.paths.stderr).read_text(), 60, "SIGTERM handled")
    subprocess.run(["scancel", job.job_id, "--signal", "USR2"], check=True)
    assert job.result() >= 1  # ran again after the requeue
    assert _sacct_state(job.job_id) == "COMPLETED"


@pytest.mark.slow
def test_train_sbatch_template_two_ranks(slurm_cluster, tmp_path: Path):
    """slurm/templates/train.sbatch runs launch.train as a 2-rank job and it completes."""
    import json
    import os
    import sys

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "train.out"
    env = {**os.environ, "CONFIG": str(repo / "configs" / "demo.yaml"), "PYTHON": sys.executable,
           "DS_ACCELERATOR": "cpu"}
    job_id = subprocess.run(
        ["sbatch", "--parsable", "--ntasks-per-node=2", "-o", str(out),
         str(repo / "slurm" / "templates" / "train.sbatch"),
         "train.max_steps=2", f"run.root={tmp_path / 'runs'}"],
        capture_output=True, text=True, check=True, cwd=repo, env=env,
    ).stdout.strip().split(";")[0]
    state = _sacct_state(job_id, timeout=240)
    text = out.read_text()
    assert state == "COMPLETED", text[-3000:]
    summary = json.loads(text[text.index("\n{") + 1:])
    assert summary["world_size"] == 2
    assert summary["steps"] == 2


def test_another_checkout_keeps_its_own_state_and_cannot_take_the_cluster_over(slurm_cluster, tmp_path: Path):
    """The cluster's state is per user and checkout; a second checkout on the machine gets its own
    state dir, and its `up` refuses (exit 5) to take over this checkout's running daemons, naming
    the checkout that runs them; its `down` leaves them running."""
    import os
    import shutil

    from tests.slurm_cluster import EXIT_TAKEN, REPO, SCRIPT

    other = tmp_path / "other-checkout"
    shutil.copytree(SCRIPT.parent, other / "slurm")
    script = other / "slurm" / "local_cluster.sh"
    env = {k: v for k, v in os.environ.items() if k not in ("PARSIMONY_SLURM_DIR", "SLURM_CONF")}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=env, timeout=120)

    other_state = next(line.split("=", 1)[1] for line in run("env").stdout.splitlines()
                       if line.startswith("export PARSIMONY_SLURM_DIR="))
    try:
        assert other_state != slurm_cluster["PARSIMONY_SLURM_DIR"]
        up = run("up")
        assert up.returncode == EXIT_TAKEN, up.stderr
        assert str(REPO) in up.stderr and slurm_cluster["PARSIMONY_SLURM_DIR"] in up.stderr, up.stderr
        assert not (Path(other_state) / "run").exists()     # nothing of the other cluster was started
        Path(other_state, "run").mkdir(parents=True)         # as if it had run once: down must not stop ours
        assert run("down").returncode == 0
        assert subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, timeout=60).returncode == 0
        assert run("kill-node", "pnode1").returncode != 0
    finally:
        shutil.rmtree(other_state, ignore_errors=True)
