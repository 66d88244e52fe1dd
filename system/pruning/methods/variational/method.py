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
  sums the pruning condition reads; it never enters that condition (it moves theta, and so
  when a structure reaches 0 and where the rounding finds it).
- Layer-gate estimators (``estimator``; :mod:`.estimators`, the paired one's state in
  :class:`.estimators.PairedEstimator`): ``paired`` (default: CE(on) - CE(off) of
  the batch from a suffix forward, one block a step round-robin, each block's running estimate; every
  block measured once at the end of the warm-up before its theta moves; the suffix forwards counted in
  the training MACs), ``conditional``, ``exact``, ``autograd``.  Unit gates use the autograd estimator;
  per example, a share of the batch's examples draws them and the others multiply by theta
  (``unit_sampled_frac``, :func:`~system.models.resnet.draw_gates`).
- Budget mode (``method.target_macs``): nu is a dual variable, a PI controller on the gap between
  E[MACs] and a schedule falling to the target at ``target_by`` (:class:`.budget.Budget`); the
  rounding at ``harden_at`` lands the deterministic network at or under the target.
- The rounding (with or without a target) folds each kept gate's theta into the weights that read it
  (``harden_fold``, :func:`.rounding.fold_kept_thetas`), so the rounded network computes the mean network.
- The pruning rule (:class:`.rule.Rule`): at every check, a structure at theta <= ``tau_theta`` for
  ``patience`` checks is removed if its condition holds (``importance``: the window mean of data +
  price >= 0, i.e. importance per cost <= nu; ``signal``; ``none``), or after ``max_revivals``
  revivals; a unit decision that would empty a branch becomes a block removal if the block's layer
  theta is at ``tau_theta`` at that check.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, cast

import torch

from system.models.anatomy import block_of, last_bn, unit_modules
from system.models.resnet import GatedResNet, RemovedBlock, gates_of, set_gate_mode, set_gates_idle, with_gate_modes
from system.pruning.complexity import count
from system.pruning.methods.base import Batch, Event, Method, StepContext, gate_grads_at_one, unit_and_layer_gates
from system.pruning.methods.variational.budget import Budget
from system.pruning.methods.variational.config import VariationalConfig
from system.pruning.methods.variational.estimators import LayerEstimator
from system.pruning.methods.variational.price import Price
from system.pruning.methods.variational.rounding import apply_rounding, cut_by_theta, fold_kept_thetas
from system.pruning.methods.variational.rule import Removals, Rule
from system.pruning.methods.variational.terms import add_drive, gated_conv_weights, gated_decay_term, normalize
from system.pruning.surgery import PrunePlan, Slices, plan_from_gates

log = logging.getLogger(__name__)


