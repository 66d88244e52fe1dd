"""A user's day with run directories: no clobbering, resumes that never silently start over, one
writer per directory, and a clean Ctrl-C.  Real training processes (``python -m launch.train``),
real signals."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from system.runtime.rundir import LOCK, RunDirError, RunLock
from system.trainer import Trainer
from tests.methods_util import tiny_config
from tests.procs import wait_for_stderr

ROOT = Path(__file__).resolve().parents[2]
TINY_CLI = ["model.name=resnet20", "data.loader=synthetic", "data.synthetic_classes=4", "data.synthetic_samples=512",
            "data.batch_size=16", "data.train_size=16", "data.val_resize=16", "data.val_crop=16", "data.workers=0",
            "train.progress=false", "train.eval_batches=2", "tracking.enabled=false", "train.threads=1",
            "method.name=taylor", "method.taylor.check_every=3", "latency.repeats=3"]


def _digest(d: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in d.rglob("*") if p.is_file()):
        h.update(f.relative_to(d).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _cli(tmp_path: Path, *over: str, env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "launch.train", *TINY_CLI, f"run.root={tmp_path}", *over],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, **kw)


# ------------------------------------------------------------------------------------------ 1: no clobbering
def test_a_second_run_with_the_same_name_gets_its_own_directory(tmp_path):
    first = Trainer(tiny_config(tmp_path, "train.max_steps=6", "run.dir=", "run.name=demo"))
    first.run()
    before = _digest(tmp_path / "demo")
    second = Trainer(tiny_config(tmp_path, "train.max_steps=3", "run.dir=", "run.name=demo"))
    second.run()
    assert second.run_dir == tmp_path / "demo-v2"
    assert _digest(tmp_path / "demo") == before  # the earlier run is untouched
    assert json.loads((tmp_path / "demo-v2" / "summary.json").read_text())["steps"] == 3
    third = Trainer(tiny_config(tmp_path, "train.max_steps=3", "run.dir=", "run.name=demo"))
    assert third.run_dir == tmp_path / "demo-v3"
    # resuming continues the newest version of the name
    again = Trainer(tiny_config(tmp_path, "train.max_steps=3", "run.dir=", "run.name=demo", "run.resume=auto"))
    assert again.run_dir == tmp_path / "demo-v3"


def test_an_explicit_run_dir_holding_a_run_is_refused(tmp_path):
    Trainer(tiny_config(tmp_path, "train.max_steps=3")).run()
    before = _digest(tmp_path / "run")
    with pytest.raises(RunDirError) as err:
        Trainer(tiny_config(tmp_path, "train.max_steps=3"))
    assert "run.dir" in str(err.value) and str(tmp_path / "run") in str(err.value) and "finished" in str(err.value)
    assert _digest(tmp_path / "run") == before


# ------------------------------------------------------------------------------------------ 2: resume
@pytest.mark.parametrize("what", ["missing", "no_checkpoint"])
def test_an_explicit_resume_path_without_a_checkpoint_is_an_error(tmp_path, what):
    target = tmp_path / "ux-aa"
    if what == "no_checkpoint":
        target.mkdir()
    proc = _cli(tmp_path, "train.max_steps=3", f"run.dir={tmp_path / 'ux-a'}", f"run.resume={target}")
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert "run.resume" in err and str(target) in err
    assert ("does not exist" if what == "missing" else "no complete checkpoint") in err
    assert not (tmp_path / "ux-a" / "summary.json").exists()  # nothing trained


# ------------------------------------------------------------------------------------------ one writer
@pytest.mark.slow
def test_a_second_launch_into_a_live_run_is_refused_and_a_dead_holder_taken_over(tmp_path):
    run_dir = tmp_path / "live"
    common = [f"run.dir={run_dir}", "train.epochs=50", "checkpoint.every_steps=2", "run.resume=auto"]
    live = _cli(tmp_path, *common)
    try:
        wait_for_stderr(live, "step-00000002")
        second = _cli(tmp_path, *common)
        _, err = second.communicate(timeout=300)
        assert second.returncode == 2
        assert "in use by a live run" in err and f"pid {live.pid}" in err
        holder = json.loads((run_dir / LOCK).read_text())
        assert holder["pid"] == live.pid
    finally:
        live.kill()  # SIGKILL: the lock stays behind, its process gone
        live.wait()
    assert (run_dir / LOCK).exists()
    third = _cli(tmp_path, *common[:1], "train.max_steps=6", "checkpoint.every_steps=2", "run.resume=auto")
    _out, err = third.communicate(timeout=300)
    assert third.returncode == 0, err[-3000:]
    assert "taking over the stale lock" in err and f"pid {live.pid} is no longer running" in err
    assert "resumed from" in err
    assert not (run_dir / LOCK).exists()  # released at the end


def test_a_lock_of_another_host_is_stale_only_without_a_heartbeat(tmp_path):
    lock = tmp_path / LOCK
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "slurm_job_id": "", "restart": 0, "started": 0.0}))
    with pytest.raises(RunDirError, match="host elsewhere, pid 1"):
        RunLock(tmp_path, stale_after_s=60).acquire()
    old = time.time() - 120
    os.utime(lock, (old, old))
    mine = RunLock(tmp_path, stale_after_s=60)
    mine.acquire()
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    mine.release()
    assert not lock.exists()


# ------------------------------------------------------------------------------------------ 6: Ctrl-C
@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_says_how_to_resume_and_exits_130(tmp_path):
    run_dir = tmp_path / "ctrlc"
    proc = _cli(tmp_path, f"run.dir={run_dir}", "train.epochs=50", "checkpoint.every_steps=4")
    wait_for_stderr(proc, "step-00000004")
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    line = [ln for ln in err.splitlines() if ln.startswith("interrupted: stopped after step")]
    assert len(line) == 1
    step = int(line[0].split("step ")[1].split(",")[0])
    assert step >= 4 and (run_dir / "checkpoints" / f"step-{step:08d}" / "manifest.json").is_file()
    assert not (run_dir / LOCK).exists()
    # the printed command resumes the run (capped here so the test ends)
    cmd = line[0].split("resume with: ", 1)[1]
    assert f"run.dir={run_dir}" in cmd and "run.resume=auto" in cmd
    resumed = subprocess.run(cmd + f" train.max_steps={step + 2}", shell=True, cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{step:08d}'}" in resumed.stderr
    assert json.loads(resumed.stdout)["steps"] == step + 2


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once(tmp_path):
    run_dir = tmp_path / "twice"
    # no periodic checkpoints; the first stop's own checkpoint write, slowed to 60 s, is under way when the
    # second SIGINT lands: a process that waited for the write would take a minute, one that stops at once seconds
    proc = _cli(tmp_path, f"run.dir={run_dir}", "train.epochs=50", "checkpoint.every_steps=0",
                "checkpoint.at_epoch_end=false", "train.eval_every_steps=2", env={"PARSIMONY_CKPT_WRITE_DELAY": "60"})
    wait_for_stderr(proc, "step 2: val top1")
    proc.send_signal(signal.SIGINT)
    time.sleep(1.0)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and time.monotonic() - t0 < 30
    assert "interrupted again: stopped at once" in err and "Traceback" not in err
    # the interrupted write left no checkpoint behind that claims to be whole
    assert not list((run_dir / "checkpoints").glob("step-*"))
