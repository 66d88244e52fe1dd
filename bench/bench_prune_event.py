"""Wall time of one pruning event vs one training step, and the coordinator's per-step overhead.

    DS_ACCELERATOR=cpu python bench/bench_prune_event.py                 # CPU: ResNet-50 at 96 px, batch 8
    python bench/bench_prune_event.py --size 224 --batch 64              # GPU (picked when available)
    torchrun --nproc_per_node=2 bench/bench_prune_event.py ...           # with real all-reduces

A pruning event is what the trainer runs: reduce (method statistics + gate thetas + BN
buffers, one all-reduce), decide (Taylor-FO-BN ranking -> plan), agree (plan-digest
all-gather), surgery, optimizer transplant and the DeepSpeed engine rebuild; each part is
timed, then the whole event through ``Coordinator.decide`` + ``Coordinator.apply``.  The
coordinator's per-step overhead is the cost of a decision check that prunes nothing (reduce
+ decide + agree), amortized over ``check_every`` steps, as a % of one training step.
Prints a table and one JSON line (``--out FILE`` writes it too).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=224 if cuda else 96, help="input side (224 on GPU, 96 on CPU)")
    ap.add_argument("--batch", type=int, default=64 if cuda else 8, help="micro-batch per rank")
    ap.add_argument("--precision", default="bf16" if cuda else "fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--channels-last", action="store_true", default=cuda)
    ap.add_argument("--steps", type=int, default=20 if cuda else 5, help="timed training steps")
    ap.add_argument("--events", type=int, default=3, help="timed pruning events")
    ap.add_argument("--per-step", type=int, default=400, help="channels removed per event")
    ap.add_argument("--check-every", type=int, default=30, help="steps between decision checks (Taylor default)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")

    from system.build import build_engine, build_network, build_opt, build_pruning_method, dense_spec_for
    from system.config import from_dict
    from system.pruning.methods import StepContext
    from system.pruning.surgery import apply_plan
    from system.pruning.transplant import transplant_optimizer
    from system.run_config import RunConfig
    from system.runtime.collectives import Collectives
    from system.runtime.coordinator import Coordinator
    from system.runtime.distributed import init_distributed, shutdown_distributed
    from system.runtime.engine import pick_device

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = from_dict(RunConfig, {
        "data": {"batch_size": args.batch}, "engine": {"kind": "deepspeed"},
        "model": {"name": args.model, "input_size": args.size},
        "train": {"precision": args.precision, "channels_last": args.channels_last},
        "method": {"name": "taylor", "taylor": {"per_step": args.per_step, "check_every": args.check_every,
                                                 "start_frac": 0.0, "stop_frac": 1.0, "keep_ratio": 0.1}}})
    env = init_distributed(cfg)
    device = pick_device("auto", env.local_rank)
    torch.manual_seed(0)
    model = build_network(cfg, dense_spec_for(cfg, num_classes=1000), device)  # as a run builds them
    method = build_pruning_method(cfg, 10**6, model)
    method.attach(model)
    opt = build_opt(cfg, model, method, args.batch * env.world_size)
    engine = build_engine(cfg, model, opt, env, device)
    del model, opt
    coord = Coordinator(Collectives(env.rank, env.world_size, device))
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)

    def train_step() -> float:
        sync(device)
        t = time.perf_counter()
        loss = F.cross_entropy(engine.forward(x).float(), y)
        engine.backward(loss)
        method.after_backward(engine.model, 0)
        engine.step()
        method.after_step(engine.model, 0)
        sync(device)
        return time.perf_counter() - t

    for _ in range(3):
        train_step()
    step_s = statistics.median(train_step() for _ in range(args.steps))

    def ctx() -> StepContext:
        return StepContext(step=1, epoch=0, total_steps=10**6, model=engine.model)

    # a check that prunes nothing: reduce + decide + agree (the per-step overhead, amortized)
    checks = []
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        coord.decide(method, engine.model, lambda: None)
        sync(device)
        checks.append(time.perf_counter() - t)
    check_s = statistics.median(checks)

    parts: dict[str, list[float]] = {k: [] for k in ("reduce", "decide", "agree", "surgery", "transplant",
                                                    "rebuild", "event", "first_step_after")}
    for _i in range(args.events):
        train_step()
        sync(device)
        t0 = time.perf_counter()
        coord.comm.all_reduce_(method.sync_tensors())
        coord.sync_model_state(engine.model)
        sync(device)
        t1 = time.perf_counter()
        plan = method.on_step_end(ctx())
        t2 = time.perf_counter()
        coord.comm.agree(plan, method.decision_state())
        t3 = time.perf_counter()
        old_model, old_opt = engine.model, engine.optimizer
        new_model, _, slices = apply_plan(old_model, plan)
        sync(device)
        t4 = time.perf_counter()
        new_opt = transplant_optimizer(old_opt, old_model, new_model, slices)
        method.after_prune(plan, slices, new_model)
        method.attach(new_model)
        sync(device)
        t5 = time.perf_counter()
        del old_model, old_opt
        engine.rebuild(new_model, new_opt)
        sync(device)
        t6 = time.perf_counter()
        del new_model, new_opt
        for k, v in zip(("reduce", "decide", "agree", "surgery", "transplant", "rebuild"),
                        (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
            parts[k].append(v)
        parts["event"].append(t6 - t0)
        parts["first_step_after"].append(train_step())
    # the same event through the coordinator's own entry points, as the trainer runs it
    train_step()
    sync(device)
    t = time.perf_counter()
    plan = coord.decide(method, engine.model, lambda: method.on_step_end(ctx()))
    coord.apply(plan, engine, method, step=0)
    sync(device)
    coord_event_s = time.perf_counter() - t
    step_after_s = statistics.median(train_step() for _ in range(max(3, args.steps // 2)))
    engine.close()

    med = {k: statistics.median(v) for k, v in parts.items()}
    res = {
        "model": args.model, "input": args.size, "micro_batch": args.batch, "world_size": env.world_size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "precision": args.precision, "channels_last": args.channels_last, "torch": torch.__version__,
        "channels_per_event": args.per_step, "step_s": step_s, "step_after_pruning_s": step_after_s,
        "event_s": med["event"], "event_over_step": med["event"] / step_s,
        "coordinator_event_s": coord_event_s, "parts_s": {k: med[k] for k in parts if k != "event"},
        "check_s": check_s, "check_every": args.check_every,
        "overhead_pct_per_step": 100.0 * check_s / args.check_every / step_s,
        "overhead_pct_if_checked_every_step": 100.0 * check_s / step_s,
    }
    if env.rank == 0:
        print(f"{args.model} {args.size}px, micro-batch {args.batch} x {env.world_size} rank(s), {res['device']}, "
              f"{args.precision}{', channels_last' if args.channels_last else ''}")
        print(f"  training step                 {1e3 * step_s:9.1f} ms")
        for k in ("reduce", "decide", "agree", "surgery", "transplant", "rebuild", "first_step_after"):
            print(f"  {k:<30}{1e3 * med[k]:9.1f} ms")
        print(f"  pruning event (sum)           {1e3 * med['event']:9.1f} ms = {res['event_over_step']:.2f} steps")
        print(f"  event via Coordinator         {1e3 * coord_event_s:9.1f} ms")
        print(f"  no-op check (reduce+decide+agree) {1e3 * check_s:7.2f} ms: {res['overhead_pct_per_step']:.3f} % of "
              f"a step at check_every={args.check_every} "
              f"({res['overhead_pct_if_checked_every_step']:.2f} % if every step)")
        print(json.dumps(res))
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=1))
    shutdown_distributed()


if __name__ == "__main__":
    main()
