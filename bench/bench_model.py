"""Training-step time: gate overhead and the speed-up of a physically pruned network.

(a) torchvision ResNet vs our gated model with every gate on (sampled gates at theta = 1, drawn as
    the variational method draws them: unit gates per example, layer gates once per batch) — the cost
    of the gates;
(a') the same model with its gates deterministic and all on (after hardening): the multiply
    forced (``force = 1``, what the gate did before it learned to skip) vs skipped;
(b) a model physically pruned to about 50% of the MACs (inner channels cut uniformly) vs the
    dense one — the measured speed-up printed beside the MACs ratio;
(c) ``--specs``: the training step of the networks runs ended with (their exported ``spec.json``), without
    gates, against the dense network of their family, interleaved: time and MACs against dense, and their
    quotient, the time a MAC costs in that shape against the dense shape.

    python bench/bench_model.py                       # CPU, resnet20 @32 and resnet50 @64
    python bench/bench_model.py --device cuda --precision bf16 --channels-last \
        --models resnet50:224:128 resnet20:32:512
    python bench/bench_model.py --specs runs/wallclock5/resnet18-64-*-e5/final --batch 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision
from plans import plan_for_macs  # the uniform cut the benches share (bench/plans.py)

from system.export import load_spec
from system.models.resnet import build_model, gates_of, set_gate_mode
from system.models.spec import dense_spec
from system.pruning.complexity import count
from system.pruning.surgery import apply_plan


class Stepper:
    """One model's training step on fixed random data (model, optimizer, batch prepared once)."""

    def __init__(self, model, batch, size, classes, device, precision, channels_last):
        self.device = device
        self.model = model.to(device).train()
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.x = torch.randn(batch, 3, size, size, device=device)
        if channels_last:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, classes, (batch,), device=device)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            loss = F.cross_entropy(self.model(self.x).float(), self.y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def interleaved(steppers: dict, iters: int, warmup: int) -> dict:
    """Median step time of each stepper, measured in alternation so drift hits all alike."""
    for st in steppers.values():
        for _ in range(warmup):
            st()
    times = {k: [] for k in steppers}
    for _ in range(iters):
        for k, st in steppers.items():
            times[k].append(st())
    return {k: statistics.median(v) for k, v in times.items()}


def time_specs(paths: list[str], args: argparse.Namespace) -> list[dict]:
    """(c): each exported network's training step (no gates) against its family's dense one, interleaved."""
    device, batch = torch.device(args.device), args.batch
    specs = {p: load_spec(p) for p in paths}
    families = {(s.name, s.input_size, s.num_classes, s.shortcut, s.in_channels) for s in specs.values()}
    if len(families) != 1:
        raise SystemExit(f"--specs: one model family, input size and head at a time, got {sorted(families)}")
    name, size, classes, shortcut, cin = families.pop()
    dense = dense_spec(name, num_classes=classes, input_size=size, shortcut=shortcut, in_channels=cin)
    nets = {"dense": dense, **specs}
    torch.manual_seed(0)
    steppers = {k: Stepper(build_model(s, gates=False), batch, size, s.num_classes, device, args.precision,
                           args.channels_last) for k, s in nets.items()}
    times = interleaved(steppers, args.iters, args.warmup)
    dense_macs = count(dense)[0]
    rows = []
    for k, s in nets.items():
        macs = count(s)[0] / dense_macs
        t = times[k] / times["dense"]
        rows.append({"spec": k, "model": name, "input": size, "batch": batch, "step_s": times[k], "macs_ratio": macs,
                     "time_ratio": t, "time_per_mac_vs_dense": t / macs})
        print(f"{k}: {name}@{size} b{batch} step {times[k] * 1e3:.1f} ms, MACs x{macs:.3f}, time x{t:.3f} of dense, "
              f"time per MAC x{t / macs:.2f} of dense's", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet20:32:128", "resnet50:64:16"],
                    help="name:input_size:batch")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--target", type=float, default=0.5, help="MACs fraction of the pruned model")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--specs", nargs="+", help="exported networks (a run's final/ or its spec.json) to time, (c)")
    ap.add_argument("--batch", type=int, default=64, help="the batch of --specs")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.specs:
        rows = time_specs(args.specs, args)
        if args.json:
            print(json.dumps(rows, indent=1))
        return
    rows = []
    for item in args.models:
        name, size, batch = item.split(":")
        size, batch = int(size), int(batch)
        spec = dense_spec(name, input_size=size)
        classes = spec.num_classes
        torch.manual_seed(0)
        gated = build_model(spec)
        set_gate_mode(gated, unit="sampled", layer="sampled")  # theta = 1: every gate on
        for g in gates_of(gated).values():  # as the variational method draws by default (per_example,
            g.per_example = g.kind == "unit"  # layer_per_example): units per example, blocks once per batch
        plan, ratio, _ = plan_for_macs(gated.spec(), args.target)
        pruned, pspec, _ = apply_plan(gated, plan)
        row = {"model": name, "input": size, "batch": batch, "device": str(device), "precision": args.precision,
               "channels_last": args.channels_last, "macs_dense": count(spec)[0], "macs_pruned": count(pspec)[0]}
        hard_mul, hard_skip = build_model(spec), build_model(spec)
        for m in (hard_mul, hard_skip):
            set_gate_mode(m, unit="deterministic", layer="deterministic")
        for g in gates_of(hard_mul).values():
            g.force = 1.0  # the multiply by ones the deterministic gate used to do
        models = {"plain": build_model(spec, gates=False), "gated": gated, "pruned": pruned,
                  "hard_mul": hard_mul, "hard_skip": hard_skip}
        if name in ("resnet18", "resnet34", "resnet50", "resnet101"):
            models["torchvision"] = getattr(torchvision.models, name)()
        steppers = {k: Stepper(m, batch, size, classes, device, args.precision, args.channels_last)
                    for k, m in models.items()}
        for k, t in interleaved(steppers, args.iters, args.warmup).items():
            row[f"{k}_s"] = t
        ref = row.get("torchvision_s", row["plain_s"])
        row["gate_overhead_pct"] = 100.0 * (row["gated_s"] / ref - 1.0)
        row["hardened_mul_overhead_pct"] = 100.0 * (row["hard_mul_s"] / row["plain_s"] - 1.0)
        row["hardened_skip_overhead_pct"] = 100.0 * (row["hard_skip_s"] / row["plain_s"] - 1.0)
        row["macs_ratio"] = ratio
        row["speedup"] = row["gated_s"] / row["pruned_s"]
        row["ideal_speedup"] = 1.0 / ratio
        rows.append(row)
        print(f"{name}@{size} b{batch} {device} {args.precision}{' CL' if args.channels_last else ''}: "
              f"torchvision {row.get('torchvision_s', float('nan')) * 1e3:.1f} ms, "
              f"plain {row['plain_s'] * 1e3:.1f} ms, "
              f"gated {row['gated_s'] * 1e3:.1f} ms (overhead {row['gate_overhead_pct']:+.1f}%), "
              f"hardened: multiply {row['hardened_mul_overhead_pct']:+.1f}% vs skipped "
              f"{row['hardened_skip_overhead_pct']:+.1f}% over no gates, "
              f"pruned to {100 * ratio:.1f}% MACs {row['pruned_s'] * 1e3:.1f} ms: "
              f"speed-up x{row['speedup']:.2f} vs ideal x{row['ideal_speedup']:.2f}", flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
