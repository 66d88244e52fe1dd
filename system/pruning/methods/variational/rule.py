"""The pruning rule of the variational method (docs/method.md sections 1 and 7).

Between checks the rule sums each theta's gradient without the drive (data + price, normalised):
the window mean is >= 0 exactly when the structure's measured importance per cost is at most nu.
At a check, a structure at theta <= ``tau_theta`` for ``patience`` checks is removed if its
condition holds (``weight_condition``: ``importance``, the window mean above; ``signal``, its BN
output small against the others'; ``none``), or after ``max_revivals`` revivals.  A unit decision
that would empty a branch becomes a block removal if the block's own layer gate is at 0 too.
"""

from __future__ import annotations

import bisect
from typing import Any

import torch

from system.models.anatomy import LAYER_GATE, anatomy, last_bn, split_gate_name, unit_modules
from system.models.resnet import GatedResNet, RemovedBlock, gates_of
from system.pruning.methods.base import add_finite, remap_stores, round_removal, unit_and_layer_gates
from system.pruning.methods.variational.config import VariationalConfig
from system.pruning.methods.variational.price import Price
from system.pruning.surgery import PrunePlan, Slices, plan_from_removals


class Rule:
    """The rule's per-gate state: checks spent at 0 (``zero_count``), revivals, and the window sums of
    the normalised theta gradient (``grad_acc``, over ``grad_n`` finite steps)."""

    def __init__(self, cfg: VariationalConfig):
        self.cfg = cfg
        self.zero_count: dict[str, torch.Tensor] = {}
        self.revivals: dict[str, torch.Tensor] = {}
        self.grad_acc: dict[str, torch.Tensor] = {}
        self.grad_n: torch.Tensor = torch.zeros(())  # the steps summed (steps with non-finite gradients skip)

    def attach(self, model: GatedResNet) -> None:
        unit, layer = unit_and_layer_gates(model)
        for n, g in {**unit, **layer}.items():
            for store in (self.zero_count, self.revivals, self.grad_acc):
                store.setdefault(n, torch.zeros_like(g.theta.detach()))
        self.grad_n = self.grad_n.to(model.fc.weight.device)

    def accumulate(self, grads: dict[str, torch.Tensor], grad_scale: float) -> None:
        """Add this step's theta gradients (normalised, before the drive) to the window sums; a step
        whose gradients are not all finite (an fp16 overflow) adds nothing, without a host sync."""
        if not grads:
            return
        finite = add_finite([self.grad_acc[n] for n in grads], list(grads.values()), grad_scale)
        self.grad_n += finite.to(self.grad_n.dtype)

    def flag(self, model: GatedResNet) -> tuple[dict[str, torch.Tensor], int]:
        """Advance the counters by one check and close the window: per gate, the structures the rule
        removes now; and how many gates sit at theta <= ``tau_theta``."""
        c = self.cfg
        unit, layer = unit_and_layer_gates(model)
        flagged: dict[str, torch.Tensor] = {}
        for name, g in {**(unit if c.unit_gates else {}), **(layer if c.layer_gates else {})}.items():
            at_zero = g.theta.detach() <= c.tau_theta
            zc = self.zero_count[name]
            revived = (~at_zero) & (zc > 0)
            self.revivals[name] += revived.to(zc.dtype)
            zc.copy_(torch.where(at_zero, zc + 1, torch.zeros_like(zc)))
            ok = self.condition(model, name, self.grad_acc[name] / self.grad_n.clamp_min(1))
            flagged[name] = at_zero & (((zc >= c.patience) & ok) | (self.revivals[name] >= c.max_revivals))
        for v in self.grad_acc.values():
            v.zero_()
        self.grad_n.zero_()
        at0 = sum(int((g.theta.detach() <= c.tau_theta).sum()) for g in {**unit, **layer}.values())
        return flagged, at0

    def condition(self, model: GatedResNet, name: str, mean_grad: torch.Tensor) -> torch.Tensor:
        """``weight_condition`` per structure of gate ``name``; ``mean_grad``: the window mean."""
        c = self.cfg
        if c.weight_condition == "none":
            return torch.ones_like(mean_grad, dtype=torch.bool)
        if c.weight_condition == "importance":
            # the window mean of data + price (normalised): >= 0 iff importance per cost <= nu
            return mean_grad >= 0
        block, gate = split_gate_name(name)
        kind = model.block_kind
        if gate == LAYER_GATE:
            bn = last_bn(dict(model.named_blocks())[block], kind)
            sig = (bn.weight.abs() + bn.bias.abs()).mean().reshape(1)
            ref = torch.stack([(last_bn(b, kind).weight.abs() + last_bn(b, kind).bias.abs()).mean()
                               for _, b in model.named_blocks() if not isinstance(b, RemovedBlock)]).mean()
        else:
            bn = unit_modules(model, [name], "bn")[0]
            sig = bn.weight.abs() + bn.bias.abs()
            ref = sig.mean()
        return sig.detach() <= c.tau_w * ref.detach()

    def plan(self, model: GatedResNet, flagged: dict[str, torch.Tensor], round_to: int) -> tuple[
            dict[str, torch.Tensor], list[str]]:
        """The flagged structures as (unit removal masks, blocks), an emptied branch resolved: the block
        goes if its layer gate is at 0 too, else the unit with the largest theta stays."""
        unit, _ = unit_and_layer_gates(model)
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
                layer_ok = (not self.cfg.layer_gates) or (lg in flagged and bool((self.zero_count[lg] > 0).all()))
                if layer_ok:
                    blocks.append(bname)
                    continue
                for gn in empties:  # keep the unit with the largest theta (ties: the lowest index)
                    keep = int(torch.argmax(unit[gn].theta.detach()))
                    flagged[gn][keep] = False
            for gn in gnames:
                removals[gn] = round_removal(flagged[gn], unit[gn].theta, round_to)
        return removals, blocks

    @staticmethod
    def within_target(model: GatedResNet, removals: dict[str, torch.Tensor], blocks: list[str], round_to: int,
                      price: Price, target: float) -> PrunePlan | None:
        """The longest prefix of the flagged structures, ordered by theta (blocks by their layer
        theta), whose removal keeps the network at or above ``target`` (a share of the dense MACs)."""
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
                rem[gn] = round_removal(rem[gn], gates[gn].theta, round_to)
            return plan_from_removals({g: m for g, m in rem.items() if bool(m.any())}, blk)

        k = bisect.bisect_left(range(len(items) + 1), True,
                               key=lambda k: price.macs_after(model, plan_of(k)) < target) - 1
        return plan_of(k) if k > 0 else None

    def decide(self, model: GatedResNet, flagged: dict[str, torch.Tensor], round_to: int, price: Price,
               target: float | None) -> PrunePlan | None:
        """The plan of the flagged structures.  Under a ``target``, a cut that would take the network under
        it for good is trimmed: the flagged structures go lowest theta first, as many as keep it at or
        above the target (the rest wait: they may revive as nu falls; the rounding step settles them)."""
        removals, blocks = self.plan(model, flagged, round_to)
        plan = plan_from_removals(removals, blocks)
        if plan.empty:
            return None
        if target is not None and price.macs_after(model, plan) < target:
            trimmed = Rule.within_target(model, removals, blocks, round_to, price, target)
            return None if trimmed is None or trimmed.empty else trimmed
        return plan

    def after_prune(self, plan: PrunePlan, slices: Slices) -> None:
        remap_stores((self.zero_count, self.revivals, self.grad_acc), plan, slices)

    def state_dict(self) -> dict[str, Any]:
        return {"zero_count": self.zero_count, "revivals": self.revivals, "grad_acc": self.grad_acc,
                "grad_n": self.grad_n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("zero_count", "revivals", "grad_acc"):
            getattr(self, key).clear()
            getattr(self, key).update({k: v.clone() for k, v in state[key].items()})
        self.grad_n = torch.as_tensor(state["grad_n"], dtype=torch.float32).clone()



class Removals:
    """Every removal event of the run: ``steps`` holds (step, channels, blocks, 'rule' | 'rounding',
    MACs after it); :meth:`shares` says how much of the removed MACs the rule took, and when."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int, int, str, float]] = []
        self.units = 0
        self.blocks = 0

    def record(self, step: int, plan: PrunePlan, kind: str, macs_after: float) -> None:
        self.units += plan.n_channels
        self.blocks += len(plan.blocks)
        self.steps.append((step, plan.n_channels, len(plan.blocks), kind, macs_after))

    def shares(self, dense_macs: float, total_steps: int) -> dict[str, float]:
        """``macs_removed_by_rule_frac``: the share of all removed MACs that the rule took out during
        training (the rest went at the rounding step); ``..._before_60pct_frac``: of those, before 60%
        of the steps."""
        if not self.steps:
            return {}
        total = max(1.0, dense_macs - self.steps[-1][4])
        rule = [r for r in self.steps if r[3] == "rule"]
        early = [r for r in rule if r[0] < 0.6 * total_steps]
        return {"macs_removed_by_rule_frac": (dense_macs - rule[-1][4]) / total if rule else 0.0,
                "macs_removed_by_rule_before_60pct_frac": (dense_macs - early[-1][4]) / total if early else 0.0}

    def state_dict(self) -> dict[str, Any]:
        return {"removed_units": self.units, "removed_blocks": self.blocks,
                "removal_steps": [list(r) for r in self.steps]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.units, self.blocks = int(state["removed_units"]), int(state["removed_blocks"])
        self.steps = [(int(r[0]), int(r[1]), int(r[2]), str(r[3]), float(r[4]))
                      for r in state.get("removal_steps", [])]
