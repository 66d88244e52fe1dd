"""One-shot GPU benchmark suite: dense and pruned ResNet-50 training speed in one table.

A person with one GPU runs it once (under 8 minutes on an H100 / H200)::

    pip install --no-deps --no-build-isolation -e . && bash bench/gpu_suite.sh   # the lent GPU machine
    python bench/gpu_suite.py --batch 128 --rows dense,pruned      # a subset of the rows, another batch
    python bench/gpu_suite.py --out gpu_suite.json --no-compile    # write the JSON too; skip torch.compile

Every row times the same training step: plain models (``build_model(spec, gates=False)``: the
architecture's speed, no gate multiplies), SGD with momentum, cross-entropy, bf16 autocast and
channels_last on a GPU (``cudnn.benchmark`` on), ``torch.cuda.synchronize`` around each timed step,
the median of ``--iters`` steps after ``--warmup``.  The rows:

``dense``            dense ResNet-50 on synthetic tensors already on the GPU (the model alone);
``dense_dali``       the same step fed by the project's DALI loader (``pipelines.loaders``: "mixed" nvJPEG
                     decode, random-resized crop, flip, normalise) from JPEG WebDataset shards made in a temp
                     dir (``bench_loaders.make_tree`` photographs + ``pipelines.shards``); throughput over the
                     timed window, loading included;
``dense_deepspeed``  the same step through ``system.runtime.engine_ds.DeepSpeedEngine`` (ZeRO 0, torch_autocast, a
                     single-process nccl / gloo group);
``pruned_r1/_r8``    every block's inner widths cut by one keep fraction, bisected so the MACs are about 50%
                     of dense, kept widths rounded to multiples of 1 / 8; built by surgery (``apply_plan``)
                     from the dense model and timed interleaved with it: speed-up and speed-up / ideal, where
                     ideal = dense MACs / pruned MACs (the issue's target is >= 0.8);
``prune_event``      one pruning event's wall time in training steps: ``bench/bench_prune_event.py`` in a
                     subprocess (Taylor plan, surgery, optimizer transplant, DeepSpeed rebuild, first step);
``compile``          ``torch.compile`` of the round_to=8 model after that surgery: compile time (its first
                     step) and compiled step time against eager (on by default on a GPU; ``--no-compile``).

A row that cannot run here (no GPU, DALI or DeepSpeed not installed, an error) reads "skipped: <reason>";
the others still run.  Without a CUDA device the suite says so in one line and runs its CPU rows on a tiny
model (ResNet-20 at 32 px): the CI path (tests/test_gpu_suite.py), so the script cannot rot.
Progress goes to stderr (logging, and any library output); stdout holds one caption line, one markdown
table and one JSON line (``--out FILE`` writes the JSON too).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from system.pruning.complexity import count, unit_gate_name  # noqa: E402
from system.models.resnet import build_model  # noqa: E402
from system.models.spec import ArchSpec, dense_spec  # noqa: E402
from system.pruning.surgery import PrunePlan, apply_plan, plan_spec  # noqa: E402

log = logging.getLogger("gpu_suite")

#: table rows, in order
ROWS = ("dense", "dense_dali", "dense_deepspeed", "pruned_r1", "pruned_r8", "prune_event", "compile")
LABELS = {
    "dense": "dense, synthetic tensors",
    "dense_dali": "dense, DALI mixed decode (JPEG shards)",
    "dense_deepspeed": "dense, DeepSpeed engine",
    "pruned_r1": "pruned ~50% MACs, round_to=1",
    "pruned_r8": "pruned ~50% MACs, round_to=8",
    "prune_event": "one pruning event (bench_prune_event)",
    "compile": "torch.compile, pruned round_to=8",
}
#: --rows also takes these names for groups of rows
ALIASES = {"dali": ("dense_dali",), "deepspeed": ("dense_deepspeed",), "pruned": ("pruned_r1", "pruned_r8"),
           "event": ("prune_event",)}
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class Skip(Exception):
    """A row that cannot run here; the message is the reason."""


@dataclass(frozen=True)
class Settings:
    device: torch.device
    model: str
    size: int
    batch: int
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    warmup: int
    iters: int
    target: float  # MACs fraction of the pruned rows
    compile: bool
    threads: int
    deadline: float  # time.perf_counter() by which the suite should be done

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def spec(self) -> ArchSpec:
        return dense_spec(self.model, input_size=self.size)

    def left_s(self) -> float:
        return self.deadline - time.perf_counter()


def sibling(name: str):
    """Import ``bench/<name>.py`` (the bench folder is no package)."""
    key = f"_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "bench" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[key]
            raise
    return sys.modules[key]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
def uniform_plan(spec: ArchSpec, keep: float, round_to: int = 1) -> PrunePlan:
    """Cut every inner width ``n`` of every kept block to ``round(keep * n)`` rounded to a multiple of
    ``round_to`` (at least ``round_to``, at most ``n``), dropping the trailing channels."""
    units = {}
    for name, _, _, blk in spec.iter_blocks():
        if blk.removed:
            continue
        for i, n in enumerate(blk.inner):
            k = min(n, max(round_to, round_to * round(keep * n / round_to)))
            if k < n:
                units[unit_gate_name(name, i)] = tuple(range(k, n))
    return PrunePlan(units=units)


def plan_for_macs(spec: ArchSpec, target: float, round_to: int = 1) -> tuple[PrunePlan, float, float]:
    """``(plan, MACs ratio, keep)``: the uniform cut whose MACs are closest to ``target`` x dense
    (bisection on the keep fraction, as ``bench_model.plan_for_macs`` does on a gated model)."""
    dense = count(spec)[0]

    def ratio(keep: float) -> float:
        return count(plan_spec(spec, uniform_plan(spec, keep, round_to))[0])[0] / dense

    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if ratio(mid) > target:
            hi = mid
        else:
            lo = mid
    keep = min((lo, hi), key=lambda k: abs(ratio(k) - target))
    return uniform_plan(spec, keep, round_to), ratio(keep), keep


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
        raise Skip("DALI is not installed (nvidia-dali-cuda130)")
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
    from system.runtime.distributed import shutdown_distributed
    from system.runtime.engine import DistEnv
    from system.runtime.engine_ds import DeepSpeedEngine
    from system.run_config import RunConfig

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


# ----------------------------------------------------------------------------------------- table
def _f(v, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else "–"


def _notes(name: str, r: dict) -> str:
    if r["status"] != "ok":
        return f"skipped: {r['reason']}"
    if name in ("dense_dali", "dense_deepspeed") and "of_dense_synthetic" in r:
        return f"{100 * r['of_dense_synthetic']:.0f}% of the synthetic-tensor img/s"
    if name.startswith("pruned_"):
        return (f"keep {r['keep']:.3f} of every inner width; dense reference {1e3 * r['dense_ref_step_s']:.1f} ms "
                f"in the same interleaved run; ideal x{r['ideal_speedup']:.2f}")
    if name == "prune_event":
        p = r["parts_s"]
        return (f"{r['channels_per_event']} channels, about {r['cost_steps']:.1f} steps in all: event "
                f"{r['event_steps']:.2f} steps (surgery "
                f"{1e3 * p['surgery']:.0f}, transplant {1e3 * p['transplant']:.0f}, rebuild {1e3 * p['rebuild']:.0f}, "
                f"decide {1e3 * (p['reduce'] + p['decide'] + p['agree']):.0f} ms); first step after "
                f"{1e3 * r['first_step_after_s']:.0f} ms = {r['first_step_after_steps']:.2f} steps; "
                f"training step {1e3 * r['step_s']:.1f} ms at micro-batch {r['micro_batch']}")
    if name == "compile":
        return (f"compile + first step {r['compile_s']:.1f} s; eager {1e3 * r['eager_step_s']:.1f} ms, "
                f"compiled x{r['speedup_vs_eager']:.2f} vs eager")
    return ""


def table(results: dict[str, dict]) -> str:
    head = ["row", "what", "step ms (event ms)", "img/s", "MACs vs dense", "speed-up vs dense", "speed-up / ideal",
            "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for name in ROWS:
        r = results[name]
        ok = r["status"] == "ok"
        ms = r.get("event_s" if name == "prune_event" else "step_s") if ok else None
        speedup = r.get("speedup") if ok else None
        if ok and name == "prune_event":
            speedup = None
        cells = [name, LABELS[name], _f(1e3 * ms if ms is not None else None, ".1f"),
                 _f(r.get("img_s") if ok else None, ".0f"), _f(r.get("macs_ratio") if ok else None, ".3f"),
                 "x" + _f(speedup, ".2f") if speedup is not None else "–",
                 _f(r.get("speedup_over_ideal") if ok else None, ".2f"), _notes(name, r)]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main
def parse_rows(text: str) -> set[str]:
    out: set[str] = set()
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if item == "all":
            out.update(ROWS)
        elif item in ALIASES:
            out.update(ALIASES[item])
        elif item in ROWS:
            out.add(item)
        else:
            raise argparse.ArgumentTypeError(
                f"unknown row {item!r}; rows: {', '.join(ROWS)} (groups: {', '.join(ALIASES)}, all)")
    return out


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50" if cuda else "resnet20",
                    help="network (resnet50 on a GPU, resnet20 without one)")
    ap.add_argument("--size", type=int, default=224 if cuda else 32, help="input side (224 / 32 px)")
    ap.add_argument("--batch", type=int, default=256 if cuda else 16, help="batch (256 / 16)")
    ap.add_argument("--iters", type=int, default=30 if cuda else 3, help="timed steps per measurement (30 / 3)")
    ap.add_argument("--warmup", type=int, default=10 if cuda else 1, help="untimed steps first (10 / 1)")
    ap.add_argument("--precision", default="bf16" if cuda else "fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=cuda)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=cuda,
                    help="the torch.compile row (on by default on a GPU)")
    ap.add_argument("--rows", type=parse_rows, default=set(ROWS),
                    help=f"comma-separated subset: {', '.join(ROWS)}; groups: {', '.join(ALIASES)}")
    ap.add_argument("--target", type=float, default=0.5, help="MACs fraction of the pruned rows")
    ap.add_argument("--budget", type=float, default=450.0,
                    help="seconds for the whole suite on a GPU: a row is skipped when too little is left")
    # one thread without a GPU: the tiny model gains nothing from more, and two OpenMP threads on a busy
    # two-core machine were seen to make a ResNet-20 step 40x slower
    ap.add_argument("--threads", type=int, default=0 if cuda else 1,
                    help="torch CPU threads (0: torch's default; 1 without a GPU)")
    ap.add_argument("--out", default="", help="also write the JSON here")
    args = ap.parse_args(argv)

    # stdout carries the table alone: library output (DeepSpeed's logger, extension builds, the
    # prune-event subprocess) goes to stderr with the progress messages
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(device)
        print(f"gpu_suite on {name}: {args.model} {args.size}px, batch {args.batch}, {args.precision}"
              f"{', channels_last' if args.channels_last else ''}; torch {torch.__version__}", file=out)
    else:
        name = f"cpu x{torch.get_num_threads()} ({platform.processor() or platform.machine()})"
        print(f"no CUDA device: running the CPU rows on a tiny model ({args.model} {args.size}px, batch "
              f"{args.batch}, {args.precision}, {name}; torch {torch.__version__})", file=out)
    s = Settings(device=device, model=args.model, size=args.size, batch=args.batch, precision=args.precision,
                 channels_last=args.channels_last, warmup=args.warmup, iters=args.iters, target=args.target,
                 compile=args.compile, threads=args.threads, deadline=t_start + args.budget)
    results = run_rows(s, args.rows)
    res = {"suite": "gpu_suite", "cuda": cuda, "device": name, "torch": torch.__version__,
           "model": args.model, "input": args.size, "batch": args.batch, "precision": args.precision,
           "channels_last": args.channels_last, "warmup": args.warmup, "iters": args.iters,
           "wall_s": time.perf_counter() - t_start, "rows": results}
    print(table(results), file=out)
    line = json.dumps(res)
    print(line, file=out)
    if args.out:
        Path(args.out).write_text(line + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
