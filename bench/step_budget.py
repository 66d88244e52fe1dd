"""Ops and host syncs per steady-state training step, per method and model (issue 24's step budget).

Counts every aten op (``func.overloadpacket``) that runs inside the real ``Trainer.train_step``, forward and
backward, with a ``TorchDispatchMode``; ``aten._local_scalar_dense`` is a host-device sync on a GPU
(``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``).  Every method is measured in its active phase (the
variational thetas trained, Taylor/L1 accumulating scores), after warm-up steps; the projected host
overhead is launches x 5 us against a 50 ms step (ResNet-50 at 5,000 img/s, batch 256).  ``launches``
leaves out the ops that only make a view or an alias of a tensor (``view``, ``detach``, ``expand``,
``select``...), which start no kernel on a GPU; the issue's budget is stated on all aten ops.

    python bench/step_budget.py                     # resnet20 @32 and resnet50 @64, batch 16, 3 steps
    python bench/step_budget.py --models resnet20:32 --steps 5 --json
    python bench/step_budget.py --methods none,variational --steps 8 --extra method.variational.paired_every=4
    python bench/step_budget.py --compile --methods none,variational   # the compiled step's launches
    python bench/step_budget.py --time --models resnet18:64 --batch 64 --steps 10 --threads 2   # step time
    python bench/step_budget.py --time --methods none,variational-warmup,variational-warmup-drawn,variational

``--compile`` counts a ``train.compile=true`` step (inductor) instead.  A ``TorchDispatchMode`` cannot see
inside a compiled region (dynamo runs the frame eagerly under one), so the compiled step is counted with
``torch.profiler``: inductor's generated kernels (recorded with ``torch._inductor.config.cpp.
enable_kernel_profile``), plus every aten op that runs outside them or as an extern kernel (a convolution),
counted as the dispatch mode counts them: a composite op (``conv2d``, ``to``) by the ops it decomposes into,
views and allocations as no launch.  On the eager step the two counters differ by a few launches a step
(``--check-profiler``; docs/benchmarks.md, "Step budget").
These are CPU inductor's kernels; a GPU's (Triton) fusion groups are the scheduler's same decisions, but the
GPU suite's ``step_compiled`` row is the count that a GPU gives.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from system.config import apply_overrides, from_dict
from system.run_config import RunConfig

LAUNCH_US, STEP_MS = 5.0, 50.0
_WARMUP = ["method.name=variational", "method.variational.warmup_frac=0.9", "method.variational.target_by=0.95",
           "method.variational.harden_at=0.97", "method.target_macs=0.5"]
METHODS = {
    "none": ["method.name=none"],
    "taylor": ["method.name=taylor", "method.taylor.start_frac=0.0", "method.taylor.check_every=1000"],
    "l1": ["method.name=l1", "method.l1.start_frac=0.0", "method.l1.check_every=1000"],
    "egp": ["method.name=egp", "method.egp.start_frac=0.0"],
    "variational": ["method.name=variational", "method.variational.warmup_frac=0.0",
                    "method.variational.check_every=1000", "method.target_macs=0.5"],
    # the warm-up's steps (theta held at 1): its gates idle, or drawn and multiplied (idle_gates=false)
    "variational-warmup": _WARMUP,
    "variational-warmup-drawn": [*_WARMUP, "method.variational.idle_gates=false"],
}
#: ops that make a view or alias (no kernel launch on a GPU)
VIEW_OPS = {"aten.view", "aten.detach", "aten.expand", "aten.select", "aten.slice", "aten.as_strided",
            "aten._reshape_alias", "aten.reshape", "aten.unsqueeze", "aten.squeeze", "aten.t", "aten.transpose",
            "aten.permute", "aten.alias", "aten.split", "aten.split_with_sizes", "aten.unbind", "aten.view_as",
            "aten.lift_fresh", "aten._unsafe_view", "aten.empty", "aten.empty_like", "aten.empty_strided",
            "aten.new_empty_strided", "aten.new_empty", "aten.narrow", "aten.resolve_conj", "aten.resolve_neg"}


class Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _composite(name: str) -> bool:
    """True when every overload of the aten op ``name`` (``aten::to``) decomposes before dispatch (a
    ``TorchDispatchMode`` sees the ops it decomposes into, not it)."""
    packet = getattr(torch.ops.aten, name.split("::", 1)[1], None)
    if packet is None:
        return False
    found = []
    for o in packet.overloads():
        try:  # (some overloads, aten::to.prim_Device, live in TorchScript, not in the dispatcher)
            found.append(torch._C._dispatch_has_kernel_for_dispatch_key(f"{name}.{o}" if o != "default" else name,
                                                                        "CompositeImplicitAutograd"))
        except RuntimeError:
            continue
    return bool(found) and all(found)


def profiled_launches(events: list) -> tuple[int, collections.Counter]:
    """Launches in a profiler's events: inductor's kernels, and the aten ops outside them counted as the
    dispatch mode counts them (a composite op by its parts, a view or an allocation as none)."""
    composite: dict[str, bool] = {}
    by_op: collections.Counter = collections.Counter()

    def count(e) -> None:
        if e.name.replace("::", ".") in VIEW_OPS:
            return
        if e.name not in composite:  # (one dispatcher lookup per op name, not per event)
            composite[e.name] = _composite(e.name)
        if composite[e.name]:
            for child in e.cpu_children:
                if child.name.startswith("aten::"):
                    count(child)
            return
        by_op[e.name] += 1

    def under_aten(e) -> bool:
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith("aten::"):
                return True
            p = p.cpu_parent
        return False

    for e in events:
        if e.name.startswith("aten::"):
            if not under_aten(e):
                count(e)
        elif "cpp_fused" in e.name:  # an inductor kernel (cpp.enable_kernel_profile)
            by_op["inductor kernel"] += 1
    return sum(by_op.values()), by_op


def build_trainer(model: str, size: int, method: str, batch: int, tmp: str, extra: tuple = (),
                  compiled: bool = False, threads: int = 1):
    """The real trainer on synthetic data, ``method`` in its active phase from the first step."""
    from system.trainer import Trainer

    over = ["data.loader=synthetic", "data.synthetic_classes=10", "data.synthetic_samples=4096",
            f"data.batch_size={batch}", f"data.train_size={size}", f"data.val_resize={size}",
            f"data.val_crop={size}", "data.workers=0", f"model.name={model}", "train.epochs=1",
            "train.progress=false", "tracking.enabled=false", "latency.enabled=false", f"train.threads={threads}",
            f"run.root={tmp}", f"run.dir={tmp}/run-{method}", f"train.compile={str(compiled).lower()}",
            *METHODS[method], *(extra if method != "none" else ())]
    return Trainer(from_dict(RunConfig, apply_overrides({}, over)))


def time_steps(model: str, size: int, methods: list[str], batch: int, steps: int, warm: int, extra: tuple,
               threads: int) -> dict[str, float]:
    """``--time``: the median wall-clock of each method's steady-state step at the dense size, the methods'
    steps interleaved so that the machine's drift hits all alike (a timing, printed, never asserted)."""
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {m: build_trainer(model, size, m, batch, tmp, extra, threads=threads) for m in methods}
        x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
        for tr in trainers.values():
            for _ in range(warm):
                tr.train_step(x, y)
        times: dict[str, list[float]] = {m: [] for m in methods}
        for _ in range(steps):
            for m, tr in trainers.items():
                t = time.perf_counter()
                tr.train_step(x, y)
                times[m].append(time.perf_counter() - t)
        for tr in trainers.values():
            tr.engine.close()
    return {m: statistics.median(v) for m, v in times.items()}


