"""The pruning-method plug-in interface.

A method configures the gates of a model, may add terms to the loss, reads gradients after
backward, and reacts to a few named events, returning a :class:`PrunePlan` when it wants
structures removed.  It never touches ``torch.distributed``: the coordinator all-reduces
the tensors a method lists in :meth:`sync_tensors` before any decision event, so every rank
decides on identical inputs.

Events, in the order the loop raises them:

- ``after_backward``  gradients of this micro-batch are there (Taylor reads ``dL/dz``)
- ``after_step``      the optimizer stepped (variational projects theta to [0, 1])
- ``step_end``        (only when :meth:`check_due` says so, after the sync) -> plan or None
- ``epoch_end``       (after the sync) -> plan or None
- ``before_save`` / ``after_load``  :meth:`state_dict` / :meth:`load_state_dict`
- ``after_prune``     the plan was applied; remap per-structure state with the slices

Example::

    method = build_method(cfg.method, model, total_steps)
    groups = method.param_groups(model)       # theta groups with their own lr
    loss = ce + method.regularizer(model, step)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from system.config import ConfigError
from system.models.resnet import GatedResNet, gates_of, set_gate_mode
from system.surgery import PrunePlan, Slices, select


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
    #: whether the method can handle unit gates on this block type, layer gates, etc.
    handles = ("basic", "bottleneck")

    def __init__(self, cfg: Any, total_steps: int, target_macs: float | None = None, round_to: int = 1):
        self.cfg = cfg
        self.total_steps = total_steps
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

    def theta_lrs(self) -> dict[str, float]:
        """Learning rate of the unit / layer theta groups (0 = theta not trained)."""
        return {"unit": 0.0, "layer": 0.0}

    def theta_active(self, step: int) -> bool:
        """Whether theta is trained at ``step`` (the LR schedule multiplies its lr by 0 otherwise)."""
        return False

    # -- per step ---------------------------------------------------------------------------
    def regularizer(self, model: GatedResNet, step: int) -> torch.Tensor | None:
        return None

    def surrogate_loss(self, model: GatedResNet, forward, x: torch.Tensor, y: torch.Tensor, loss_fn,
                       step: int, per_example_loss: torch.Tensor | None = None) -> torch.Tensor | None:
        """A term whose gradient carries an estimator the autograd path cannot (called before backward).

        ``loss_fn(logits, y)`` gives per-example losses; ``per_example_loss`` is the main forward's.
        """
        return None

    def extra_forwards(self) -> int:
        """Forwards the last step ran beyond the main one (counted in the training MACs)."""
        return 0

    def after_backward(self, model: GatedResNet, grad_scale: float = 1.0) -> None:
        """Gradients are there.  ``grad_scale`` is the loss scale they carry (fp16): divide by it."""
        pass

    def after_step(self, model: GatedResNet) -> None:
        pass

    def check_due(self, step: int) -> bool:
        return False

    def sync_tensors(self) -> list[torch.Tensor]:
        """Tensors the coordinator all-reduces (mean) in place before a decision event."""
        return []

    def on_step_end(self, ctx: StepContext) -> PrunePlan | None:
        return None

    def on_epoch_end(self, ctx: StepContext) -> PrunePlan | None:
        return None

    def after_prune(self, plan: PrunePlan, slices: Slices, model: GatedResNet) -> None:
        pass

    # -- evaluation -------------------------------------------------------------------------
    @contextlib.contextmanager
    def eval_gates(self, model: GatedResNet) -> Iterator[None]:
        """Gate modes for evaluation (default: as they are)."""
        yield

    def final_plan(self, model: GatedResNet) -> PrunePlan | None:
        """A last plan before export (e.g. cut every gate that is off deterministically)."""
        return None

    # -- state (before_save / after_load) ---------------------------------------------------
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
        block = g.rsplit(".", 1)[0]
        if block in plan.blocks:
            continue
        dims = slices.get(key_of(g))
        out[g] = select(v, {0: dims[0]}) if dims and 0 in dims else v
    return out


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
