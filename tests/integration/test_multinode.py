"""Multi-node jobs for real: launch.submit on the two namespaced nodes of the local Slurm cluster.

``pnode1`` and ``pnode2`` (partition ``multi``) each run their own ``slurmd`` in their own network
and UTS namespace, with their own hostname and address on a bridge (slurm/local_cluster.sh).  So
MASTER_ADDR is a hostname resolved on the other node, LOCAL_RANK differs from RANK, the process
group must pick the node's own interface, and a node can be lost.

Every job trains the same tiny run as tests/integration/test_submit.py (ResNet-20, embedded
Fashion-MNIST, 40 steps, Taylor pruning at steps 6-18, a checkpoint every 10 steps) with DeepSpeed
on gloo, recording into the embedded MLflow store of a runs root shared by the module.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from launch import submitting as S
from launch.config import load_job
from launch.slurm_cmd import run_slurm
from launch.waiting import continued_on_fewer
from system.config import ConfigError
from tests.integration.test_slurm_cluster import _sacct_state
from tests.integration.test_submit import CONFIG, TINY, _final, _mlflow_runs, _resumed_steps, _wait_for
from tests.slurm_cluster import SCRIPT, multi_partition

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(600)]

NODE_RE = re.compile(r"rank (\d+) \(local rank (\d+)\) on host (\S+): MASTER_ADDR (\S+) = (\S+); process group on "
                     r"interface (\S+) \((\S+), ([^)]*)\)")
PLAN_RE = re.compile(r"step (\d+): pruned \d+ channels and \d+ blocks in \S+ \(plan (\w+)\)")


@pytest.fixture(scope="module")
def root(tmp_path_factory, slurm_cluster) -> Path:
    multi_partition()
    root = tmp_path_factory.mktemp("multinode")
    return root


def _overrides(root: Path, name: str, tasks_per_node: int, *more: str) -> list[str]:
    return [*TINY, f"run.root={root / 'runs'}", f"launch.folder={root / 'submitit' / '%j'}", f"run.name={name}",
            f"launch.partition={multi_partition()}", "launch.nodes=2", f"launch.tasks_per_node={tasks_per_node}",
            "launch.cpus_per_task=1", "engine.kind=deepspeed", *more]


def _submit(root: Path, name: str, tasks_per_node: int = 1, *more: str) -> S.Submitted:
    launch, jobs = load_job(CONFIG, _overrides(root, name, tasks_per_node, *more))
    (sub,) = S.submit(launch, jobs)
    return sub


def _task_log(sub: S.Submitted, task: int) -> str:
    return Path(str(sub.job.paths.stderr).replace("_0_log.err", f"_{task}_log.err")).read_text()


def _node_record(text: str) -> tuple[int, int, str, str, str, str, str, str]:
    m = NODE_RE.search(text)
    assert m, text[-3000:]
    r, lr, host, master, master_ip, ifname, local_ip, why = m.groups()
    return int(r), int(lr), host, master, master_ip, ifname, local_ip, why


def _cluster(*args: str) -> None:
    r = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.fixture(scope="module")
def two_nodes(root) -> tuple[S.Submitted, list[dict]]:
    """2 nodes x 1 task, run to the end: the reference of the preemption test."""
    sub = _submit(root, "n2")
    return sub, sub.job.results()


@pytest.mark.parametrize("tasks_per_node", [1, 2])
def test_two_node_job_trains_prunes_and_agrees(root, two_nodes, tasks_per_node: int):
    if tasks_per_node == 1:
        sub, results = two_nodes
    else:
        sub = _submit(root, "n2x2", 2)
        results = sub.job.results()
    world = 2 * tasks_per_node
    table = ", ".join(f"{r}=pnode{1 + r // tasks_per_node}/10.77.0.{11 + r // tasks_per_node}" for r in range(world))
    assert len(results) == world
    summary = json.loads((sub.run_dir / "summary.json").read_text())
    assert summary["world_size"] == world and summary["steps"] == 40
    assert summary["prune_events"] > 0 and summary["macs"] < summary["macs_dense"]
    (run,) = _mlflow_runs(sub.tracking_uri, sub.run_name)  # one MLflow run
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == str(world)
    # the first rank of each node logs where it is, the interface it chose, and every plan it applied
    leaders = [0, tasks_per_node]
    plans = []
    for task, host, addr in zip(leaders, ("pnode1", "pnode2"), ("10.77.0.11", "10.77.0.12")):
        text = _task_log(sub, task)
        rank, local_rank, got_host, master, master_ip, ifname, local_ip, why = _node_record(text)
        assert (rank, local_rank, got_host) == (task, 0, host)
        assert (master, master_ip) == ("pnode1", "10.77.0.11")  # the first node's name, resolved on each node
        assert (ifname, local_ip, why) == ("clus0", addr, "route to 10.77.0.11")
        assert f"ranks: {table}" in text  # every rank's host, as each node sees it
        plans.append(PLAN_RE.findall(text))
    assert plans[0] and plans[0] == plans[1]  # both nodes applied the same plans at the same steps
    assert len(plans[0]) == summary["prune_events"]


def _task_pid(job_id: str, task: int, timeout: float = 60) -> int:
    """The pid of task ``task`` of job ``job_id`` (the python process submitit runs), from /proc."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                env = dict(kv.split("=", 1) for kv in (p / "environ").read_text().split("\0") if "=" in kv)
                cmd = (p / "cmdline").read_text()
            except OSError:
                continue
            if env.get("SLURM_JOB_ID") == job_id and env.get("SLURM_PROCID") == str(task) and "submitit" in cmd \
                    and "python" in cmd:
                return int(p.name)
        time.sleep(0.5)
    raise AssertionError(f"no process for task {task} of job {job_id}")


