"""launch.submit on the real local Slurm cluster: multi-task training, preemption, requeue, arrays, bad input.

Every job trains ResNet-20 on the embedded Fashion-MNIST shards for 40 steps on CPU with Taylor
pruning (it prunes at steps 6, 9, 12, 15, 18), a checkpoint every 10 steps, and records into the
embedded MLflow store of a runs root shared by the module.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from launch import submitting as S
from launch.config import LaunchConfig, load_job
from launch.slurm_cmd import run_slurm
from launch.slurm_job import same_global_batch
from system.config import ConfigError

# generous: on a loaded 2-core machine a 2-task job took 3x longer than alone (see docs/slurm.md)
slurm = pytest.mark.slurm
slow = pytest.mark.slow
timeout = pytest.mark.timeout(480)

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "demo.yaml"
TINY = ["model.name=resnet20", "data.batch_size=16", "data.workers=0", "train.max_steps=40", "train.eval_batches=2",
        "train.progress=false", "train.log_every_steps=5", "train.device=cpu",
        "method.name=taylor", "method.taylor.check_every=3", "method.taylor.start_frac=0.1",
        "method.taylor.stop_frac=0.7", "method.taylor.per_step=40", "method.taylor.keep_ratio=0.5",
        "method.target_macs=null",  # the demo recipe's budget would override keep_ratio
        "checkpoint.every_steps=10", "checkpoint.keep_last=10", "launch.time_min=20",
        "latency.repeats=3"]  # the final timing at its minimum: tests read its figures, not their precision
TWO_TASKS = ["engine.kind=deepspeed", "launch.tasks_per_node=2", "launch.cpus_per_task=1"]
ONE_TASK = ["engine.kind=local", "launch.tasks_per_node=1", "launch.cpus_per_task=1"]


@pytest.fixture(scope="module")
def root(tmp_path_factory, slurm_cluster) -> Path:
    """Runs root of the module (its embedded MLflow store is created by the first run)."""
    root = tmp_path_factory.mktemp("submit")
    return root


def _submit(root: Path, *overrides: str, sweeps: list[str] | None = None) -> list[S.Submitted]:
    launch, jobs = load_job(CONFIG, [*TINY, f"run.root={root / 'runs'}", f"launch.folder={root / 'submitit' / '%j'}",
                                     *overrides], sweeps)
    return S.submit(launch, jobs)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def _log(sub: S.Submitted) -> str:
    return Path(sub.job.paths.stderr).read_text()


def _resumed_steps(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"resumed from \S+: step (\d+)", text)]


def _mlflow_runs(uri: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, filter_string=f"attributes.run_name = '{name}'")


def _final(sub: S.Submitted) -> tuple[dict, str, bytes]:
    final = sub.run_dir / "final"
    return (json.loads((sub.run_dir / "summary.json").read_text()), (final / "spec.json").read_text(),
            (final / "model.safetensors").read_bytes())


@pytest.fixture(scope="module")
def uninterrupted(root) -> tuple[S.Submitted, list[dict]]:
    """A 2-task job that runs to the end (the reference of the preemption test)."""
    (sub,) = _submit(root, *TWO_TASKS, "run.name=ref")
    return sub, sub.job.results()


@slurm
@slow
@timeout
def test_two_task_job_trains_and_prunes(uninterrupted):
    sub, results = uninterrupted
    assert len(results) == 2  # one result per task
    summary = json.loads((sub.run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["steps"] == 40
    assert summary["prune_events"] > 0 and summary["macs"] < summary["macs_dense"]
    assert results[0]["run_id"] == summary["run_id"]
    (run,) = _mlflow_runs(sub.tracking_uri, sub.run_name)
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    text = _log(sub)
    assert "rank 0 of 2" in text and "process group up: rank 0 of 2" in text
    # the job's log ends with the result (the summary), as the CLI prints it
    logged = re.search(r"run \S+ finished: (\{.*\})$", text, re.M)
    assert logged and json.loads(logged.group(1))["run_id"] == summary["run_id"]


@slurm
@slow
@timeout
def test_preemption_resumes_and_matches_uninterrupted(root, uninterrupted):
    ref, _ = uninterrupted
    (sub,) = _submit(root, *TWO_TASKS, "run.name=preempted")
    first = sub.run_dir / "checkpoints" / "step-00000010"
    _wait_for(first.exists, 300, "the first checkpoint")
    sub.job._interrupt()  # what Slurm does on preemption: SIGTERM, then USR2
    results = sub.job.results()
    assert len(results) == 2
    text = _log(sub)
    # the signal set a flag; both ranks stopped at the same step and saved together, then requeue + resume
    stops = [int(s) for s in re.findall(r"checkpoint of step (\d+) saved, stopping", text)]
    assert len(stops) == 1 and 10 <= stops[0] < 20, text[-3000:]  # at most one interval of work lost
    rank1 = Path(str(sub.job.paths.stderr).replace("_0_log.err", "_1_log.err")).read_text()
    assert f"checkpoint of step {stops[0]} saved, stopping" in rank1
    manifest = json.loads((sub.run_dir / "checkpoints" / f"step-{stops[0]:08d}" / "manifest.json").read_text())
    # (a signal landing right after the step-10 save is agreed at step 10: that checkpoint is reused)
    assert manifest["reason"] in (("preempted",) if stops[0] > 10 else ("every_steps", "preempted"))
    assert manifest["world_size"] == 2
    assert "Requeued job" in text
    assert _resumed_steps(text) == [stops[0]]
    # same architecture, metrics and weights as the uninterrupted job
    got, want = _final(sub), _final(ref)
    for key in ("top1", "top5", "val_loss", "macs", "params", "prune_events", "channels_removed", "steps",
                "world_size", "train_macs"):
        assert got[0][key] == want[0][key], key
    assert got[1] == want[1]  # final spec
    assert got[2] == want[2]  # bit-identical final weights
    # one MLflow run, continued after the requeue, finished
    (run,) = _mlflow_runs(sub.tracking_uri, sub.run_name)
    assert run.info.status == "FINISHED" and run.info.run_id == got[0]["run_id"]


@slurm
@slow
@timeout
def test_external_requeue_resumes_from_checkpoint(root):
    (sub,) = _submit(root, *ONE_TASK, "run.name=requeued")
    _wait_for((sub.run_dir / "checkpoints" / "step-00000010").exists, 300, "the first checkpoint")
    subprocess.run(["scontrol", "requeue", str(sub.job.job_id)], check=True, capture_output=True)
    summary = sub.job.result()
    text = _log(sub)
    resumed = _resumed_steps(text)
    assert resumed and resumed[0] >= 10, text[-3000:]  # from its newest checkpoint, not from scratch
    assert "restart 1" in text
    assert summary["steps"] == 40 and summary["prune_events"] > 0
    (run,) = _mlflow_runs(sub.tracking_uri, sub.run_name)
    assert run.info.status == "FINISHED"


@slurm
@slow
@timeout
def test_job_array_two_runs_listed_by_compare(root):
    subs = _submit(root, *ONE_TASK, "run.name=sweep", "train.max_steps=20", "checkpoint.every_steps=0",
                   sweeps=["method.taylor.keep_ratio=0.5,0.7"])
    assert len(subs) == 2
    ids = [str(s.job.job_id) for s in subs]
    assert len({i.split("_")[0] for i in ids}) == 1 and {i.split("_")[1] for i in ids} == {"0", "1"}  # one array
    assert len({s.run_name for s in subs}) == 2
    for s in subs:
        s.job.result()
    out = subprocess.run([sys.executable, "-m", "launch.compare", "--runs-root", str(root / "runs"), "--json"],
                         capture_output=True, text=True, check=True, cwd=REPO)
    rows = {r["run_name"]: r for r in json.loads(out.stdout)}
    for s in subs:
        assert s.run_name in rows, (s.run_name, sorted(rows))
    got = [rows[s.run_name] for s in subs]
    assert got[0]["macs"] < got[1]["macs"]  # keep_ratio 0.5 prunes more than 0.7


def _jobs_submitted_since(t0: datetime.datetime) -> list[str]:
    """The jobs Slurm accounts as submitted at or after ``t0`` (by submit time: a job of an earlier test whose
    record reaches slurmdbd late is not counted, as a plain count of recent jobs did)."""
    out = run_slurm("sacct", "-X", "-n", "-a", "-P", "-o", "JobID,Submit", "-S", "now-1hour")
    jobs = (line.split("|") for line in out.splitlines() if "|" in line)
    return [j for j, submit in jobs if datetime.datetime.fromisoformat(submit) >= t0]


def _now() -> datetime.datetime:
    return datetime.datetime.now().replace(microsecond=0)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.submit", "--config", str(CONFIG), *args],
                          capture_output=True, text=True, cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)},
                          timeout=240)


@slurm
@slow
@timeout
@pytest.mark.parametrize("override,key", [
    ("launch.partition=nope", "launch.partition"),
    ("launch.tasks_per_node=2", "launch.tasks_per_node"),   # with launch.gpus_per_node=1 below
    ("launch.cpus_per_task=3", "launch.cpus_per_task"),     # 3 CPUs per task, the node has 2
    ("launch.slurm_extra={bogus-option: 1}", "launch.slurm_extra"),
    ("launch.gpus_per_node=1", "launch.gpus_per_node"),     # the local node has no GPU
])
def test_bad_input_fails_before_submission(root, override, key):
    overrides = [override]
    if override == "launch.tasks_per_node=2":
        overrides.append("launch.gpus_per_node=1")
    folder = root / f"bad-{key}"
    t0 = _now()
    with pytest.raises(ConfigError) as err:
        _submit(root, *ONE_TASK, *overrides, f"launch.folder={folder}")
    assert err.value.key == key, str(err.value)
    assert _jobs_submitted_since(t0) == [] and not folder.exists()  # nothing submitted


@slurm
@slow
@timeout
def test_cli_bad_partition_and_failed_job(root):
    bad = _cli("launch.partition=nope", f"run.root={root / 'runs'}", cwd=root)
    assert bad.returncode == 2
    assert "launch.partition" in bad.stderr and "nothing was submitted" in bad.stderr
    assert "debug" in bad.stderr  # names the partitions the cluster has
    # a job that fails inside: the shard folder does not exist
    failed = _cli(*TINY, *ONE_TASK, "data.root=/nonexistent/shards", f"run.root={root / 'runs'}",
                  f"launch.folder={root / 'failed' / '%j'}", "--wait", cwd=root)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert re.search(r"^job \d+: run ", failed.stdout, re.M)  # printed the job id before waiting
    # the submit-time check warned (the path may exist on the cluster's nodes), and --wait showed states
    assert "warning: data.root: /nonexistent/shards does not exist on this host" in failed.stderr
    states = re.findall(r"^job \d+ \(\S+\): (\w+)$", failed.stdout, re.M)
    assert states and states[-1] in ("FAILED", "COMPLETED") and len(states) == len(dict.fromkeys(states))
    assert "mlflow    sqlite:///" in failed.stdout
    assert "FAILED" in failed.stderr and "/nonexistent/shards" in failed.stderr
    err_log = re.search(r"stderr: (\S+)", failed.stderr).group(1)
    assert Path(err_log).is_file() and "/nonexistent/shards" in Path(err_log).read_text()


@slurm
@timeout
def test_wait_asks_the_scheduler_at_every_poll(root, monkeypatch):
    """``--wait`` sees a job that ended without a result file (cancelled here; a process that died is the same)
    at its next poll.  Submitit's own check reads its cached state, refreshed only every min(600 s, half the
    time since the last submission): such a job was seen done up to a minute late after a minute (ten on a long job)."""
    from launch import waiting

    (sub,) = _submit(root, *ONE_TASK, "run.name=cancelled-while-running")

    def scheduler() -> str:
        return run_slurm("sacct", "-n", "-X", "-P", "-j", str(sub.job.job_id), "-o", "State").strip()

    # asked as submitit's own wait() asks, meanwhile: its answer lags the scheduler's
    _wait_for(lambda: (sub.job.done(), scheduler())[1] == "RUNNING", 240, "the job to start")
    run_slurm("scancel", str(sub.job.job_id))
    _wait_for(lambda: (sub.job.done(), scheduler())[1].startswith("CANCELLED"), 60, "the job to end")
    polls: list[float] = []  # the waits of launch.waiting (submitit's own, for the result file, run as they do)
    monkeypatch.setattr(waiting, "time", SimpleNamespace(sleep=polls.append, monotonic=time.monotonic))
    assert waiting.wait([sub], poll_s=5) == 1
    assert polls == []  # seen ended at the first look, without a poll's sleep


def _continue(cmd: str, root: Path, *more: str) -> subprocess.CompletedProcess:
    """Run a printed ``parsimony-submit --resume ...`` command (as ``python -m launch.submit``)."""
    args = shlex.split(cmd)
    assert args[0] == "parsimony-submit" and args[1] == "--resume", cmd
    return subprocess.run([sys.executable, "-m", "launch.submit", *args[1:], *more], capture_output=True, text=True,
                          cwd=root, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=400)


def _run_id(run_dir: Path, step: int) -> str:
    manifest = json.loads((run_dir / "checkpoints" / f"step-{step:08d}" / "manifest.json").read_text())
    return manifest["parts"]["tracking"]["run_id"]


@slurm
@slow
@timeout
def test_a_failed_job_continues_in_a_new_job(root):
    """After an in-job failure, --wait prints the error line and the command that continues it; that command's
    job continues the same run directory and MLflow run from the newest checkpoint.  (After ``scancel``:
    tests/integration/test_imagenet_walkthrough.py, with the real ImageNet recipe.)"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PARSIMONY_STOP_AFTER_STEP": "10"}  # the job dies after step 10
    failed = subprocess.run([sys.executable, "-m", "launch.submit", "--config", str(CONFIG), *TINY, *ONE_TASK,
                             "run.name=failing", f"run.root={root / 'runs'}", f"launch.folder={root / 'f' / '%j'}",
                             "--wait", "--poll", "1"], capture_output=True, text=True, cwd=root, env=env, timeout=400)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    # whole lines: submitit's (no result, the job's state) and how the task ended, never a cut tail
    assert re.search(r"FAILED: Job \d+ \(task: 0\) .* has not produced any output \(state: FAILED\)$",
                     failed.stderr, re.M), failed.stderr
    assert re.search(r"^  srun: error: .*Exited with exit code 75$", failed.stderr, re.M), failed.stderr
    cmd = re.search(r"continue it from its last checkpoint: (.*)", failed.stderr).group(1)
    run_dir = Path(re.search(r"run dir +(\S+)", failed.stdout).group(1))
    assert f"--resume {run_dir}" in cmd and not (run_dir / "summary.json").exists()
    # the job's own log: its last line names the error, the run directory and the continue command
    job_log = Path(re.search(r"stderr: (\S+)", failed.stderr).group(1)).read_text()
    last = [ln for ln in job_log.splitlines() if "[rank 0]" in ln][-1]
    d = re.escape(str(run_dir))
    assert re.search(rf"run {re.escape(run_dir.name)} failed: InjectedStop: 75; run dir {d}; continue it: "
                     rf"parsimony-submit --resume {d} --config \S+demo\.yaml", last), last
    done = _continue(cmd, root, f"launch.folder={root / 'f2' / '%j'}", "--wait", "--poll", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"run dir   {run_dir}" in done.stdout  # the same directory, the same name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["run_id"] == _run_id(run_dir, 10)
    log = next((root / "f2").rglob("*_0_log.err")).read_text()
    assert _resumed_steps(log) == [10], log[-3000:]
    (run,) = _mlflow_runs(f"sqlite:///{root / 'runs' / 'mlflow.db'}", run_dir.name)
    assert run.info.status == "FINISHED" and run.info.run_id == summary["run_id"]


def test_launch_section_is_not_part_of_the_run_config(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {CONFIG}\nlaunch:\n  tasks_per_node: 2\n  sweep:\n    optim.lr: [0.1, 0.2]\n")
    launch, jobs = load_job(recipe, ["launch.nodes=1", "train.max_steps=3"])
    assert launch == LaunchConfig(tasks_per_node=2, sweep={"optim.lr": [0.1, 0.2]})
    assert [j.cfg.optim.lr for j in jobs] == [0.1, 0.2] and jobs[0].cfg.train.max_steps == 3
    assert not hasattr(jobs[0].cfg, "launch")
    with pytest.raises(ConfigError, match="launch.nodez"):
        load_job(recipe, ["launch.nodez=2"])
    with pytest.raises(ConfigError, match="launch.sweep.optim.lr"):
        load_job(recipe, [], ["optim.lr=0.1,-1"])
    with pytest.raises(ConfigError, match="launch.cluster"):
        load_job(recipe, ["launch.cluster=debug"])  # 2 tasks cannot run in-process


def test_elastic_continuation_keeps_the_global_batch():
    """What a job submitted on 2 x 2 ranks runs with when it continues on fewer (launch.min_nodes)."""
    import dataclasses

    launch, (job,) = load_job(CONFIG, ["launch.nodes=2", "launch.tasks_per_node=2", "launch.min_nodes=1",
                                       "data.batch_size=16"])
    assert launch.elastic and launch.num_tasks == 4 and not LaunchConfig(nodes=2, min_nodes=2).elastic
    on_two = same_global_batch(job.cfg, 4, 2)
    assert on_two.data.batch_size == 32 and on_two.engine.global_batch == 0
    fixed = dataclasses.replace(job.cfg, engine=dataclasses.replace(job.cfg.engine, global_batch=64))
    assert same_global_batch(fixed, 4, 1).engine.global_batch == 64  # an explicit global batch stays explicit
    assert same_global_batch(fixed, 4, 1).data.batch_size == 64
    with pytest.raises(ConfigError, match="data.batch_size.*64 is not divisible by 3"):
        same_global_batch(job.cfg, 4, 3)


def test_stop_request_saves_at_the_agreed_step_and_resume_is_exact(tmp_path):
    """Without Slurm: a stop request mid-run saves at the next step, raises Preempted; resuming equals
    the uninterrupted run."""
    from system.config import load_config
    from system.run_config import RunConfig
    from system.runtime import preemption
    from system.trainer import Trainer
    from tests.ckpt_scripts.harness import BASE, TAYLOR

    trained: dict[str, list[int]] = {}  # the steps each call trained, and where it resumed from
    resumed_from: dict[str, int | None] = {}

    def train(name: str, stop_at: int = 0) -> dict:
        cfg = load_config(RunConfig, None, [*BASE, *TAYLOR, "checkpoint.every_steps=0", f"run.root={tmp_path}",
                                            f"run.name={name}", "run.resume=auto"])
        tr = Trainer(cfg)
        inner = tr.train_step
        trained[name] = []
        ck = tr.checkpointer.resumed_from
        resumed_from[name] = None if ck is None else ck.step

        def step(x, y):
            trained[name].append(tr.state.step)
            loss = inner(x, y)
            if tr.state.step == stop_at:
                preemption.request_stop("test")
            return loss

        tr.train_step = step
        return tr.run()

    try:
        preemption.watch()
        with pytest.raises(preemption.Preempted) as stop:
            train("p", stop_at=7)
        assert stop.value.step == 7
        manifest = json.loads((tmp_path / "p" / "checkpoints" / "step-00000007" / "manifest.json").read_text())
        assert manifest["reason"] == "preempted"
        preemption.reset()
        preemption.watch()
        resumed = train("p")
        preemption.reset()
        plain = train("u")
    finally:
        preemption.reset()
    # the second call continued from the step-7 checkpoint and trained only the steps after it
    assert resumed_from == {"p": 7, "u": None} and trained["p"] == list(range(7, plain["steps"]))
    for key in ("top1", "val_loss", "macs", "params", "prune_events", "steps"):
        assert resumed[key] == plain[key], key
    assert (tmp_path / "p" / "final" / "spec.json").read_text() == (tmp_path / "u" / "final" / "spec.json").read_text()


@slurm
@slow
@timeout
@pytest.mark.parametrize("overrides,key", [
    (["engine.kind=deepspeed", "launch.tasks_per_node=2", "engine.zero_stage=2"], "engine.zero_stage"),
    (["method.name=variational", "model.zero_init_residual=true"], "method.name"),
    (["train.precision=bf16"], "launch.gpus_per_node"),  # the allocation has no GPU
])
def test_dry_run_runs_the_checks_a_job_would_fail_inside(root, overrides, key):
    t0 = _now()
    out = _cli(*TINY, *ONE_TASK, *overrides, f"run.root={root / 'runs'}", f"launch.folder={root / 'dry' / '%j'}",
               "--dry-run", cwd=root)
    assert out.returncode == 2 and f"config key '{key}'" in out.stderr, out.stdout + out.stderr
    assert "nothing was submitted" in out.stderr and _jobs_submitted_since(t0) == []


@slurm
@slow
@timeout
def test_dry_run_prints_the_real_command_and_warns_about_the_data(root):
    out = _cli(*TINY, *ONE_TASK, "data.root=/nonexistent/shards", f"run.root={root / 'runs'}",
               f"launch.folder={root / 'dry' / '%j'}", "--dry-run", cwd=root)
    assert out.returncode == 0, out.stderr
    assert "warning: data.root: /nonexistent/shards does not exist on this host" in out.stderr
    srun = [ln for ln in out.stdout.splitlines() if ln.startswith("srun")]
    assert srun and "-m submitit.core._submit" in srun[0] and not srun[0].rstrip().endswith(" true")
    # the command a task runs: one key a line, only those off their default, run.resume once
    text = out.stdout.replace("\\\n", " ")
    cmd = [ln.strip() for ln in text.splitlines() if "-m launch.train" in ln]
    assert cmd and "data.root=/nonexistent/shards" in cmd[0] and "method.name=taylor" in cmd[0]
    assert cmd[0].count("run.resume=") == 1 and "train.precision=fp32" not in cmd[0]
    # the printed command line is the same run config (it parses back to it)
    from launch.train import load
    cfg = load(None, shlex.split(cmd[0])[3:])
    _, [job] = load_job(CONFIG, [*TINY, *ONE_TASK, "data.root=/nonexistent/shards", f"run.root={root / 'runs'}"])
    want = S.resolve_paths(job).cfg
    assert cfg == dataclasses.replace(want, run=dataclasses.replace(want.run, resume="auto"))
