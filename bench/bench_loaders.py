"""Loader throughput on ImageNet-sized JPEGs: images/s and images per CPU-second for each loader.

    python bench/bench_loaders.py                      # CPU: wds, dali (CPU-only), synthetic
    python bench/bench_loaders.py --gpu                # also DALI mixed (nvJPEG) decode and wds -> cuda
    python bench/bench_loaders.py --images 512 --workers 8 --json out.json

The data are real colour photographs shipped inside installed Python packages (matplotlib's
``grace_hopper.jpg``, scikit-learn's ``china.jpg`` / ``flower.jpg`` when present), cut into random
crops and resized to ImageNet-like sizes (about 500x375, JPEG quality 90), then sharded with
``pipelines.shards``. Training transforms at 224 px (random-resized crop, flip, normalise).
"images/s per core" divides by the CPU time actually used (main process, DALI threads and the
DataLoader workers), so it does not depend on how many cores the machine has.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from PIL import Image

from pipelines import shards
from pipelines.config import DataConfig
from pipelines.loaders import build_loader

log = logging.getLogger("bench_loaders")


def find_photos(folder: str | None = None) -> list[Path]:
    """Real colour photographs: those in ``folder``, else those that ship with installed packages."""
    import importlib.util

    if folder:
        return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    found = []
    for pkg, rel in [("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
                     ("sklearn", "datasets/images/china.jpg"), ("sklearn", "datasets/images/flower.jpg"),
                     ("skimage", "data/astronaut.png"), ("skimage", "data/coffee.png"),
                     ("skimage", "data/chelsea.png")]:
        spec = importlib.util.find_spec(pkg)
        if spec and spec.submodule_search_locations:
            p = Path(next(iter(spec.submodule_search_locations))) / rel
            if p.is_file():
                found.append(p)
    foolbox = importlib.util.find_spec("foolbox")
    if foolbox and foolbox.submodule_search_locations:
        found += sorted(Path(next(iter(foolbox.submodule_search_locations))).glob("data/*.jpg"))
    if not found:
        raise SystemExit("no real photographs found (install matplotlib, scikit-learn or foolbox)")
    return found


def make_tree(root: Path, n: int, seed: int = 0, photos: str | None = None) -> None:
    """``n`` ImageNet-sized JPEGs in 4 class folders, random crops of the real photographs."""
    rng = random.Random(seed)
    photos = [Image.open(p).convert("RGB") for p in find_photos(photos)]
    for i in range(n):
        src = photos[i % len(photos)]
        w, h = src.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        out = (500, 375) if rng.random() < 0.7 else (375, 500)
        img = src.crop((x, y, x + cw, y + ch)).resize(out, Image.BILINEAR)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        d = root / "train" / f"class{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        img.save(d / f"img{i:05d}.JPEG", "JPEG", quality=90)


def _cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def measure(cfg: DataConfig, device: str, epochs: int) -> dict:
    """Run ``epochs`` training epochs, timed from building the loader to its last batch.

    ``images_per_s`` includes start-up (workers, pipeline build): with prefetching, excluding it
    would count batches prepared before the clock started. ``steady_images_per_s`` leaves out the
    first ``workers * prefetch + 2`` batches of each epoch (use many images for it to mean much).
    """
    images, wall, cpu, steady_images, steady_wall = 0, 0.0, 0.0, 0, 0.0
    skip = cfg.workers * cfg.prefetch + 2
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for epoch in range(epochs):
        sync()
        t0, c0 = time.perf_counter(), _cpu_seconds()
        loader = build_loader(cfg, "train", 0, 1, seed=0, epoch=epoch, device=device)
        it, batches = iter(loader), len(loader)
        for i, (x, _) in enumerate(it):
            images += len(x)
            if i == skip - 1:
                sync()
                t1 = time.perf_counter()
            elif i >= skip:
                steady_images += len(x)
        sync()
        t2 = time.perf_counter()
        del it, loader  # joins DataLoader workers, so their CPU time is counted
        wall += time.perf_counter() - t0
        cpu += _cpu_seconds() - c0
        if batches > skip:
            steady_wall += t2 - t1
    return {"images": images, "images_per_s": images / wall, "images_per_cpu_s": images / max(cpu, 1e-9),
            "cpu_cores_busy": cpu / wall,
            "steady_images_per_s": steady_images / steady_wall if steady_wall else float("nan")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=256, help="JPEGs in the benchmark set")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="DataLoader workers / DALI threads")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--gpu", action="store_true", help="also DALI mixed decode and wds delivering to cuda:0")
    ap.add_argument("--photos", default=None, help="folder of photographs to cut the benchmark set from")
    ap.add_argument("--data", default=None, help="reuse/keep the shard set here instead of a temp dir")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="bench-loaders-") as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "shards"
        if not (data / "manifest.json").is_file():
            make_tree(Path(tmp) / "src", args.images, photos=args.photos)
            shards.build(Path(tmp) / "src", data, max_count=128, workers=args.workers, progress=False)
        base = dict(root=str(data), batch_size=args.batch_size, workers=args.workers, prefetch=2)
        runs = [("wds", "cpu"), ("dali", "cpu"), ("synthetic", "cpu")]
        if args.gpu:
            if not torch.cuda.is_available():
                raise SystemExit("--gpu given but torch sees no CUDA device")
            runs += [("dali", "cuda:0"), ("wds", "cuda:0")]
        results = []
        for kind, device in runs:
            cfg = DataConfig(loader=kind, synthetic_samples=args.images, **base)
            r = {"loader": kind, "device": device, "workers": args.workers, **measure(cfg, device, args.epochs)}
            results.append(r)
            log.info("%-9s %-7s %8.1f img/s (steady %8.1f)  %7.1f img per CPU-s  (%.2f cores busy)", kind,
                     device, r["images_per_s"], r["steady_images_per_s"], r["images_per_cpu_s"], r["cpu_cores_busy"])
    meta = {"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if args.gpu else None,
            "image_size": "500x375 / 375x500 JPEG q90", "train_size": 224, "batch_size": args.batch_size}
    print(json.dumps({"meta": meta, "results": results}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
