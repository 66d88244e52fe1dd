"""Which samples each rank reads in each batch of an epoch: one pure function shared by all loaders.

The epoch's sample stream is the shards in a permuted order, each shard's samples in a permuted
order (both drawn from ``(seed, epoch)``; validation is not shuffled). Global batch ``g`` is stream
positions ``[g*W*B, (g+1)*W*B)``; rank ``r`` gets the ``r``-th slice of ``B`` of it. So W ranks with
batch B see exactly what one rank with batch W*B sees, and the plan of batch ``g`` does not depend
on where iteration started (exact mid-epoch resume).

* train: ``floor(N / (W*B))`` batches per rank, the remainder dropped.
* val: ``ceil(N / (W*B))`` batches per rank; positions past N are padding (label -1), all at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAD = -1


def rng_for(*key: int) -> np.random.Generator:
    """A generator that depends only on ``key`` (seed, epoch, ...), never on global state."""
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]))


@dataclass(frozen=True)
class EpochPlan:
    """Sample assignment of one rank for one epoch.

    ``shard[g, j]`` / ``row[g, j]`` locate the j-th sample of batch g (``shard == PAD`` marks padding);
    ``position[g, j]`` is its place in the global stream (used to seed per-sample augmentation).
    """

    shard: np.ndarray  # (num_batches, B) int32
    row: np.ndarray  # (num_batches, B) int32
    position: np.ndarray  # (num_batches, B) int64

    @property
    def num_batches(self) -> int:
        return int(self.shard.shape[0])


def epoch_plan(counts: list[int], batch_size: int, rank: int, world_size: int, seed: int, epoch: int,
               train: bool, shuffle: bool = True) -> EpochPlan:
    """Plan for shards of ``counts`` samples; see the module docstring."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    n = int(sum(counts))
    B, W = batch_size, world_size
    if train and shuffle:
        rng = rng_for(seed, epoch, 0x5EED)
        order = rng.permutation(len(counts))
        shard = np.concatenate([np.full(counts[s], s, np.int32) for s in order])
        row = np.concatenate([rng.permutation(counts[s]).astype(np.int32) for s in order])
    else:
        shard = np.concatenate([np.full(c, s, np.int32) for s, c in enumerate(counts)])
        row = np.concatenate([np.arange(c, dtype=np.int32) for c in counts])
    nb = n // (W * B) if train else -(-n // (W * B))
    total = nb * W * B
    if total > n:
        shard = np.concatenate([shard, np.full(total - n, PAD, np.int32)])
        row = np.concatenate([row, np.zeros(total - n, np.int32)])
    position = np.arange(total, dtype=np.int64)
    take = lambda a: a[:total].reshape(nb, W, B)[:, rank, :]  # noqa: E731
    return EpochPlan(take(shard).copy(), take(row).copy(), take(position).copy())
