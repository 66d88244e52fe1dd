"""Run one training (or one resumed part of it) and record what a resume must reproduce.

In process: ``record(overrides)``.  As a script (one process per rank, or under SIGKILL tests)::

    python -m tests.ckpt_scripts.harness OUT_JSON key=value ...

writes OUT_JSON (rank 0; ``.rank{r}`` suffix on other ranks) with the per-step losses, the
(epoch, batch) position of every step, the pruning-event digests, where it resumed from and
whether it was stopped by ``PARSIMONY_STOP_AFTER_STEP``; the final weights go beside it as
``OUT_JSON.weights.pt``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]

#: a small, fast recipe: ResNet-20 on 16x16 synthetic images, 12 steps per epoch, 2 epochs
BASE = ["model.name=resnet20", "data.loader=synthetic", "data.synthetic_samples=384", "data.synthetic_classes=10",
        "data.batch_size=32", "data.train_size=16", "data.val_resize=16", "data.val_crop=16", "data.workers=0",
        "train.epochs=2", "train.eval_batches=1", "train.progress=false", "train.log_every_steps=1",
        "train.device=cpu", "train.threads=1", "tracking.enabled=false", "checkpoint.every_steps=4",
        "checkpoint.keep_last=3", "latency.repeats=3"]  # (the final timing at its minimum)
#: the demo shards instead (real JPEGs through the WebDataset loader), 20 steps per epoch at batch 200
WDS = ["data.loader=wds", "data.batch_size=200"]
TAYLOR = ["method.name=taylor", "method.taylor.check_every=3", "method.taylor.start_frac=0.1",
          "method.taylor.stop_frac=0.7", "method.taylor.per_step=40", "method.taylor.keep_ratio=0.5"]
VARIATIONAL = ["method.name=variational", "method.variational.check_every=2", "method.variational.patience=1",
               "method.variational.warmup_frac=0.1", "method.variational.nu=2.0",
               "method.variational.theta_travel=1.0", "method.variational.harden_at=0.75"]


def record(overrides: list[str], weights_out: Path | None = None) -> dict:
    from system.config import load_config
    from system.run_config import RunConfig
    from system.runtime.distributed import init_distributed, shutdown_distributed
    from system.runtime.faults import InjectedStop
    from system.trainer import Trainer

    cfg = load_config(RunConfig, None, BASE + list(overrides))
    env = init_distributed(cfg)
    rec: dict = {"losses": [], "positions": [], "stopped": None, "resumed_from": None, "summary": None}
    try:
        tr = Trainer(cfg, env)
        inner = tr.train_step

        def step(x, y):
            pos = (tr.state.epoch, tr.state.batch)
            loss = inner(x, y)
            rec["losses"].append([tr.state.step, float(loss)])  # (the test reads every step; the loop does not)
            rec["positions"].append(list(pos))
            return loss

        tr.train_step = step
        try:
            rec["summary"] = tr.run()
        except InjectedStop as stop:
            rec["stopped"] = stop.step
        ck = tr.checkpointer.resumed_from
        rec["resumed_from"] = None if ck is None else ck.step
        rec["events"] = [[ev.step, ev.digest] for ev in tr.coord.events]
        rec["run_id"] = getattr(tr, "run_id", None)
        rec["weights"] = {k: v.detach().cpu().clone() for k, v in tr.model.state_dict().items()}
    finally:
        shutdown_distributed()
    if weights_out is not None:
        torch.save(rec.pop("weights"), weights_out)
    return rec


def main(argv: list[str]) -> int:
    import logging
    import os

    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s")
    out = Path(argv[0]) if rank == 0 else Path(f"{argv[0]}.rank{rank}")
    rec = record(argv[1:], weights_out=Path(f"{out}.weights.pt"))
    out.write_text(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
