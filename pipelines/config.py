"""Typed configuration of the data pipelines (the ``data`` section of a run config).

Example::

    from system.config import from_dict
    cfg = from_dict(DataConfig, {"loader": "dali", "root": "/data/imagenet-wds", "batch_size": 256})
    cfg = DataConfig(train_size=28, val_resize=32, val_crop=28)   # the embedded demo data
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from system.config import check

#: The embedded demo shards (real Fashion-MNIST images), resolved relative to this package.
DEMO_ROOT = str(Path(__file__).resolve().parent / "demo_data")

LOADERS = ("dali", "wds", "synthetic")


@dataclass(frozen=True)
class DataConfig:
    """Where the data is and how it is decoded, augmented and batched.

    Attributes:
        loader: ``"dali"`` (DALI; GPU decode when ``device`` is CUDA, CPU-only pipeline otherwise),
            ``"wds"`` (WebDataset tar shards + torchvision transforms v2 + DataLoader workers) or
            ``"synthetic"`` (random tensors, for throughput benchmarks).
        root: shard directory holding ``manifest.json`` (written by ``python -m pipelines.shards``);
            the default is the embedded Fashion-MNIST demo shards.
        batch_size: per-rank micro-batch.
        train_size: side of the random-resized crop used for training.
        val_resize: shorter side after resizing, for validation.
        val_crop: side of the centre crop taken after ``val_resize``.
        min_area / max_area: range of the random-resized crop's area fraction (DeepLearningExamples: 0.08-1).
        min_ratio / max_ratio: range of its aspect ratio (3/4 - 4/3).
        flip: random horizontal flip during training.
        mean / std: per-channel normalisation on the 0-1 scale (images are ``(x/255 - mean) / std``).
        workers: DataLoader worker processes (wds) or DALI CPU threads (dali).
        prefetch: batches prepared ahead (per worker for wds, DALI queue depth for dali).
        shuffle: shuffle the training split (shard order and order inside shards) every epoch.
        verify_checksums: hash every shard against the manifest when a loader is built (slow on ImageNet).
        root: a shard directory, or a URL of one (``http(s)://host/shards``, ``pipe:CMD {}`` with ``{}``
            standing for a file name): read through wids, which caches shards on the node (``wds`` only).
        cache_dir: where remote shards are cached (default: ``$TMPDIR/parsimony-shards``).
        max_skip_frac: a run stops (with a checkpoint, naming the worst shards) once more than this
            fraction of an epoch's training samples were skipped as unreadable (default 0.1%).
        eval_split: the split evaluations read: ``val`` (choices are made here) or ``test`` (shard sets
            built with a held-out test split; read only for final tables).
        synthetic_classes / synthetic_samples: size of the synthetic data set (train split; val is a tenth).
        synthetic_size: image side of synthetic data (0: use ``train_size`` / ``val_crop``).
    """

    loader: str = "wds"
    root: str = DEMO_ROOT
    batch_size: int = 64
    train_size: int = 224
    val_resize: int = 256
    val_crop: int = 224
    min_area: float = 0.08
    max_area: float = 1.0
    min_ratio: float = 3.0 / 4.0
    max_ratio: float = 4.0 / 3.0
    flip: bool = True
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    workers: int = 2
    prefetch: int = 2
    shuffle: bool = True
    verify_checksums: bool = False
    max_skip_frac: float = 0.001
    cache_dir: str = ""
    eval_split: str = "val"
    synthetic_classes: int = 1000
    synthetic_samples: int = 10_000
    synthetic_size: int = 0

    def __post_init__(self) -> None:
        check(self.loader in LOADERS, "loader", f"must be one of {list(LOADERS)}, got {self.loader!r}")
        check(self.loader == "synthetic" or bool(self.root), "root", "must name a shard directory")
        check(not (self.loader == "dali" and self.root.startswith(("http://", "https://", "pipe:"))), "loader",
              f"dali reads local shards; data.root={self.root} is a URL: use data.loader=wds (or a local copy)")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.train_size >= 1, "train_size", "must be >= 1")
        check(self.val_crop >= 1, "val_crop", "must be >= 1")
        check(self.val_resize >= self.val_crop, "val_resize", "must be >= val_crop")
        check(0.0 < self.min_area <= self.max_area <= 1.0, "min_area", "need 0 < min_area <= max_area <= 1")
        check(0.0 < self.min_ratio <= self.max_ratio, "min_ratio", "need 0 < min_ratio <= max_ratio")
        check(len(self.mean) == 3, "mean", "needs 3 values")
        check(len(self.std) == 3 and all(s > 0 for s in self.std), "std", "needs 3 values > 0")
        check(self.eval_split in ("val", "test"), "eval_split", f"must be 'val' or 'test', got {self.eval_split!r}")
        check(self.workers >= 0, "workers", "must be >= 0")
        check(0.0 <= self.max_skip_frac <= 1.0, "max_skip_frac", f"must be in [0, 1], got {self.max_skip_frac}")
        check(self.prefetch >= 1, "prefetch", "must be >= 1")
        check(self.synthetic_classes >= 1, "synthetic_classes", "must be >= 1")
        check(self.synthetic_samples >= 1, "synthetic_samples", "must be >= 1")
        check(self.synthetic_size >= 0, "synthetic_size", "must be >= 0")
