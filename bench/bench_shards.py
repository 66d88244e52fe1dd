"""The shard tool on an ImageNet-like tree: images per second, per worker process, and a resume.

    python bench/bench_shards.py --images 20000 --distinct 500 --workers 2

Makes ``--images`` JPEGs of ImageNet's sizes (500x375 / 375x500, quality 90) in 4 class folders:
``--distinct`` real-photograph crops (``bench_loaders.make_tree``), the rest hard links to them (the
shard tool reads, screens and copies every file alike). Then ``pipelines.shards.build`` with
``--workers`` processes, timed; then the same conversion killed (SIGKILL) once a third of its shards
exist and run again (it keeps the finished shards and writes the rest), timed, and its manifest
checked identical (shard checksums included) to the uninterrupted one. Prints the figures and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_loaders import make_tree

from pipelines import shards


def make_big_tree(root: Path, n: int, distinct: int) -> None:
    seed_dir = root.parent / "distinct"
    make_tree(seed_dir, distinct)
    files = sorted(seed_dir.rglob("*.JPEG"))
    for i in range(n):
        d = root / "train" / f"class{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        os.link(files[i % len(files)], d / f"img{i:06d}.JPEG")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--distinct", type=int, default=500)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--max-count", type=int, default=1000)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    try:
        tree = work / "tree"
        t0 = time.perf_counter()
        make_big_tree(tree, args.images, args.distinct)
        t_tree = time.perf_counter() - t0
        out = work / "shards"
        t0 = time.perf_counter()
        m = shards.build(tree, out, max_count=args.max_count, workers=args.workers, progress=False)
        t_build = time.perf_counter() - t0
        n = m["splits"]["train"]["num_samples"]
        # resume: the same conversion killed (SIGKILL) once a third of its shards exist, then run again
        again = work / "again"
        cmd = [sys.executable, "-m", "pipelines.shards", "--src", str(tree), "--out", str(again),
               "--max-count", str(args.max_count), "--workers", str(args.workers)]
        total = len(m["splits"]["train"]["shards"])
        proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        while proc.poll() is None and len(list(again.glob("train-*.tar"))) < max(1, total // 3):
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        kept = len(list(again.glob("train-*.tar")))
        t0 = time.perf_counter()
        m2 = shards.build(tree, again, max_count=args.max_count, workers=args.workers, progress=False)
        t_resume = time.perf_counter() - t0
        same = m2["splits"] == m["splits"]
        rec = {"images": n, "workers": args.workers, "build_s": t_build, "img_s": n / t_build,
               "img_s_per_worker": n / t_build / args.workers, "tree_s": t_tree, "resume_s": t_resume,
               "resume_kept_shards": kept, "resume_identical": same}
        print(f"shard tool: {n} JPEGs in {t_build:.1f} s with {args.workers} worker(s): {rec['img_s']:.0f} img/s, "
              f"{rec['img_s_per_worker']:.0f} img/s per worker; killed with {kept} of {total} shards written, the "
              f"re-run took {t_resume:.1f} s, identical manifest: {same}")
        print(json.dumps(rec))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
