"""Entropy-guided pruning (EGP; Liao, Quetu, Nguyen, Tartaglione 2023), re-implemented.

Candidate layers are the inner convs of every residual branch.  For each ReLU after them a
forward hook counts, per channel, the fraction ``p`` of (samples x positions) where it is on;
the layer entropy is the mean binary entropy ``H(p)`` over its non-constant channels
(0 when every channel is constant), averaged over the training batches since the last
iteration.  Each iteration prunes ``prune_frac`` of the remaining candidate weights by
magnitude, unstructured, with layer ``l``'s share ``softmax(sum(s) / s_l)``,
``s_l = H_l * mean|w_l|``, capped at what the layer has left; masks are re-applied after
every optimizer step.

Structures removed physically [ours: the exact folding rule]: a channel that was never on
since the last iteration outputs 0 after its ReLU and is cut as a unit (exact on the training
data); a branch whose inner ReLUs are all constant-off has entropy 0 and is removed (its
constant output is dropped).  Always-on layers are reported as linearisable, not cut.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from system.config import check
from system.models.anatomy import anatomy, block_of
from system.models.resnet import GatedResNet, RemovedBlock, set_gate_mode
from system.pruning.methods.base import Event, Method, StepContext, remap_stores, round_removal
from system.pruning.surgery import PrunePlan, Slices, select


@dataclass(frozen=True)
class EGPConfig:
    """Section ``method.egp``."""

    iterations: int = 4  # pruning iterations, evenly spaced between start and stop
    prune_frac: float = 0.5  # of the remaining candidate weights per iteration
    start_frac: float = 0.2  # the first pruning iteration at this fraction of the run
    stop_frac: float = 0.7  # the last one at this fraction
    remove_dead_units: bool = True  # cut channels never on since the last iteration

    def __post_init__(self) -> None:
        check(self.iterations >= 1, "iterations", "must be >= 1")
        check(0.0 < self.prune_frac < 1.0, "prune_frac", "must be in (0, 1)")
        check(0.0 <= self.start_frac < self.stop_frac <= 1.0, "start_frac", "need 0 <= start_frac < stop_frac <= 1")


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-12, 1 - 1e-12)
    return -(p * p.log2() + (1 - p) * (1 - p).log2())


class EGP(Method):
    name = "egp"
    events = frozenset({Event.STEP_END})
    no_target_reason = ("it prunes weights unstructured and removes only layers whose entropy reaches 0, so its "
                        "MACs cannot be steered to a target; sweep method.egp.iterations instead")

    def __init__(self, cfg: EGPConfig, total_steps: int, target_macs: float | None = None, round_to: int = 1,
                 weight_decay: float = 0.0):
        super().__init__(cfg, total_steps, target_macs, round_to, weight_decay)
        self.on_sum: dict[str, torch.Tensor] = {}  # gate-style name "layerX.Y.gateI" -> per-channel sum of p
        self.n_batches = torch.zeros(1)
        self.masks: dict[str, torch.Tensor] = {}  # conv weight name -> 0/1 mask
        self.done_iterations = 0
        self.layers_removed = 0
        self.linearisable: list[str] = []
        self._hooks: list[Any] = []

    # the candidate convs and the ReLU after each, by gate-style name
    @staticmethod
    def _candidates(model: GatedResNet) -> dict[str, tuple[str, torch.nn.Conv2d, torch.nn.Module]]:
        out = {}
        units = anatomy(model.block_kind).units
        for bname, blk in model.named_blocks():
            if isinstance(blk, RemovedBlock):
                continue
            for u in units:
                out[f"{bname}.{u.gate}"] = (f"{bname}.{u.conv}.weight", getattr(blk, u.conv), getattr(blk, u.relu))
        return out

    def attach(self, model: GatedResNet) -> None:
        set_gate_mode(model, unit="off", layer="off")
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for gname, (wname, conv, relu) in self._candidates(model).items():
            self.on_sum.setdefault(gname, torch.zeros(conv.out_channels, device=conv.weight.device))
            self.masks.setdefault(wname, torch.ones_like(conv.weight.detach()))
            self._hooks.append(relu.register_forward_hook(self._hook(gname)))

    def _hook(self, gname: str):
        def fn(module, inputs, output):
            if module.training:
                self.on_sum[gname] += (output.detach() > 0).float().mean(dim=(0, 2, 3))
        return fn

    def after_backward(self, model: GatedResNet, step: int, grad_scale: float = 1.0) -> None:
        self.n_batches += 1

    def after_step(self, model: GatedResNet, step: int) -> None:
        self._apply_masks(model)

    def _apply_masks(self, model: GatedResNet) -> None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for wname, m in self.masks.items():
                params[wname].mul_(m)

    def _schedule(self) -> list[int]:
        c = self.cfg
        a, b = c.start_frac * self.total_steps, c.stop_frac * self.total_steps
        if c.iterations == 1:
            return [max(1, int(a))]
        return [max(1, int(a + (b - a) * k / (c.iterations - 1))) for k in range(c.iterations)]

    def check_due(self, step: int) -> bool:
        return step in self._schedule()

    @property
    def final_step(self) -> int | None:
        """Its last pruning iteration's step: the first step (0-based) trained on the final network."""
        return self._schedule()[-1]

    def sync_tensors(self) -> list[torch.Tensor]:
        return [self.on_sum[n] for n in sorted(self.on_sum)] + [self.n_batches]

    def entropies(self) -> dict[str, float]:
        out = {}
        n = max(1.0, float(self.n_batches))
        for g, s in self.on_sum.items():
            p = s / n
            nonconst = (p > 0) & (p < 1)
            out[g] = float(binary_entropy(p[nonconst]).mean()) if bool(nonconst.any()) else 0.0
        return out

    def on_step_end(self, ctx: StepContext) -> PrunePlan | None:
        model = ctx.model
        params = dict(model.named_parameters())
        ent = self.entropies()
        n = max(1.0, float(self.n_batches))
        cands = self._candidates(model)
        # 1. unstructured magnitude pruning with entropy-guided shares
        names = sorted(cands)
        remaining = {g: int(self.masks[cands[g][0]].sum()) for g in names}
        s = {g: ent[g] * float((params[cands[g][0]].detach().abs() * self.masks[cands[g][0]]).sum())
             / max(1, remaining[g]) for g in names}
        total_s = sum(s.values())
        logits = torch.tensor([total_s / max(v, 1e-12) for v in s.values()], dtype=torch.float64)
        share = torch.softmax(logits - logits.max(), dim=0)
        budget = int(self.cfg.prune_frac * sum(remaining.values()))
        for g, sh in zip(names, share.tolist()):
            k = min(math.floor(sh * budget), max(0, remaining[g] - 1))
            if k <= 0:
                continue
            wname = cands[g][0]
            w = params[wname].detach().abs().flatten()
            m = self.masks[wname].view(-1)
            w = torch.where(m > 0, w, torch.full_like(w, float("inf")))
            idx = torch.argsort(w, stable=True)[:k]
            m[idx] = 0
        self._apply_masks(model)
        self.done_iterations += 1
        # 2. structures: dead channels and zero-entropy branches
        units, blocks = {}, []
        for bname, _blk in model.named_blocks():
            gates = [g for g in names if g.startswith(bname + ".")]
            if not gates:
                continue
            dead = {g: torch.nonzero(self.on_sum[g] / n == 0).flatten().tolist() for g in gates}
            if all(ent[g] == 0.0 for g in gates) and any(len(dead[g]) == self.on_sum[g].numel() for g in gates):
                blocks.append(bname)
                continue
            for g in gates:
                if ent[g] == 0.0 and not dead[g]:
                    self.linearisable.append(g)
                if self.cfg.remove_dead_units and dead[g] and len(dead[g]) < self.on_sum[g].numel():
                    mask = torch.zeros(self.on_sum[g].numel(), dtype=torch.bool)
                    mask[dead[g]] = True
                    mask = round_removal(mask, self.on_sum[g], self.round_to)  # round_to: keep some dead ones
                    if bool(mask.any()):
                        units[g] = tuple(int(i) for i in torch.nonzero(mask).flatten())
        for v in self.on_sum.values():
            v.zero_()
        self.n_batches.zero_()
        plan = PrunePlan(units=units, blocks=tuple(blocks))
        return None if plan.empty else plan

    def after_prune(self, plan: PrunePlan, slices: Slices, model: GatedResNet) -> None:
        remap_stores((self.on_sum,), plan, slices)
        masks = {}
        for wname, m in self.masks.items():
            if block_of(block_of(wname)) in plan.blocks:  # "layer1.0.conv1.weight" -> "layer1.0"
                continue
            masks[wname] = select(m, slices.get(wname))
        self.masks = masks
        self.layers_removed += len(plan.blocks)

    def sparsity(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return 1.0 - sum(float(m.sum()) for m in self.masks.values()) / max(1, total)

    def state_dict(self) -> dict[str, Any]:
        return {"on_sum": self.on_sum, "n_batches": self.n_batches, "masks": self.masks,
                "done_iterations": self.done_iterations, "layers_removed": self.layers_removed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.on_sum = {k: v.clone() for k, v in state["on_sum"].items()}
        self.n_batches = state["n_batches"].clone()
        self.masks = {k: v.clone() for k, v in state["masks"].items()}
        self.done_iterations, self.layers_removed = int(state["done_iterations"]), int(state["layers_removed"])

    def summary(self) -> dict[str, Any]:
        return {"sparsity": self.sparsity(), "layers_removed": self.layers_removed,
                "linearisable_layers": sorted(set(self.linearisable)), "iterations": self.done_iterations}
