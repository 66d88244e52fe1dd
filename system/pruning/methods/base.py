"""The pruning-method plug-in interface.

A method configures the gates of a model, may add terms to the loss, reads gradients after
backward, and answers the loop's :class:`Event` s, returning a :class:`PrunePlan` when it wants
structures removed.  It never touches ``torch.distributed``: the coordinator all-reduces the
tensors a method lists in :meth:`Method.sync_tensors` before any decision event, so every rank
decides on identical inputs.

What the loop asks of a method, in order:

- ``before_step(model, step)``  the step's forward comes next (what its gates do)
- ``loss_terms(model, step, batch)``  extra loss terms (prices, estimator surrogates, own decay)
- ``after_backward(model, step, grad_scale)``  gradients of this micro-batch are there
- ``after_step(model, step)``  the optimizer stepped (variational projects theta to [0, 1])
- ``decide(event, ctx)``  at :attr:`Event.STEP_END` (only when :meth:`check_due`),
  :attr:`Event.EPOCH_END` and :attr:`Event.FINAL` (the end of training), for the events the
  method declares in :attr:`Method.events`, after the sync -> plan or None
- ``after_prune(plan, slices, model)``  the plan was applied; remap per-gate state
- ``state_dict()`` / ``load_state_dict()``  the method's own state, for checkpoints

``step`` is the index of the step in progress (0-based), the loop's own count: a method keeps no step
counter of its own.

What a method declares instead of being probed for: :meth:`Method.decay_exempt` (weights it
decays in its own loss), :meth:`Method.export_gates` (how its gates fold at export),
:meth:`Method.theta_lrs` (its theta groups' learning rates), :attr:`Method.handles` (block kinds),
:attr:`Method.supports_target` (whether it steers to ``method.target_macs``).  Shared helpers:
:func:`~system.pruning.surgery.plan_from_removals` (masks -> plan, the empty-branch rule),
:func:`remap_stores` (per-gate state through surgery), :func:`round_removal` (``method.round_to``).

Example::

    method = build_method(cfg.method, total_steps, weight_decay=cfg.optim.weight_decay)
    method.check_model(model)
    method.attach(model)
    opt = build_optimizer(model, cfg.optim, method.theta_lrs(), global_batch, method.decay_exempt(model),
                          method.theta_momentum())
    loss = ce + sum(method.loss_terms(model, step, batch))
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from system.config import ConfigError
from system.models.anatomy import block_of
from system.models.resnet import GatedResNet, gates_of, set_gate_mode
from system.models.spec import ArchSpec
from system.pruning.complexity import count
from system.pruning.surgery import PrunePlan, Slices, plan_spec, select


class Event(enum.Enum):
    """The loop's decision events."""

    STEP_END = "step_end"  # after an optimizer step, when :meth:`Method.check_due` says so
    EPOCH_END = "epoch_end"  # after the last batch of an epoch
    FINAL = "final"  # after the last step, before the network is deployed


@dataclass
class Batch:
    """What a method may read of the current micro-batch to build its loss terms."""

    x: torch.Tensor
    y: torch.Tensor
    forward: Callable[[torch.Tensor], torch.Tensor]  # the engine's forward (precision, layout)
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, y) -> per-example losses
    per_example_loss: torch.Tensor  # the main forward's


@dataclass
class StepContext:
    """What a method may read at an event."""

    step: int  # optimizer steps done so far (1-based after the first step)
    epoch: int
    total_steps: int
    model: GatedResNet


