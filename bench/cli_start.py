"""How fast each console command answers ``--help`` (the start-up a user waits for before any work).

Runs every ``parsimony-*`` command of ``.venv/bin`` with ``--help`` ``--repeats`` times in fresh processes and
prints the median wall-clock, against the 1.5 s the project aims for::

    python bench/cli_start.py
    python bench/cli_start.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = ("train", "submit", "compare", "inspect", "export", "tracking")
TARGET_S = 1.5


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    bindir = Path(sys.executable).parent
    print(f"{'command':24s} {'median --help':>14s} {'vs 1.5 s':>9s}")
    for name in COMMANDS:
        exe = bindir / f"parsimony-{name}"
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            subprocess.run([str(exe), "--help"], check=True, capture_output=True)
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        print(f"parsimony-{name:14s} {med:13.2f}s {med / TARGET_S:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
