"""Optimizer parameter groups and the learning-rate schedule.

Groups (each carries a ``name`` key, kept through surgery): ``decay`` (conv and fc weights),
``no_decay`` (BN parameters and biases, unless ``optim.decay_bn_bias``), ``theta_unit`` and
``theta_layer`` (gate parameters: plain SGD, no decay, the method's own lr).  Weights the method
decays in its own loss (``Method.decay_exempt``: the variational method's gated decay, for the
branch convs) move to ``no_decay``.

The schedule is a pure function of the step (:func:`lr_at`), so a rebuilt optimizer or a
resumed run continues at exactly the same learning rate.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

import torch

from system.config import ConfigError, check
from system.models.resnet import GatedResNet


@dataclass(frozen=True)
class OptimConfig:
    """Section ``optim``: SGD (momentum, optional Nesterov) or AdamW, warm-up + cosine."""

    name: Literal["sgd", "adamw"] = "sgd"  # the optimizer (adamw is refused for a method that trains theta)
    lr: float = 0.1  # at ``lr_batch`` images per step; scaled linearly to the global batch
    lr_batch: int = 0  # 0 = no scaling (lr is used as is); 256 = DeepLearningExamples convention
    momentum: float = 0.9  # SGD momentum (AdamW: beta1)
    nesterov: bool = False  # Nesterov momentum (SGD)
    weight_decay: float = 5e-4  # L2 on conv and linear weights (see decay_bn_bias)
    decay_bn_bias: bool = False  # weight decay on BN parameters and biases (gates never decay)
    label_smoothing: float = 0.0  # of the cross-entropy targets
    schedule: Literal["cosine", "constant", "step"] = "cosine"  # the LR after the warm-up
    warmup_epochs: float = 0.0  # linear LR warm-up from 0, in epochs
    min_lr: float = 0.0  # the LR cosine ends at
    step_milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of training, for ``step``
    step_gamma: float = 0.1  # ``step``: the LR factor at each milestone
    # learning-rate rewinding (after Renda et al., ICLR 2020) inside one run: at this fraction of the steps after
    # the warm-up the cosine starts again from ``restart_factor`` times its peak and anneals to ``min_lr`` by the
    # end. ``final``: where the method's architecture becomes final (:attr:`Method.final_step`: the variational
    # method's hardening, a ranking method's last pruning step; no restart for a method that never prunes).
    # 0 = off (the default: on the study's validation split dense gains nearly as much from it as a pruned run)
    restart_at: float | Literal["final"] = 0.0
    restart_factor: float = 1.0  # the restarted cosine's peak, as a multiple of the schedule's

    def __post_init__(self) -> None:
        check(self.lr > 0, "lr", "must be > 0")
        check(self.lr_batch >= 0, "lr_batch", "must be >= 0")
        check(0.0 <= self.momentum < 1.0, "momentum", "must be in [0, 1)")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(0.0 <= self.label_smoothing < 1.0, "label_smoothing", "must be in [0, 1)")
        check(self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")
        check(self.min_lr >= 0, "min_lr", "must be >= 0")
        check(self.restart_at == "final" or 0.0 <= self.restart_at < 1.0, "restart_at",
              "must be 'final' or in [0, 1) (a fraction of training; 0 = off)")
        check(self.restart_at == 0.0 or self.schedule == "cosine", "restart_at",
              f"restarts the cosine schedule; schedule is {self.schedule!r}")
        check(self.restart_factor > 0, "restart_factor", "must be > 0")


def param_groups(model: GatedResNet, cfg: OptimConfig, theta_lrs: dict[str, float], lr: float,
                 exempt: Collection[str] = (), theta_momentum: float = 0.0) -> list[dict]:
    groups: dict[str, list] = {"decay": [], "no_decay": [], "theta_unit": [], "theta_layer": []}
    for name, p in model.named_parameters():
        if name.endswith(".theta"):
            groups["theta_layer" if name.endswith("layer_gate.theta") else "theta_unit"].append(p)
        elif p.dim() <= 1:
            groups["decay" if cfg.decay_bn_bias else "no_decay"].append(p)
        elif name in exempt:
            groups["no_decay"].append(p)
        else:
            groups["decay"].append(p)
    out = []
    # every group exists even when empty, so an optimizer rebuilt for a pruned model (resume)
    # has the same groups as the one that was transplanted through the pruning events
    for gname, params in groups.items():
        theta = gname.startswith("theta")
        base = theta_lrs["unit" if gname == "theta_unit" else "layer"] if theta else lr
        out.append({"name": gname, "params": params, "base_lr": base, "lr": base,
                    "weight_decay": cfg.weight_decay if gname == "decay" else 0.0,
                    # theta: an average of its recent gradients (dampening = momentum keeps the step's size)
                    **({"momentum": theta_momentum, "dampening": theta_momentum, "nesterov": False}
                       if theta and cfg.name == "sgd" else {})})
    return out


def build_optimizer(model: GatedResNet, cfg: OptimConfig, theta_lrs: dict[str, float], global_batch: int,
                    exempt: Collection[str] = (), theta_momentum: float = 0.0) -> torch.optim.Optimizer:
    """SGD or AdamW over :func:`param_groups`; ``exempt``: weights not decayed by the optimizer;
    ``theta_momentum``: the theta groups' gradient averaging (:meth:`Method.theta_momentum`)."""
    if cfg.name == "adamw" and any(v > 0 for v in theta_lrs.values()):
        # Adam divides every gradient by its running RMS: the price-normalised theta step (and with it
        # the rule "a structure leaves when its importance per cost is below nu") would not hold
        raise ConfigError("optim.name", "adamw cannot train the gate parameters theta (Adam rescales their "
                          "gradients, so the price no longer sets the decisions): use optim.name=sgd with a "
                          "method that trains theta")
    lr = scaled_lr(cfg, global_batch)
    groups = param_groups(model, cfg, theta_lrs, lr, exempt, theta_momentum)
    # foreach: one multi-tensor op per update step for all parameters (the default on CUDA; explicit so
    # the CPU runs the same step, and the op budget of bench/step_budget.py counts what a GPU launches)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, foreach=True)
    return torch.optim.AdamW(groups, lr=lr, foreach=True)


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    return cfg.lr * global_batch / cfg.lr_batch if cfg.lr_batch else cfg.lr


