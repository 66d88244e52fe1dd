"""Small labelled image datasets (arrays in memory) as an ImageNet-layout JPEG tree, then shards.

Shared by :mod:`pipelines.fmnist` and :mod:`pipelines.mnist`.  A dataset comes as the official
training and test arrays; :func:`balanced_subset` (called by :func:`build`) carves a class-balanced validation
split out of the training set (disjoint from the training subset), so choices are made on ``val`` and the
official test set is the ``test`` split, read only for final tables.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines import shards


def balanced_subset(labels: np.ndarray, n: int | None, seed: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """Indices of a class-balanced random subset of size ``n`` (all when ``n`` is None), outside ``exclude``."""
    pool = np.ones(len(labels), bool)
    if exclude is not None:
        pool[exclude] = False
    if n is None or n >= int(pool.sum()):
        return np.flatnonzero(pool)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per = [n // len(classes) + (i < n % len(classes)) for i in range(len(classes))]
    picks = []
    for c, k in zip(classes, per):
        idx = np.flatnonzero((labels == c) & pool)
        if k > len(idx):
            raise ValueError(f"class {c}: {k} images asked, {len(idx)} available")
        picks.append(rng.choice(idx, k, replace=False))
    return np.sort(np.concatenate(picks))


def write_tree(root: Path, classes: list[str], splits: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
               quality: int = 90) -> None:
    """Write ``root/<split>/<i>_<class>/<index>.jpg`` for ``{split: (images uint8, labels, indices)}``."""
    for split, (images, labels, idx) in splits.items():
        for c, name in enumerate(classes):
            (root / split / f"{c}_{name}").mkdir(parents=True, exist_ok=True)
        for i in idx:
            c = int(labels[i])
            Image.fromarray(images[i], "L").save(root / split / f"{c}_{classes[c]}" / f"{i:05d}.jpg",
                                                 "JPEG", quality=quality)


def build(out: str | Path, classes: list[str], train: tuple[np.ndarray, np.ndarray],
          test: tuple[np.ndarray, np.ndarray] | None, n_train: int | None, n_val: int, n_test: int | None,
          seed: int, max_count: int, workers: int | None, progress: bool, source: str) -> dict:
    """Shards with ``train`` (a subset of the training set), ``val`` (carved from the training set,
    disjoint from ``train``) and, when ``test`` is given, ``test`` (the official test set)."""
    images, labels = train
    val_idx = balanced_subset(labels, n_val, seed + 1)
    train_idx = balanced_subset(labels, n_train, seed, exclude=val_idx)
    splits = {"train": (images, labels, train_idx), "val": (images, labels, val_idx)}
    if test is not None:
        splits["test"] = (*test, balanced_subset(test[1], n_test, seed + 2))
    with tempfile.TemporaryDirectory(prefix="tree-") as tmp:
        write_tree(Path(tmp), classes, splits)
        return shards.build(tmp, out, max_count=max_count, seed=seed, workers=workers, progress=progress,
                            source=source)


def main(build_fn, prog: str, description: str, argv: list[str] | None = None, n_val: int = 5000) -> int:
    """The command line of a dataset builder:
    ``build_fn(out, train, val, seed, max_count, workers, progress, test)``."""
    import argparse
    import logging

    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--out", required=True)
    ap.add_argument("--train", type=int, default=None, help="train images (default: all that are not val)")
    ap.add_argument("--val", type=int, default=n_val, help=f"val images carved from the training set ({n_val})")
    ap.add_argument("--test", type=int, default=None, help="test images (default: the whole official test set)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-count", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    build_fn(args.out, args.train, args.val, args.seed, args.max_count, args.workers, not args.no_progress, args.test)
    return 0
