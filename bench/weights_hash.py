"""The sha256 of the final weights of a fixed-seed run per method: the check that a refactoring changed no
behaviour (same seed, same data order, same decisions -> the same bytes).

    python bench/weights_hash.py [--methods variational,taylor,l1] [--steps 40]

Each run: ResNet-20 on synthetic 16 px data, batch 16, the method pruning during the run (variational
with its defaults at a 0.5 MACs target; taylor and l1 at a 0.5 target), tracking and latency off.
Prints one line per method: its name, the final MACs share, and the sha256 of ``final/model.safetensors``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from system.config import apply_overrides, from_dict
from system.run_config import RunConfig

BASE = ["model.name=resnet20", "data.loader=synthetic", "data.synthetic_classes=4", "data.synthetic_samples=512",
        "data.batch_size=16", "data.train_size=16", "data.val_resize=16", "data.val_crop=16", "data.workers=0",
        "train.epochs=1", "train.progress=false", "train.eval_batches=2", "tracking.enabled=false",
        "latency.enabled=false", "optim.lr=0.05", "train.seed=0", "train.threads=1", "checkpoint.every_steps=0"]
METHODS = {
    "variational": ["method.name=variational", "method.target_macs=0.5"],
    "taylor": ["method.name=taylor", "method.target_macs=0.5", "method.taylor.check_every=3",
               "method.taylor.start_frac=0.1", "method.taylor.stop_frac=0.7"],
    "l1": ["method.name=l1", "method.target_macs=0.5", "method.l1.check_every=3",
           "method.l1.start_frac=0.1", "method.l1.stop_frac=0.7"],
}


def run(method: str, steps: int) -> tuple[float, str]:
    from system.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        over = [*BASE, *METHODS[method], f"train.max_steps={steps}", f"run.root={tmp}", f"run.dir={tmp}/run"]
        cfg = from_dict(RunConfig, apply_overrides({}, over))
        summary = Trainer(cfg).run()
        digest = hashlib.sha256((Path(tmp) / "run" / "final" / "model.safetensors").read_bytes()).hexdigest()
        return float(summary["macs_pct"]), digest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="variational,taylor")
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    out = {}
    for m in args.methods.split(","):
        macs, digest = run(m, args.steps)
        out[m] = {"macs_pct": round(macs, 3), "sha256": digest}
        print(f"{m:12s} MACs {macs:6.2f}%  sha256 {digest}", flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
