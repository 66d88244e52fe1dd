"""The loop's own state and the seeding rules of a run.

:class:`LoopState` is the progress a checkpoint restores; :func:`seed_everything` and
:func:`seed_rank_stream` are the two seeding points (identical weights on every rank, then each
rank's own gate samples); :func:`rng_neutral` keeps data loading off the gates' random stream.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from system.models.spec import ArchSpec


@dataclass
class LoopState:
    """Everything about progress that a checkpoint must restore."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches of ``epoch`` already consumed
    train_macs: float = 0.0
    train_macs_dense: float = 0.0
    prune_events: int = 0
    channels_removed: int = 0
    blocks_removed: int = 0
    wall_s: float = 0.0
    # seconds of wall_s spent outside the training steps: "eval", "prune" (decision events), "checkpoint"
    time_s: dict = field(default_factory=dict)
    best_top1: float = 0.0
    last_eval: dict = field(default_factory=dict)
    width_history: list = field(default_factory=list)  # [(step, {gate: width})]
    samples_skipped: int = 0  # unreadable training samples skipped, all ranks together

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        fresh = LoopState(**state)  # an unknown key is an error (TypeError names it)
        fresh.width_history = [(int(st), dict(w)) for st, w in fresh.width_history]
        self.__dict__.update(fresh.__dict__)


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and python with ``seed`` on every rank, so the weights are initialised
    identically everywhere (:func:`seed_rank_stream` then gives each rank its own gate samples)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))


def seed_rank_stream(seed: int, rank: int) -> None:
    """After the weights exist: each rank's own torch stream, so gate samples differ across ranks."""
    torch.manual_seed((seed * 1_000_003 + rank * 7_919 + 1) % (2**63))


def widths_of(spec: ArchSpec) -> dict[str, int]:
    out = {}
    for name, _, _, blk in spec.iter_blocks():
        for i, w in enumerate(blk.inner):
            out[f"{name}.conv{i + 1}"] = 0 if blk.removed else w
    return out


def rng_neutral(loader):
    """Iterate ``loader`` without advancing the global torch RNG.

    Starting a DataLoader iterator draws its worker seeds from the global generator, which the
    gates sample from; isolating it makes gate samples depend on the steps taken only, so a run
    resumed mid-epoch samples exactly like the uninterrupted one (augmentation is seeded per sample).
    """
    it = iter(loader)
    try:
        while True:
            with torch.random.fork_rng(devices=[]):
                try:
                    item = next(it)
                except StopIteration:
                    return
            yield item
    finally:
        # shut the loader's workers (and pin-memory thread) down now, not at interpreter exit:
        # a DataLoader left half-iterated with pinned memory can hang the process at exit
        close = getattr(it, "close", None)
        if close is not None:
            close()
