"""Terms of the variational method besides the price: the theta-weighted weight decay (a loss term)
and the drive (added to the theta gradients, after the rule has read them)."""

from __future__ import annotations

from typing import Any

import torch

from system.models.anatomy import anatomy
from system.models.resnet import GatedResNet, RemovedBlock


def gated_conv_weights(model: GatedResNet) -> set[str]:
    """The branch conv weights of the live blocks: what the gated decay decays in the loss."""
    convs = anatomy(model.block_kind).convs
    return {f"{b}.{c}.weight" for b, blk in model.named_blocks() if not isinstance(blk, RemovedBlock) for c in convs}


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


def normalize(grads: dict[str, torch.Tensor], kinds: dict[str, list[str]], price: dict[str, torch.Tensor],
              per_nu: dict[str, Any]) -> None:
    """``grads[n] /= price[n] * per_nu[kind]`` in place (the normalised theta step), one or two
    multi-tensor ops per kind of gate."""
    for k, names in kinds.items():
        if names:
            denom = [price[n] for n in names]
            if not isinstance(per_nu[k], float):
                denom = list(torch._foreach_mul(denom, per_nu[k]))
            torch._foreach_div_([grads[n] for n in names], denom)


def add_drive(grads: dict[str, torch.Tensor], thetas: dict[str, torch.Tensor], kinds: dict[str, list[str]],
              weight: Any, scale: dict[str, Any], mode: str) -> None:
    """Add, in place, the gradient of ``drive * s * nu * c_j * theta (1 - theta)`` to the gates of
    ``kinds``: ``weight`` (``drive * s * nu``, times the loss scale) x ``d/dtheta [theta (1 - theta)]``
    x c_j, or, with the normalised step, / step_scale of the kind: ``scale`` maps a gate to its price
    (raw step) or a kind to its step scale (normalised step).  ``mode`` ``down``: only towards 0, below
    theta 0.5.  A handful of multi-tensor ops for all gates."""
    for k, names in kinds.items():
        if not names:
            continue
        w = [weight * (1.0 / scale[k])] * len(names) if k in scale else \
            list(torch._foreach_mul([scale[n] for n in names], weight))
        with torch.no_grad():  # (no detach per theta: each would be an op)
            push = list(torch._foreach_mul([thetas[n] for n in names], -2.0))
            torch._foreach_add_(push, 1.0)
            if mode == "down":
                torch._foreach_clamp_min_(push, 0.0)
            torch._foreach_mul_(push, w)
            torch._foreach_add_([grads[n] for n in names], push)
