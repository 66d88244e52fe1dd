"""Fashion-MNIST (Debian package ``dataset-fashion-mnist``) as JPEG WebDataset shards.

Usage::

    python -m pipelines.fmnist --out /data/fmnist-wds                 # full: 60,000 train / 10,000 val
    python -m pipelines.fmnist --out pipelines/demo_data --train 4000 --val 1000 --max-count 1000

The images are written as greyscale JPEGs into an ImageNet-layout folder tree (class folders
``0_T-shirt_top`` ... ``9_Ankle_boot``, so sorted folder order equals the official label ids; the
official test set is the ``val`` split), which is then converted by ``pipelines.shards``. Subsets
(``--train`` / ``--val``) are class-balanced and drawn with ``--seed``.
"""

from __future__ import annotations

import argparse
import gzip
import logging
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines import shards

log = logging.getLogger(__name__)

SRC = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle_boot"]
FILES = {"train": "train", "val": "t10k"}


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file as a uint8 array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load(split: str, src: Path = SRC) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) of ``split`` ('train' or 'val' = the official test set)."""
    stem = FILES[split]
    img, lab = src / f"{stem}-images-idx3-ubyte.gz", src / f"{stem}-labels-idx1-ubyte.gz"
    for p in (img, lab):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing; install the Debian package dataset-fashion-mnist")
    images, labels = read_idx(img), read_idx(lab)
    if len(images) != len(labels):
        raise ValueError(f"{img}: {len(images)} images but {len(labels)} labels")
    return images, labels


def balanced_subset(labels: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """Indices of a class-balanced random subset of size ``n`` (all indices when ``n`` is None)."""
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per = [n // len(classes) + (i < n % len(classes)) for i in range(len(classes))]
    picks = [rng.choice(np.flatnonzero(labels == c), k, replace=False) for c, k in zip(classes, per)]
    return np.sort(np.concatenate(picks))


def write_tree(root: Path, counts: dict[str, int | None], seed: int, quality: int = 90) -> None:
    """Write ``root/{train,val}/<class>/<index>.jpg`` from the Debian package."""
    for split, n in counts.items():
        images, labels = load(split)
        for c, name in enumerate(CLASSES):
            (root / split / f"{c}_{name}").mkdir(parents=True, exist_ok=True)
        for i in balanced_subset(labels, n, seed):
            c = int(labels[i])
            Image.fromarray(images[i], "L").save(root / split / f"{c}_{CLASSES[c]}" / f"{i:05d}.jpg",
                                                 "JPEG", quality=quality)


def build(out: str | Path, train: int | None = None, val: int | None = None, seed: int = 0,
          max_count: int = 1000, workers: int | None = None, progress: bool = True) -> dict:
    """Write Fashion-MNIST shards into ``out``; returns the manifest."""
    with tempfile.TemporaryDirectory(prefix="fmnist-") as tmp:
        write_tree(Path(tmp), {"train": train, "val": val}, seed)
        return shards.build(tmp, out, max_count=max_count, seed=seed, workers=workers, progress=progress,
                            source=f"{SRC} (Fashion-MNIST, MIT licence)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.fmnist", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--train", type=int, default=None, help="train images (default: all 60,000)")
    ap.add_argument("--val", type=int, default=None, help="val images (default: all 10,000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-count", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    build(args.out, args.train, args.val, args.seed, args.max_count, args.workers, not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