def test_preempted_two_node_job_resumes_identically(root, two_nodes):
    ref, _ = two_nodes
    sub = _submit(root, "n2pre")
    _wait_for((sub.run_dir / "checkpoints" / "step-00000010" / "manifest.json").exists, 300, "the first checkpoint")
    # as Slurm does: the signal reaches the first task only (rank 0 on pnode1)
    os.kill(_task_pid(str(sub.job.job_id), 0), signal.SIGUSR2)
    results = sub.job.results()
    assert len(results) == 2
    logs = [_task_log(sub, 0), _task_log(sub, 1)]
    stops = [[int(s) for s in re.findall(r"checkpoint of step (\d+) saved, stopping", t)] for t in logs]
    assert len(stops[0]) == 1 and stops[0] == stops[1], logs[0][-3000:]  # one agreed step, on both nodes
    assert "Requeued job" in logs[0]
    assert _resumed_steps(logs[0]) == stops[0]
    got, want = _final(sub), _final(ref)
    for key in ("top1", "macs", "params", "prune_events", "steps", "world_size", "train_macs"):
        assert got[0][key] == want[0][key], key
    assert got[1] == want[1] and got[2] == want[2]  # same final architecture, bit-identical weights
    (run,) = _mlflow_runs(sub.tracking_uri, sub.run_name)
    assert run.info.status == "FINISHED" and run.info.run_id == got[0]["run_id"]


def test_node_lost_mid_run_is_named_requeued_and_resumed(root):
    """The node goes silent (link cut, then every process killed: no FIN/RST reaches the survivor),
    so the survivor's collective times out.  The timeout (8 s; the loss is named about 15 s after the
    kill) is well below the cluster's SlurmdTimeout (30 s): the job itself, not Slurm's node-failure
    handling, finds and names the loss and requeues."""
    sub = _submit(root, "n2lost", 1, "engine.collective_timeout_s=8")
    first = sub.run_dir / "checkpoints" / "step-00000010"
    _wait_for((first / "manifest.json").exists, 300, "the first checkpoint")
    manifest = (first / "manifest.json").read_text()
    t0 = time.monotonic()
    _cluster("kill-node", "pnode2")
    try:
        _wait_for(lambda: "requeueing job" in _task_log(sub, 0), 90, "the survivor to requeue the job")
        took = time.monotonic() - t0
        text = _task_log(sub, 0)
        assert "rank 0 on host pnode1: lost contact with rank 1 on host pnode2 (10.77.0.12)" in text, text[-3000:]
        assert took < 60, took  # bounded: the collective timeout, the 5 s check-in, start-up slack
    finally:
        _cluster("up", "--nodes", "2")  # the node comes back
    summary = sub.job.task(0).result()
    text = _task_log(sub, 0)
    resumed = _resumed_steps(text)
    assert resumed and resumed[0] >= 10, text[-3000:]  # from its last complete checkpoint
    assert (first / "manifest.json").read_text() == manifest  # nothing checkpointed was lost
    assert summary["steps"] == 40 and summary["world_size"] == 2 and summary["prune_events"] > 0
    (run,) = _mlflow_runs(sub.tracking_uri, sub.run_name)  # the same MLflow run, finished
    assert run.info.status == "FINISHED" and run.info.run_id == summary["run_id"]


