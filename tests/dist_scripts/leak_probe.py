"""20 pruning events through the coordinator and the DeepSpeed engine in one process;
prints one JSON line with resident memory (MiB) and open file descriptors after each event.

    DS_ACCELERATOR=cpu python tests/dist_scripts/leak_probe.py [--events 20] [--no-destroy]
    DS_ACCELERATOR=cpu torchrun --nproc_per_node=2 tests/dist_scripts/leak_probe.py

``--no-destroy`` skips the engine's release of the old DeepSpeed engine (to measure the leak
that the release prevents).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch
import torch.nn.functional as F

from system.config import from_dict
from system.models.resnet import build_model, gates_of
from system.models.spec import dense_spec
from system.optim import build_optimizer
from system.pruning.methods import build_method
from system.pruning.surgery import PrunePlan
from system.run_config import RunConfig
from system.runtime.collectives import Collectives
from system.runtime.coordinator import Coordinator
from system.runtime.distributed import init_distributed
from system.runtime.engine_ds import DeepSpeedEngine


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def n_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def live_objects() -> dict[str, int]:
    """Live DeepSpeed engines, models and the bytes of live parameter-sized tensors (Python-level leaks)."""
    import deepspeed.runtime.engine as dse

    from system.models.resnet import GatedResNet

    out = {"ds_engines": 0, "models": 0, "optimizers": 0}
    for o in gc.get_objects():
        if isinstance(o, dse.DeepSpeedEngine):
            out["ds_engines"] += 1
        elif isinstance(o, GatedResNet):
            out["models"] += 1
        elif isinstance(o, torch.optim.Optimizer):
            out["optimizers"] += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=20)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--no-destroy", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = from_dict(RunConfig, {"method": {"name": "taylor"}, "data": {"batch_size": args.batch},
                                "engine": {"kind": "deepspeed"}, "train": {"device": "cpu"}})
    model = build_model(dense_spec(args.model, num_classes=10, input_size=28))
    method = build_method(cfg.method, 1000)
    method.attach(model)
    opt = build_optimizer(model, cfg.optim, method.theta_lrs(), args.batch)
    env = init_distributed(cfg)  # under torchrun: a gloo group of WORLD_SIZE ranks
    engine = DeepSpeedEngine(model, opt, cfg, env, torch.device("cpu"))
    del model, opt  # only the engine holds the live model and optimizer
    if args.no_destroy:
        engine._destroy = lambda: setattr(engine, "_ds", None)
    coord = Coordinator(Collectives(env.rank, env.world_size))
    x, y = torch.randn(args.batch, 3, 28, 28), torch.randint(0, 10, (args.batch,))
    rows = []
    for i in range(args.events):
        for _ in range(2):
            loss = F.cross_entropy(engine.forward(x), y)
            engine.backward(loss)
            engine.step()
            del loss  # DeepSpeed's output hooks on it reference the engine
        gates = sorted((n, g) for n, g in gates_of(engine.model).items() if g.kind == "unit" and g.theta.numel() > 1)
        name, _ = gates[i % len(gates)]
        plan = coord.decide(method, engine.model, lambda name=name: PrunePlan(units={name: (0,)}))
        coord.apply(plan, engine, method, step=i)
        gc.collect()
        rows.append({"event": i + 1, "rss_mib": round(rss_mib(), 2), "fds": n_fds(), **live_objects()})
    engine.close()
    if env.rank == 0:
        print(json.dumps({"model": args.model, "world_size": env.world_size, "destroy": not args.no_destroy,
                          "rows": rows}))


if __name__ == "__main__":
    main()
