"""Loaders behind one interface: DALI, WebDataset shards + torchvision v2, and synthetic data.

Example::

    from pipelines.config import DataConfig
    from pipelines.loaders import build_loader

    cfg = DataConfig(train_size=28, val_resize=32, val_crop=28, batch_size=128)  # embedded demo shards
    loader = build_loader(cfg, "train", rank=0, world_size=2, seed=0, epoch=3, start_batch=10)
    for images, labels in loader:   # float32 NCHW normalised on `device`; int64 labels (-1 = padding)
        ...

Every loader follows ``pipelines.plan.epoch_plan``: the samples of batch ``g`` on rank ``r`` depend
only on (seed, epoch, rank, world_size), so all loaders read the same samples, every rank yields the
same number of batches, and ``start_batch`` resumes exactly. A sample that cannot be read (a label
that is not an integer in range, a JPEG that does not decode) is skipped (train: the batch is one
shorter; val: it becomes padding with label -1), counted in ``skipped`` / ``skipped_by_shard`` and
logged with its shard; the trainer enforces ``data.max_skip_frac``.
"""

from __future__ import annotations

import logging
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from pipelines.config import DataConfig
from pipelines.plan import PAD, EpochPlan, epoch_plan, rng_for
from pipelines.shardset import ShardIndex, ShardSet, ShardSetError, cached_index, parse_label, write_index

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def _raw(value) -> bytes:
    """A wids sample component as bytes (wids hands out file-like buffers)."""
    return value.getvalue() if hasattr(value, "getvalue") else bytes(value)


