"""L1-norm filter pruning (Li et al., ICLR 2017, "Pruning Filters for Efficient ConvNets").

A unit's score is the L1 norm of the filter that produces it (``sum |W|`` of its conv's output
channel), read from the weights at each pruning step; everything else is the ranking base's
(:mod:`system.pruning.methods.ranking`).  The paper ranks within a layer; one global ranking needs
scores on one scale, so by default [ours, ``normalize``] each layer's norms are divided by that
layer's mean (``none``: raw norms, which favours removing whole thin-weight layers).  The scores
come from the weights, which every rank holds identically: nothing is synced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from system.config import check
from system.models.anatomy import unit_modules
from system.models.resnet import GatedResNet
from system.pruning.methods.ranking import Ranking, RankingConfig


@dataclass(frozen=True)
class L1Config(RankingConfig):
    """Section ``method.l1``: the ranking keys, no smoothing by default (the weights are the state)."""

    check_every: int = 30  # steps between pruning steps (the scores are the weights at each; no batches averaged)
    momentum: float = 0.0
    normalize: Literal["mean", "none"] = "mean"  # [ours] per-layer scale before the global ranking

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.normalize in ("mean", "none"), "normalize", f"'mean' or 'none', got {self.normalize!r}")


class L1(Ranking):
    name = "l1"

    def step_scores(self, model: GatedResNet) -> dict[str, torch.Tensor]:
        out = {}
        names = list(self.acc)  # every unit gate (attach fills it; surgery remaps it)
        for name, conv in zip(names, unit_modules(model, names, "conv")):
            norms = conv.weight.detach().abs().sum(dim=(1, 2, 3)).float()
            out[name] = norms / norms.mean().clamp_min(1e-12) if self.cfg.normalize == "mean" else norms
        return out

    def sync_tensors(self) -> list[torch.Tensor]:
        return []
