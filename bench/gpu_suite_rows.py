"""The GPU suite's rows (the measurements) for ``bench/gpu_suite.py``: the uniform pruned specs, one function
per group of rows (the Trainer-step groups from ``bench/gpu_suite_trainer.py``; the settings every row reads
in ``bench/gpu_suite_base.py``), and :func:`run_rows`, which runs them and turns a failure into
"skipped: <reason>".  What each row measures is described in ``bench/gpu_suite.py``.

Imported by ``bench/gpu_suite.py``, which puts the repository root and the bench folder on ``sys.path``
first.  Example::

    s = Settings(device=torch.device("cpu"), model="resnet20", size=32, batch=16, precision="fp32",
                 channels_last=False, warmup=1, iters=3, target=0.5, compile=False, threads=1,
                 deadline=time.perf_counter() + 450)
    results = run_rows(s, {"dense", "pruned_r8"})   # {row: {"status": "ok", "step_s": ...} | skipped}
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from gpu_suite_base import ROOT, Settings, Skip, sibling, sync
from gpu_suite_trainer import row_trainer_compiled, row_trainer_steps
from plans import plan_for_macs, uniform_plan  # noqa: F401  (the shared uniform cut; re-exported)

from system.models.resnet import build_model
from system.models.spec import ArchSpec
from system.pruning.complexity import count
from system.pruning.surgery import apply_plan

log = logging.getLogger("gpu_suite")

#: table rows, in order
ROWS = ("dense", "dense_dali", "dense_deepspeed", "pruned_r1", "pruned_r8", "prune_event", "compile",
        "step_dense", "step_variational", "step_compiled")
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def stepper(model: torch.nn.Module, s: Settings):
    """``bench_model.Stepper``: one training step on fixed random data, timed with synchronisation."""
    return sibling("bench_model").Stepper(model, s.batch, s.size, s.spec().num_classes, s.device, s.precision,
                                          s.channels_last)


def median_times(steppers: dict, s: Settings) -> dict[str, float]:
    """Median step time of each stepper, measured in alternation (``bench_model.interleaved``)."""
    return sibling("bench_model").interleaved(steppers, s.iters, s.warmup)


# ----------------------------------------------------------------------------------- pruned specs


def inner_widths(spec: ArchSpec) -> list[list[int]]:
    return [list(blk.inner) for *_, blk in spec.iter_blocks()]


# ------------------------------------------------------------------------------------------ rows
def row_dense(s: Settings, wanted: tuple[str, ...], shared: dict) -> dict:
    st = stepper(build_model(s.spec(), gates=False), s)
    t = median_times({"dense": st}, s)["dense"]
    shared["dense_img_s"] = s.batch / t
    return {"dense": {"step_s": t, "img_s": s.batch / t, "macs_ratio": 1.0}}


def make_jpeg_shards(out: Path, n: int, distinct: int = 256, workers: int | None = None) -> Path:
    """``n`` ImageNet-sized JPEGs (crops of real photographs, ``bench_loaders.make_tree``; ``distinct`` of
    them, the rest hard links) written as a project shard set by ``pipelines.shards``; returns its root."""
    from pipelines import shards

    src = out / "src"
    sibling("bench_loaders").make_tree(src, min(n, distinct))
    files = sorted(src.glob("train/*/*.JPEG"))
    for i in range(n - len(files)):
        f = files[i % len(files)]
        dup = f.with_name(f"dup{i:06d}_{f.name}")
        try:
            os.link(f, dup)
        except OSError:
            dup.write_bytes(f.read_bytes())
    root = out / "shards"
    shards.build(src, root, max_count=1000, workers=workers or min(os.cpu_count() or 1, 16), progress=False)
    return root


def _train_step(model, opt, x, y, s: Settings) -> None:
    if s.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = _autocast_dtype(s.precision)
    with torch.autocast(s.device.type, dtype=dtype, enabled=dtype is not None):
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def row_dali(s: Settings, wanted: tuple[str, ...], shared: dict) -> dict:
    if not s.cuda:
        raise Skip("DALI mixed decode (nvJPEG) needs a CUDA device")
    if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
        raise Skip("DALI is not installed (nvidia-dali-cuda130; too large for bench/wheelhouse.sh's 60 MB)")
    from pipelines.config import DataConfig
    from pipelines.loaders import build_loader

    n = s.batch * (s.warmup + s.iters + 1)  # one spare batch
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as tmp:
        t = time.perf_counter()
        root = make_jpeg_shards(Path(tmp), n)
        shard_s = time.perf_counter() - t
        log.info("dense_dali: %d JPEGs sharded in %.1f s", n, shard_s)
        cfg = DataConfig(loader="dali", root=str(root), batch_size=s.batch, train_size=s.size,
                         workers=min(os.cpu_count() or 1, 16), prefetch=2)
        loader = build_loader(cfg, "train", 0, 1, seed=0, epoch=0, device=s.device)
        model = build_model(s.spec(), gates=False).to(s.device).train()
        if s.channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        it = iter(loader)
        try:
            for _ in range(s.warmup):
                _train_step(model, opt, *next(it), s)
            sync(s.device)
            t0 = time.perf_counter()
            for _ in range(s.iters):
                _train_step(model, opt, *next(it), s)
            sync(s.device)
            dt = (time.perf_counter() - t0) / s.iters
        finally:
            it.close()  # the loader's pipeline and index files go with its generator
        row = {"step_s": dt, "img_s": s.batch / dt, "macs_ratio": 1.0, "images": n, "decode": "mixed",
               "shards_made_s": shard_s}
        if "dense_img_s" in shared:
            row["of_dense_synthetic"] = row["img_s"] / shared["dense_img_s"]
        return {"dense_dali": row}


def row_deepspeed(s: Settings, wanted: tuple[str, ...], shared: dict) -> dict:
    if importlib.util.find_spec("deepspeed") is None:
        raise Skip("DeepSpeed is not installed")
    from system.config import from_dict
    from system.run_config import RunConfig
    from system.runtime.distributed import shutdown_distributed
    from system.runtime.engine import DistEnv
    from system.runtime.engine_ds import DeepSpeedEngine

    cfg = from_dict(RunConfig, {"data": {"batch_size": s.batch}, "engine": {"kind": "deepspeed"},
                                "train": {"precision": s.precision, "channels_last": s.channels_last}})
    saved = {k: os.environ.get(k) for k in _DIST_VARS}
    model = build_model(s.spec(), gates=False).to(s.device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)  # as bench_model.Stepper's
    engine = None
    try:
        # the engine starts a single-process group itself (free port; nccl on a GPU, gloo on CPU)
        engine = DeepSpeedEngine(model, opt, cfg, DistEnv(), s.device)
        del model, opt
        x = torch.randn(s.batch, 3, s.size, s.size, device=s.device)
        y = torch.randint(0, s.spec().num_classes, (s.batch,), device=s.device)

        def step() -> float:
            sync(s.device)
            t = time.perf_counter()
            loss = F.cross_entropy(engine.forward(x).float(), y)
            engine.backward(loss)
            engine.step()
            sync(s.device)
            return time.perf_counter() - t

        for _ in range(s.warmup):
            step()
        t = statistics.median(step() for _ in range(s.iters))
    finally:
        if engine is not None:
            engine.close()
        shutdown_distributed()
        for k, v in saved.items():  # the engine set the launcher variables for its group
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    row = {"step_s": t, "img_s": s.batch / t, "macs_ratio": 1.0}
    if "dense_img_s" in shared:
        row["of_dense_synthetic"] = row["img_s"] / shared["dense_img_s"]
    return {"dense_deepspeed": row}


def row_pruned(s: Settings, wanted: tuple[str, ...], shared: dict) -> dict:
    spec = s.spec()
    dense = build_model(spec, gates=False)
    models, info = {}, {}
    for name in wanted:
        r = 8 if name == "pruned_r8" else 1
        plan, ratio, keep = plan_for_macs(spec, s.target, r)
        pruned, pspec, _ = apply_plan(dense, plan)  # surgery, on the host
        models[name] = pruned
        info[name] = {"round_to": r, "keep": keep, "macs_ratio": ratio, "inner_widths": inner_widths(pspec)}
        shared[f"plan_{name}"] = plan
    steppers = {"dense_ref": stepper(dense, s), **{k: stepper(m, s) for k, m in models.items()}}
    times = median_times(steppers, s)
    out = {}
    for name in wanted:
        t, ratio = times[name], info[name]["macs_ratio"]
        speedup = times["dense_ref"] / t
        out[name] = {**info[name], "step_s": t, "img_s": s.batch / t, "dense_ref_step_s": times["dense_ref"],
                     "speedup": speedup, "ideal_speedup": 1.0 / ratio, "speedup_over_ideal": speedup * ratio}
        shared[f"step_{name}"] = t
    shared["dense_ref_step_s"] = times["dense_ref"]
    return out


def row_prune_event(s: Settings, wanted: tuple[str, ...], shared: dict) -> dict:
    if importlib.util.find_spec("deepspeed") is None:
        raise Skip("DeepSpeed is not installed (bench_prune_event.py times the DeepSpeed engine rebuild)")
    spec = s.spec()
    inner = sum(sum(blk.inner) for *_, blk in spec.iter_blocks())
    per_step = max(1, round(0.05 * inner))  # about 5% of the inner channels per event
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as tmp:
        out = Path(tmp) / "event.json"
        cmd = [sys.executable, str(ROOT / "bench" / "bench_prune_event.py"), "--model", s.model,
               "--size", str(s.size), "--batch", str(s.batch), "--precision", s.precision,
               "--steps", str(max(3, s.iters // 2 if s.cuda else s.iters)), "--events", "3" if s.cuda else "1",
               "--per-step", str(per_step), "--out", str(out)]
        if s.channels_last:
            cmd.append("--channels-last")
        if s.threads:
            cmd += ["--threads", str(s.threads)]
        env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        timeout = max(60.0, min(s.left_s(), 360.0))
        log.info("prune_event: %s", " ".join(cmd[1:]))
        try:
            r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise Skip(f"bench_prune_event.py ran past {timeout:.0f} s") from None
        if r.returncode != 0 or not out.is_file():
            lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
            log.warning("bench_prune_event.py stderr:\n%s", "\n".join(lines[-30:]))
            raise RuntimeError(f"bench_prune_event.py exited {r.returncode}: {lines[-1] if lines else 'no output'}")
        res = json.loads(out.read_text())
    parts = res["parts_s"]
    step = res["step_s"]
    row = {"step_s": step, "event_s": res["event_s"], "event_steps": res["event_s"] / step,
           "first_step_after_s": parts["first_step_after"], "first_step_after_steps": parts["first_step_after"] / step,
           # the event plus the first step's excess over a plain step, in steps
           "cost_steps": (res["event_s"] + parts["first_step_after"]) / step - 1.0,
           "parts_s": parts, "channels_per_event": res["channels_per_event"],
           "coordinator_event_s": res["coordinator_event_s"], "step_after_pruning_s": res["step_after_pruning_s"],
           "check_overhead_pct_per_step": res["overhead_pct_per_step"], "micro_batch": res["micro_batch"]}
    return {"prune_event": row}


def row_compile(s: Settings, wanted: tuple[str, ...], shared: dict) -> dict:
    if not s.compile:
        raise Skip("off without a GPU (--compile runs it)" if not s.cuda else "off (--compile runs it)")
    spec = s.spec()
    plan = shared.get("plan_pruned_r8")
    if plan is None:
        plan, _, _ = plan_for_macs(spec, s.target, 8)
    dense = build_model(spec, gates=False)
    eager, pspec, _ = apply_plan(dense, plan)  # the event's surgery
    shrunk, _, _ = apply_plan(dense, plan)
    del dense
    torch._dynamo.reset()
    compiled = stepper(torch.compile(shrunk), s)
    t = time.perf_counter()
    compiled()  # traces, compiles forward and backward, runs one step
    compile_s = time.perf_counter() - t
    times = median_times({"eager": stepper(eager, s), "compiled": compiled}, s)
    row = {"step_s": times["compiled"], "img_s": s.batch / times["compiled"], "compile_s": compile_s,
           "eager_step_s": times["eager"], "speedup_vs_eager": times["eager"] / times["compiled"],
           "macs_ratio": count(pspec)[0] / count(spec)[0]}
    if "dense_ref_step_s" in shared:
        row["speedup"] = shared["dense_ref_step_s"] / times["compiled"]
    return {"compile": row}


#: (rows it fills, function, rough seconds it needs on a GPU: skipped when less of --budget is left)
GROUPS: list[tuple[tuple[str, ...], Callable[[Settings, tuple[str, ...], dict], dict], float]] = [
    (("dense",), row_dense, 30),
    (("dense_dali",), row_dali, 90),
    (("dense_deepspeed",), row_deepspeed, 60),
    (("pruned_r1", "pruned_r8"), row_pruned, 60),
    (("prune_event",), row_prune_event, 120),
    (("compile",), row_compile, 150),
    (("step_dense", "step_variational"), row_trainer_steps, 60),
    (("step_compiled",), row_trainer_compiled, 150),
]


def _reason(exc: BaseException) -> str:
    if isinstance(exc, Skip):
        return str(exc)
    text = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {text[:300]}"


def run_rows(s: Settings, selected: set[str]) -> dict[str, dict]:
    """Run every group with a selected row, each in its own try/except; a failure skips its rows."""
    results: dict[str, dict] = {r: {"status": "skipped", "reason": "not selected (--rows)"} for r in ROWS}
    shared: dict = {}
    for rows, fn, need_s in GROUPS:
        wanted = tuple(r for r in rows if r in selected)
        if not wanted:
            continue
        t = time.perf_counter()
        log.info("rows %s ...", ", ".join(wanted))
        try:
            if s.cuda and s.left_s() < need_s:
                raise Skip(f"time budget: {max(0.0, s.left_s()):.0f} s left, the row needs about {need_s:.0f} s")
            for name, row in fn(s, wanted, shared).items():
                results[name] = {"status": "ok", **row}
        except (Exception, SystemExit) as exc:  # a row never stops the suite
            if isinstance(exc, Skip):
                log.info("skipped %s: %s", ", ".join(wanted), exc)
            else:
                log.warning("rows %s failed:\n%s", ", ".join(wanted), traceback.format_exc())
            for name in wanted:
                results[name] = {"status": "skipped", "reason": _reason(exc)}
        finally:
            free_memory()
        log.info("rows %s: %.1f s", ", ".join(wanted), time.perf_counter() - t)
    return results