def _ignore_interrupts(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process, which stops the run at a step boundary
    with a checkpoint (a worker that died of SIGINT would fail the batch it was loading)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Loader:
    """One rank's batches of one epoch.

    Iterating yields ``(images, labels)``: ``images`` float32 ``(b, 3, H, W)`` normalised, on ``device``;
    ``labels`` int64 ``(b,)`` on ``device``, -1 for padding (validation only).

    Attributes:
        num_classes: classes of the data set.
        num_samples: samples in the split (all ranks together).
        batches_per_epoch: batches a rank yields in a whole epoch (the same on every rank).
        start_batch: index of the first batch this loader yields.
        skipped: samples skipped so far by this loader (unreadable label, JPEG that does not decode);
            ``skipped_by_shard`` counts them per shard file.
    ``len(loader) == batches_per_epoch - start_batch``: the batches this iterator yields.
    """

    def __init__(self, cfg: DataConfig, split: str, rank: int, world_size: int, seed: int, epoch: int,
                 start_batch: int, device: str | torch.device, plan: EpochPlan, num_classes: int,
                 num_samples: int):
        self.cfg, self.split, self.rank, self.world_size = cfg, split, rank, world_size
        self.seed, self.epoch, self.device = seed, epoch, torch.device(device)
        self.plan, self.num_classes, self.num_samples = plan, num_classes, num_samples
        self.batches_per_epoch = plan.num_batches
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside 0..{self.batches_per_epoch}")
        self.start_batch = start_batch
        self.skipped = 0
        self.skipped_by_shard: dict[str, int] = {}
        self.shard_paths: list[str] = []  # shard index -> file (set by the shard-reading loaders)
        self.train = split == "train"
        self.size = cfg.train_size if self.train else cfg.val_crop
        self._mean = torch.tensor(cfg.mean, device=self.device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(cfg.std, device=self.device).view(1, 3, 1, 1) * 255

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def _normalise(self, images_u8: torch.Tensor) -> torch.Tensor:
        x = images_u8.to(self.device, non_blocking=True).float()
        return x.sub_(self._mean).div_(self._std)

    def _count_skips(self, shards: list[int], g: int) -> None:
        """Count the skipped samples of batch ``g`` (``shards``: the shard index of each)."""
        if shards:
            self.skipped += len(shards)
            for s in shards:
                name = self.shard_paths[s] if s < len(self.shard_paths) else str(s)
                self.skipped_by_shard[name] = self.skipped_by_shard.get(name, 0) + 1
            log.warning("%s rank %d batch %d: skipped %d corrupt sample(s) (%d so far)", self.split, self.rank,
                        g, len(shards), self.skipped)


# --------------------------------------------------------------------------------------------- wds
class _BatchReader(torch.utils.data.Dataset):
    """Reads, decodes and augments the samples of plan batch ``g`` (runs inside DataLoader workers).

    Samples are fetched from the WebDataset tars by the byte ranges of their index; augmentation is
    seeded per sample from (seed, epoch, stream position), so the result does not depend on workers.
    """

    def __init__(self, cfg: DataConfig, shardset: ShardSet, split: str, plan: EpochPlan, seed: int, epoch: int):
        from torchvision.transforms import v2

        self.paths = [s.path for s in shardset.shards(split)]
        self.index_paths = [s.index_path for s in shardset.shards(split)]
        # a remote root: wids reads sample (shard, row) from a node-local cache it fills on first use
        self.remote = shardset.remote
        self._spec = [{"url": str(s.path), "nsamples": s.samples} for s in shardset.shards(split)]
        self._offsets = np.cumsum([0] + [s.samples for s in shardset.shards(split)])[:-1].tolist()
        self._cache_dir = cfg.cache_dir or str(Path(tempfile.gettempdir()) / "parsimony-shards")
        self._wids: Any = None
        self.num_classes = shardset.num_classes
        self.plan, self.seed, self.epoch, self.train = plan, seed, epoch, split == "train"
        if self.train:
            ops = [v2.RandomResizedCrop(cfg.train_size, scale=(cfg.min_area, cfg.max_area),
                                        ratio=(cfg.min_ratio, cfg.max_ratio), antialias=True)]
            ops += [v2.RandomHorizontalFlip()] if cfg.flip else []
            self.size = cfg.train_size
        else:
            ops = [v2.Resize(cfg.val_resize, antialias=True), v2.CenterCrop(cfg.val_crop)]
            self.size = cfg.val_crop
        self.transform = v2.Compose(ops)
        self._files: dict[int, BinaryIO] = {}
        self._index: dict[int, ShardIndex] = {}

    def __len__(self) -> int:
        return self.plan.num_batches

    def _read_remote(self, s: int, r: int) -> tuple[bytes, bytes, str]:
        if self._wids is None:  # built in the worker that reads (the dataset is not shared across processes)
            import contextlib
            import sys

            import wids

            with contextlib.redirect_stdout(sys.stderr):  # wids prints its shard list (stdout is for results)
                self._wids = wids.ShardListDataset(self._spec, cache_dir=self._cache_dir, transformations=[],
                                                   lru_size=4)
        sample = self._wids[self._offsets[s] + r]
        return _raw(sample[".jpg"]), _raw(sample[".cls"]), str(sample["__key__"])

    def _read(self, s: int, r: int) -> tuple[bytes, int, str]:
        if self.remote:
            jpg, cls_bytes, key = self._read_remote(s, r)
            return jpg, self._label(cls_bytes, s, key), key
        if s not in self._index:
            self._index[s] = cached_index(Path(self.index_paths[s]))
            self._files[s] = open(self.paths[s], "rb")
        idx, f = self._index[s], self._files[s]
        if r >= len(idx):
            raise ShardSetError(f"{self.index_paths[s]}: sample {r} out of range ({len(idx)} samples)")
        f.seek(idx.cls[r, 0])
        cls_bytes = f.read(idx.cls[r, 1])
        f.seek(idx.jpg[r, 0])
        jpg = f.read(idx.jpg[r, 1])
        return jpg, self._label(cls_bytes, s, idx.keys[r]), idx.keys[r]

    def _label(self, cls_bytes: bytes, s: int, key: str) -> int:
        try:
            return parse_label(cls_bytes, self.num_classes)
        except ValueError as exc:
            raise ShardSetError(f"{self.paths[s]}: sample {key} has a {exc}") from None

    def decode(self, jpg: bytes, position: int) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_image

        if jpg[:2] == b"\xff\xd8" and b"\xff\xd9" not in jpg[-64:]:
            raise RuntimeError("truncated JPEG (no end-of-image marker)")
        img = decode_image(torch.frombuffer(bytearray(jpg), dtype=torch.uint8), mode=ImageReadMode.RGB)
        torch.manual_seed(int(rng_for(self.seed, self.epoch, position).integers(2**62)))
        return self.transform(img)

    def __getitem__(self, g: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """The batch's images and labels, and the shard index of every sample skipped (an unreadable
        label or a JPEG that does not decode: logged with its shard and key, never fatal)."""
        images, labels, skipped = [], [], []
        with torch.random.fork_rng(devices=[]):
            for s, r, p in zip(self.plan.shard[g], self.plan.row[g], self.plan.position[g]):
                if s == PAD:
                    images.append(torch.zeros(3, self.size, self.size, dtype=torch.uint8))
                    labels.append(PAD)
                    continue
                try:
                    jpg, label, _key = self._read(int(s), int(r))
                    img = self.decode(jpg, int(p))
                except Exception as exc:  # corrupt sample: skip, never crash the job
                    log.warning("corrupt sample (shard %s, row %d): %s", self.paths[s], int(r), exc)
                    skipped.append(int(s))
                    if not self.train:
                        images.append(torch.zeros(3, self.size, self.size, dtype=torch.uint8))
                        labels.append(PAD)
                    continue
                images.append(img)
                labels.append(label)
        if not images:
            empty = torch.zeros(0, 3, self.size, self.size, dtype=torch.uint8)
            return empty, torch.zeros(0, dtype=torch.int64), skipped
        return torch.stack(images), torch.tensor(labels, dtype=torch.int64), skipped

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_files"], state["_index"] = {}, {}
        return state


class WdsLoader(Loader):
    """WebDataset tar shards read by index, decoded and augmented by torchvision v2 in DataLoader workers."""

    def __init__(self, cfg: DataConfig, shardset: ShardSet, split: str, **kw):
        super().__init__(cfg, split, **kw)
        self.reader = _BatchReader(cfg, shardset, split, self.plan, self.seed, self.epoch)
        self.shard_paths = [str(p) for p in self.reader.paths]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        workers = self.cfg.workers
        if workers and not self.reader.remote:  # parse the indexes once here; forked workers inherit the cache
            for path in self.reader.index_paths:
                cached_index(Path(path))
        dl = torch.utils.data.DataLoader(
            self.reader, batch_size=None, sampler=range(self.start_batch, self.batches_per_epoch),
            num_workers=workers, prefetch_factor=self.cfg.prefetch if workers else None,
            pin_memory=self.device.type == "cuda", worker_init_fn=_ignore_interrupts if workers else None,
        )
        for g, (images, labels, skipped) in enumerate(dl, start=self.start_batch):
            self._count_skips(skipped, g)
            yield self._normalise(images), labels.to(self.device, non_blocking=True)


# -------------------------------------------------------------------------------------------- dali
class DaliLoader(Loader):
    """DALI ``fn.readers.webdataset`` pipeline following the epoch plan.

    The plan's sample order is handed to the reader as per-epoch index files (DALI reads the samples
    an index lists, in its order), so the reader is built with ``shard_id=0, num_shards=1``: the rank
    split is already in the plan, which is what makes train batch counts equal on every rank and
    mid-epoch resume exact. Decoding is ``mixed`` (nvJPEG) on a CUDA ``device``, CPU otherwise
    (``device_id=None``). Augmentation follows NVIDIA DeepLearningExamples. Random crops are drawn
    from a pipeline seed of (seed, epoch, rank, start_batch): a resumed epoch reads exactly the same
    samples in the same order, but its random crops after the resume point are fresh draws.
    A batch whose decoding fails is decoded again in Python (skipping the bad sample) and the
    pipeline restarts at the next batch.
    """

    def __init__(self, cfg: DataConfig, shardset: ShardSet, split: str, **kw):
        super().__init__(cfg, split, **kw)
        self.shardset = shardset
        self.shards = shardset.shards(split)
        self.fallback = _BatchReader(cfg, shardset, split, self.plan, self.seed, self.epoch)
        self.shard_paths = [str(s.path) for s in self.shards]
        self.gpu = self.device.type == "cuda"
        self._tmp: str | None = None

    def _pipeline(self, start: int):
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        shard, row = self.plan.shard[start:].ravel(), self.plan.row[start:].ravel()
        real = shard != PAD
        shard, row = shard[real], row[real]
        if len(shard) == 0:
            return None
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="dali-idx-")
        # Consecutive samples of one shard form a run: one (tar, index file) pair per run.
        cuts = np.flatnonzero(np.diff(shard)) + 1
        paths, index_paths = [], []
        for k, (a, b) in enumerate(zip(np.r_[0, cuts], np.r_[cuts, len(shard)])):
            s = int(shard[a])
            ipath = Path(self._tmp) / f"s{start}-{k:06d}.idx"
            write_index(ipath, self.shards[s].index.lines(row[a:b]))
            paths.append(str(self.shards[s].path))
            index_paths.append(str(ipath))
        cfg = self.cfg
        mean = [m * 255 for m in cfg.mean]
        std = [s * 255 for s in cfg.std]
        seed = int(rng_for(self.seed, self.epoch, self.rank, start).integers(2**31))
        pipe = Pipeline(batch_size=cfg.batch_size, num_threads=max(1, cfg.workers),
                        device_id=(self.device.index or 0) if self.gpu else None, seed=seed,
                        prefetch_queue_depth=cfg.prefetch)
        decode_dev = "mixed" if self.gpu else "cpu"
        op_dev = "gpu" if self.gpu else "cpu"
        with pipe:
            # DALI's stub types the reader's return as a union that may be None
            jpegs, cls = fn.readers.webdataset(  # type: ignore[misc]
                paths=paths, index_paths=index_paths, ext=["jpg", "cls"], missing_component_behavior="error",
                shard_id=0, num_shards=1, random_shuffle=False, pad_last_batch=True, name="Reader")
            if self.train:
                images = fn.decoders.image_random_crop(
                    jpegs, device=decode_dev, output_type=types.RGB, random_area=[cfg.min_area, cfg.max_area],
                    random_aspect_ratio=[cfg.min_ratio, cfg.max_ratio], num_attempts=100)
                images = fn.resize(images, device=op_dev, resize_x=cfg.train_size, resize_y=cfg.train_size,
                                   interp_type=types.INTERP_LINEAR, antialias=False)
                mirror = fn.random.coin_flip(probability=0.5) if cfg.flip else 0
                size = cfg.train_size
            else:
                images = fn.decoders.image(jpegs, device=decode_dev, output_type=types.RGB)
                images = fn.resize(images, device=op_dev, resize_shorter=cfg.val_resize,
                                   interp_type=types.INTERP_TRIANGULAR)
                mirror = 0
                size = cfg.val_crop
            images = fn.crop_mirror_normalize(images, device=op_dev, dtype=types.FLOAT, output_layout="CHW",
                                              crop=(size, size), mean=mean, std=std, mirror=mirror)
            pipe.set_outputs(images, cls)
        pipe.build()
        return pipe

    def _to_torch(self, images, cls, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        if self.gpu:
            dense = images.as_tensor()
            out = torch.empty(dense.shape(), dtype=torch.float32, device=self.device)
            feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(self.device))
        else:
            out = torch.from_numpy(images.as_array())
        labels = torch.tensor([int(cls.at(i).tobytes()) for i in range(n)], dtype=torch.int64)
        return out[:n].to(self.device), labels

    def _check_labels(self, labels: torch.Tensor, g: int) -> None:
        bad = (labels < 0) | (labels >= self.num_classes)
        if bad.any():
            j = int(bad.nonzero()[0, 0])
            real = self.plan.shard[g] != PAD
            s, r = int(self.plan.shard[g][real][j]), int(self.plan.row[g][real][j])
            raise ShardSetError(f"{self.shards[s].path}: sample {self.shards[s].index.keys[r]} has class id "
                                f"{int(labels[j])}, outside 0..{self.num_classes - 1}")

    def _pad(self, images: torch.Tensor, labels: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        real = torch.from_numpy(self.plan.shard[g] != PAD)
        if bool(real.all()):
            return images, labels.to(self.device)
        B = self.cfg.batch_size
        full = torch.zeros(B, 3, self.size, self.size, dtype=torch.float32, device=self.device)
        full_labels = torch.full((B,), PAD, dtype=torch.int64)
        full[real.to(self.device)] = images
        full_labels[real] = labels
        return full, full_labels.to(self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = self.start_batch
        pipe = self._pipeline(g)
        try:
            while g < self.batches_per_epoch:
                n = int((self.plan.shard[g] != PAD).sum())
                if n == 0:  # a batch of padding only (val, small data): nothing to read
                    images = torch.zeros(0, 3, self.size, self.size, device=self.device)
                    labels = torch.zeros(0, dtype=torch.int64)
                else:
                    try:
                        out_images, out_cls = pipe.run()
                        images, labels = self._to_torch(out_images, out_cls, n)
                        self._check_labels(labels, g)
                    except (RuntimeError, ValueError) as exc:  # a JPEG DALI cannot decode, a bad label
                        log.warning("DALI failed on %s batch %d (%s); decoding it in Python",
                                    self.split, g, str(exc).strip().splitlines()[0][:200])
                        pipe = None  # a failed DALI pipeline is not reused
                        images_u8, labels, skipped = self.fallback[g]
                        self._count_skips(skipped, g)
                        pipe = self._pipeline(g + 1)
                        yield self._normalise(images_u8), labels.to(self.device)
                        g += 1
                        continue
                yield self._pad(images, labels, g) if not self.train else (images, labels.to(self.device))
                g += 1
        finally:
            pipe = None
            if self._tmp:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None


# --------------------------------------------------------------------------------------- synthetic
class SyntheticLoader(Loader):
    """Random images (generated once, on ``device``) and plan-determined labels: measures the model, not I/O."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(int(rng_for(self.seed, 0xDA7A).integers(2**62)))
        images = torch.randn(self.cfg.batch_size, 3, self.size, self.size, generator=gen).to(self.device)
        all_labels = rng_for(self.seed, self.epoch, 0x1AB).integers(self.num_classes, size=self.num_samples)
        for g in range(self.start_batch, self.batches_per_epoch):
            pos = self.plan.position[g]
            lab = np.where(self.plan.shard[g] == PAD, PAD, all_labels[np.minimum(pos, self.num_samples - 1)])
            yield images, torch.from_numpy(lab.astype(np.int64)).to(self.device)


# ----------------------------------------------------------------------------------------- factory
def class_names(cfg: DataConfig) -> list[str]:
    """The class names by label: the shard manifest's (``class0, ...`` for synthetic data)."""
    if cfg.loader == "synthetic":
        return [f"class{i}" for i in range(cfg.synthetic_classes)]
    return list(ShardSet.open(cfg.root).classes)  # a URL root: its manifest, fetched


def build_loader(cfg: DataConfig, split: str, rank: int, world_size: int, seed: int, epoch: int,
                 start_batch: int = 0, device: str | torch.device = "cpu") -> Loader:
    """Build the loader of one rank for one epoch.

    Args:
        cfg: data config (``cfg.loader`` picks DALI, WebDataset or synthetic).
        split: ``"train"`` (shuffled, augmented, remainder dropped) or ``"val"`` / ``"test"`` (every sample once
            across ranks, padded with label -1 so every rank has the same number of batches).
        rank, world_size: this rank and the number of ranks.
        seed, epoch: the epoch's order depends only on these (and rank / world_size).
        start_batch: first batch to yield (resume); yields exactly what an uninterrupted epoch would.
        device: where images and labels are delivered; a CUDA device makes DALI decode on the GPU.

    Raises:
        ShardSetError: missing / empty shard directory, or a manifest that does not match its files.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    train = split == "train"
    common: dict[str, Any] = dict(rank=rank, world_size=world_size, seed=seed, epoch=epoch, start_batch=start_batch,
                                  device=device)
    if cfg.loader == "synthetic":
        n = cfg.synthetic_samples if train else max(1, cfg.synthetic_samples // 10)
        plan = epoch_plan([n], cfg.batch_size, rank, world_size, seed, epoch, train, cfg.shuffle)
        loader: Loader = SyntheticLoader(cfg, split, plan=plan, num_classes=cfg.synthetic_classes, num_samples=n,
                                         **common)
        if cfg.synthetic_size:
            loader.size = cfg.synthetic_size
        return loader
    shardset = ShardSet.open(cfg.root, verify_checksums=cfg.verify_checksums)
    counts = [s.samples for s in shardset.shards(split)]
    plan = epoch_plan(counts, cfg.batch_size, rank, world_size, seed, epoch, train, cfg.shuffle)
    kw = dict(plan=plan, num_classes=shardset.num_classes, num_samples=sum(counts), **common)
    if plan.num_batches == 0:
        log.warning("%s: %d %s samples give no full batch of %d x %d ranks", cfg.root, sum(counts), split,
                    cfg.batch_size, world_size)
    cls = DaliLoader if cfg.loader == "dali" else WdsLoader
    return cls(cfg, shardset, split, **kw)
