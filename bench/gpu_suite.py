"""One-shot GPU benchmark suite: dense and pruned ResNet-50 training speed in one table.

A person with one GPU runs it once (under 8 minutes on an H100 / H200)::

    pip install --no-deps --no-build-isolation -e . && bash bench/gpu_suite.sh   # the lent GPU machine
    python bench/gpu_suite.py --batch 128 --rows dense,pruned      # a subset of the rows, another batch
    python bench/gpu_suite.py --out gpu_suite.json --no-compile    # write the JSON too; skip torch.compile

Every row times the same training step: plain models (``build_model(spec, gates=False)``: the
architecture's speed, no gate multiplies), SGD with momentum, cross-entropy, bf16 autocast and
channels_last on a GPU (``cudnn.benchmark`` on), ``torch.cuda.synchronize`` around each timed step,
the median of ``--iters`` steps after ``--warmup``.  The rows:

``dense``            dense ResNet-50 on synthetic tensors already on the GPU (the model alone);
``dense_dali``       the same step fed by the project's DALI loader (``pipelines.loaders``: "mixed" nvJPEG
                     decode, random-resized crop, flip, normalise) from JPEG WebDataset shards made in a temp
                     dir (``bench_loaders.make_tree`` photographs + ``pipelines.shards``); throughput over the
                     timed window, loading included;
``dense_deepspeed``  the same step through ``system.runtime.engine_ds.DeepSpeedEngine`` (ZeRO 0, torch_autocast, a
                     single-process nccl / gloo group);
``pruned_r1/_r8``    every block's inner widths cut by one keep fraction, bisected so the MACs are about 50%
                     of dense, kept widths rounded to multiples of 1 / 8; built by surgery (``apply_plan``)
                     from the dense model and timed interleaved with it: speed-up and speed-up / ideal, where
                     ideal = dense MACs / pruned MACs (the issue's target is >= 0.8);
``prune_event``      one pruning event's wall time in training steps: ``bench/bench_prune_event.py`` in a
                     subprocess (Taylor plan, surgery, optimizer transplant, DeepSpeed rebuild, first step);
``compile``          ``torch.compile`` of the round_to=8 model after that surgery: compile time (its first
                     step) and compiled step time against eager (on by default on a GPU; ``--no-compile``).

A row that cannot run here (no GPU, DALI or DeepSpeed not installed, an error) reads "skipped: <reason>";
the others still run.  Without a CUDA device the suite says so in one line and runs its CPU rows on a tiny
model (ResNet-20 at 32 px): the CI path (tests/integration/test_gpu_suite.py), so the script cannot rot.
Progress goes to stderr (logging, and any library output); stdout holds one caption line, one markdown
table and one JSON line (``--out FILE`` writes the JSON too).

The code: the settings in ``bench/gpu_suite_base.py``, the rows in ``bench/gpu_suite_rows.py`` (the Trainer-step
rows in ``bench/gpu_suite_trainer.py``), the table in ``bench/gpu_suite_report.py``, the command line here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, however this file is loaded

import torch  # noqa: E402
from gpu_suite_base import Settings  # noqa: E402
from gpu_suite_report import table  # noqa: E402
from gpu_suite_rows import ROWS, make_jpeg_shards, plan_for_macs, run_rows  # noqa: E402

# what tests and other scripts read from this file (the code lives in gpu_suite_rows / gpu_suite_report)
__all__ = ["ALIASES", "ROWS", "main", "make_jpeg_shards", "parse_rows", "plan_for_macs"]

#: --rows also takes these names for groups of rows
ALIASES = {"dali": ("dense_dali",), "deepspeed": ("dense_deepspeed",), "pruned": ("pruned_r1", "pruned_r8"),
           "event": ("prune_event",)}


def parse_rows(text: str) -> set[str]:
    out: set[str] = set()
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if item == "all":
            out.update(ROWS)
        elif item in ALIASES:
            out.update(ALIASES[item])
        elif item in ROWS:
            out.add(item)
        else:
            raise argparse.ArgumentTypeError(
                f"unknown row {item!r}; rows: {', '.join(ROWS)} (groups: {', '.join(ALIASES)}, all)")
    return out


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50" if cuda else "resnet20",
                    help="network (resnet50 on a GPU, resnet20 without one)")
    ap.add_argument("--size", type=int, default=224 if cuda else 32, help="input side (224 / 32 px)")
    ap.add_argument("--batch", type=int, default=256 if cuda else 16, help="batch (256 / 16)")
    ap.add_argument("--iters", type=int, default=30 if cuda else 3, help="timed steps per measurement (30 / 3)")
    ap.add_argument("--warmup", type=int, default=10 if cuda else 1, help="untimed steps first (10 / 1)")
    ap.add_argument("--precision", default="bf16" if cuda else "fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=cuda)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=cuda,
                    help="the torch.compile row (on by default on a GPU)")
    ap.add_argument("--rows", type=parse_rows, default=set(ROWS),
                    help=f"comma-separated subset: {', '.join(ROWS)}; groups: {', '.join(ALIASES)}")
    ap.add_argument("--target", type=float, default=0.5, help="MACs fraction of the pruned rows")
    ap.add_argument("--budget", type=float, default=450.0,
                    help="seconds for the whole suite on a GPU: a row is skipped when too little is left")
    # one thread without a GPU: the tiny model gains nothing from more, and two OpenMP threads on a busy
    # two-core machine were seen to make a ResNet-20 step 40x slower
    ap.add_argument("--threads", type=int, default=0 if cuda else 1,
                    help="torch CPU threads (0: torch's default; 1 without a GPU)")
    ap.add_argument("--out", default="", help="also write the JSON here")
    args = ap.parse_args(argv)

    # stdout carries the table alone: library output (DeepSpeed's logger, extension builds, the
    # prune-event subprocess) goes to stderr with the progress messages
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(device)
        print(f"gpu_suite on {name}: {args.model} {args.size}px, batch {args.batch}, {args.precision}"
              f"{', channels_last' if args.channels_last else ''}; torch {torch.__version__}", file=out)
    else:
        name = f"cpu x{torch.get_num_threads()} ({platform.processor() or platform.machine()})"
        print(f"no CUDA device: running the CPU rows on a tiny model ({args.model} {args.size}px, batch "
              f"{args.batch}, {args.precision}, {name}; torch {torch.__version__})", file=out)
    s = Settings(device=device, model=args.model, size=args.size, batch=args.batch, precision=args.precision,
                 channels_last=args.channels_last, warmup=args.warmup, iters=args.iters, target=args.target,
                 compile=args.compile, threads=args.threads, deadline=t_start + args.budget)
    results = run_rows(s, args.rows)
    res = {"suite": "gpu_suite", "cuda": cuda, "device": name, "torch": torch.__version__,
           "model": args.model, "input": args.size, "batch": args.batch, "precision": args.precision,
           "channels_last": args.channels_last, "warmup": args.warmup, "iters": args.iters,
           "wall_s": time.perf_counter() - t_start, "rows": results}
    print(table(results), file=out)
    line = json.dumps(res)
    print(line, file=out)
    if args.out:
        Path(args.out).write_text(line + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
