"""Complexity-aware variational unit + layer gates (docs/method.md section 1), and its
unit-only and layer-only special cases.  Every [ours] mechanism below, and what it does to the
decisions, is described in docs/method.md section 7; the keys are those of
:class:`~system.pruning.methods.variational.config.VariationalConfig`.

theta in [0, 1] is trained by projected SGD in its own parameter groups (momentum ``theta_momentum``).
The loss adds ``nu * [alpha * E[MACs]/MACs_full + (1 - alpha) * E[Params]/Params_full]`` (layer part
x beta; the exact multilinear polynomials of :mod:`system.pruning.complexity`, so autograd gives each
structure its marginal cost) and, optionally, the theta-weighted decay of the gated weights.

- The theta step (``theta_step: normalized``): each theta's gradient divided by its price ``c_j``, so
  it moves at nu minus its importance per cost; under a target the layer thetas' step is also divided
  by nu (``step_per_nu``), so a block with no importance leaves at full speed whatever nu's scale.
- The drive (``drive``, ``drive_mode``): added in :meth:`Variational.after_backward`, after the window
  sums the pruning condition reads; it never enters a removal decision.
- Layer-gate estimators (``estimator``; :mod:`.estimators`): ``paired`` (default: CE(on) - CE(off) of
  the batch from a suffix forward, one block a step round-robin, each block's running estimate; every
  block measured once at the end of the warm-up before its theta moves; the suffix forwards counted in
  the training MACs), ``conditional``, ``exact``, ``autograd``.  Unit gates use the autograd estimator.
- Budget mode (``method.target_macs``): nu is a dual variable, a PI controller on the gap between
  E[MACs] and a schedule falling to the target at ``target_by`` (:meth:`Variational._dual_step`); the
  rounding at ``harden_at`` lands the deterministic network at or under the target.
- The pruning rule: at every check, a structure at theta <= ``tau_theta`` for ``patience`` checks is
  removed if its condition holds (``importance``: the window mean of data + price >= 0, i.e. importance
  per cost <= nu; ``signal``; ``none``), or after ``max_revivals`` revivals; a unit decision that would
  empty a branch becomes a block removal if the block's own condition holds.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any, cast

import torch

from system.models.anatomy import LAYER_GATE, anatomy, last_bn, split_gate_name
from system.models.resnet import GatedResNet, RemovedBlock, gates_of, set_gate_mode
from system.pruning.complexity import count, expected, suffix_macs
from system.pruning.methods.base import (
    Batch,
    Event,
    Method,
    StepContext,
    all_finite,
    remap_stores,
    round_removal,
    unit_and_layer_gates,
)
from system.pruning.methods.variational.config import VariationalConfig
from system.pruning.methods.variational.estimators import conditional_term, exact_term, paired_differences
from system.pruning.methods.variational.rounding import round_thetas
from system.pruning.methods.variational.terms import gated_decay_term
from system.pruning.surgery import PrunePlan, Slices, plan_from_gates, plan_from_removals, plan_spec

log = logging.getLogger(__name__)


def _scale_grad(t: torch.Tensor, scale: float) -> torch.Tensor:
    """Value ``t``, gradient ``scale * dt``."""
    if scale == 1.0:
        return t
    return t * scale + (t * (1.0 - scale)).detach()


class Variational(Method):
    name = "variational"
    events = frozenset({Event.STEP_END, Event.FINAL})
    supports_target = True

    def __init__(self, cfg: VariationalConfig, total_steps: int, target_macs: float | None = None,
                 round_to: int = 1, weight_decay: float = 0.0):
        super().__init__(cfg, total_steps, target_macs, round_to, weight_decay)
        self.warmup_steps = int(cfg.warmup_frac * total_steps)
        self.harden_step = int(cfg.harden_at * total_steps) if cfg.harden == "final" else None
        self.target_step = max(self.warmup_steps + 1, int(cfg.target_by * total_steps))
        self.hardened = False
        self.full: tuple[float, float] | None = None
        self.nu = cfg.nu_start if target_macs is not None else cfg.nu
        self.nu_i = self.nu  # the integral part of the dual variable (budget mode)
        self.zero_count: dict[str, torch.Tensor] = {}
        self.revivals: dict[str, torch.Tensor] = {}
        # the theta gradient without the drive (data + price), normalised, summed since the last check
        self.grad_acc: dict[str, torch.Tensor] = {}
        self.grad_n: torch.Tensor = torch.zeros(())  # the steps summed (steps with non-finite gradients skip)
        self.removed_units = 0
        self.removed_blocks = 0
        self.check_every = cfg.check_every or max(1, round(0.02 * total_steps))
        self.extra_forward_count = 0.0  # the estimator's extra forwards this step, in full-forward MACs
        # paired estimator: each block's running estimate of CE(on) - CE(off), and the round-robin position
        self.layer_est: dict[str, torch.Tensor] = {}
        self.layer_picks = 0
        self._seen_blocks: set[str] = set()
        self.expected_macs_at_harden: float | None = None
        self.nu_max = self.nu
        self.expected_macs = 1.0  # E[MACs] / dense MACs after the last step
        # every event: (step, channels, blocks, 'rule' | 'rounding', MACs after it)
        self.removal_steps: list[tuple[int, int, int, str, float]] = []
        self._rounding = False  # the plan in flight comes from the rounding step
        self._price_spec: Any = None  # the spec the cached prices belong to
        self._price: dict[str, torch.Tensor] = {}
        self._suffix_spec: Any = None  # the spec the cached suffix fractions belong to
        self._suffix: list[float] = []
        self._step = 0

    # -- set-up -------------------------------------------------------------------------
    def check_model(self, model: GatedResNet) -> None:
        super().check_model(model)
        if self.cfg.layer_gates and (self.cfg.nu > 0 or self.target is not None):
            for name, blk in model.named_blocks():
                if isinstance(blk, RemovedBlock):
                    continue
                last = last_bn(blk, model.block_kind)
                if not bool(last.weight.detach().any()):
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
        set_gate_mode(model, unit=mode_u, layer=mode_l)
        for g in gates_of(model).values():
            g.per_example = c.per_example if g.kind == "unit" else c.layer_per_example
            g.threshold = c.threshold
            # the layer thetas get E[CE(xi=1) - CE(xi=0)] through surrogate_loss instead
            g.straight_through = not (g.kind == "layer" and c.estimator != "autograd")
        if self.full is None:
            macs, params = count(model.spec())
            self.full = (float(macs), float(params))
        unit, layer = unit_and_layer_gates(model)
        for n, g in {**unit, **layer}.items():
            self.zero_count.setdefault(n, torch.zeros_like(g.theta.detach()))
            self.revivals.setdefault(n, torch.zeros_like(g.theta.detach()))
            self.grad_acc.setdefault(n, torch.zeros_like(g.theta.detach()))
        for n, g in layer.items():
            self.layer_est.setdefault(n, torch.zeros_like(g.theta.detach()))
        model.keep_block_inputs = self._paired_live()
        self.grad_n = self.grad_n.to(model.fc.weight.device)

    def _paired_live(self) -> bool:
        c = self.cfg
        return c.estimator == "paired" and c.layer_gates and not self.hardened and (c.nu > 0 or self.target is not None)
    @property
    def dense(self) -> tuple[float, float]:
        """(MACs, params) of the dense network (known from :meth:`attach` on)."""
        if self.full is None:
            raise RuntimeError("method 'variational': attach() the model first")
        return self.full

    def theta_momentum(self) -> float:
        return self.cfg.theta_momentum

    def theta_lrs(self) -> dict[str, float]:
        c = self.cfg
        if c.theta_step == "normalized":
            lr = 1.0 / (c.theta_travel * max(1, self.total_steps))
            return {"unit": lr if c.unit_gates else 0.0, "layer": lr if c.layer_gates else 0.0}
        return {"unit": c.lr_unit if c.unit_gates else 0.0, "layer": c.lr_layer if c.layer_gates else 0.0}

    def theta_active(self, step: int) -> bool:
        # nu = 0 without a target is "accuracy only": theta is not trained (it stays 1),
        # so stochastic noise in the data gradient cannot prune anything.
        priced = self.cfg.nu > 0 or self.target is not None
        return priced and step >= self.warmup_steps and not self.hardened

    # -- loss ---------------------------------------------------------------------------
    def _active(self, model: GatedResNet, thetas=None):
        unit, layer = unit_and_layer_gates(model)
        get = (lambda n, g: g.theta) if thetas is None else (lambda n, g: thetas[n])
        u = {n: get(n, g) for n, g in unit.items()} if self.cfg.unit_gates else {}
        lyr = {n: _scale_grad(get(n, g), self.cfg.beta) for n, g in layer.items()} if self.cfg.layer_gates else {}
        return u, lyr

    def _cost(self, model: GatedResNet, thetas=None) -> torch.Tensor:
        c = self.cfg
        u, lyr = self._active(model, thetas)
        em, ep = expected(model.spec(), u, lyr)
        return c.alpha * em / self.dense[0] + (1.0 - c.alpha) * ep / self.dense[1]

    def complexity_cost(self, model: GatedResNet) -> torch.Tensor:
        return self.nu * self._cost(model)

    def prices(self, model: GatedResNet) -> dict[str, torch.Tensor]:
        """Each gate's price coefficient c_j (layer part x beta) with every gate of the current network on."""
        spec = model.spec()
        if self._price_spec is not spec:
            ones = {n: torch.ones_like(g.theta.detach(), dtype=torch.float64).requires_grad_(True)
                    for n, g in gates_of(model).items()}
            if not ones:  # every block is gone
                self._price, self._price_spec = {}, spec
                return self._price
            cost = self._cost(model, ones)
            grads = torch.autograd.grad(cost, list(ones.values()), allow_unused=True)
            self._price = {n: (gr if gr is not None else torch.zeros_like(t)).to(torch.float32).clamp_min(1e-12)
                           .to(model.fc.weight.device) for (n, t), gr in zip(ones.items(), grads)}
            self._price_spec = spec
        return self._price

    def _ramp(self, step: int) -> float:
        """0 at the end of the warm-up, 1 when the budget is due (``target_by``): the drive's weight and
        the budget schedule."""
        return min(1.0, max(0.0, (step - self.warmup_steps) / max(1, self.target_step - self.warmup_steps)))

    def scheduled_budget(self, step: int) -> float:
        """m*(t): the budget the dual variable tracks (1 until the warm-up ends, T from ``target_by``)."""
        if self.target is None:
            return 1.0
        return 1.0 - (1.0 - self.target) * self._ramp(step)

    # -- what the method declares ------------------------------------------------------
    def decay_exempt(self, model: GatedResNet) -> set[str]:
        """With gated decay, the branch convs are decayed in the loss (theta-weighted), not by the optimizer."""
        if not self.cfg.gated_decay or self.weight_decay == 0:
            return set()
        convs = anatomy(model.block_kind).convs
        return {f"{b}.{c}.weight" for b, blk in model.named_blocks() if not isinstance(blk, RemovedBlock)
                for c in convs}

    def export_gates(self) -> str:
        return "deterministic" if self.hardened else "mean"

    def loss_terms(self, model: GatedResNet, step: int, batch: Batch) -> list[torch.Tensor]:
        terms = [self.surrogate_loss(model, batch.forward, batch.x, batch.y, batch.loss_fn, step,
                                     per_example_loss=batch.per_example_loss),
                 self.regularizer(model, step),
                 self.gated_decay(model, self.weight_decay) if self.decay_exempt(model) else None]
        return [t for t in terms if t is not None]

    def regularizer(self, model: GatedResNet, step: int) -> torch.Tensor | None:
        if not self.theta_active(step):
            return None
        # (the drive is not a loss term: after_backward adds its gradient, so that the pruning
        # condition can read the theta gradient without it)
        return self.complexity_cost(model) if self.nu > 0 else None

    def surrogate_loss(self, model, forward, x, y, loss_fn, step, per_example_loss=None):
        """Layer estimators other than autograd: a term whose theta_B gradient is the estimate."""
        c = self.cfg
        self.extra_forward_count = 0
        if c.estimator == "autograd" or not c.layer_gates:
            return None
        _, layer = unit_and_layer_gates(model)
        active = self.theta_active(step)
        # paired: the last steps of the warm-up measure every block once, so that no theta starts
        # moving on the zero its estimate starts at
        priming = (c.estimator == "paired" and not active and self._paired_live()
                   and self.warmup_steps - len(layer) <= step < self.warmup_steps)
        if not layer or not (active or priming):
            return None
        if c.estimator == "conditional":
            return conditional_term(layer, per_example_loss)
        if c.estimator == "paired":
            term = self._paired_term(model, layer, forward, x, y, loss_fn, per_example_loss)
            return term if active else None
        names = sorted(layer)
        k = len(names) if c.exact_blocks == 0 else min(c.exact_blocks, len(names))
        if k < len(names):
            pick = torch.randperm(len(names))[:k].tolist()
            names = [names[i] for i in sorted(pick)]
        self.extra_forward_count = float(k)
        return exact_term(model, layer, names, forward, x, y, loss_fn, per_example_loss)

    def _paired_term(self, model, layer, forward, x, y, loss_fn, per_example_loss) -> torch.Tensor:
        """Sum_B est_B * theta_B: every block's theta gets its running estimate of CE(on) - CE(off);
        ``paired_blocks`` blocks (round-robin) get a fresh paired difference this step."""
        c = self.cfg
        flat = [(i, f"{n}.{LAYER_GATE}") for i, (n, _) in enumerate(model.named_blocks())]
        live = [(i, n) for i, n in flat if n in layer]
        k = len(live) if c.paired_blocks == 0 else min(c.paired_blocks, len(live))
        picks = [live[(self.layer_picks + j) % len(live)] for j in range(k)]
        self.layer_picks = (self.layer_picks + k) % len(live)
        diffs = paired_differences(model, layer, picks, forward, x, y, loss_fn, per_example_loss)
        model.block_inputs = []
        suffix = self._suffix_fractions(model)
        self.extra_forward_count = sum(suffix[i] for i, _ in picks)
        m = c.paired_memory
        for n, d in diffs.items():
            est = self.layer_est[n]
            fresh = d.to(est.dtype).reshape(est.shape)
            # the first difference of a block replaces the zero it started with; a non-finite one is dropped
            new = m * est + (1 - m) * fresh if n in self._seen_blocks else fresh
            est.copy_(torch.where(torch.isfinite(fresh), new, est))
            self._seen_blocks.add(n)
        return cast(torch.Tensor, sum(self.layer_est[n].detach().reshape(()) * g.theta.reshape(())
                                      for n, g in layer.items()))

    def _suffix_fractions(self, model: GatedResNet) -> list[float]:
        """Each block's suffix forward as a fraction of the network's MACs (kept per spec, like the prices)."""
        spec = model.spec()
        if self._suffix_spec is not spec:
            total = max(1, count(spec)[0])
            self._suffix, self._suffix_spec = [m / total for m in suffix_macs(spec)], spec
        return self._suffix

    def extra_forwards(self) -> float:
        """This step's forwards beyond the main one, in full-network forwards (the paired estimator's
        suffix forwards count their share of the network's MACs)."""
        return self.extra_forward_count

    def gated_decay(self, model: GatedResNet, weight_decay: float) -> torch.Tensor | None:
        """The theta-weighted decay of the branch weights (``gated_decay``), or None when off."""
        if not self.cfg.gated_decay or weight_decay == 0:
            return None
        return gated_decay_term(model, weight_decay, unit_live=self.cfg.unit_gates and not self.hardened,
                                layer_live=self.cfg.layer_gates and not self.hardened)

    # -- per step -----------------------------------------------------------------------
    def after_backward(self, model: GatedResNet, grad_scale: float = 1.0) -> None:
        """Normalise the theta gradients (``theta_step: normalized``), add them to the window sums the
        pruning condition reads (a step whose gradients are not finite, an fp16 overflow, adds nothing),
        then add the drive's gradient, which the condition never sees."""
        c = self.cfg
        model.block_inputs = []  # the paired estimator's kept inputs are spent by now
        active = self.theta_active(self._step)
        normalized = c.theta_step == "normalized" and active
        price = self.prices(model) if normalized or (active and c.drive > 0) else {}
        live = [(n, g) for n, g in gates_of(model).items() if g.theta.grad is not None and n in self.grad_acc]
        if not live:
            return
        per_nu = {k: self._step_scale(k) if normalized else 1.0 for k in ("unit", "layer")}
        if normalized:  # in place: the optimizer steps on the normalized gradient
            for n, g in live:
                assert g.theta.grad is not None
                g.theta.grad.div_(price[n] * per_nu[g.kind])
        if self._paired_live():  # no step, and no evidence for the rule, before a block's first measurement
            for n, g in live:
                if g.kind == "layer" and n not in self._seen_blocks:
                    cast(torch.Tensor, g.theta.grad).zero_()
        grads = [cast(torch.Tensor, g.theta.grad).detach() for _, g in live]
        finite = all_finite(grads)
        for (n, _), t in zip(live, grads):
            self.grad_acc[n] += torch.where(finite, t / grad_scale, torch.zeros_like(t))
        self.grad_n += finite.to(self.grad_n.dtype)
        s = self._ramp(self._step)
        if active and c.drive > 0 and s > 0 and self.nu > 0:
            # d/dtheta of drive * s * nu * c_j * theta (1 - theta), normalised by c_j when the step is
            kinds = {"unit": c.unit_gates, "layer": c.layer_gates}
            for n, g in live:
                if kinds[g.kind]:
                    scale = 1.0 / per_nu[g.kind] if normalized else price[n]
                    push = 1 - 2 * g.theta.detach()
                    if c.drive_mode == "down":  # only towards 0, below theta 0.5
                        push = push.clamp_min(0.0)
                    cast(torch.Tensor, g.theta.grad).add_(c.drive * s * self.nu * grad_scale * scale * push)

    def _step_scale(self, kind: str) -> float:
        """``step_per_nu`` [ours], under a target: the normalised theta gradient of the chosen kinds is
        divided by nu (at least ``nu_floor``), so that a structure with importance per cost well below nu leaves at the
        price's full speed whatever nu's scale (under a target nu starts small and falls once the budget
        is met; with speed proportional to nu a useless block could still be at theta 0.8 when the budget
        is due).  The sign of every step, and so every decision, is unchanged; only the speed is."""
        mode = self.cfg.step_per_nu
        if self.target is None:  # a fixed nu is the user's own scale of the price: its speed stays as set
            return 1.0
        if mode == "all" or (mode == "layer" and kind == "layer"):
            return max(self.nu, self.cfg.nu_floor)
        return 1.0

    def after_step(self, model: GatedResNet) -> None:
        with torch.no_grad():
            for g in gates_of(model).values():
                g.theta.clamp_(0.0, 1.0)
            active = self.theta_active(self._step)
            self._step += 1
            if active and self.target is not None:  # the dual variable follows E[MACs] every step
                self._update_expected_macs(model)
                self._dual_step()

    def _update_expected_macs(self, model: GatedResNet) -> None:
        with torch.no_grad():
            self.expected_macs = float(expected(model.spec(), *self._thetas(model))[0]) / self.dense[0]

    def _dual_step(self) -> None:
        """Budget mode: nu from a PI controller in log space on the relative gap to the scheduled budget.

        ``gap = (E[MACs]/MACs_full - m*(t)) / (1 - T)``; ``log nu_I += dual_gain * gap / (theta_travel * steps)``
        (integral: a gap of one full budget held for one theta travel time multiplies nu by e^dual_gain)
        and ``nu = nu_I * exp(dual_kp * gap)`` (proportional: an overshoot relaxes the pressure at once).
        """
        c = self.cfg
        assert self.target is not None  # budget mode only
        gap = (self.expected_macs - self.scheduled_budget(self._step)) / max(1e-6, 1.0 - self.target)
        rate = c.dual_gain / (c.theta_travel * max(1, self.total_steps))
        self.nu_i = min(1e6, max(1e-6, self.nu_i * math.exp(rate * gap)))
        self.nu = self.nu_i * math.exp(c.dual_kp * max(-5.0, min(5.0, gap)))
        self.nu_max = max(self.nu_max, self.nu)

    def _thetas(self, model: GatedResNet):
        unit, layer = unit_and_layer_gates(model)
        u = {n: g.theta.detach() for n, g in unit.items()} if self.cfg.unit_gates else {}
        lyr = {n: g.theta.detach() for n, g in layer.items()} if self.cfg.layer_gates else {}
        return u, lyr

    def check_due(self, step: int) -> bool:
        if self.hardened:
            return False
        if self.harden_step is not None and step >= self.harden_step:
            return True
        return step > self.warmup_steps and step % self.check_every == 0

    def decision_state(self) -> dict[str, Any]:
        """nu (the dual variable, recomputed on every rank from theta) and the expected MACs it follows."""
        return {"nu": self.nu, "nu_i": self.nu_i, "expected_macs": self.expected_macs}

    def sync_tensors(self) -> list[torch.Tensor]:
        return [self.grad_acc[n] for n in sorted(self.grad_acc)]

    def on_step_end(self, ctx: StepContext) -> PrunePlan | None:
        model = ctx.model
        self._step = ctx.step
        if self.harden_step is not None and ctx.step >= self.harden_step and not self.hardened:
            return self._harden(model)
        return self._check(model)

    def _round(self, model: GatedResNet) -> dict[str, torch.Tensor]:
        """theta rounded to {0, 1}: at ``threshold``, or, under a target, the cut nearest the target from below."""
        u, lyr = self._thetas(model)
        return round_thetas(model.spec(), u, lyr, self.cfg.threshold, self.round_to, self.target, self.dense[0])

    def _harden(self, model: GatedResNet) -> PrunePlan:
        """Round theta to {0, 1}, switch to deterministic gates, cut every gate that is off."""
        c = self.cfg
        self._update_expected_macs(model)
        self.expected_macs_at_harden = self.expected_macs  # where the theta dynamics got before rounding
        rounded = self._round(model)
        gates = gates_of(model)
        with torch.no_grad():
            for n, v in rounded.items():
                gates[n].theta.copy_(v)
        self.hardened = True
        self.attach(model)
        plan = plan_from_gates(model, threshold=c.threshold)
        self._rounding = not plan.empty
        log.info("hardening at step %d: theta rounded, %d channels and %d blocks cut", self._step,
                 plan.n_channels, len(plan.blocks))
        return plan

    def _weight_ok(self, model: GatedResNet, name: str, mean_grad: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        if c.weight_condition == "none":
            return torch.ones_like(mean_grad, dtype=torch.bool)
        if c.weight_condition == "importance":
            # the window mean of data + price (normalised): >= 0 iff importance per cost <= nu
            return mean_grad >= 0
        block, gate = split_gate_name(name)
        blk = dict(model.named_blocks())[block]
        kind = model.block_kind
        if gate == LAYER_GATE:
            bn = last_bn(blk, kind)
            sig = (bn.weight.abs() + bn.bias.abs()).mean().reshape(1)
            ref = torch.stack([(last_bn(b, kind).weight.abs() + last_bn(b, kind).bias.abs()).mean()
                               for _, b in model.named_blocks() if not isinstance(b, RemovedBlock)]).mean()
        else:
            bn = getattr(blk, anatomy(kind).unit(gate).bn)
            sig = bn.weight.abs() + bn.bias.abs()
            ref = sig.mean()
        return sig.detach() <= c.tau_w * ref.detach()

    def _check(self, model: GatedResNet) -> PrunePlan | None:
        c = self.cfg
        unit, layer = unit_and_layer_gates(model)
        if self.target is None:  # (under a target it is kept current every step)
            self._update_expected_macs(model)
        flagged: dict[str, torch.Tensor] = {}
        for name, g in {**(unit if c.unit_gates else {}), **(layer if c.layer_gates else {})}.items():
            th = g.theta.detach()
            at_zero = th <= c.tau_theta
            zc = self.zero_count[name]
            revived = (~at_zero) & (zc > 0)
            self.revivals[name] += revived.to(zc.dtype)
            zc.copy_(torch.where(at_zero, zc + 1, torch.zeros_like(zc)))
            mean_grad = self.grad_acc[name] / self.grad_n.clamp_min(1)
            ok = self._weight_ok(model, name, mean_grad)
            flagged[name] = at_zero & (((zc >= c.patience) & ok) | (self.revivals[name] >= c.max_revivals))
        for v in self.grad_acc.values():
            v.zero_()
        self.grad_n.zero_()
        at0 = sum(int((g.theta.detach() <= c.tau_theta).sum()) for g in {**unit, **layer}.values())
        log.info("check at step %d: nu %.4f, E[MACs] %.3f of dense (budget %.3f), %d gates at theta <= %g, "
                 "%d flagged", self._step, self.nu, self.expected_macs, self.scheduled_budget(self._step), at0,
                 c.tau_theta, sum(int(f.sum()) for f in flagged.values()))
        removals: dict[str, torch.Tensor] = {}
        blocks: list[str] = []
        anat = anatomy(model.block_kind)
        for bname, _blk in model.named_blocks():
            lg = f"{bname}.{LAYER_GATE}"
            if lg in flagged and bool(flagged[lg].all()):
                blocks.append(bname)
                continue
            gnames = [f"{bname}.{u.gate}" for u in anat.units if f"{bname}.{u.gate}" in flagged]
            empties = [gn for gn in gnames if bool(flagged[gn].all())]
            if empties:
                layer_ok = (not c.layer_gates) or (lg in flagged and bool((self.zero_count[lg] > 0).all()))
                if layer_ok:
                    blocks.append(bname)
                    continue
                for gn in empties:  # keep the unit with the largest theta (ties: the lowest index)
                    keep = int(torch.argmax(unit[gn].theta.detach()))
                    flagged[gn][keep] = False
            for gn in gnames:
                removals[gn] = round_removal(flagged[gn], unit[gn].theta, self.round_to)
        plan = plan_from_removals(removals, blocks)
        if plan.empty:
            return None
        if self.target is not None and self._macs_after(model, plan) < self.target:
            # the whole cut would take the network under its budget for good: the flagged structures
            # go lowest theta first, as many as keep it at or above the target (the rest wait: they
            # may revive as nu falls; the rounding step settles them)
            trimmed = self._within_target(model, removals, blocks)
            return None if trimmed is None or trimmed.empty else trimmed
        return plan

    def _macs_after(self, model: GatedResNet, plan: PrunePlan) -> float:
        return count(plan_spec(model.spec(), plan)[0])[0] / self.dense[0]

    def _within_target(self, model: GatedResNet, removals: dict[str, torch.Tensor],
                       blocks: list[str]) -> PrunePlan | None:
        """The longest prefix of the flagged structures, ordered by theta (blocks by their layer
        theta), whose removal keeps the network at or above ``method.target_macs``."""
        gates = gates_of(model)
        items = [(float(gates[f"{b}.{LAYER_GATE}"].theta.detach().reshape(())) if f"{b}.{LAYER_GATE}" in gates
                  else 0.0, b, -1) for b in blocks]
        for gn, mask in removals.items():
            th = gates[gn].theta.detach()
            items += [(float(th[i]), gn, i) for i in torch.nonzero(mask).flatten().tolist()]
        items.sort()
        widths = {gn: mask.numel() for gn, mask in removals.items()}

        def plan_of(k: int) -> PrunePlan:
            rem = {gn: torch.zeros(w, dtype=torch.bool) for gn, w in widths.items()}
            blk = []
            for _, n, i in items[:k]:
                if i < 0:
                    blk.append(n)
                else:
                    rem[n][i] = True
            for gn in rem:  # never empty a branch here (that is a block decision)
                if bool(rem[gn].all()):
                    rem[gn][int(torch.argmax(gates[gn].theta.detach()))] = False
                rem[gn] = round_removal(rem[gn], gates[gn].theta, self.round_to)
            return plan_from_removals({g: m for g, m in rem.items() if bool(m.any())}, blk)

        target = cast(float, self.target)
        k = bisect.bisect_left(range(len(items) + 1), True,
                               key=lambda k: self._macs_after(model, plan_of(k)) < target) - 1
        return plan_of(k) if k > 0 else None

    def after_prune(self, plan: PrunePlan, slices: Slices, model: GatedResNet) -> None:
        remap_stores((self.zero_count, self.revivals, self.grad_acc, self.layer_est), plan, slices)
        self._seen_blocks &= set(self.layer_est)
        self.removed_units += plan.n_channels
        self.removed_blocks += len(plan.blocks)
        kind = "rounding" if self._rounding else "rule"
        self._rounding = False
        self.removal_steps.append((self._step, plan.n_channels, len(plan.blocks), kind,
                                   float(count(model.spec())[0])))

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
        """The network the run ends with is deterministic: round now if nothing rounded before."""
        plan = self._harden(model) if not self.hardened else plan_from_gates(model, threshold=self.cfg.threshold)
        return None if plan.empty else plan

    # -- state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"hardened": self.hardened, "full": list(self.full) if self.full else None,
                "zero_count": self.zero_count, "revivals": self.revivals, "grad_acc": self.grad_acc,
                "grad_n": self.grad_n, "removed_units": self.removed_units, "removed_blocks": self.removed_blocks,
                "layer_est": self.layer_est, "layer_seen": sorted(self._seen_blocks),
                "layer_picks": self.layer_picks,
                "nu_max": self.nu_max, "nu": self.nu, "nu_i": self.nu_i,
                "expected_macs_at_harden": self.expected_macs_at_harden, "step": self._step,
                "expected_macs": self.expected_macs,
                "removal_steps": [list(r) for r in self.removal_steps]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.hardened = bool(state["hardened"])
        self.full = tuple(state["full"]) if state["full"] else None
        for key in ("zero_count", "revivals", "grad_acc"):
            getattr(self, key).clear()
            getattr(self, key).update({k: v.clone() for k, v in state[key].items()})
        self.grad_n = torch.as_tensor(state["grad_n"], dtype=torch.float32).clone()
        self.layer_est.clear()
        self.layer_est.update({k: v.clone() for k, v in state.get("layer_est", {}).items()})
        self._seen_blocks = set(state.get("layer_seen", []))
        self.layer_picks = int(state.get("layer_picks", 0))
        self.nu_max = float(state.get("nu_max", self.nu_max))
        self.expected_macs_at_harden = state.get("expected_macs_at_harden")
        self.removed_units, self.removed_blocks = int(state["removed_units"]), int(state["removed_blocks"])
        self.nu = float(state.get("nu", self.nu))
        self.nu_i = float(state.get("nu_i", self.nu_i))
        self._step = int(state.get("step", 0))
        self.expected_macs = float(state.get("expected_macs", 1.0))
        self.removal_steps = [tuple(r) for r in state.get("removal_steps", [])]

    def summary(self) -> dict[str, Any]:
        """``macs_removed_by_rule_frac``: the share of all removed MACs that the pruning rule took out
        during training (the rest went at the rounding step); ``..._before_60pct``: of those, before 60%."""
        out = {"hardened": self.hardened, "nu_final": self.nu, "nu_max": self.nu_max,
               "expected_macs_frac": self.expected_macs, "check_every": self.check_every,
               "expected_macs_at_harden": self.expected_macs_at_harden,
               "removal_steps": [list(r) for r in self.removal_steps]}
        if self.removal_steps and self.full:
            dense, final = self.dense[0], self.removal_steps[-1][4]
            total = max(1.0, dense - final)
            rule = [r for r in self.removal_steps if r[3] == "rule"]
            early = [r for r in rule if r[0] < 0.6 * self.total_steps]
            out["macs_removed_by_rule_frac"] = (dense - rule[-1][4]) / total if rule else 0.0
            out["macs_removed_by_rule_before_60pct_frac"] = (dense - early[-1][4]) / total if early else 0.0
        return out