class Variational(Method):
    """The method's hooks; its parts keep their own state: :class:`Price` (the dense size, the prices),
    :class:`Budget` (nu), :class:`Rule` (the pruning rule), :class:`LayerEstimator` (the layer thetas'
    data gradient; ``paired`` is its paired estimator's state)."""

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
        self.price = Price(cfg)
        self.budget = Budget(cfg, total_steps, target_macs, self.warmup_steps, self.target_step)
        self.rule = Rule(cfg)
        self.layer_estimator = LayerEstimator(cfg)
        self.paired = self.layer_estimator.paired
        self.removals = Removals()
        self.check_every = cfg.check_every or max(1, round(0.02 * total_steps))
        self.expected_macs_at_harden: float | None = None
        self.rounding_cut: dict[str, int] | None = None  # the units the rounding cut, by theta before it
        self._rounding = False  # the plan in flight comes from the rounding step
        self._event_step = 0  # the step of the decision in flight (its log lines and removal_steps)
        self._idle: tuple[bool, bool] | None = None  # the attached model's (unit, layer) gates idle (None: not set)
        self._blocks = 0  # the attached model's layer gates (the paired estimator primes one a step)

    # -- set-up -------------------------------------------------------------------------
    def check_model(self, model: GatedResNet) -> None:
        super().check_model(model)
        if self.cfg.layer_gates and (self.cfg.nu > 0 or self.target is not None):
            for name, blk in model.named_blocks():
                if not isinstance(blk, RemovedBlock) and not bool(last_bn(blk, model.block_kind).weight.detach().any()):
                    raise ValueError(
                        f"method 'variational' with layer gates cannot prune a zero-initialised residual "
                        f"network (block {name} starts with its branch at 0, so its layer gate gets no data "
                        f"gradient and the complexity price removes it before it learns): set "
                        f"model.zero_init_residual=false or method.variational.layer_gates=false")

    def attach(self, model: GatedResNet) -> None:
        c = self.cfg
        live = "deterministic" if self.hardened else "sampled"
        set_gate_mode(model, unit=live if c.unit_gates else "off", layer=live if c.layer_gates else "off")
        for g in gates_of(model).values():
            g.per_example = c.per_example if g.kind == "unit" else c.layer_per_example
            g.sampled_frac = c.unit_sampled_frac if g.kind == "unit" else 1.0
            g.undrawn_grad = c.unit_undrawn_grad
            g.threshold = c.threshold
            # the layer thetas get E[CE(xi=1) - CE(xi=0)] through surrogate_loss instead
            g.straight_through = not (g.kind == "layer" and c.estimator != "autograd")
        if self.hardened:  # decide now (a decision step) whether each deterministic gate can skip its multiply
            for g in gates_of(model).values():
                g.all_on()
        self.price.set_dense(model)
        self.rule.attach(model)
        self.paired.attach(unit_and_layer_gates(model)[1])
        model.keep_block_inputs = self._paired_live()
        self._idle = None  # before_step sets the new model's gates
        self._blocks = len(unit_and_layer_gates(model)[1])

    def _paired_live(self) -> bool:
        c = self.cfg
        return c.estimator == "paired" and c.layer_gates and not self.hardened and (c.nu > 0 or self.target is not None)

    def theta_momentum(self) -> float:
        return self.cfg.theta_momentum

    def theta_lrs(self) -> dict[str, float]:
        c = self.cfg
        if c.theta_step == "normalized":
            lr = 1.0 / (c.theta_travel * max(1, self.total_steps))
            return {"unit": lr if c.unit_gates else 0.0, "layer": lr if c.layer_gates else 0.0}
        return {"unit": c.lr_unit if c.unit_gates else 0.0, "layer": c.lr_layer if c.layer_gates else 0.0}

    @property
    def final_step(self) -> int | None:
        """``harden_step``: the hardening applies when that many steps are done, so the step of that index
        (0-based) is the first one trained on the rounded network (none without it: ``harden: none`` rounds only
        after the run)."""
        return self.harden_step

    def theta_active(self, step: int) -> bool:
        # nu = 0 without a target is "accuracy only": theta is not trained (it stays 1),
        # so stochastic noise in the data gradient cannot prune anything.
        priced = self.cfg.nu > 0 or self.target is not None
        return priced and step >= self.warmup_steps and not self.hardened

    def decay_exempt(self, model: GatedResNet) -> set[str]:
        """With gated decay, the branch convs are decayed in the loss (theta-weighted), not by the optimizer."""
        return gated_conv_weights(model) if self.cfg.gated_decay and self.weight_decay else set()

    def export_gates(self) -> str:
        return "deterministic" if self.hardened else "mean"

    def gates_idle(self, step: int) -> tuple[bool, bool]:
        """Whether the sampled (unit, layer) gates of ``step`` are idle (:class:`~system.models.resnet.Gate`):
        theta is held at 1 (it does not train: the warm-up, or a run without a price), and for the layer gates
        the paired estimator does not prime (it draws them).  theta is 1 then: it starts at 1
        (``model.init_from`` never loads gates), its lr is 0 until :meth:`theta_active`, which stays true once
        true until the hardening, and the hardened gates are deterministic.  An idle step's forward and weight
        gradients are the drawing step's bit for bit (xi = 1), its random stream too (the draw is still made),
        its theta gradients are read off the BatchNorms (:meth:`_idle_theta_grads`; equal up to float rounding),
        and its gates cost the draw and a few multi-tensor ops instead of a few ops each.  ``idle_gates: false``:
        never."""
        unit = self.cfg.idle_gates and not self.hardened and not self.theta_active(step)
        return unit, unit and not self._priming(step)

    def _priming(self, step: int) -> bool:
        """The paired estimator measures every block once in the last steps of the warm-up, so that no theta
        starts moving on the zero its estimate starts at."""
        return (self._paired_live() and not self.theta_active(step)
                and self.warmup_steps - self._blocks <= step < self.warmup_steps)

    def before_step(self, model: GatedResNet, step: int) -> None:
        idle = self.gates_idle(step)
        if idle != self._idle:
            set_gates_idle(model, unit=idle[0], layer=idle[1])
            self._idle = idle

    # -- loss ---------------------------------------------------------------------------
    def loss_terms(self, model: GatedResNet, step: int, batch: Batch) -> list[torch.Tensor]:
        c, live = self.cfg, not self.hardened
        decay = gated_decay_term(model, self.weight_decay, unit_live=c.unit_gates and live,
                                 layer_live=c.layer_gates and live) if self.decay_exempt(model) else None
        terms = [self.surrogate_loss(model, step, batch), self.regularizer(model, step), decay]
        return [t for t in terms if t is not None]

    def regularizer(self, model: GatedResNet, step: int) -> torch.Tensor | None:
        if not self.theta_active(step):
            return None
        # (the drive is not a loss term: after_backward adds its gradient, so that the pruning
        # condition can read the theta gradient without it)
        if not self.budget.positive:
            return None
        cost = self.price.cost(model)
        return self.budget.nu_like(cost) * cost

    def surrogate_loss(self, model: GatedResNet, step: int, batch: Batch) -> torch.Tensor | None:
        """Layer estimators other than autograd: a term whose theta_B gradient is the estimate."""
        c = self.cfg
        if c.estimator == "autograd" or not c.layer_gates:
            self.layer_estimator.extra_forwards = 0.0
            return None
        _, layer = unit_and_layer_gates(model)
        return self.layer_estimator.term(model, layer, batch, self.theta_active(step), self._priming(step), step)

    def extra_forwards(self) -> float:
        """This step's forwards beyond the main one, in full-network forwards (the paired estimator's
        suffix forwards count their share of the network's MACs)."""
        return self.layer_estimator.extra_forwards

    # -- per step -----------------------------------------------------------------------
    def after_backward(self, model: GatedResNet, step: int, grad_scale: float = 1.0) -> None:
        """Normalise the theta gradients (``theta_step: normalized``), add them to the rule's window sums
        once theta trains (a warm-up step, whose gradients are the data's alone and not priced, adds nothing;
        nor does a step whose gradients are not finite, an fp16 overflow), then add the drive's gradient,
        which the rule never sees."""
        c = self.cfg
        model.block_inputs = []  # the paired estimator's kept inputs are spent by now
        if self._idle and any(self._idle):
            self._idle_theta_grads(model)
        active = self.theta_active(step)
        normalized = c.theta_step == "normalized" and active
        price = self.price.prices(model) if normalized or (active and c.drive > 0) else {}
        gates = gates_of(model)
        live = [(n, g) for n, g in gates.items() if g.theta.grad is not None and n in self.rule.grad_acc]
        if not live:
            return
        per_nu = {k: self.budget.step_scale(k) if normalized else 1.0 for k in ("unit", "layer")}
        grads = {n: cast(torch.Tensor, g.theta.grad) for n, g in live}
        kinds = {k: [n for n, g in live if g.kind == k] for k in ("unit", "layer")}
        if normalized:  # in place: the optimizer steps on the normalized gradient
            normalize(grads, kinds, price, per_nu)
        if self._paired_live():  # no step, no evidence for the rule and no drive before a block's first measurement
            for n in kinds["layer"]:
                if n not in self.paired.seen:
                    grads[n].zero_()
            kinds["layer"] = [n for n in kinds["layer"] if n in self.paired.seen]
        if active:  # the rule's windows hold trained-theta steps only: data + price, normalised as stated
            self.rule.accumulate(grads, grad_scale)  # (gradients carry no graph: no detach)
        s = self.budget.ramp(step)
        if active and c.drive > 0 and s > 0 and self.budget.positive:
            on = {"unit": c.unit_gates, "layer": c.layer_gates}
            add_drive(grads, {n: gates[n].theta for n in grads}, {k: v for k, v in kinds.items() if on[k]},
                      c.drive * s * self.budget.nu * grad_scale, per_nu if normalized else price, c.drive_mode)

    @staticmethod
    def _idle_theta_grads(model: GatedResNet) -> None:
        """The theta gradients that idle gates did not compute, read off the BatchNorms they follow: what a
        drawn gate at xi = 1 gives its theta (straight-through), equal up to float rounding
        (:func:`~system.pruning.methods.base.gate_grads_at_one`).  Nothing trains on them (theta's lr is 0
        while the gates idle), but theta's momentum averages them, as it did when the warm-up drew its gates: the
        warm-up then leaves the method in the state it always did.  (The rule's windows sum no warm-up step.)"""
        gates = gates_of(model)
        names = [n for n, g in gates.items() if g.mode == "sampled" and g.idle and g.straight_through]
        units = [n for n in names if gates[n].kind == "unit"]
        layers = [n for n in names if gates[n].kind == "layer"]  # (the autograd layer estimator only)
        blocks = dict(model.named_blocks())
        bns = unit_modules(model, units, "bn") + [last_bn(blocks[block_of(n)], model.block_kind) for n in layers]
        dz = gate_grads_at_one(bns) if bns else None
        if dz is None:
            return
        with torch.no_grad():
            for n, d in zip(units + layers, dz):
                theta = gates[n].theta
                d = d if gates[n].kind == "unit" else d.sum().reshape(theta.shape)  # a branch's gate: every channel
                if theta.grad is None:
                    theta.grad = d.to(theta.dtype)
                else:  # (a gated decay term reached theta through the loss)
                    theta.grad.add_(d)

    def after_step(self, model: GatedResNet, step: int) -> None:
        with torch.no_grad():  # the projection to [0, 1], one multi-tensor op each way
            thetas: list[torch.Tensor] = [g.theta for g in gates_of(model).values()]
            if thetas:
                torch._foreach_clamp_min_(thetas, 0.0)
                torch._foreach_clamp_max_(thetas, 1.0)
        if self.theta_active(step) and self.target is not None:  # the dual variable follows E[MACs] every step
            self.budget.expected_macs = self.price.expected_macs_t(model)  # on the device: no sync
            self.budget.dual_step(step + 1)

    def check_due(self, step: int) -> bool:
        harden_due = self.harden_step is not None and step >= self.harden_step
        return not self.hardened and (harden_due or (step > self.warmup_steps and step % self.check_every == 0))

    def decision_state(self) -> dict[str, Any]:
        """nu (the dual variable, recomputed on every rank from theta) and the expected MACs it follows."""
        return {k: v for k, v in self.budget.values().items() if k != "nu_max"}

    def log_values(self, step: int) -> dict[str, torch.Tensor | float]:
        """Under a target, the controller: nu, E[MACs] (a share of the dense MACs) and the budget it tracks."""
        if self.target is None:
            return {}
        b = self.budget
        return {"prune/nu": b.nu, "prune/expected_macs": b.expected_macs, "prune/budget": b.scheduled(step)}

    def sync_tensors(self) -> list[torch.Tensor]:
        return [self.rule.grad_acc[n] for n in sorted(self.rule.grad_acc)]

    # -- deciding -----------------------------------------------------------------------
    def decide(self, event: Event, ctx: StepContext) -> PrunePlan | None:
        self._event_step = ctx.step
        return super().decide(event, ctx)

    def on_step_end(self, ctx: StepContext) -> PrunePlan | None:
        if self.harden_step is not None and ctx.step >= self.harden_step and not self.hardened:
            return self._harden(ctx.model)
        return self._check(ctx.model)

    def _harden(self, model: GatedResNet) -> PrunePlan:
        """Round theta to {0, 1} (at ``threshold``, or, under a target, the cut nearest the target from
        below), switch to deterministic gates, cut every gate that is off."""
        c = self.cfg
        self.budget.expected_macs = self.price.expected_macs(model)
        self.expected_macs_at_harden = self.budget.expected_macs  # where the theta dynamics got before rounding
        unit, layer = self.price.thetas(model)
        before = {n: t.clone() for n, t in unit.items()}  # (the rounding writes the gates these views read)
        layer_before = {n: t.clone() for n, t in layer.items()}
        apply_rounding(model, unit, layer, c.threshold, self.round_to, self.target, self.price.dense[0])
        if c.harden_fold:
            units, mean, blocks = fold_kept_thetas(model, before, layer_before)
            log.info("the fold at the rounding: %d kept units under theta 1 (the kept units' mean theta %.3f) and %d "
                     "kept blocks under theta 1 folded into the weights that read them", units, mean, blocks)
        self.hardened = True
        self.attach(model)
        plan = plan_from_gates(model, threshold=c.threshold)
        self._rounding = not plan.empty
        self.rounding_cut = cut_by_theta(plan, before)
        log.info("hardening at step %d: theta rounded, %d channels and %d blocks cut; the channels by theta before "
                 "the rounding: %s", self._event_step, plan.n_channels, len(plan.blocks),
                 ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in self.rounding_cut.items()))
        return plan

    def _check(self, model: GatedResNet) -> PrunePlan | None:
        """The rule at a check (:meth:`Rule.decide`: under a target, trimmed to stay at or above it)."""
        b = self.budget
        if self.target is None:  # (under a target it is kept current every step)
            b.expected_macs = self.price.expected_macs(model)
        flagged, at0 = self.rule.flag(model)
        live, drop = self._sampling_noise(model)
        log.info("check at step %d: nu %.4f, E[MACs] %.3f of dense (budget %.3f), %d gates at theta <= %g, "
                 "%d flagged; %d units between 0 and 1, live units drawn off %.1f%%", self._event_step, float(b.nu),
                 float(b.expected_macs), b.scheduled(self._event_step), at0, self.cfg.tau_theta,
                 sum(int(f.sum()) for f in flagged.values()), live, 100.0 * drop)
        return self.rule.decide(model, flagged, self.round_to, self.price, self.target)

    def _sampling_noise(self, model: GatedResNet) -> tuple[int, float]:
        """How stochastic the network still trains: the unit gates strictly between 0 and 1, and the share of
        the live units' (theta > 0) values that are draws of 0, ``unit_sampled_frac`` x mean(1 - theta) (the
        undrawn examples multiply by theta; drawn per batch, every value is a draw; for the check line: one sync
        a check)."""
        unit = self.price.thetas(model)[0]
        if not unit:
            return 0, 0.0
        t = torch.cat(list(unit.values()))
        live = t[t > 0]
        drawn = self.cfg.unit_sampled_frac if self.cfg.per_example else 1.0  # (per batch the key does nothing)
        off = drawn * float((1 - live).mean()) if live.numel() else 0.0
        return int(((t > 0) & (t < 1)).sum()), off

    def after_prune(self, plan: PrunePlan, slices: Slices, model: GatedResNet) -> None:
        self.rule.after_prune(plan, slices)
        self.paired.after_prune(plan, slices)
        self.removals.record(self._event_step, plan, "rounding" if self._rounding else "rule",
                             float(count(model.spec())[0]))
        self._rounding = False

    def final_plan(self, model: GatedResNet) -> PrunePlan | None:
        """The network the run ends with is deterministic: round now if nothing rounded before."""
        plan = self._harden(model) if not self.hardened else plan_from_gates(model, threshold=self.cfg.threshold)
        return None if plan.empty else plan

    # -- evaluation ---------------------------------------------------------------------
    def eval_gates(self, model: GatedResNet) -> contextlib.AbstractContextManager[None]:
        c = self.cfg
        mode = "deterministic" if self.hardened else c.eval_gates
        return with_gate_modes(model, unit=mode if c.unit_gates else "off", layer=mode if c.layer_gates else "off")

    # -- state (one flat dict: the parts' keys side by side) -------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"hardened": self.hardened, "full": list(self.price.full) if self.price.full else None,
                **self.rule.state_dict(), **self.paired.state_dict(), **self.budget.state_dict(),
                **self.removals.state_dict(), "expected_macs_at_harden": self.expected_macs_at_harden,
                "rounding_cut": self.rounding_cut}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.hardened = bool(state["hardened"])
        self.price.full = tuple(state["full"]) if state["full"] else None
        self.rule.load_state_dict(state)
        self.paired.load_state_dict(state)
        self.budget.load_state_dict(state)
        self.removals.load_state_dict(state)
        self.expected_macs_at_harden = state.get("expected_macs_at_harden")
        self.rounding_cut = state.get("rounding_cut")

    def summary(self) -> dict[str, Any]:
        """nu, E[MACs], the removal events, the share of the removed MACs the rule took
        (:meth:`Removals.shares`) and the units the rounding cut by their theta before it (:func:`cut_by_theta`)."""
        b, r = self.budget.values(), self.removals
        return {"hardened": self.hardened, "nu_final": b["nu"], "nu_max": b["nu_max"],
                "expected_macs_frac": b["expected_macs"], "check_every": self.check_every,
                "expected_macs_at_harden": self.expected_macs_at_harden, "removal_steps": [list(x) for x in r.steps],
                "rounding_cut_units": self.rounding_cut,
                **(r.shares(self.price.dense[0], self.total_steps) if self.price.full else {})}
