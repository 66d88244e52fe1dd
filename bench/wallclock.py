"""Do pruning runs finish sooner than dense? Whole training runs back to back, each alone (issue 24 point 4).

For every model and method: one ``parsimony-train`` run of the study recipe (configs/study_<method>.yaml, for dense
configs/study_dense.yaml: Fashion-MNIST-4k, batch 64, LR 0.1 cosine) at ``--target`` of the dense MACs, ``--epochs``
epochs, with the machine's cores to itself (``--threads``), tracking and the end-of-run latency timing off; then one
table: wall-clock against the dense run of the same model, the same for the training steps alone (summary.json's
``time_s``: the wall-clock less evaluation, pruning events and checkpoints), training MACs (the share of the dense
run's, as the run counts them: every forward and backward, an estimator's extra forwards included), the final
network's MACs and top-1 on the validation split. The target is a wall-clock of at most 0.85 of dense. A run that
finished is read back, not run again, so the bench resumes. This machine's wall-clock drifts by 10% and more between
runs of the same training, so ``--repeats N`` trains every run N times in rounds (dense first in each, the later
rounds in ``-r<i>`` directories) and gives each method's median ratio to the dense run of its round, with the range.

    python -m pipelines.fmnist --out data/fmnist-4k --train 4000     # the data, once
    python bench/wallclock.py                                        # resnet56@32 and resnet18@64
    python bench/wallclock.py --models resnet20:32 --epochs 1 --methods none,taylor
    python bench/wallclock.py --models resnet18:64 --methods variational --extra method.variational.paired_every=4
    python bench/wallclock.py --epochs 5 --repeats 3 --root runs/wallclock6       # 3 rounds, median ratios
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 0.85
RECIPES = {"none": "study_dense", "taylor": "study_taylor", "l1": "study_l1", "variational": "study_variational"}


def run(model: str, size: int, method: str, args: argparse.Namespace, rep: int = 0) -> dict:
    """The run's summary.json (training it first unless it finished); ``rep`` > 0: the same training again,
    in a directory of its own (``-r<rep>``)."""
    extra = args.extra if method != "none" else []
    # a run with extra overrides is named by them, so that it never meets (or is read back as) the default's
    # (the key's last part and the value: method.variational.alpha=0.5 -> -alpha0.5)
    tag = "".join(f"-{key.rsplit('.', 1)[-1]}{value}" for key, _, value in (o.partition("=") for o in extra))
    name = f"{model}-{size}-{method}-e{args.epochs}{tag}" + (f"-r{rep}" if rep else "")
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


def row(model: str, method: str, runs: list[dict], dense: list[dict]) -> dict:
    """A method's line: the median wall-clock over the rounds, and the median (min, max) of its ratio to the
    dense run of the same round (the machine drifts between rounds; within one, the runs are back to back).
    ``steps_vs_dense``: the same for the training steps alone (summary.json's ``time_s``)."""
    ratios = [s["wall_s"] / d["wall_s"] for s, d in zip(runs, dense)]
    steps = [s.get("time_s", {}).get("steps") for s in runs]
    dense_steps = [d.get("time_s", {}).get("steps") for d in dense]
    steps_ratio = [a / b for a, b in zip(steps, dense_steps) if a and b]
    times = [s["time_s"] for s in runs if s.get("time_s")]
    last = runs[-1]  # (the rounds are the same training: MACs, top-1 and blocks are those of any)
    return {"model": model, "method": method, "repeats": len(runs),
            "wall_s": statistics.median(s["wall_s"] for s in runs), "walls_s": [s["wall_s"] for s in runs],
            "wall_vs_dense": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "steps_vs_dense": statistics.median(steps_ratio) if len(steps_ratio) == len(runs) else None,
            "time_s": {k: statistics.median(t[k] for t in times) for k in times[0]} if len(times) == len(runs)
            else None,
            "train_macs_pct": last["train_macs_pct"], "macs_pct": last["macs_pct"], "top1": 100 * last["top1"],
            "steps": last["steps"], "blocks_removed": last.get("blocks_removed", 0)}


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
    ap.add_argument("--repeats", type=int, default=1,
                    help="rounds of every run (dense first in each); the table gives the median ratio and its range")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--extra", nargs="*", default=[], help="overrides for every run but the dense one (in its name)")
    args = ap.parse_args()
    methods = args.methods.split(",")
    if "none" not in methods:
        methods.insert(0, "none")
    rows = []
    for spec in args.models:
        model, size = spec.split(":")
        rounds: dict[str, list[dict]] = {m: [] for m in methods}
        for rep in range(args.repeats):  # each round trains dense and every method once, in this order
            for method in methods:
                rounds[method].append(run(model, int(size), method, args, rep))
        for method in methods:
            rows.append(row(f"{model}@{size}", method, rounds[method], rounds["none"]))
    print(f"{'model':14s} {'method':12s} {'wall s':>8s} {'vs dense':>9s} {'range':>11s} {'steps':>6s} "
          f"{'eval s':>7s} {'prune s':>8s} {'train MACs':>11s} {'MACs':>7s} {'top-1':>7s} {'blocks':>6s}  "
          f"target <= {TARGET_RATIO}")
    for r in rows:
        ok = "" if r["method"] == "none" else ("met" if r["wall_vs_dense"] <= TARGET_RATIO else "not met")
        spread = f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}" if r["repeats"] > 1 else "-"
        t = r["time_s"]  # (runs from before summary.json had time_s: the split is not known)
        split = (f"{r['steps_vs_dense']:6.2f} {t['eval']:7.1f} {t['prune']:8.1f}" if t and r["steps_vs_dense"]
                 else f"{'-':>6s} {'-':>7s} {'-':>8s}")
        print(f"{r['model']:14s} {r['method']:12s} {r['wall_s']:8.1f} {r['wall_vs_dense']:9.2f} {spread:>11s} "
              f"{split} {r['train_macs_pct']:10.1f}% {r['macs_pct']:6.1f}% {r['top1']:7.2f} "
              f"{r['blocks_removed']:6d}  {ok}")
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