class Method:
    """Base class: a method that never prunes (the dense baseline)."""

    name = "none"
    #: the block kinds the method can prune
    handles = ("basic", "bottleneck")
    #: whether the method steers its pruning to ``method.target_macs`` (else a target is refused)
    supports_target = False
    #: why a target is refused (the ``method.target_macs`` error names it)
    no_target_reason = "it prunes nothing"
    #: the events the method decides at: the loop runs the decision (its collectives included) only
    #: for these
    events: frozenset[Event] = frozenset()

    def __init__(self, cfg: Any, total_steps: int, target_macs: float | None = None, round_to: int = 1,
                 weight_decay: float = 0.0):
        self.cfg = cfg
        self.total_steps = total_steps
        self.weight_decay = weight_decay  # optim.weight_decay (for a method that decays weights itself)
        self.target = target_macs  # method.target_macs (None = off)
        self.round_to = round_to  # method.round_to: kept inner widths are multiples of it

    # -- set-up ---------------------------------------------------------------------------
    def check_model(self, model: GatedResNet) -> None:
        """Raise ValueError if this method cannot prune ``model``."""
        if model.block_kind not in self.handles:
            raise ValueError(f"method '{self.name}' cannot prune {model.arch_name} ({model.block_kind} blocks)")
        if self.round_to > 1:
            unit, _ = unit_and_layer_gates(model)
            bad = {n: g.theta.numel() for n, g in unit.items() if g.theta.numel() % self.round_to}
            if bad:
                name, width = next(iter(bad.items()))
                raise ConfigError("method.round_to",
                    f"{self.round_to} does not divide the width of {len(bad)} "
                    f"layer(s) of {model.arch_name} (e.g. {name}: {width} channels); kept widths are rounded "
                    f"to multiples of it, so it must be at most, and divide, every inner width")

    def attach(self, model: GatedResNet) -> None:
        """Configure gate modes for training.  The dense baseline switches every gate off."""
        set_gate_mode(model, unit="off", layer="off")

    def theta_momentum(self) -> float:
        """The theta groups' SGD momentum, with dampening equal to it (an average of recent gradients)."""
        return 0.0

    def theta_lrs(self) -> dict[str, float]:
        """Learning rate of the unit / layer theta groups (0 = theta not trained)."""
        return {"unit": 0.0, "layer": 0.0}

    @property
    def final_step(self) -> int | None:
        """The first step (0-based) trained on the network's final architecture, i.e. how many steps are done when
        its last plan applies: no plan comes after it (``None``:
        the architecture never changes, or the method cannot say); ``optim.restart_at: final`` restarts the
        learning rate there."""
        return None

    def theta_active(self, step: int) -> bool:
        """Whether theta is trained at ``step`` (the LR schedule multiplies its lr by 0 otherwise)."""
        return False

    def decay_exempt(self, model: GatedResNet) -> set[str]:
        """Names of weights the method decays in its own loss terms (the optimizer does not decay them)."""
        return set()

    def export_gates(self) -> str:
        """How the gates fold at export (``run.export_gates=auto``): ``mean`` or ``deterministic``."""
        return "mean"

    # -- per step ---------------------------------------------------------------------------
    def before_step(self, model: GatedResNet, step: int) -> None:
        """Step ``step``'s forward comes next (set what its gates do; no collective, no host sync)."""
        pass

    def loss_terms(self, model: GatedResNet, step: int, batch: Batch) -> list[torch.Tensor]:
        """Terms added to the loss before backward, in order (prices, estimator surrogates whose
        gradient carries what autograd cannot, the method's own weight decay)."""
        return []

    def extra_forwards(self) -> float:
        """Forwards the last step ran beyond the main one, in full-network forwards (counted in the
        training MACs)."""
        return 0.0

    def after_backward(self, model: GatedResNet, step: int, grad_scale: float = 1.0) -> None:
        """Gradients of step ``step`` are there.  ``grad_scale`` is the loss scale they carry (fp16):
        divide by it."""
        pass

    def after_step(self, model: GatedResNet, step: int) -> None:
        """The optimizer took step ``step``."""
        pass

    def check_due(self, step: int) -> bool:
        return False

    def decision_state(self) -> dict[str, Any]:
        """Scalars a decision depends on that each rank computes for itself (not synced tensors):
        they join the plan digest the ranks agree on, so a drift is caught before any surgery."""
        return {}

    def sync_tensors(self) -> list[torch.Tensor]:
        """Tensors the coordinator all-reduces (mean) in place before a decision event."""
        return []

    def log_values(self, step: int) -> dict[str, torch.Tensor | float]:
        """Training metrics of the method at a log interval (section ``prune/``): tensors stay on the device
        until the loop reads them together with the loss (one host read per interval)."""
        return {}

    def decide(self, event: Event, ctx: StepContext) -> PrunePlan | None:
        """The plan for ``event`` (called on every rank after the coordinator's sync)."""
        if event is Event.STEP_END:
            return self.on_step_end(ctx)
        if event is Event.EPOCH_END:
            return self.on_epoch_end(ctx)
        return self.final_plan(ctx.model)

    def on_step_end(self, ctx: StepContext) -> PrunePlan | None:
        return None

    def on_epoch_end(self, ctx: StepContext) -> PrunePlan | None:
        return None

    def after_prune(self, plan: PrunePlan, slices: Slices, model: GatedResNet) -> None:
        pass

    # -- evaluation -------------------------------------------------------------------------
    def eval_gates(self, model: GatedResNet) -> contextlib.AbstractContextManager[None]:
        """Gate modes for evaluation, for a ``with`` block (default: as they are)."""
        return contextlib.nullcontext()

    def final_plan(self, model: GatedResNet) -> PrunePlan | None:
        """The plan at :attr:`Event.FINAL`, before export (e.g. cut every gate that is off
        deterministically); declare ``Event.FINAL`` in :attr:`events` to be asked."""
        return None

    # -- state (saved in every checkpoint, loaded before attach on resume) -------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def summary(self) -> dict[str, Any]:
        """Method-specific figures for ``summary.json``."""
        return {}


