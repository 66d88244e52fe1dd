"""The synchronized pruning coordinator.

At a decision event it all-reduces the method's statistics, the gate parameters and the
BatchNorm running statistics (DeepSpeed does not sync them), lets the method decide, checks
with an all-gather of the plan's digest that every rank holds the same plan (and stops,
naming the ranks, before anything is changed if not), then applies surgery, transplants the
optimizer state and has the engine rebuilt.  The collectives themselves are in
:mod:`system.runtime.collectives`.

Example::

    coord = Coordinator(Collectives(rank, world_size, device))
    plan = coord.decide(method, model, lambda: method.decide(Event.STEP_END, ctx))
    if plan: coord.apply(plan, engine, method, step)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from system.models.resnet import GatedResNet, gates_of
from system.pruning.surgery import PrunePlan, apply_plan
from system.pruning.transplant import transplant_optimizer
from system.runtime.collectives import Collectives, PlanMismatch
from system.runtime.rendezvous import node_log

__all__ = ["Coordinator", "PlanMismatch", "PruneEvent"]


@dataclass
class PruneEvent:
    step: int
    channels: int
    blocks: int
    rebuild_s: float
    digest: str


class Coordinator:
    """Pruning events agreed across ranks; keeps their record (a checkpointed part)."""

    def __init__(self, comm: Collectives):
        self.comm = comm
        self.events: list[PruneEvent] = []

    def state_dict(self) -> dict[str, Any]:
        return {"events": [dataclasses.asdict(ev) for ev in self.events]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.events[:] = [PruneEvent(**ev) for ev in state.get("events", [])]

    def sync_model_state(self, model: GatedResNet) -> None:
        """Average gate thetas and BN running statistics across ranks."""
        tensors = [g.theta.data for g in gates_of(model).values()]
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d) and m.running_mean is not None and m.running_var is not None:
                tensors += [m.running_mean, m.running_var]
        self.comm.all_reduce_(tensors)

    # -- a decision event ------------------------------------------------------------------
    def decide(self, method, model: GatedResNet, decide_fn: Callable[[], PrunePlan | None]) -> PrunePlan | None:
        self.comm.all_reduce_(method.sync_tensors())
        self.sync_model_state(model)
        plan = decide_fn()
        if plan is not None and plan.empty:
            plan = None
        self.comm.agree(plan, method.decision_state())
        return plan

    def apply(self, plan: PrunePlan, engine, method, step: int) -> PruneEvent:
        """Surgery + optimizer transplant + engine rebuild; returns the event record."""
        t0 = time.perf_counter()
        old_model, old_opt = engine.model, engine.optimizer
        new_model, _, slices = apply_plan(old_model, plan)
        new_opt = transplant_optimizer(old_opt, old_model, new_model, slices)
        method.after_prune(plan, slices, new_model)
        method.attach(new_model)
        engine.rebuild(new_model, new_opt)
        ev = PruneEvent(step=step, channels=plan.n_channels, blocks=len(plan.blocks),
                        rebuild_s=time.perf_counter() - t0, digest=plan.digest())
        self.events.append(ev)
        # on every node's first rank (not only rank 0): each node's log shows the plans it applied
        node_log.info("step %d: pruned %d channels and %d blocks in %.3fs (plan %s)", step, ev.channels,
                      ev.blocks, ev.rebuild_s, ev.digest)
        return ev
