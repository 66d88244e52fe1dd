"""Distributed training: the DeepSpeed engine and the synchronized pruning coordinator.

The ``slow`` tests start real processes (``torchrun --standalone``, gloo, ``DS_ACCELERATOR=cpu``)
and real DeepSpeed.  DeepSpeed JIT-builds its CPU comm op on first use (about 30-90 s, then cached
in ~/.cache/torch_extensions); the module fixture builds it once so no test pays for it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from system.config import ConfigError, from_dict, load_config
from system.run_config import RunConfig
from system.runtime.coordinator import PlanMismatch
from system.runtime.engine import DistEnv
from system.runtime.engine_ds import DeepSpeedEngine, check_engine_config, deepspeed_config
from tests.net import free_port
from tests.procs import build_ds_ops

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
TORCHRUN = str(Path(PY).with_name("torchrun"))

#: ResNet-20 on the embedded Fashion-MNIST shards, one thread per process
SMALL = ["model.name=resnet20", "data.loader=wds", "data.workers=0", "data.train_size=28", "data.val_resize=28",
         "data.val_crop=28", "train.epochs=1", "train.eval_batches=1", "train.progress=false", "train.device=cpu",
         "train.threads=1", "tracking.enabled=false", "latency.repeats=3"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def _run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _torchrun(args: list[str], timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", *args], cwd=ROOT, env={**_env(), **env},
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ds_ops():
    """Build (or find cached) DeepSpeed's CPU comm op once, outside the timed tests."""
    build_ds_ops(_env(), ROOT)


def _cfg(**over) -> RunConfig:
    return from_dict(RunConfig, over)