def remap_vector(values: dict[str, torch.Tensor], plan: PrunePlan, slices: Slices,
                 key_of=lambda gate: f"{gate}.theta") -> dict[str, torch.Tensor]:
    """Remap per-gate vectors (keyed by gate name) through surgery: drop removed blocks,
    index-select the surviving channels."""
    out = {}
    for g, v in values.items():
        if block_of(g) in plan.blocks:
            continue
        dims = slices.get(key_of(g))
        out[g] = select(v, {0: dims[0]}) if dims and 0 in dims else v
    return out


def add_finite(stores: list[torch.Tensor], values: list[torch.Tensor], scale: Any = 1.0) -> torch.Tensor:
    """``stores[i] += values[i] / scale`` for every i, or, when any value is not finite (an fp16 overflow
    step, which the loss scaler skips), for none: a method's statistics skip that step too.  A handful
    of multi-tensor ops whatever the number of gates, and no host sync; returns the 0-d bool "all finite"."""
    finite = torch.stack(torch._foreach_norm(values, float("inf"))).isfinite().all()  # max |v|: no overflow
    flat = torch.cat([v if v.dim() == 1 else v.reshape(-1) for v in values])
    if not (isinstance(scale, float) and scale == 1.0):
        flat = flat / scale
    parts = torch.split(torch.where(finite, flat, torch.zeros_like(flat)), [v.numel() for v in values])
    torch._foreach_add_(stores, [part if part.shape == st.shape else part.view_as(st)
                                 for part, st in zip(parts, stores)])
    return finite


def remap_stores(stores: Iterable[dict[str, torch.Tensor]], plan: PrunePlan, slices: Slices) -> None:
    """Remap every per-gate store (in place) through surgery, with :func:`remap_vector`."""
    for store in stores:
        new = remap_vector(store, plan, slices)
        store.clear()
        store.update(new)


def smallest_macs_frac(dense: ArchSpec) -> float:
    """The MACs of the ``dense`` network with every residual block removed, as a share of its own: no
    plan of any method goes below it (the stem, the projection shortcuts and the classifier stay)."""
    blocks = tuple(name for name in dense.block_names() if not dense.get_block(name).removed)
    return count(plan_spec(dense, PrunePlan(units={}, blocks=blocks))[0])[0] / max(1, count(dense)[0])


def round_removal(remove: torch.Tensor, strength: torch.Tensor, round_to: int) -> torch.Tensor:
    """A unit-removal mask whose kept count is rounded up to a multiple of ``round_to``.

    The strongest of the units marked for removal are kept back (ties: the lowest index); a mask
    that removes every unit stays as it is (the branch goes whole: the empty-branch rule).
    Rounding up keeps the method's ranking and never cuts a unit the method kept.
    """
    n = remove.numel()
    kept = n - int(remove.sum())
    if round_to <= 1 or kept == 0 or kept % round_to == 0:
        return remove
    back = min(n, -(-kept // round_to) * round_to) - kept
    out = remove.clone()
    idx = torch.nonzero(remove).flatten()
    order = torch.argsort(-strength.detach()[idx].float(), stable=True)
    out[idx[order[:back]]] = False
    return out


def unit_and_layer_gates(model: GatedResNet):
    gates = gates_of(model)
    unit = {n: g for n, g in gates.items() if g.kind == "unit"}
    layer = {n: g for n, g in gates.items() if g.kind == "layer"}
    return unit, layer


def gate_grads_at_one(bns: list) -> list[torch.Tensor] | None:
    """``dL/dz`` of a gate ``z = 1`` that multiplies the output of each BatchNorm of ``bns`` (after its ReLU,
    or directly), per channel, read off the BatchNorm's gradients: ``gamma * dL/dgamma + beta * dL/dbeta``
    (``relu(y) z = relu(z y)`` for ``z >= 0``, and ``z y = z gamma xhat + z beta``); two multi-tensor ops
    for all of them.  None if a BatchNorm has no gradient; the loss scale stays in."""
    if any(b.weight.grad is None or b.bias.grad is None for b in bns):
        return None
    with torch.no_grad():  # (no detach per tensor: each would be an op of its own)
        dz = torch._foreach_mul([b.weight for b in bns], [b.weight.grad for b in bns])
        torch._foreach_addcmul_(dz, [b.bias for b in bns], [b.bias.grad for b in bns])
    return list(dz)
