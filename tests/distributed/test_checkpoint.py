"""Checkpoints: exact resume (also right after a pruning event), faults, safe loading, inspect, elastic N -> M.

The fast tests run the trainer in this process on a small synthetic recipe
(tests/ckpt_scripts/harness.py) and interrupt it with ``PARSIMONY_STOP_AFTER_STEP``, which saves
and stops without changing any schedule.  The slow ones start real processes: SIGKILL in the middle
of a checkpoint write, and 2 -> 1 / 1 -> 2 ranks under DeepSpeed on gloo.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from system.models.resnet import build_model
from system.pruning.complexity import count
from system.runtime.checkpoint import (
    ENV_STOP,
    ENV_WRITE_DELAY,
    MANIFEST,
    CheckpointError,
    find_resumable,
    list_checkpoints,
    manifest_digest,
    sha256_of,
    verify,
)
from system.runtime.engine import saved_model_weights
from tests.ckpt_scripts.harness import TAYLOR, VARIATIONAL, WDS, record
from tests.net import free_port

ROOT = Path(__file__).resolve().parents[2]
STEPS = 24  # 2 epochs x 12 steps


def _chain(tmp_path: Path, overrides: list[str], stops: list[int], monkeypatch) -> list[dict]:
    """Run to the end, stopping (save + exit) after each step in ``stops`` and resuming with auto."""
    parts = []
    for stop in stops + [0]:
        if stop:
            monkeypatch.setenv(ENV_STOP, str(stop))
        else:
            monkeypatch.delenv(ENV_STOP, raising=False)
        parts.append(record(overrides + [f"run.dir={tmp_path / 'resumed'}", "run.resume=auto"]))
    return parts


def _assert_same_run(full: dict, parts: list[dict], stops: list[int]) -> None:
    losses = [lp for p in parts for lp in p["losses"]]
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))
    assert losses == full["losses"]  # bit-for-bit equal floats
    assert [q for p in parts for q in p["positions"]] == full["positions"]
    assert [p["stopped"] for p in parts] == stops + [None]
    assert [p["resumed_from"] for p in parts] == [None] + stops
    assert parts[-1]["events"] == full["events"]  # pruning plans (digests) carried through the checkpoints
    assert parts[-1]["summary"]["macs"] == full["summary"]["macs"]
    w_full, w_res = full["weights"], parts[-1]["weights"]
    assert w_full.keys() == w_res.keys()
    for k in w_full:
        assert torch.equal(w_full[k], w_res[k]), k


@pytest.mark.parametrize("method, stops", [
    (TAYLOR, [6, 12, 13]),  # 6, 12: right after a pruning event (12 is also the epoch's last step)
    (VARIATIONAL, [5, 14, 19]),  # sampled gates (RNG); 14: right after a pruning event of the rule
], ids=["taylor", "variational"])
def test_interrupted_run_equals_uninterrupted(tmp_path, monkeypatch, method, stops):
    monkeypatch.delenv(ENV_STOP, raising=False)
    full = record(method + [f"run.dir={tmp_path / 'full'}"])
    assert full["events"], "the recipe must prune"
    assert any(step in stops for step, _ in full["events"]), "a stop must fall right after a pruning event"
    parts = _chain(tmp_path, method, stops, monkeypatch)
    _assert_same_run(full, parts, stops)
    # the last resumed part rebuilt the pruned architecture from the spec
    assert parts[-1]["summary"]["macs_pct"] < 100.0


def test_real_data_resume_mid_epoch(tmp_path, monkeypatch):
    """The WebDataset loader on the demo JPEGs resumes mid-epoch exactly (start_batch)."""
    over = TAYLOR + WDS + ["data.batch_size=64", "train.epochs=1", "train.max_steps=6", "checkpoint.every_steps=0"]
    monkeypatch.delenv(ENV_STOP, raising=False)
    full = record(over + [f"run.dir={tmp_path / 'full'}"])
    parts = _chain(tmp_path, over, [3], monkeypatch)
    assert [lp for p in parts for lp in p["losses"]] == full["losses"]
    assert parts[-1]["events"] == full["events"] and full["events"]
    for k, v in full["weights"].items():
        assert torch.equal(v, parts[-1]["weights"][k]), k


# ------------------------------------------------------------------------------------ layout
@pytest.fixture
def stopped_run(tmp_path, monkeypatch):
    """A run stopped after step 8 with checkpoints at 4 and 8 (Taylor pruned at 3 and 6)."""
    monkeypatch.setenv(ENV_STOP, "8")
    rec = record(TAYLOR + [f"run.dir={tmp_path / 'run'}"])
    monkeypatch.delenv(ENV_STOP)
    assert rec["stopped"] == 8
    return tmp_path / "run"


def test_layout_latest_keep_last_and_manifest(stopped_run):
    root = stopped_run / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-00000008"
    infos = list_checkpoints(stopped_run)
    assert [c.step for c in infos] == [4, 8]
    c = verify(root / "step-00000008")
    m = c.manifest
    assert (m["step"], m["epoch"], m["batch"], m["world_size"], m["global_batch"]) == (8, 0, 8, 1, 32)
    assert m["config"]["method"]["name"] == "taylor" and m["parts"]["loop"]["step"] == 8
    assert [e["step"] for e in m["parts"]["coordinator"]["events"]] == [3, 6]
    assert set(m["files"]) == {"spec.json", "engine_state.pt", "method_rank0.pt", "rng_rank0.pt",
                               "buffers_rank0.pt"}
    assert count(c.spec)[0] < count(infos[0].spec)[0]  # pruned between 4 and 8
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())


def test_keep_last(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_STOP, "13")
    record(TAYLOR + [f"run.dir={tmp_path}", "checkpoint.every_steps=2", "checkpoint.keep_last=2"])
    assert [c.step for c in list_checkpoints(tmp_path)] == [12, 13]


def _measured(ckpt_dir: Path, spec) -> tuple[int, int]:
    """``(MACs, params)`` of a checkpoint counted without :func:`count`: the parameters are the saved
    weights' (convs, BatchNorms, classifier; no gate, no running statistic), the MACs torch's FLOP counter's
    tally of a forward of the network the spec builds, whose every tensor must have the saved one's shape."""
    weights = saved_model_weights(ckpt_dir)
    model = build_model(spec, gates=False).eval()
    own = model.state_dict()
    assert set(own) <= set(weights) and all(own[k].shape == weights[k].shape for k in own)
    params = sum(v.numel() for k, v in weights.items() if k in own and k.endswith((".weight", ".bias")))
    with torch.no_grad(), FlopCounterMode(display=False) as flops:  # torch's own tally: 2 FLOPs a MAC
        model(torch.zeros(1, spec.in_channels, spec.input_size, spec.input_size))
    return flops.get_total_flops() // 2, params