def resolve_restart(cfg: OptimConfig, final_step: int | None, total_steps: int, steps_per_epoch: int) -> OptimConfig:
    """``cfg`` with ``restart_at: final`` replaced by the fraction (of the steps after the warm-up) at which
    ``final_step``, the method's architecture, becomes final: 0 (no restart) when it never does, or not
    after the warm-up and before the last step."""
    if cfg.restart_at != "final":
        return cfg
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    frac = 0.0
    if final_step is not None and warm < final_step < total_steps:
        frac = (final_step - warm) / max(1, total_steps - warm)
    return dataclasses.replace(cfg, restart_at=frac)


def lr_factor(cfg: OptimConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of the weights' base lr at ``step`` (0-based): linear warm-up, then the schedule (with
    ``restart_at`` > 0, a cosine that starts again at that fraction of the steps after the warm-up)."""
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, total_steps - warm)
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return cfg.step_gamma ** sum(1 for m in cfg.step_milestones if t >= m)
    r = cfg.restart_at
    if isinstance(r, str):
        raise ValueError("optim.restart_at: 'final' is resolved by resolve_restart() before the schedule is read")
    if r > 0.0 and t >= r:  # the second cosine, over what is left of the run
        return cfg.restart_factor * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (t - r) / (1.0 - r))))
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def set_lrs(opt: torch.optim.Optimizer, cfg: OptimConfig, step: int, total_steps: int, steps_per_epoch: int,
            theta_on: bool) -> float:
    """Set every group's lr for ``step``; returns the weights' lr (for logging)."""
    f = lr_factor(cfg, step, total_steps, steps_per_epoch)
    weights_lr = 0.0
    for g in opt.param_groups:
        if g["name"].startswith("theta"):
            g["lr"] = g["base_lr"] if theta_on else 0.0
        else:
            base = g["base_lr"]
            g["lr"] = cfg.min_lr + (base - cfg.min_lr) * f if base > cfg.min_lr else base * f
            weights_lr = g["lr"]
    return weights_lr
