"""Compiled (``train.compile``) against eager training steps, and the recompile after a pruning event.

Each mode builds a real run (``system.trainer.Trainer`` on synthetic data, the variational method's gates in
the forward) and times ``Trainer.train_step``: the first step (for the compiled run: the compile), the
median of ``--steps`` steady steps, then one pruning event (a uniform cut of every inner width to ``--keep``
through ``Coordinator.apply``, as the loop applies one), the first step after it (the recompile) and the
median after it.  Prints one row per mode and the ratios::

    python bench/compile_step.py                      # ResNet-20 @32, batch 64, inductor, CPU
    python bench/compile_step.py --model resnet56 --backend aot_eager
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(args: argparse.Namespace, compiled: bool, root: Path) -> dict[str, float]:
    from plans import uniform_plan

    from system.config import apply_overrides, from_dict
    from system.run_config import RunConfig
    from system.trainer import Trainer

    over = [f"model.name={args.model}", f"model.input_size={args.size}", "data.loader=synthetic",
            f"data.batch_size={args.batch}", "data.workers=0", f"data.train_size={args.size}",
            f"data.val_resize={args.size}", f"data.val_crop={args.size}", "method.name=variational",
            # no warm-up: the timed steps train theta with the gates drawn (in the warm-up, since session 13,
            # the gates idle and multiply nothing)
            "method.variational.warmup_frac=0.0",
            "tracking.enabled=false", "latency.enabled=false", "checkpoint.every_steps=0", "train.progress=false",
            f"train.threads={args.threads}", f"train.compile={str(compiled).lower()}",
            f"train.compile_backend={args.backend}", f"run.dir={root / ('compiled' if compiled else 'eager')}"]
    trainer = Trainer(from_dict(RunConfig, apply_overrides({}, over)))
    device = trainer.device
    spec = trainer.spec()
    x = torch.randn(args.batch, spec.in_channels, args.size, args.size, device=device)
    y = torch.randint(0, spec.num_classes, (args.batch,), device=device)

    def step() -> float:
        sync(device)
        t = time.perf_counter()
        trainer.train_step(x, y)
        sync(device)
        return time.perf_counter() - t

    out = {"first_s": step()}
    out["step_s"] = statistics.median(step() for _ in range(args.steps))
    t = time.perf_counter()
    trainer.coord.apply(uniform_plan(trainer.spec(), args.keep), trainer.engine, trainer.method, trainer.state.step)
    out["event_s"] = time.perf_counter() - t
    out["first_after_s"] = step()
    out["step_after_s"] = statistics.median(step() for _ in range(args.steps))
    trainer.engine.close()
    if trainer.lock is not None:
        trainer.lock.release()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--steps", type=int, default=10, help="timed steady steps, before and after the event")
    ap.add_argument("--keep", type=float, default=0.6, help="the event keeps this fraction of every inner width")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="", help="also write the figures here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        rows = {mode: measure(args, mode == "compiled", Path(tmp)) for mode in ("eager", "compiled")}
    e, c = rows["eager"], rows["compiled"]
    print(f"{args.model} @{args.size}, batch {args.batch}, {args.threads} threads, backend {args.backend}, "
          f"{torch.get_num_threads()} torch threads, {'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(f"{'mode':10s} {'first step':>11s} {'step':>9s} {'event':>8s} {'1st after':>10s} {'step after':>11s}")
    for mode, r in rows.items():
        print(f"{mode:10s} {r['first_s']:10.2f}s {1e3 * r['step_s']:7.1f}ms {r['event_s']:7.2f}s "
              f"{r['first_after_s']:9.2f}s {1e3 * r['step_after_s']:9.1f}ms")
    ratios = {"compiled_vs_eager_step": c["step_s"] / e["step_s"],
              "compiled_vs_eager_step_after": c["step_after_s"] / e["step_after_s"],
              "compile_s": c["first_s"] - c["step_s"],
              "recompile_after_event_s": c["first_after_s"] - c["step_after_s"],
              "recompile_in_steps": (c["first_after_s"] - c["step_after_s"]) / c["step_after_s"]}
    for k, v in ratios.items():
        print(f"{k:30s} {v:9.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
