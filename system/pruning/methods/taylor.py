"""Taylor-FO-BN importance pruning (Molchanov et al., CVPR 2019), re-implemented from the paper.

The paper's criterion, read off the BatchNorm that precedes each unit gate: a channel's importance in
a batch is ``(gamma * dL/dgamma + beta * dL/dbeta)^2``.  It equals ``(dL/dz)^2`` of a gate ``z = 1``
multiplying that channel after its ReLU (``relu(y) * z = relu(z * y)`` for ``z >= 0``, and
``z * y = z * gamma * xhat + z * beta``), which is how the unit gates would measure it; reading the
BN gradients instead needs no gate in the step, so a Taylor step runs the dense network's ops plus a
few multi-tensor ops after backward (docs/benchmarks.md, "Step budget").  The score is averaged over
the ``check_every`` mini-batches before each pruning step, then smoothed across pruning steps with
``momentum``.  Everything else (the schedule, the global ranking, the target search, ``round_to``,
whole blocks) is the ranking base's: :mod:`system.pruning.methods.ranking`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from system.models.anatomy import unit_modules
from system.models.resnet import GatedResNet
from system.pruning.methods.base import gate_grads_at_one
from system.pruning.methods.ranking import Ranking, RankingConfig


@dataclass(frozen=True)
class TaylorConfig(RankingConfig):
    """Section ``method.taylor``: the ranking keys (keep_ratio 0.72, check_every 30, momentum 0.9,
    start_frac 0.2, stop_frac 0.7 by default)."""


class Taylor(Ranking):
    name = "taylor"

    def batch_scores(self, model: GatedResNet, grad_scale: float) -> dict[str, torch.Tensor]:
        """``(gamma * dL/dgamma + beta * dL/dbeta)^2`` of every unit in this batch (the loss scale
        divided out), six multi-tensor ops for the whole network."""
        names = list(self.acc)
        # the BatchNorm each unit passes through before its gate
        dz = gate_grads_at_one(unit_modules(model, names, "bn")) if names else None
        if dz is None:
            return {}
        with torch.no_grad():
            if grad_scale != 1.0:
                torch._foreach_div_(dz, grad_scale)
            torch._foreach_mul_(dz, dz)
        return dict(zip(names, dz))
