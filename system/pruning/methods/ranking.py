"""The scoring seam: a method that ranks unit gates by a score and removes the lowest on a schedule.

A ranking method supplies only its *importance*; this base owns the rest, the part Torch-Pruning
calls scheduler and pruner:

- the unit gates name the units (their thetas are the per-unit stores' shapes), but stay ``off`` in
  training: a score reads the weights (L1) or the BatchNorm gradients (Taylor), so a ranking step
  runs the dense network's ops and no per-gate multiply;
- the schedule: dense until ``start_frac``, a pruning step every ``check_every`` steps until
  ``stop_frac``, each removing ``max(per_step, ceil(still needed / pruning steps left))`` gates, so
  the target is reached by ``stop_frac``;
- the scores: per batch (:meth:`Ranking.batch_scores`, summed over the ``check_every`` batches before a
  pruning step and averaged) or at the pruning step (:meth:`Ranking.step_scores`), then smoothed
  across pruning steps with ``momentum``;
- one global, stable ranking (ties by position, so every rank agrees), the target search (the fewest
  removals that bring the MACs to ``method.target_macs``, or ``keep_ratio`` of the gates), kept widths
  rounded up to ``method.round_to`` by keeping the highest-scored units, and a block that would lose
  every unit removed whole (it becomes its shortcut).

A new ranking baseline is a config dataclass (:class:`RankingConfig` plus its own keys) and one of the
two score hooks: see :mod:`system.pruning.methods.l1` (Li et al. 2017) and
:mod:`system.pruning.methods.taylor` (Molchanov et al. 2019).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any

import torch

from system.config import check
from system.models.resnet import GatedResNet, set_gate_mode
from system.pruning.complexity import count, expected
from system.pruning.methods.base import (
    Event,
    Method,
    StepContext,
    add_finite,
    remap_stores,
    round_removal,
    unit_and_layer_gates,
)
from system.pruning.surgery import PrunePlan, Slices, plan_from_removals


@dataclass(frozen=True)
class RankingConfig:
    """The schedule and selection keys every ranking method shares."""

    keep_ratio: float = 0.72  # fraction of the prunable gates kept at the end (unused under method.target_macs)
    check_every: int = 30  # steps between pruning steps (and batches averaged per pruning step)
    per_step: int = 0  # at least this many gates per pruning step (0: only what reaching the target needs)
    per_step_frac: float = 0.0  # the same minimum as a fraction of all gates
    momentum: float = 0.9  # smoothing of scores across pruning steps
    start_frac: float = 0.2  # train dense for this fraction of the steps first
    stop_frac: float = 0.7  # stop pruning here at the latest; the rest is fine-tuning

    def __post_init__(self) -> None:
        check(0.0 < self.keep_ratio <= 1.0, "keep_ratio", "must be in (0, 1]")
        check(self.check_every >= 1, "check_every", "must be >= 1")
        check(self.per_step >= 0, "per_step", "must be >= 0")
        check(0.0 <= self.per_step_frac < 1.0, "per_step_frac", "must be in [0, 1)")
        check(0.0 <= self.momentum < 1.0, "momentum", "must be in [0, 1)")
        check(0.0 <= self.start_frac < self.stop_frac <= 1.0, "start_frac", "need 0 <= start_frac < stop_frac <= 1")


class Ranking(Method):
    """Base of the ranking methods; a subclass overrides :meth:`batch_scores` or :meth:`step_scores`."""

    supports_target = True
    events = frozenset({Event.STEP_END})

    def __init__(self, cfg: RankingConfig, total_steps: int, target_macs: float | None = None, round_to: int = 1,
                 weight_decay: float = 0.0):
        super().__init__(cfg, total_steps, target_macs, round_to, weight_decay)
        self.dense_macs: float | None = None
        self.acc: dict[str, torch.Tensor] = {}
        self.smooth: dict[str, torch.Tensor] = {}
        self.n_acc = 0
        self.n_events = 0
        self.total_gates: int | None = None
        self.removed = 0

    # -- the importance: a subclass overrides one of these -------------------------------------
    def batch_scores(self, model: GatedResNet, grad_scale: float) -> dict[str, torch.Tensor] | None:
        """This batch's contribution to each unit gate's score (None: the method scores at the pruning
        step only).  Called after backward in the ``check_every`` batches before each pruning step."""
        return None

    def step_scores(self, model: GatedResNet) -> dict[str, torch.Tensor]:
        """Each unit gate's score at a pruning step (default: the batch scores' window average)."""
        out = {n: a / max(1, self.n_acc) for n, a in self.acc.items()}
        for a in self.acc.values():
            a.zero_()
        self.n_acc = 0
        return out

    # -- set-up and per step ----------------------------------------------------------------
    def attach(self, model: GatedResNet) -> None:
        set_gate_mode(model, unit="off", layer="off")
        unit, _ = unit_and_layer_gates(model)
        with torch.no_grad():
            for g in unit.values():
                g.theta.fill_(1.0)
        for n, g in unit.items():
            self.acc.setdefault(n, torch.zeros_like(g.theta.detach()))
        if self.total_gates is None:
            self.total_gates = sum(g.theta.numel() for g in unit.values())
        if self.dense_macs is None:
            self.dense_macs = float(count(model.spec())[0])

    @property
    def start_step(self) -> int:
        return int(self.cfg.start_frac * self.total_steps)

    @property
    def stop_step(self) -> int:
        return int(self.cfg.stop_frac * self.total_steps)

    @property
    def final_step(self) -> int | None:
        """The last check at or before ``stop_step`` (none when there is none after ``start_step``): its plan
        applies when that many steps are done, so the step of that index (0-based) is the first one trained on
        the final network."""
        last = self.stop_step // self.cfg.check_every * self.cfg.check_every
        return last if self.check_due(last) else None  # (a check step, as the loop asks)

    @property
    def first_check(self) -> int:
        return (self.start_step // self.cfg.check_every + 1) * self.cfg.check_every

    def after_backward(self, model: GatedResNet, step: int, grad_scale: float = 1.0) -> None:
        # the first window is the check_every batches before the first pruning step, like every other
        if step + 1 <= self.first_check - self.cfg.check_every:
            return
        scores = self.batch_scores(model, grad_scale)
        if scores is None:
            return
        if scores:  # an fp16 overflow step adds nothing (the ranking is per window)
            add_finite([self.acc[n] for n in scores], list(scores.values()))
        self.n_acc += 1

    def check_due(self, step: int) -> bool:
        return self.start_step < step <= self.stop_step and step % self.cfg.check_every == 0

    def sync_tensors(self) -> list[torch.Tensor]:
        return [self.acc[n] for n in sorted(self.acc)]

    # -- deciding ---------------------------------------------------------------------------
    def _update_scores(self, model: GatedResNet) -> None:
        m = self.cfg.momentum
        for n, avg in self.step_scores(model).items():
            prev = self.smooth.get(n)
            self.smooth[n] = avg.clone() if prev is None else m * prev + (1 - m) * avg

    def on_step_end(self, ctx: StepContext) -> PrunePlan | None:
        c = self.cfg
        self._update_scores(ctx.model)
        names = sorted(self.smooth)
        scores = torch.cat([self.smooth[n] for n in names])
        owner = [(n, i) for n in names for i in range(self.smooth[n].numel())]
        # stable global ranking: ties broken by position so every rank agrees
        ranking = torch.argsort(scores, stable=True).tolist()
        needed = self._needed(ctx.model, names, owner, ranking)
        if needed <= 0:
            return None
        floor = max(c.per_step, int(c.per_step_frac * self.total_gates))
        k = min(needed, max(floor, math.ceil(needed / self.events_left(ctx.step))))
        plan = plan_from_removals(self._removals(names, owner, ranking, k))
        return None if plan.empty else plan

    def _removals(self, names, owner, ranking, k: int) -> dict[str, torch.Tensor]:
        """Per gate, the removal mask of the ``k`` lowest-ranked gates, kept widths rounded up to
        ``round_to`` by keeping the highest-scored units."""
        remove = {n: torch.zeros(self.smooth[n].numel(), dtype=torch.bool) for n in names}
        for j in ranking[:k]:
            n, i = owner[j]
            remove[n][i] = True
        return {n: round_removal(m, self.smooth[n], self.round_to) for n, m in remove.items()}

    def events_left(self, step: int) -> int:
        """Pruning steps from ``step`` (included) to ``stop_frac``."""
        ce = self.cfg.check_every
        first = max(step, self.start_step + 1)
        return max(1, self.stop_step // ce - (first - 1) // ce)

    def _needed(self, model: GatedResNet, names, owner, ranking) -> int:
        """How many of the lowest-ranked gates must go to reach the target (gate count or MACs)."""
        remaining = len(owner)
        if self.target is None:
            return remaining - round(self.cfg.keep_ratio * self.total_gates)
        spec = model.spec()
        target, dense = self.target, self.dense_macs
        assert dense is not None  # set by attach

        def frac(k: int) -> float:
            on = {n: (~m).to(torch.float64) for n, m in self._removals(names, owner, ranking, k).items()}
            return float(expected(spec, on, None)[0]) / dense

        # the fewest removals that bring the MACs to the target (MACs fall monotonically in k)
        k = bisect.bisect_left(range(remaining + 1), True, key=lambda k: frac(k) <= target)
        return min(k, remaining)

    def after_prune(self, plan: PrunePlan, slices: Slices, model: GatedResNet) -> None:
        remap_stores((self.acc, self.smooth), plan, slices)
        self.n_events += 1
        self.removed += plan.n_channels

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"acc": self.acc, "smooth": self.smooth, "n_acc": self.n_acc, "n_events": self.n_events,
                "total_gates": self.total_gates, "removed": self.removed,
                "dense_macs": self.dense_macs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.acc = {k: v.clone() for k, v in state["acc"].items()}
        self.smooth = {k: v.clone() for k, v in state["smooth"].items()}
        self.n_acc, self.n_events = int(state["n_acc"]), int(state["n_events"])
        self.total_gates, self.removed = state["total_gates"], int(state["removed"])
        self.dense_macs = state.get("dense_macs", self.dense_macs)

    def summary(self) -> dict[str, Any]:
        kept = None if self.total_gates is None else (self.total_gates - self.removed) / self.total_gates
        return {"gates_kept_frac": kept, "keep_ratio": self.cfg.keep_ratio if self.target is None else None}
