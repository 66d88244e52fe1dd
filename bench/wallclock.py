"""Do pruning runs finish sooner than dense? Whole training runs back to back, each alone (issue 24 point 4).

For every model and method: one ``parsimony-train`` run of the study recipe (configs/study_<method>.yaml:
Fashion-MNIST-4k, batch 64, LR 0.1 cosine) at ``--target`` of the dense MACs, ``--epochs`` epochs, with the
machine's cores to itself (``--threads``), tracking and the end-of-run latency timing off; then one table:
wall-clock against the dense run of the same model, the same for the training steps alone (summary.json's
``time_s``: the wall-clock less evaluation, pruning events and checkpoints), training MACs (the share of the
dense run's, as the run counts them: every forward and backward, an estimator's extra forwards included), the
final network's MACs and top-1 on the validation split. The target is a wall-clock of at most 0.85 of dense. A
run that finished is read back, not run again, so the bench resumes.

    python -m pipelines.fmnist --out data/fmnist-4k --train 4000     # the data, once
    python bench/wallclock.py                                        # resnet56@32 and resnet18@64
    python bench/wallclock.py --models resnet20:32 --epochs 1 --methods none,taylor
    python bench/wallclock.py --models resnet18:64 --methods variational --extra method.variational.paired_every=4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 0.85
RECIPES = {"none": "study_dense", "taylor": "study_taylor", "l1": "study_l1", "variational": "study_variational"}


def run(model: str, size: int, method: str, args: argparse.Namespace) -> dict:
    """The run's summary.json (training it first unless it finished)."""
    extra = args.extra if method != "none" else []
    # a run with extra overrides is named by them, so that it never meets (or is read back as) the default's
    # (the key's last part and the value: method.variational.alpha=0.5 -> -alpha0.5)
    tag = "".join(f"-{o.split('=', 1)[0].rsplit('.', 1)[-1]}{o.split('=', 1)[1] if '=' in o else ''}" for o in extra)
    name = f"{model}-{size}-{method}-e{args.epochs}{tag}"
    run_dir = Path(args.root) / name
    summary = run_dir / "summary.json"
    if not summary.is_file():
        cmd = [sys.executable, "-m", "launch.train", "--config", str(ROOT / "configs" / f"{RECIPES[method]}.yaml"),
               f"model.name={model}", f"data.root={args.data}", f"data.train_size={size}", f"data.val_resize={size}",
               f"data.val_crop={size}", f"train.epochs={args.epochs}", f"train.threads={args.threads}",
               "tracking.enabled=false", "latency.enabled=false", "data.eval_split=val", f"run.root={args.root}",
               f"run.dir={run_dir}", f"run.name={name}", "run.resume=auto", f"train.seed={args.seed}"]
        if method != "none":
            cmd.append(f"method.target_macs={args.target}")
        cmd += extra
        print(f"training {name} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{name} failed ({r.returncode}):\n{r.stderr[-3000:]}")
        print(f"  {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    return json.loads(summary.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet56:32", "resnet18:64"])
    ap.add_argument("--methods", default="none,taylor,variational")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default="data/fmnist-4k")
    ap.add_argument("--root", default="runs/wallclock")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--extra", nargs="*", default=[], help="overrides for every run but the dense one (in its name)")
    args = ap.parse_args()
    methods = args.methods.split(",")
    if "none" not in methods:
        methods.insert(0, "none")
    rows = []
    for spec in args.models:
        model, size = spec.split(":")
        dense = None
        for method in methods:
            s = run(model, int(size), method, args)
            dense = s if method == "none" else dense
            steps_s = s.get("time_s", {}).get("steps")  # the training steps alone (summary.json's time_s)
            dense_steps = dense.get("time_s", {}).get("steps")
            rows.append({"model": f"{model}@{size}", "method": method, "wall_s": s["wall_s"],
                         "wall_vs_dense": s["wall_s"] / dense["wall_s"], "time_s": s.get("time_s"),
                         "steps_vs_dense": steps_s / dense_steps if steps_s and dense_steps else None,
                         "train_macs_pct": s["train_macs_pct"],
                         "macs_pct": s["macs_pct"], "top1": 100 * s["top1"], "steps": s["steps"],
                         "blocks_removed": s.get("blocks_removed", 0)})
    print(f"{'model':14s} {'method':12s} {'wall s':>8s} {'vs dense':>9s} {'steps s':>8s} {'vs dense':>9s} "
          f"{'eval s':>7s} {'prune s':>8s} {'train MACs':>11s} {'MACs':>7s} {'top-1':>7s} {'blocks':>6s}  "
          f"target <= {TARGET_RATIO}")
    for r in rows:
        ok = "" if r["method"] == "none" else ("met" if r["wall_vs_dense"] <= TARGET_RATIO else "not met")
        t = r["time_s"] or {}  # (a run from before summary.json had time_s: its split is not known)
        split = (f"{t['steps']:8.1f} {r['steps_vs_dense']:9.2f} {t['eval']:7.1f} {t['prune']:8.1f}"
                 if t and r["steps_vs_dense"] else f"{'-':>8s} {'-':>9s} {'-':>7s} {'-':>8s}")
        print(f"{r['model']:14s} {r['method']:12s} {r['wall_s']:8.1f} {r['wall_vs_dense']:9.2f} {split} "
              f"{r['train_macs_pct']:10.1f}% {r['macs_pct']:6.1f}% {r['top1']:7.2f} {r['blocks_removed']:6d}  {ok}")
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
