"""Fashion-MNIST (Debian package ``dataset-fashion-mnist``) as JPEG WebDataset shards.

Usage::

    python -m pipelines.fmnist --out data/fmnist        # 55,000 train / 5,000 val (from train) / 10,000 test
    python -m pipelines.fmnist --out data/fmnist-4k --train 4000       # the 2-core study's training subset

The images are written as greyscale JPEGs into an ImageNet-layout folder tree (class folders
``0_T-shirt_top`` ... ``9_Ankle_boot``, so sorted folder order equals the official label ids),
which is then converted by ``pipelines.shards``.  ``val`` is carved out of the official training
set (class-balanced, disjoint from ``train``); the official test set is the ``test`` split.
Subsets are class-balanced and drawn with ``--seed``.
"""

from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np

from pipelines import tree

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


def build(out: str | Path, train: int | None = None, val: int = 5000, seed: int = 0, max_count: int = 1000,
          workers: int | None = None, progress: bool = True, test: int | None = None) -> dict:
    """Write Fashion-MNIST shards into ``out`` (train / val carved from train / official test); returns the manifest."""
    return tree.build(out, CLASSES, load("train"), load("val"), train, val, test, seed, max_count, workers,
                      progress, source=f"{SRC} (Fashion-MNIST, MIT licence)")


def main(argv: list[str] | None = None) -> int:
    return tree.main(build, "python -m pipelines.fmnist", __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    sys.exit(main())
