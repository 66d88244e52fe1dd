"""Complexity-aware variational unit + layer gates (ALGORITHM.md section 1), and its
unit-only and layer-only special cases.

theta in [0, 1] is trained by projected SGD in its own parameter groups.  The loss adds

    nu * [alpha * E[MACs]/MACs_full + (1 - alpha) * E[Params]/Params_full]   (layer part x beta)
    + sum_j theta_j * (lambda/2) * ||w_j||^2                                    (gated decay)
    + harden * s(t) * sum theta (1 - theta)                                     (optional, [ours])

E[MACs] and E[Params] are the exact multilinear polynomials of :mod:`system.complexity`,
so autograd gives each structure its marginal cost (the automatic coefficients).

Pruning rule [ours, configurable]: at every check (every ``check_every`` steps after the
theta warm-up) a structure whose theta <= ``tau_theta`` has its zero-counter raised, else
reset (a reset after a hit counts as a revival).  It is removed once the counter reaches
``patience`` and the weight condition holds, or once it has revived ``max_revivals`` times
and sits at zero again (theta cannot bounce back forever).  Weight conditions:

- ``grad``: the theta gradient averaged since the last check is >= 0, i.e. the full
  objective pushes theta further into 0: it is in 0's domain of attraction;
- ``signal``: the channel's pre-gate output (|gamma| + |beta| of its BN, which set the
  output size after normalisation) is below ``tau_w`` times the layer's mean;
- ``none``: theta alone decides.

A unit decision that would empty a branch becomes a block removal if the block's layer
condition holds (or layer gates are off); otherwise the strongest unit is kept.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import torch

from system.complexity import count, expected
from system.config import check
from system.methods.base import Method, StepContext, remap_vector, unit_and_layer_gates
from system.models.resnet import GatedResNet, gates_of, set_gate_mode
from system.surgery import PrunePlan, Slices, plan_from_gates

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VariationalConfig:
    """Section ``method.variational``.  Defaults: see docs/results.md for the calibration."""

    unit_gates: bool = True
    layer_gates: bool = True
    nu: float = 1.0  # accuracy vs pruning strength
    alpha: float = 0.5  # MACs (1) vs parameters (0)
    beta: float = 1.0  # scale of the layer-gate part of the complexity gradient
    # theta learning rates (plain SGD, projected to [0, 1]).  A unit's marginal cost is 1/16-1/64
    # of a block's, so units need a ~100x larger rate to move at all (docs/results.md, calibration:
    # at 0.05 no unit theta reached 0 in 1,400 steps on Fashion-MNIST).
    lr_unit: float = 1.0
    lr_layer: float = 0.01
    warmup_frac: float = 0.2  # weights only for this fraction of the steps
    estimator: Literal["autograd", "exact_layer"] = "autograd"
    per_example: bool = False  # sample xi per example instead of per mini-batch
    gated_decay: bool = True  # weight decay of gated weights scaled by theta (in the loss)
    # pruning conditions
    check_every: int = 50
    patience: int = 3
    tau_theta: float = 0.0
    weight_condition: Literal["grad", "signal", "none"] = "grad"
    tau_w: float = 0.5
    max_revivals: int = 3
    # determinism at the end [ours]
    harden: Literal["none", "concave", "final"] = "final"
    harden_at: float = 0.7  # "final": at this fraction of steps round theta to {0,1} and prune
    harden_strength: float = 1.0  # "concave": weight of s(t) * theta (1 - theta), s ramps 0->1
    eval_gates: Literal["mean", "deterministic"] = "mean"  # before hardening
    threshold: float = 0.5  # deterministic gate: xi = 1[theta > threshold]

    def __post_init__(self) -> None:
        check(self.nu >= 0, "nu", "must be >= 0")
        check(0.0 <= self.alpha <= 1.0, "alpha", f"must be in [0, 1], got {self.alpha}")
        check(self.beta >= 0, "beta", "must be >= 0")
        check(self.lr_unit >= 0 and self.lr_layer >= 0, "lr_unit", "theta learning rates must be >= 0")
        check(0.0 <= self.warmup_frac < 1.0, "warmup_frac", "must be in [0, 1)")
        check(self.unit_gates or self.layer_gates, "unit_gates", "at least one of unit_gates/layer_gates must be on")
        check(self.check_every >= 1, "check_every", "must be >= 1")
        check(self.patience >= 1, "patience", "must be >= 1")
        check(0.0 <= self.tau_theta < 0.5, "tau_theta", "must be in [0, 0.5)")
        check(self.tau_w >= 0, "tau_w", "must be >= 0")
        check(self.max_revivals >= 1, "max_revivals", "must be >= 1")
        check(0.0 < self.harden_at <= 1.0, "harden_at", "must be in (0, 1]")
        check(self.harden_strength >= 0, "harden_strength", "must be >= 0")
        check(0.0 < self.threshold < 1.0, "threshold", "must be in (0, 1)")


def _scale_grad(t: torch.Tensor, scale: float) -> torch.Tensor:
    """Value ``t``, gradient ``scale * dt``."""
    if scale == 1.0:
        return t
    return t * scale + (t * (1.0 - scale)).detach()


class Variational(Method):
    name = "variational"

    def __init__(self, cfg: VariationalConfig, total_steps: int):
        super().__init__(cfg, total_steps)
        self.warmup_steps = int(cfg.warmup_frac * total_steps)
        self.harden_step = int(cfg.harden_at * total_steps) if cfg.harden == "final" else None
        self.hardened = False
        self.full: tuple[float, float] | None = None
        self.zero_count: dict[str, torch.Tensor] = {}
        self.revivals: dict[str, torch.Tensor] = {}
        self.grad_acc: dict[str, torch.Tensor] = {}
        self.grad_n = 0
        self.removed_units = 0
        self.removed_blocks = 0

    # -- set-up -------------------------------------------------------------------------
    def check_model(self, model: GatedResNet) -> None:
        super().check_model(model)
        if self.cfg.layer_gates and self.cfg.nu > 0:
            for name, blk in model.named_blocks():
                last = getattr(blk, "bn3", None) or getattr(blk, "bn2", None)
                if last is not None and not bool(last.weight.detach().any()):
                    raise ValueError(
                        f"method 'variational' with layer gates cannot prune a zero-initialised residual "
                        f"network (block {name} starts with its branch at 0, so its layer gate gets no data "
                        f"gradient and the complexity price removes it before it learns): set "
                        f"model.zero_init_residual=false or method.variational.layer_gates=false")

    def attach(self, model: GatedResNet) -> None:
        c = self.cfg
        mode_u = "sampled" if c.unit_gates else "off"
        mode_l = "sampled" if c.layer_gates else "off"
        if self.hardened:
            mode_u = "deterministic" if c.unit_gates else "off"
            mode_l = "deterministic" if c.layer_gates else "off"
        set_gate_mode(model, unit=mode_u, layer=mode_l, per_example=c.per_example)
        for g in gates_of(model).values():
            g.threshold = c.threshold
            # exact estimator: layer thetas get E[CE(xi=1) - CE(xi=0)] via surrogate_loss instead
            g.straight_through = not (g.kind == "layer" and c.estimator == "exact_layer")
        if self.full is None:
            spec = model.spec()
            self.full = tuple(float(v) for v in count(spec))
        unit, layer = unit_and_layer_gates(model)
        for n, g in {**unit, **layer}.items():
            self.zero_count.setdefault(n, torch.zeros_like(g.theta.detach()))
            self.revivals.setdefault(n, torch.zeros_like(g.theta.detach()))
            self.grad_acc.setdefault(n, torch.zeros_like(g.theta.detach()))

    def theta_lrs(self) -> dict[str, float]:
        c = self.cfg
        return {"unit": c.lr_unit if c.unit_gates else 0.0, "layer": c.lr_layer if c.layer_gates else 0.0}

    def theta_active(self, step: int) -> bool:
        # nu = 0 is "accuracy only": without a complexity price theta is not trained (it stays 1),
        # so stochastic noise in the data gradient cannot prune anything.
        return self.cfg.nu > 0 and step >= self.warmup_steps and not self.hardened

    # -- loss ---------------------------------------------------------------------------
    def _active(self, model: GatedResNet):
        unit, layer = unit_and_layer_gates(model)
        u = {n: g.theta for n, g in unit.items()} if self.cfg.unit_gates else {}
        lyr = {n: _scale_grad(g.theta, self.cfg.beta) for n, g in layer.items()} if self.cfg.layer_gates else {}
        return u, lyr

    def complexity_cost(self, model: GatedResNet) -> torch.Tensor:
        c = self.cfg
        u, lyr = self._active(model)
        em, ep = expected(model.spec(), u, lyr)
        return c.nu * (c.alpha * em / self.full[0] + (1.0 - c.alpha) * ep / self.full[1])

    def regularizer(self, model: GatedResNet, step: int) -> torch.Tensor | None:
        c = self.cfg
        terms = []
        if self.theta_active(step) and c.nu > 0:
            terms.append(self.complexity_cost(model))
        if c.harden == "concave" and self.theta_active(step) and c.harden_strength > 0:
            ramp = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
            unit, layer = unit_and_layer_gates(model)
            pen = sum((g.theta * (1 - g.theta)).sum() for g in {**unit, **layer}.values())
            terms.append(c.harden_strength * ramp * pen)
        return sum(terms) if terms else None

    def surrogate_loss(self, model, forward, x, y, loss_fn, step):
        """``exact_layer``: d/dtheta_B of E[CE] = E[CE(xi_B=1) - CE(xi_B=0)], one sample of the rest."""
        if self.cfg.estimator != "exact_layer" or not self.cfg.layer_gates or not self.theta_active(step):
            return None
        _, layer = unit_and_layer_gates(model)
        diffs, thetas = [], []
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        momenta = [m.momentum for m in bns]
        for m in bns:  # the extra forwards must not move the running statistics
            m.momentum = 0.0
        with torch.no_grad():
            for g in layer.values():
                vals = []
                for v in (1.0, 0.0):
                    g.force = v
                    vals.append(loss_fn(forward(x), y))
                g.force = None
                diffs.append(vals[0] - vals[1])
                thetas.append(g.theta.reshape(()))
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        return sum(d.detach() * t for d, t in zip(diffs, thetas))

    def gated_decay(self, model: GatedResNet, weight_decay: float) -> torch.Tensor | None:
        """sum over blocks of theta_B * (lambda/2) * [sum_u theta_u ||w_u||^2 + ||w_last||^2]."""
        if not self.cfg.gated_decay or weight_decay == 0:
            return None
        total = 0.0
        for bname, blk in model.named_blocks():
            if not hasattr(blk, "layer_gate"):
                continue
            inner = []
            for i in (1, 2):
                gate = getattr(blk, f"gate{i}", None)
                if gate is None:
                    continue
                conv = getattr(blk, f"conv{i}")
                sq = conv.weight.pow(2).sum(dim=(1, 2, 3))
                th = gate.theta if self.cfg.unit_gates and not self.hardened else gate.theta.detach().clamp(0, 1)
                inner.append((th * sq).sum())
            last = blk.conv3 if hasattr(blk, "conv3") else blk.conv2
            inner.append(last.weight.pow(2).sum())
            tb = blk.layer_gate.theta if self.cfg.layer_gates and not self.hardened else blk.layer_gate.theta.detach()
            total = total + tb.reshape(()) * sum(inner)
        return 0.5 * weight_decay * total

    # -- per step -----------------------------------------------------------------------
    def after_backward(self, model: GatedResNet) -> None:
        for n, g in gates_of(model).items():
            if g.theta.grad is not None and n in self.grad_acc:
                self.grad_acc[n] += g.theta.grad.detach()
        self.grad_n += 1

    def after_step(self, model: GatedResNet) -> None:
        with torch.no_grad():
            for g in gates_of(model).values():
                g.theta.clamp_(0.0, 1.0)

    def check_due(self, step: int) -> bool:
        if self.hardened:
            return False
        if self.harden_step is not None and step >= self.harden_step:
            return True
        return step > self.warmup_steps and step % self.cfg.check_every == 0

    def sync_tensors(self) -> list[torch.Tensor]:
        return [self.grad_acc[n] for n in sorted(self.grad_acc)]

    def on_step_end(self, ctx: StepContext) -> PrunePlan | None:
        model = ctx.model
        if self.harden_step is not None and ctx.step >= self.harden_step and not self.hardened:
            return self._harden(model)
        return self._check(model)

    def _harden(self, model: GatedResNet) -> PrunePlan:
        """Round theta to {0, 1}, switch to deterministic gates, cut every gate that is off."""
        c = self.cfg
        with torch.no_grad():
            for g in gates_of(model).values():
                on = g.theta > c.threshold
                g.theta.copy_(on.to(g.theta.dtype))
        self.hardened = True
        self.attach(model)
        plan = plan_from_gates(model, threshold=c.threshold)
        log.info("hardening: theta rounded, %d channels and %d blocks cut", plan.n_channels, len(plan.blocks))
        return plan

    def _weight_ok(self, model: GatedResNet, name: str, mean_grad: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        if c.weight_condition == "none":
            return torch.ones_like(mean_grad, dtype=torch.bool)
        if c.weight_condition == "grad":
            return mean_grad >= 0
        block, _, gate = name.rpartition(".")
        blk = dict(model.named_blocks())[block]
        if gate == "layer_gate":
            bn = blk.bn3 if hasattr(blk, "bn3") else blk.bn2
            sig = (bn.weight.abs() + bn.bias.abs()).mean().reshape(1)
            ref = torch.stack([
                ((b.bn3 if hasattr(b, "bn3") else b.bn2).weight.abs()
                 + (b.bn3 if hasattr(b, "bn3") else b.bn2).bias.abs()).mean()
                for _, b in model.named_blocks() if hasattr(b, "bn2")]).mean()
        else:
            bn = getattr(blk, f"bn{gate[4:]}")
            sig = bn.weight.abs() + bn.bias.abs()
            ref = sig.mean()
        return sig.detach() <= c.tau_w * ref.detach()

    def _check(self, model: GatedResNet) -> PrunePlan | None:
        c = self.cfg
        unit, layer = unit_and_layer_gates(model)
        flagged: dict[str, torch.Tensor] = {}
        for name, g in {**(unit if c.unit_gates else {}), **(layer if c.layer_gates else {})}.items():
            th = g.theta.detach()
            at_zero = th <= c.tau_theta
            zc = self.zero_count[name]
            revived = (~at_zero) & (zc > 0)
            self.revivals[name] += revived.to(zc.dtype)
            zc.copy_(torch.where(at_zero, zc + 1, torch.zeros_like(zc)))
            mean_grad = self.grad_acc[name] / max(1, self.grad_n)
            ok = self._weight_ok(model, name, mean_grad)
            flagged[name] = at_zero & (((zc >= c.patience) & ok) | (self.revivals[name] >= c.max_revivals))
        for v in self.grad_acc.values():
            v.zero_()
        self.grad_n = 0
        units: dict[str, tuple[int, ...]] = {}
        blocks: list[str] = []
        for bname, blk in model.named_blocks():
            lg = f"{bname}.layer_gate"
            if lg in flagged and bool(flagged[lg].all()):
                blocks.append(bname)
                continue
            gnames = [f"{bname}.gate{i}" for i in (1, 2) if f"{bname}.gate{i}" in flagged]
            empties = [gn for gn in gnames if bool(flagged[gn].all())]
            if empties:
                layer_ok = (not c.layer_gates) or (lg in flagged and bool((self.zero_count[lg] > 0).all()))
                if layer_ok or not c.layer_gates:
                    blocks.append(bname)
                    continue
                for gn in empties:  # keep the unit with the largest theta, then the largest signal
                    keep = int(torch.argmax(unit[gn].theta.detach() + 1e-6 * torch.arange(unit[gn].theta.numel(), device=unit[gn].theta.device)))
                    flagged[gn][keep] = False
            for gn in gnames:
                idx = tuple(int(i) for i in torch.nonzero(flagged[gn]).flatten())
                if idx:
                    units[gn] = idx
        plan = PrunePlan(units=units, blocks=tuple(blocks))
        return None if plan.empty else plan

    def after_prune(self, plan: PrunePlan, slices: Slices, model: GatedResNet) -> None:
        for store in (self.zero_count, self.revivals, self.grad_acc):
            new = remap_vector(store, plan, slices)
            store.clear()
            store.update(new)
        self.removed_units += plan.n_channels
        self.removed_blocks += len(plan.blocks)

    # -- evaluation ---------------------------------------------------------------------
    @contextlib.contextmanager
    def eval_gates(self, model: GatedResNet) -> Iterator[None]:
        c = self.cfg
        saved = {n: g.mode for n, g in gates_of(model).items()}
        mode = "deterministic" if self.hardened else c.eval_gates
        set_gate_mode(model, unit=mode if c.unit_gates else "off", layer=mode if c.layer_gates else "off")
        try:
            yield
        finally:
            for n, g in gates_of(model).items():
                g.mode = saved[n]

    def final_plan(self, model: GatedResNet) -> PrunePlan | None:
        plan = plan_from_gates(model, threshold=self.cfg.threshold) if self.hardened else None
        return None if plan is None or plan.empty else plan

    # -- state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"hardened": self.hardened, "full": list(self.full) if self.full else None,
                "zero_count": self.zero_count, "revivals": self.revivals, "grad_acc": self.grad_acc,
                "grad_n": self.grad_n, "removed_units": self.removed_units, "removed_blocks": self.removed_blocks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.hardened = bool(state["hardened"])
        self.full = tuple(state["full"]) if state["full"] else None
        for key in ("zero_count", "revivals", "grad_acc"):
            getattr(self, key).clear()
            getattr(self, key).update({k: v.clone() for k, v in state[key].items()})
        self.grad_n = int(state["grad_n"])
        self.removed_units, self.removed_blocks = int(state["removed_units"]), int(state["removed_blocks"])

    def summary(self) -> dict[str, Any]:
        return {"hardened": self.hardened}
