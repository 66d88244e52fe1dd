"""The embedded demo data: its ``val`` split is carved from the Fashion-MNIST training set, so
``data.eval_split=val`` on the demo never reads an official test image (docs/data.md)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import fmnist

DEMO = Path(__file__).resolve().parents[2] / "pipelines" / "demo_data"


def _images(split: str, n: int) -> np.ndarray:
    out = []
    with tarfile.open(DEMO / f"{split}-000000.tar") as t:
        for mem in t.getmembers():
            if mem.name.endswith((".jpg", ".jpeg", ".png")):
                data = t.extractfile(mem).read()  # type: ignore[union-attr]
                out.append(np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float32).reshape(-1))
                if len(out) >= n:
                    break
    return np.stack(out)


@pytest.mark.skipif(not (fmnist.SRC / "t10k-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist missing")
def test_demo_val_images_come_from_the_training_set_not_the_test_set():
    val = _images("val", 40)
    test, _ = fmnist.load("val")  # the official t10k files
    train, _ = fmnist.load("train")
    test = test.reshape(len(test), -1).astype(np.float32)
    train = train.reshape(len(train), -1).astype(np.float32)
    for a in val:  # JPEG round trips leave a small error: a copy is within ~15 MSE, a different image >> 100
        assert ((train - a) ** 2).mean(1).min() < 30
        assert ((test - a) ** 2).mean(1).min() > 100
