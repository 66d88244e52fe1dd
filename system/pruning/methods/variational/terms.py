"""Loss terms of the variational method besides the price: the theta-weighted weight decay."""

from __future__ import annotations

from typing import Any

import torch

from system.models.anatomy import anatomy
from system.models.resnet import GatedResNet, RemovedBlock


def gated_decay_term(model: GatedResNet, weight_decay: float, unit_live: bool, layer_live: bool) -> torch.Tensor:
    """sum over blocks of theta_B * (lambda/2) * [sum_u theta_u ||w_u||^2 + ||w_last||^2].

    A theta that is not live (its gates off, or hardened) enters as a constant, clamped to [0, 1].
    """
    total: Any = 0.0
    anat = anatomy(model.block_kind)
    for _, blk in model.named_blocks():
        if isinstance(blk, RemovedBlock):
            continue
        inner = []
        for u in anat.units:
            gate = getattr(blk, u.gate)
            sq = getattr(blk, u.conv).weight.pow(2).sum(dim=(1, 2, 3))
            th = gate.theta if unit_live else gate.theta.detach().clamp(0, 1)
            inner.append((th * sq).sum())
        inner.append(getattr(blk, anat.last_conv).weight.pow(2).sum())
        lg = getattr(blk, anat.layer_gate)
        tb = lg.theta if layer_live else lg.theta.detach()
        total = total + tb.reshape(()) * sum(inner)
    return 0.5 * weight_decay * total
