"""The synchronized pruning coordinator: the only place (with the engine) touching torch.distributed.

At a decision event it all-reduces the method's statistics, the gate parameters and the
BatchNorm running statistics (DeepSpeed does not sync them), lets the method decide, checks
with an all-gather of the plan's digest that every rank holds the same plan (and stops,
naming the ranks, before anything is changed if not), then applies surgery, transplants the
optimizer state and has the engine rebuilt.

Example::

    coord = Coordinator(rank, world_size)
    plan = coord.decide(method, model, lambda: method.on_step_end(ctx))
    if plan: coord.apply(plan, engine, method)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from system.models.resnet import GatedResNet, gates_of
from system.surgery import PrunePlan, apply_plan
from system.transplant import transplant_optimizer

log = logging.getLogger(__name__)


class PlanMismatch(RuntimeError):
    """Ranks disagree on a pruning plan; nothing was changed."""

    def __init__(self, digests: list[str]):
        self.digests = digests
        groups: dict[str, list[int]] = {}
        for r, d in enumerate(digests):
            groups.setdefault(d, []).append(r)
        majority = max(groups.values(), key=len)
        odd = sorted(r for rs in groups.values() if rs is not majority for r in rs)
        super().__init__(f"pruning plans differ across ranks: rank(s) {odd} disagree with rank(s) {majority} "
                         f"(digests {digests}); nothing was pruned")
        self.ranks = odd


@dataclass
class PruneEvent:
    step: int
    channels: int
    blocks: int
    rebuild_s: float
    digest: str


class Coordinator:
    """Collectives for pruning decisions and evaluation; a no-op wrapper at world size 1."""

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu"):
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.events: list[PruneEvent] = []

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def _comm_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if (
            self.distributed and dist.get_backend() == "nccl") else torch.device("cpu")

    # -- reductions -----------------------------------------------------------------------
    def all_reduce_(self, tensors: list[torch.Tensor], op: str = "mean") -> None:
        """Reduce ``tensors`` in place across ranks (flattened into one buffer, one collective)."""
        if not self.distributed or not tensors:
            return
        dev = self._comm_device()
        flat = torch.cat([t.detach().reshape(-1).to(dev, torch.float64) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        if op == "mean":
            flat /= self.world_size
        off = 0
        with torch.no_grad():
            for t in tensors:
                n = t.numel()
                t.copy_(flat[off:off + n].view_as(t).to(t.device, t.dtype))
                off += n

    def sum_scalars(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        self.all_reduce_([t], op="sum")
        return t.tolist()

    def any_flag(self, flag: bool) -> bool:
        """True on every rank if it is True on any rank (preemption agreement)."""
        return self.sum_scalars([1.0 if flag else 0.0])[0] > 0

    def sync_model_state(self, model: GatedResNet) -> None:
        """Average gate thetas and BN running statistics across ranks."""
        tensors = [g.theta.data for g in gates_of(model).values()]
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d) and m.running_mean is not None:
                tensors += [m.running_mean, m.running_var]
        self.all_reduce_(tensors)

    def agree(self, plan: PrunePlan | None) -> None:
        """All-gather the plan digest; raise PlanMismatch naming the odd ranks if they differ."""
        if not self.distributed:
            return
        digest = (plan or PrunePlan()).digest()
        out: list[str] = [""] * self.world_size
        dist.all_gather_object(out, digest)
        if len(set(out)) > 1:
            raise PlanMismatch(out)

    # -- a decision event ------------------------------------------------------------------
    def decide(self, method, model: GatedResNet, decide_fn: Callable[[], PrunePlan | None]) -> PrunePlan | None:
        self.all_reduce_(method.sync_tensors())
        self.sync_model_state(model)
        plan = decide_fn()
        if plan is not None and plan.empty:
            plan = None
        self.agree(plan)
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
        log.info("step %d: pruned %d channels and %d blocks in %.3fs (plan %s)", step, ev.channels, ev.blocks,
                 ev.rebuild_s, ev.digest)
        return ev
