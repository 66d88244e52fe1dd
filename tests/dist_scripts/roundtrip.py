"""DeepSpeedEngine checkpoint contract in one process: save_state(dir) then load_state(dir)
restores model and optimizer exactly, and the engine also survives rebuilding around the same
model (no duplicated DeepSpeed hooks).  Prints one JSON line.

    DS_ACCELERATOR=cpu python -m tests.dist_scripts.roundtrip DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


def main(directory: str) -> None:
    from system.config import from_dict
    from system.models.resnet import build_model
    from system.models.spec import dense_spec
    from system.optim import build_optimizer
    from system.run_config import RunConfig
    from system.runtime.engine import DistEnv
    from system.runtime.engine_ds import CHECKPOINT_TAG, DeepSpeedEngine

    torch.manual_seed(0)
    cfg = from_dict(RunConfig, {"data": {"batch_size": 4}, "engine": {"kind": "deepspeed"}})
    model = build_model(dense_spec("resnet20", num_classes=10, input_size=16))
    opt = build_optimizer(model, cfg.optim, {"unit": 0.0, "layer": 0.0}, 4)
    eng = DeepSpeedEngine(model, opt, cfg, DistEnv(), torch.device("cpu"))
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))

    def step():
        eng.backward(F.cross_entropy(eng.forward(x), y))
        eng.step()

    step()
    eng.rebuild(eng.model, eng.optimizer)  # same module again: hooks must not pile up
    step()
    n_hooks = len(eng.model._forward_pre_hooks) + len(eng.model._forward_hooks)
    eng.save_state(Path(directory))
    saved = {k: v.clone() for k, v in eng.model.state_dict().items()}
    saved_mom = {n: eng.optimizer.state[p]["momentum_buffer"].clone() for n, p in eng.model.named_parameters()
                 if p in eng.optimizer.state}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in eng.optimizer.param_groups]
    for g in eng.optimizer.param_groups:  # changed after the save: the load must bring the saved settings back
        g["lr"] *= 0.5
        g["momentum"] = 0.5
    step()
    step()
    eng.load_state(Path(directory))
    same_w = all(torch.equal(v, eng.model.state_dict()[k]) for k, v in saved.items())
    same_m = all(torch.equal(m, eng.optimizer.state[p]["momentum_buffer"])
                 for n, p in eng.model.named_parameters() for m in [saved_mom.get(n)] if m is not None)
    same_g = groups == [{k: v for k, v in g.items() if k != "params"} for g in eng.optimizer.param_groups]
    files = sorted(str(p.relative_to(directory)) for p in Path(directory).rglob("*") if p.is_file())
    eng.close()
    print(json.dumps({"weights_equal": same_w, "momentum_equal": same_m and bool(saved_mom), "groups_equal": same_g,
                      "module_hooks": n_hooks, "tag": CHECKPOINT_TAG, "files": files}))


if __name__ == "__main__":
    main(sys.argv[1])
