"""Unreadable training samples: counted across ranks, reported, and bounded (``data.max_skip_frac``).

The loaders skip a sample whose label or JPEG cannot be read and count it per shard; at every log
interval and at the end of an epoch every rank calls :meth:`SkipWatch.check` (one all-reduce), so
all ranks see the same total and stop together when it passes the limit.
"""

from __future__ import annotations

from typing import Any


class SkipLimitExceeded(ValueError):
    """More of an epoch's training samples were unreadable than ``data.max_skip_frac`` allows."""


class SkipWatch:
    """The epoch's skipped samples (all ranks) against ``max_frac`` of its training samples."""

    def __init__(self, comm: Any, max_frac: float):
        self.comm, self.max_frac = comm, max_frac
        self.seen = 0  # this epoch's total at the last check

    def new_epoch(self) -> None:
        self.seen = 0

    def check(self, loader: Any) -> tuple[int, str | None]:
        """(samples newly skipped since the last check, all ranks; a message when over the limit)."""
        total = int(self.comm.sum_scalars([float(loader.skipped)])[0])
        new, self.seen = total - self.seen, total
        limit = self.max_frac * loader.num_samples
        if total <= limit:
            return new, None
        merged: dict[str, int] = {}
        for counts in self.comm.all_gather_object(dict(loader.skipped_by_shard)):
            for shard, n in counts.items():
                merged[shard] = merged.get(shard, 0) + n
        worst = sorted(merged.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
        return new, (f"config key 'data.max_skip_frac': {total} of this epoch's {loader.num_samples} training "
                     f"samples were unreadable, over the limit of {self.max_frac:g} ({limit:.0f}); worst shards: "
                     + ", ".join(f"{s} ({n})" for s, n in worst))