def test_node_lost_for_good_elastic_job_continues_on_one_node(root):
    """``launch.min_nodes=1``: the survivor requeues the job asking for the one node left; Slurm starts
    it once pnode2 is DOWN, and the run resumes 2 -> 1 ranks with the same global batch."""
    sub = _submit(root, "n2elastic", 1, "engine.collective_timeout_s=8", "launch.min_nodes=1")
    first = sub.run_dir / "checkpoints" / "step-00000010"
    _wait_for((first / "manifest.json").exists, 300, "the first checkpoint")
    _cluster("kill-node", "pnode2")
    try:
        summary = sub.job.task(0).result()  # the node stays down until the job is done
    finally:
        _cluster("up", "--nodes", "2")
    text = _task_log(sub, 0)
    assert "lost contact with rank 1 on host pnode2" in text, text[-3000:]
    assert "continues on 1 node(s) instead of 2 (launch.min_nodes=1)" in text
    assert "data.batch_size 16 -> 32 keeps the global batch 32" in text
    assert re.search(r"resumed from \S+step-000000[1-9]0: .* 2 ranks -> 1", text), text[-3000:]
    assert summary["world_size"] == 1 and summary["steps"] == 40 and summary["prune_events"] > 0
    assert continued_on_fewer(sub.job) == summary  # what launch.submit --wait reports
    (run,) = _mlflow_runs(sub.tracking_uri, sub.run_name)
    assert run.info.status == "FINISHED" and run.info.run_id == summary["run_id"]


def test_lost_rank_ends_the_job_without_requeue_on_failure(root):
    sub = _submit(root, "n2fail", 1, "launch.requeue_on_failure=false")
    _wait_for((sub.run_dir / "checkpoints" / "step-00000010" / "manifest.json").exists, 300, "the first checkpoint")
    os.kill(_task_pid(str(sub.job.job_id), 1), signal.SIGKILL)  # rank 1's process dies; its node stays
    with pytest.raises(Exception, match=r"lost contact with rank 1 on host pnode2"):
        sub.job.task(0).result()
    text = _task_log(sub, 0)
    assert "requeueing" not in text and f"job {sub.job.job_id} ends (launch.requeue_on_failure=false)" in text
    assert _sacct_state(str(sub.job.job_id)) == "FAILED"


def test_loopback_interface_from_the_environment_fails_fast_naming_it(root, monkeypatch):
    """A GLOO_SOCKET_IFNAME=lo exported from a one-host shell (sbatch passes the environment on)
    would hang the rendezvous until the collective timeout; every rank refuses it at once."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    t0 = time.monotonic()
    sub = _submit(root, "n2lo")
    for task, host in ((0, "pnode1"), (1, "pnode2")):
        with pytest.raises(Exception, match=f"host {host}: GLOO_SOCKET_IFNAME=lo is a loopback interface"):
            sub.job.task(task).result()
    assert time.monotonic() - t0 < 150
    assert not (sub.run_dir / "checkpoints").exists()


@pytest.mark.parametrize("override,key", [
    (["launch.nodes=3"], "launch.nodes"),                   # the partition has 2 nodes
    (["launch.tasks_per_node=3"], "launch.tasks_per_node"),  # 3 tasks x 1 CPU, the nodes have 2
    (["launch.gpus_per_node=1"], "launch.gpus_per_node"),    # the nodes have no GPU
    (["launch.min_nodes=3"], "launch.min_nodes"),            # above launch.nodes
    (["launch.min_nodes=1", "engine.kind=local"], "engine.kind"),  # one rank would not resume DeepSpeed's
    # 3 nodes x batch 3 = 9 would not split over the 2 ranks of a 2-node continuation (checked before the node count)
    (["launch.nodes=3", "launch.min_nodes=2", "data.batch_size=3"], "data.batch_size"),
])
def test_bad_multi_node_allocation_is_refused_naming_the_key(root, override: list[str], key: str):
    with pytest.raises(ConfigError) as err:
        launch, jobs = load_job(CONFIG, [*_overrides(root, "bad", 1), *override])
        S.submit(launch, jobs)
    assert err.value.key == key, str(err.value)
    # nothing submitted: Slurm never saw a job of that name (the queue itself changes with other tests' jobs)
    assert run_slurm("sacct", "-X", "-n", "-P", "--name", "bad", "-S", "now-1hour", "-o", "JobID").strip() == ""