def measure(model: str, size: int, method: str, batch: int, steps: int, warm: int, extra: tuple = (),
            compiled: bool = False, profiler: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        if compiled:
            import torch._inductor.config as inductor_config

            inductor_config.cpp.enable_kernel_profile = True
        trainer = build_trainer(model, size, method, batch, tmp, extra, compiled)
        x = torch.randn(batch, 3, size, size)
        y = torch.randint(0, 10, (batch,))
        for _ in range(warm):
            trainer.train_step(x, y)
        if compiled or profiler:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    trainer.train_step(x, y)
            n, by_op = profiled_launches(list(prof.events()))
            trainer.engine.close()
            graphs = trainer.engine.compiler.summary()["graphs"] if compiled else []
            return {"model": f"{model}@{size}", "method": method, "compiled": compiled, "ops_per_step": None,
                    "launches_per_step": n / steps, "syncs_per_step": by_op.get("aten::_local_scalar_dense", 0) / steps,
                    "host_ms": n / steps * LAUNCH_US / 1000.0, "graphs": graphs,
                    "top_ops": {k: v / steps for k, v in by_op.most_common(12)}}
        counter = Counter()
        with counter:
            for _ in range(steps):
                trainer.train_step(x, y)
        trainer.engine.close()
    total = sum(counter.ops.values()) / steps
    launches = sum(n for op, n in counter.ops.items() if op not in VIEW_OPS) / steps
    syncs = counter.ops.get("aten._local_scalar_dense", 0) / steps
    return {"model": f"{model}@{size}", "method": method, "compiled": False, "ops_per_step": total,
            "launches_per_step": launches, "syncs_per_step": syncs, "host_ms": launches * LAUNCH_US / 1000.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20:32", "resnet50:64"])
    ap.add_argument("--methods", default=",".join(m for m in METHODS if "-warmup" not in m),
                    help=f"of {', '.join(METHODS)} (default: all but the warm-up variants)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--extra", nargs="*", default=[],
                    help="overrides for every method but dense (count a multiple of paired_every as --steps)")
    ap.add_argument("--compile", action="store_true", help="count the train.compile=true step (see the module doc)")
    ap.add_argument("--check-profiler", action="store_true",
                    help="count the eager step with the profiler's counter (to compare it with the dispatch mode's)")
    ap.add_argument("--time", action="store_true",
                    help="time each method's steady-state step instead (median, interleaved; dense size)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of --time")
    args = ap.parse_args()
    if args.time:
        for spec in args.models:
            name, size = spec.split(":")
            methods = ["none"] + [m for m in args.methods.split(",") if m != "none"]
            med = time_steps(name, int(size), methods, args.batch, args.steps, args.warm, tuple(args.extra),
                             args.threads)
            for m, t in med.items():
                print(f"{name}@{size} b{args.batch} {m:12s} step {t * 1e3:7.1f} ms  x{t / med['none']:.2f} dense "
                      f"(median of {args.steps}, {args.threads} threads)", flush=True)
            if args.json:
                print(json.dumps({"model": f"{name}@{size}", "batch": args.batch, "step_s": med}))
        return 0
    rows = []
    for spec in args.models:
        name, size = spec.split(":")
        dense: dict | None = None
        for method in args.methods.split(","):
            r = measure(name, int(size), method, args.batch, args.steps, args.warm, tuple(args.extra),
                        compiled=args.compile, profiler=args.check_profiler)
            dense = r if method == "none" else dense
            r["vs_dense"] = r["ops_per_step"] / dense["ops_per_step"] if dense and r["ops_per_step"] else None
            r["launches_vs_dense"] = r["launches_per_step"] / dense["launches_per_step"] if dense else None
            rows.append(r)
            ratio = f"{r['vs_dense']:.2f}" if r["vs_dense"] else "-"
            lratio = f"{r['launches_vs_dense']:.2f}" if r["launches_vs_dense"] else "-"
            ops = f"{r['ops_per_step']:6.0f}" if r["ops_per_step"] else "     -"
            mode = "compiled" if r["compiled"] else "eager"
            print(f"{r['model']:14s} {method:12s} {mode:8s} ops/step {ops} x{ratio:>5s} dense  "
                  f"launches {r['launches_per_step']:6.0f} x{lratio:>5s}  syncs/step {r['syncs_per_step']:4.1f}  "
                  f"host {r['host_ms']:5.1f} ms of a {STEP_MS:.0f} ms step ({100 * r['host_ms'] / STEP_MS:.0f}%)",
                  flush=True)
            if "top_ops" in r:
                print("    most launched:", ", ".join(f"{k} {v:.0f}" for k, v in r["top_ops"].items()),
                      f"| graphs per network {r['graphs']}" if r["compiled"] else "", flush=True)
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
