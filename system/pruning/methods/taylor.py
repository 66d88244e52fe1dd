"""Taylor-FO-BN importance pruning (Molchanov et al., CVPR 2019), re-implemented from the paper.

Gates ``z = 1`` sit after BN on the same channels as the variational unit gates (mode ``mean``
with theta fixed at 1, so ``dL/dz`` is theta's gradient; theta's lr is 0).  The score of a gate is
``(dL/dz)^2``, averaged over the ``check_every`` mini-batches before each pruning step, then smoothed
across pruning steps with ``momentum``.  Everything else (the schedule, the global ranking, the
target search, ``round_to``, whole blocks) is the ranking base's: :mod:`system.pruning.methods.ranking`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from system.models.resnet import GatedResNet
from system.pruning.methods.base import unit_and_layer_gates
from system.pruning.methods.ranking import Ranking, RankingConfig


@dataclass(frozen=True)
class TaylorConfig(RankingConfig):
    """Section ``method.taylor``: the ranking keys (keep_ratio 0.72, check_every 30, momentum 0.9,
    start_frac 0.2, stop_frac 0.7 by default)."""


class Taylor(Ranking):
    name = "taylor"

    def batch_scores(self, model: GatedResNet, grad_scale: float) -> dict[str, torch.Tensor]:
        """``(dL/dz)^2`` of every unit gate in this batch (the loss scale divided out)."""
        unit, _ = unit_and_layer_gates(model)
        live = {n: g.theta.grad.detach() for n, g in unit.items() if g.theta.grad is not None}
        if not live:
            return {}
        return dict(zip(live, torch._foreach_pow(torch._foreach_div(list(live.values()), grad_scale), 2)))