def test_inspect_lists_checkpoints(stopped_run, capsys):
    from launch.inspect import main

    assert main([str(stopped_run), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    cks = rec["checkpoints"]
    assert [c["step"] for c in cks] == [4, 8]
    for c, info in zip(cks, list_checkpoints(stopped_run)):
        # counted apart from the spec's formula: from the saved weights and a forward of the network
        assert (c["macs"], c["params"]) == _measured(info.path, info.spec)
    assert cks[1]["macs"] < cks[0]["macs"]
    assert main([str(stopped_run)]) == 0
    table = capsys.readouterr().out
    assert "checkpoints:" in table and "step        8" in table and "MACs" in table


# ------------------------------------------------------------------------------------ faults
def _truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def _edit_manifest(p: Path) -> None:
    m = json.loads(p.read_text())
    m["step"] = 7
    p.write_text(json.dumps(m))


@pytest.mark.parametrize("fault, file, message", [
    (_truncate, "engine_state.pt", "engine_state.pt.*truncated"),
    (_flip, "method_rank0.pt", "method_rank0.pt.*sha256"),
    (_flip, "spec.json", "spec.json.*sha256"),
    (lambda p: p.unlink(), "rng_rank0.pt", "rng_rank0.pt.*missing"),
    (_edit_manifest, MANIFEST, "manifest.json.*digest"),
    (_truncate, MANIFEST, "manifest.json.*not valid JSON"),
    (lambda p: p.unlink(), MANIFEST, "no manifest.json"),
], ids=["truncated-weights", "tampered-method", "tampered-spec", "missing-rng", "edited-manifest",
        "truncated-manifest", "no-manifest"])
def test_damaged_checkpoint_refused_and_auto_falls_back(stopped_run, caplog, fault, file, message):
    bad = stopped_run / "checkpoints" / "step-00000008"
    fault(bad / file)
    with pytest.raises(CheckpointError, match=message):
        find_resumable(bad)
    with caplog.at_level(logging.WARNING, logger="system.runtime.checkpoint"):
        assert find_resumable(stopped_run).step == 4
    assert "step-00000008" in caplog.text and "falling back" in caplog.text
    # explicit path: refused with a clear error; auto: resumes from step 4 and finishes
    with pytest.raises(CheckpointError, match=message):
        record(TAYLOR + [f"run.dir={stopped_run}", f"run.resume={bad}"])
    rec = record(TAYLOR + [f"run.dir={stopped_run}", "run.resume=auto"])
    assert rec["resumed_from"] == 4 and rec["losses"][0][0] == 5 and rec["summary"]["steps"] == STEPS


def test_all_checkpoints_damaged_is_an_error(stopped_run):
    for d in (stopped_run / "checkpoints").glob("step-*"):
        _flip(d / "engine_state.pt")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        find_resumable(stopped_run)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("file", ["method_rank0.pt", "engine_state.pt"])
def test_loading_never_unpickles_objects(stopped_run, tmp_path, monkeypatch, file):
    """A consistent (re-hashed) checkpoint carrying a pickled object is refused, the object never built
    (engine files are screened with weights_only before the engine, which may unpickle, sees them)."""
    bad = stopped_run / "checkpoints" / "step-00000008"
    torch.save({"model": _Payload()}, bad / file)
    m = json.loads((bad / MANIFEST).read_text())
    m["files"][file] = {"sha256": sha256_of(bad / file), "bytes": (bad / file).stat().st_size}
    m["manifest_sha256"] = manifest_digest(m)
    (bad / MANIFEST).write_text(json.dumps(m))
    assert verify(bad).step == 8
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=f"{file}.*plain tensors"):
        record(TAYLOR + [f"run.dir={stopped_run}", f"run.resume={bad}"])
    assert not (tmp_path / "PWNED").exists()


def test_resume_with_other_global_batch_refused(stopped_run):
    with pytest.raises(CheckpointError, match="global batch of 32.*data.batch_size=32"):
        record(TAYLOR + [f"run.dir={stopped_run}", "run.resume=auto", "data.batch_size=16"])


def test_auto_without_checkpoints_starts_fresh(tmp_path):
    rec = record(TAYLOR + [f"run.dir={tmp_path}", "run.resume=auto", "train.max_steps=2",
                           "checkpoint.every_steps=0"])
    assert rec["resumed_from"] is None and rec["losses"][0][0] == 1


def test_mlflow_run_continues(tmp_path, monkeypatch):
    track = [f"run.root={tmp_path}", "tracking.enabled=true", "train.max_steps=8", "checkpoint.every_steps=0"]
    monkeypatch.setenv(ENV_STOP, "5")
    first = record(TAYLOR + track + [f"run.dir={tmp_path / 'run'}"])
    monkeypatch.delenv(ENV_STOP)
    assert first["run_id"]
    assert verify(tmp_path / "run" / "checkpoints" / "step-00000005").run_id == first["run_id"]
    second = record(TAYLOR + track + [f"run.dir={tmp_path / 'run'}", "run.resume=auto"])
    assert second["resumed_from"] == 5 and second["summary"]["run_id"] == first["run_id"]

    from mlflow.tracking import MlflowClient

    from system.tracking import TRAIN_LOSS, local_store_uri

    hist = MlflowClient(tracking_uri=local_store_uri(tmp_path)).get_metric_history(first["run_id"], TRAIN_LOSS)
    assert sorted(m.step for m in hist) == list(range(1, 9))


# ------------------------------------------------------------------------------------ processes
def _harness_cmd(out: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "tests.ckpt_scripts.harness", str(out), *overrides]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (ENV_STOP, ENV_WRITE_DELAY, "RANK", "WORLD_SIZE")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", **extra)
    return env


@pytest.mark.slow
def test_sigkill_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    proc = subprocess.Popen(_harness_cmd(tmp_path / "killed.json", TAYLOR + [f"run.dir={run}"]), cwd=ROOT,
                            env=_env(**{ENV_WRITE_DELAY: "1.0"}), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    root = run / "checkpoints"
    deadline = time.time() + 120
    try:
        while not ((root / "step-00000004").exists() and (root / ".tmp-step-00000008").exists()):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no second checkpoint write seen"
            time.sleep(0.05)
        time.sleep(0.3)  # inside the write (the delay sits between the files)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert [c.step for c in list_checkpoints(run)] == [4]
    assert (root / ".tmp-step-00000008").exists() and not (root / "step-00000008").exists()
    assert find_resumable(run).step == 4

    monkeypatch.delenv(ENV_STOP, raising=False)
    monkeypatch.delenv(ENV_WRITE_DELAY, raising=False)
    resumed = record(TAYLOR + [f"run.dir={run}", "run.resume=auto"])
    assert resumed["resumed_from"] == 4 and not (root / ".tmp-step-00000008").exists()
    full = record(TAYLOR + [f"run.dir={tmp_path / 'full'}"])  # same results as never killed
    assert resumed["losses"] == full["losses"][4:]
    assert resumed["events"] == full["events"]
    for k, v in full["weights"].items():
        assert torch.equal(v, resumed["weights"][k]), k



def _launch(out: Path, world: int, overrides: list[str], stop: int = 0) -> list[dict]:
    """Run the harness on ``world`` processes (gloo, DeepSpeed on CPU); return each rank's record."""
    port = str(free_port())
    extra = {ENV_STOP: str(stop)} if stop else {}
    procs = []
    for r in range(world):
        env = _env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, **extra)
        procs.append(subprocess.Popen(_harness_cmd(out, overrides), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE))
    errs = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        errs.append(err.decode()[-3000:])
    assert all(p.returncode == 0 for p in procs), "\n".join(errs)
    paths = [out] + [Path(f"{out}.rank{r}") for r in range(1, world)]
    return [json.loads(p.read_text()) for p in paths]


DS = TAYLOR + ["engine.kind=deepspeed", "engine.backend=gloo", "run.resume=auto"]
STOP = 6  # right after the Taylor pruning event of step 6


@pytest.fixture(scope="module")
def two_rank_stopped(tmp_path_factory):
    """A 2-rank DeepSpeed run (2 x 16) stopped after step 6, and its records."""
    tmp = tmp_path_factory.mktemp("two_rank")
    first = _launch(tmp / "first.json", 2, DS + ["data.batch_size=16", f"run.dir={tmp / 'run'}"], stop=STOP)
    return tmp / "run", first


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.slow
def test_two_rank_resume_is_exact(tmp_path, two_rank_stopped):
    """N -> N on 2 processes: per-rank RNG, method state and BN buffers make the resumed run exact."""
    src, first = two_rank_stopped
    run = _copy_run(src, tmp_path / "run")
    over = DS + ["data.batch_size=16"]
    full = _launch(tmp_path / "full.json", 2, over + [f"run.dir={tmp_path / 'full'}"])
    second = _launch(tmp_path / "b.json", 2, over + [f"run.dir={run}"])
    for r in range(2):
        assert first[r]["losses"] + second[r]["losses"] == full[r]["losses"]
        assert second[r]["events"] == full[r]["events"]
        suffix = "" if r == 0 else f".rank{r}"
        w_full = torch.load(f"{tmp_path / 'full.json'}{suffix}.weights.pt", weights_only=True)
        w_res = torch.load(f"{tmp_path / 'b.json'}{suffix}.weights.pt", weights_only=True)
        for k, v in w_full.items():
            assert torch.equal(v, w_res[k]), (r, k)


@pytest.mark.slow
@pytest.mark.parametrize("n, m", [(2, 1), (1, 2)])
def test_elastic_resume(tmp_path, two_rank_stopped, n, m):
    """Written by N ranks, resumed on M: same global batch (32), same data position, same plans so far."""
    if n == 2:
        run = _copy_run(two_rank_stopped[0], tmp_path / "run")
        first = two_rank_stopped[1]
    else:
        run = tmp_path / "run"
        first = _launch(tmp_path / "first.json", n, DS + [f"data.batch_size={32 // n}", f"run.dir={run}"], stop=STOP)
    info = find_resumable(run)
    assert (info.step, info.world_size, info.batch, info.manifest["global_batch"]) == (STOP, n, STOP, 32)
    assert info.manifest["engine"] == "deepspeed" and "engine/mp_rank_00_model_states.pt" in info.manifest["files"]
    assert {f"rng_rank{r}.pt" for r in range(n)} <= set(info.manifest["files"])
    second = _launch(tmp_path / "second.json", m, DS + [f"data.batch_size={32 // m}", f"run.dir={run}"])
    for rec in first:
        assert rec["stopped"] == STOP and [s for s, _ in rec["losses"]] == list(range(1, STOP + 1))
    for rec in second:
        assert rec["resumed_from"] == STOP
        # the data position carries over: global batch 6 of epoch 0 is the first one trained
        assert [s for s, _ in rec["losses"]] == list(range(STOP + 1, STEPS + 1))
        assert rec["positions"] == [[e, b] for e in (0, 1) for b in range(12)][STOP:]
        assert rec["events"][:2] == first[0]["events"][:2]  # plans of steps 3 and 6, from the checkpoint
        assert rec["summary"]["steps"] == STEPS and rec["summary"]["world_size"] == m
    # every rank ended with the same pruned architecture and weights
    w0 = torch.load(f"{tmp_path / 'second.json'}.weights.pt", weights_only=True)
    for r in range(1, m):
        wr = torch.load(f"{tmp_path / 'second.json'}.rank{r}.weights.pt", weights_only=True)
        for k, v in w0.items():
            if "running" not in k and "num_batches" not in k:
                assert torch.equal(v, wr[k]), k