# ------------------------------------------------------------------------------ the DeepSpeed JSON
def test_deepspeed_config_is_derived_from_the_run_config():
    cfg = _cfg(data={"batch_size": 32})
    ds = deepspeed_config(cfg, 4)
    assert ds["train_batch_size"] == 128 and ds["train_micro_batch_size_per_gpu"] == 32
    assert ds["gradient_accumulation_steps"] == 1
    assert ds["zero_optimization"] == {"stage": 0}
    assert ds["zero_allow_untested_optimizer"] is True
    assert "optimizer" not in ds and "scheduler" not in ds  # our optimizer and our schedule
    assert "torch_autocast" not in ds and "bf16" not in ds and "fp16" not in ds
    bf = deepspeed_config(_cfg(train={"precision": "bf16"}), 1)
    assert bf["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert deepspeed_config(_cfg(train={"precision": "fp16"}), 1)["torch_autocast"]["dtype"] == "float16"
    json.dumps(ds)  # plain JSON


# ------------------------------------------------------------------------------ bad input at start
@pytest.mark.parametrize("over, world, device, key", [
    ({"engine": {"zero_stage": 1}}, 2, "cpu", "engine.zero_stage"),
    ({"engine": {"zero_stage": 2}}, 1, "cpu", "engine.zero_stage"),
    ({"engine": {"global_batch": 100}, "data": {"batch_size": 50}}, 3, "cpu", "engine.global_batch"),
    ({"engine": {"global_batch": 256}, "data": {"batch_size": 64}}, 2, "cpu", "engine.global_batch"),
    ({"train": {"precision": "bf16"}}, 1, "cpu", "train.precision"),
    ({"train": {"precision": "fp16"}}, 2, "cpu", "train.precision"),
    ({"engine": {"backend": "nccl"}}, 2, "cpu", "engine.backend"),
])
def test_bad_engine_config_names_the_key(over, world, device, key):
    cfg = _cfg(**over)
    with pytest.raises(ConfigError) as ei:
        check_engine_config(cfg, world, device)
    assert ei.value.key == key and f"'{key}'" in str(ei.value)
    with pytest.raises(ConfigError):  # the engine refuses before DeepSpeed is touched
        DeepSpeedEngine(torch.nn.Linear(2, 2), None, cfg, DistEnv(world_size=world), torch.device(device))


def test_good_engine_config_passes():
    check_engine_config(_cfg(engine={"global_batch": 128}, data={"batch_size": 64}), 2, "cpu")
    check_engine_config(_cfg(train={"precision": "bf16", "channels_last": True}), 2, "cuda")


def test_launch_refuses_zero_stage_at_start():
    r = _run([PY, "-m", "launch.train", *SMALL, "engine.kind=deepspeed", "engine.zero_stage=2",
              "train.max_steps=2", "run.dir=/nonexistent/never-written"], timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "engine.zero_stage" in r.stderr
    assert not Path("/nonexistent/never-written").exists()


# ------------------------------------------------------------------------------ the engine contract
@pytest.mark.slow
def test_engine_checkpoint_round_trip(ds_ops, tmp_path):
    r = _run([PY, "-m", "tests.dist_scripts.roundtrip", str(tmp_path)], timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["weights_equal"] and res["momentum_equal"] and res["groups_equal"]
    assert res["module_hooks"] == 2  # one DeepSpeed pre/post pair, not one per rebuild
    assert all(f.startswith(res["tag"] + "/") for f in res["files"])  # everything inside the given directory


# ------------------------------------------------------------------------------ equivalence
EQUIV = SMALL + ["train.max_steps=8", "optim.lr=0.05", "optim.schedule=cosine", "method.name=taylor",
                 "method.taylor.check_every=3", "method.taylor.start_frac=0.0", "method.taylor.stop_frac=1.0",
                 "method.taylor.per_step=12", "method.taylor.keep_ratio=0.8", "data.min_area=0.6", "data.flip=true"]


@pytest.mark.slow
def test_two_ranks_equal_one_rank_through_pruning_events(ds_ops, tmp_path):
    """2 ranks x micro-batch 8 == 1 rank x 16 over 8 steps with two pruning events (steps 3 and 6).

    Choices that make the comparison exact and honest:
    - Taylor-FO-BN: gates are deterministic (z = 1), the scores are (dL/dz)^2 of the
      DeepSpeed-averaged gradient, so no per-rank sampling enters.
    - BatchNorm: two ranks normalise over their own 8 samples; the single rank therefore runs
      its batch of 16 as two ghost batches of 8 (``GhostBatchEngine``), the same sample groups.
      The data plan gives rank r the r-th half of the same global batch, augmentation is seeded
      per sample, so both runs see identical inputs.
    - Compared: the plans (digests and steps) and every parameter.  BN running buffers are not
      compared: the ghost-batch reference updates them twice per step where the ranks update once
      and are averaged, and they never enter a training-mode forward.
    A 1-rank run with a plain batch of 16 (BN over 16) is also run: it must NOT match, showing the
    check can fail.
    """
    two, one, plain = tmp_path / "two.pt", tmp_path / "one.pt", tmp_path / "plain.pt"
    r = _torchrun(["-m", "tests.dist_scripts.equivalence", str(two), "8", *EQUIV, f"run.dir={tmp_path / 'r2'}"])
    assert r.returncode == 0, r.stderr[-4000:]
    r = _run([PY, "-m", "tests.dist_scripts.equivalence", str(one), "8", "--ghost", *EQUIV,
              f"run.dir={tmp_path / 'r1'}"])
    assert r.returncode == 0, r.stderr[-4000:]
    a, b = torch.load(two), torch.load(one)
    assert a["world_size"] == 2 and b["world_size"] == 1
    assert a["steps"] == b["steps"] == [3, 6]
    assert a["digests"] == b["digests"] and a["spec"] == b["spec"]
    assert a["params"].keys() == b["params"].keys()
    for k, v in b["params"].items():
        torch.testing.assert_close(a["params"][k], v, rtol=1e-4, atol=1e-5, msg=k)

    r = _run([PY, "-m", "tests.dist_scripts.equivalence", str(plain), "16", *EQUIV, f"run.dir={tmp_path / 'rp'}"])
    assert r.returncode == 0, r.stderr[-4000:]
    c = torch.load(plain)
    differs = c["digests"] != a["digests"] or any(
        c["params"][k].shape != v.shape or not torch.allclose(c["params"][k], v, rtol=1e-4, atol=1e-5)
        for k, v in a["params"].items() if k in c["params"])
    assert differs, "BN over 16 vs 2 x 8 should change the run; the comparison above would be vacuous"


# ------------------------------------------------------------------------------ plan mismatch
@pytest.mark.slow
def test_perturbed_rank_is_caught_before_any_surgery(ds_ops, tmp_path):
    prefix = tmp_path / "mm"
    over = SMALL + ["data.batch_size=8", "train.max_steps=10", "method.name=variational",
                    "method.variational.warmup_frac=0", "method.variational.nu=0", "method.variational.check_every=2",
                    "method.variational.patience=1", "method.variational.weight_condition=none",
                    "method.variational.harden=none", f"run.dir={tmp_path / 'run'}"]
    r = _torchrun(["-m", "tests.dist_scripts.mismatch", str(prefix), *over], timeout=180)
    assert r.returncode != 0  # the job stops
    for rank in (0, 1):
        rec = json.loads(Path(f"{prefix}.rank{rank}.json").read_text())
        assert rec["error"] and "rank(s) [1]" in rec["error"], rec
        assert rec["ranks"] == [1]
        assert rec["step"] == 2  # the first decision
        assert rec["prune_events"] == 0 and rec["coordinator_events"] == 0
        assert rec["spec_after"] == rec["spec_before"]  # nothing was pruned
    assert not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.slow
def test_a_rank_whose_nu_drifts_is_caught_though_its_plan_agrees(ds_ops, tmp_path):
    """nu is each rank's own float (recomputed from theta): it joins the digest the ranks agree on."""
    prefix = tmp_path / "nu"
    over = SMALL + ["data.batch_size=8", "train.max_steps=10", "method.name=variational", "method.target_macs=0.5",
                    "method.variational.warmup_frac=0", "method.variational.check_every=2",
                    "method.variational.harden=none", f"run.dir={tmp_path / 'run'}"]
    r = _torchrun(["-m", "tests.dist_scripts.mismatch", str(prefix), *over], timeout=180, PERTURB="nu")
    assert r.returncode != 0
    for rank in (0, 1):
        rec = json.loads(Path(f"{prefix}.rank{rank}.json").read_text())
        assert rec["error"] and "rank(s) [1]" in rec["error"], rec
        assert rec["step"] == 2 and rec["prune_events"] == 0


def test_plan_mismatch_names_the_odd_ranks():
    exc = PlanMismatch(["aa", "aa", "bb", "aa"])
    assert exc.ranks == [2] and "rank(s) [2]" in str(exc)


# ------------------------------------------------------------------------------ launch.train under torchrun
@pytest.mark.slow
def test_torchrun_launch_train_prunes_and_records_world_size(ds_ops, tmp_path):
    run_dir = tmp_path / "demo2"
    r = _torchrun(["-m", "launch.train", "--config", "configs/demo.yaml", "train.max_steps=12", "train.progress=false",
                   "train.threads=1", "train.eval_batches=1", "data.workers=0", "data.batch_size=16",
                   "tracking.enabled=false", "method.variational.warmup_frac=0", "method.variational.nu=50",
                   "method.variational.check_every=4", "method.variational.patience=1",
                   "method.variational.weight_condition=none", "method.variational.lr_unit=1.0",
                   "method.variational.lr_layer=0.5", "method.variational.tau_theta=0.3",
                   f"run.dir={run_dir}"])
    assert r.returncode == 0, r.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["prune_events"] > 0
    assert summary["macs"] < summary["macs_dense"]
    assert (run_dir / "final").is_dir()



@pytest.mark.slow
def test_deepspeed_launcher_runs_launch_train(ds_ops, tmp_path):
    run_dir = tmp_path / "ds"
    ds = str(Path(PY).with_name("deepspeed"))
    r = _run([ds, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "launch.train",
              *SMALL, "data.batch_size=16", "train.max_steps=6", "method.name=taylor", "method.taylor.check_every=3",
              "method.taylor.start_frac=0", "method.taylor.per_step=20", "method.taylor.keep_ratio=0.5",
              f"run.dir={run_dir}"])
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["prune_events"] >= 1


# ------------------------------------------------------------------------------ no leak
@pytest.mark.slow
def test_twenty_pruning_events_do_not_leak(ds_ops):
    r = _run([PY, "tests/dist_scripts/leak_probe.py", "--events", "20", "--model", "resnet20"], timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])["rows"]
    assert len(rows) == 20
    # exactly one DeepSpeed engine, model and optimizer alive after every event
    assert all(row["ds_engines"] == 1 and row["models"] == 1 and row["optimizers"] == 1 for row in rows), rows
    assert len({row["fds"] for row in rows}) == 1, rows  # no descriptor opened per rebuild
    growth = rows[-1]["rss_mib"] - rows[4]["rss_mib"]
    assert growth < 8.0, f"resident memory grew {growth:.1f} MiB over events 5..20: {rows}"


def test_load_config_accepts_the_engine_keys():
    cfg = load_config(RunConfig, None, ["engine.kind=deepspeed", "engine.zero_stage=0", "engine.global_batch=128"])
    assert cfg.engine.kind == "deepspeed"
