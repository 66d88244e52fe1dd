"""The safety-net rounding of theta to {0, 1} (``harden_at``), target- and ``round_to``-aware."""

from __future__ import annotations

import bisect
import itertools
import math

import torch

from system.models.anatomy import block_of, last_bn, unit_modules
from system.models.resnet import GatedResNet, gates_of
from system.models.spec import ArchSpec
from system.pruning.complexity import expected
from system.pruning.methods.base import round_removal
from system.pruning.surgery import PrunePlan

#: the bins of :func:`cut_by_theta`, by theta before the rounding: (name, low, high), low < theta <= high
CUT_BINS = (("theta_0", -math.inf, 0.0), ("under_0.2", 0.0, 0.2), ("under_0.5", 0.2, 0.5), ("from_0.5", 0.5, math.inf))


def round_thetas(spec: ArchSpec, unit: dict[str, torch.Tensor], layer: dict[str, torch.Tensor], threshold: float,
                 round_to: int, target: float | None, dense_macs: float) -> dict[str, torch.Tensor]:
    """0/1 values for every gate: ``theta > threshold``, kept unit widths rounded up to multiples of
    ``round_to`` (the highest thetas kept); under a ``target`` (a fraction of ``dense_macs``), the
    cut of the deterministic network nearest the target from below:

    - layer-only: the best cut over the blocks (:func:`best_block_cut`);
    - otherwise from ``theta > threshold``, flipping the lowest-theta kept gates off (the fewest) or
      the highest-theta cut gates back on (the most that fit; units past a block that does not fit
      still may), and also from the same units with every block kept; whichever lands nearer."""
    thetas = {**unit, **layer}
    on = {n: (t > threshold).to(t.dtype) for n, t in thetas.items()}

    def rounded(vals):  # kept unit widths up to multiples of round_to, keeping the highest thetas
        for n in unit:
            vals[n] = (~round_removal(vals[n] == 0, unit[n], round_to)).to(vals[n].dtype)
        return vals

    if target is None or not thetas:
        return rounded(on)
    if layer and not unit:  # layer-only: the best cut over the blocks, not a greedy flip
        best = best_block_cut(spec, layer, target, dense_macs)
        if best is not None:
            return best

    def macs(vals):
        return float(expected(spec, {n: vals[n] for n in unit}, {n: vals[n] for n in layer})[0]) / dense_macs

    def with_flips(start, cands, k, value):
        vals = {n: t.clone() for n, t in start.items()}
        for n, i in cands[:k]:
            vals[n][i] = value
        return rounded(vals)

    order = sorted((float(thetas[n][i]), n, i) for n in thetas for i in range(thetas[n].numel()))

    def land(start):
        # MACs fall monotonically with every flip to 0 (rise with every flip to 1): bisect the count
        if macs(with_flips(start, [], 0, 0.0)) > target:  # cut more: the fewest of the lowest-theta kept ones
            kept = [(n, i) for _, n, i in order if start[n][i] > 0]

            def fewest(cands):
                k = bisect.bisect_left(range(len(cands) + 1), True,
                                       key=lambda k: macs(with_flips(start, cands, k, 0.0)) <= target)
                return with_flips(start, cands, min(k, len(cands)), 0.0)

            out = fewest(kept)
            if layer and unit:  # a block flipped whole can overshoot by its size: units alone may land nearer
                units_only = fewest([(n, i) for n, i in kept if n in unit])
                if target >= macs(units_only) > macs(out):
                    out = units_only
            return out
        # keep more: as many of the highest-theta cut ones as stay within the target
        cands = [(n, i) for _, n, i in reversed(order) if start[n][i] == 0]

        def most(cands):
            return bisect.bisect_left(range(len(cands) + 1), True,
                                      key=lambda k: macs(with_flips(start, cands, k, 1.0)) > target) - 1

        k = most(cands)
        if layer and unit and k < len(cands):  # a block that does not fit stops the prefix; units after it may
            rest = [(n, i) for n, i in cands[k:] if n in unit]
            cands = cands[:k] + rest
            k = most(cands)
        return with_flips(start, cands, k, 1.0)

    best = land(on)
    if layer and unit and any(float(on[n].min()) == 0 for n in layer):
        alt = land({**on, **{n: torch.ones_like(on[n]) for n in layer}})
        if target >= macs(alt) > macs(best) or macs(best) > target >= macs(alt):
            best = alt
    return best


#: the most block-count combinations :func:`best_block_cut` enumerates (else the greedy flip decides)
MAX_COMBINATIONS = 2_000_000


def best_block_cut(spec: ArchSpec, layer: dict[str, torch.Tensor], target: float,
                   dense_macs: float) -> dict[str, torch.Tensor] | None:
    """Layer-only rounding: the set of blocks to cut whose network has the most MACs at or under
    ``target`` (a fraction of ``dense_macs``); among equal cuts, the one that cuts the lowest thetas.

    Removing a block removes its branch's MACs whatever else is removed (the residual stream is
    never pruned), so the cut is a subset-sum over the block costs.  Blocks of equal cost are
    interchangeable, so the search runs over how many of each cost class go (lowest theta first).
    None when no cut reaches the target or the classes are too many to enumerate."""
    names = list(layer)
    ones = {n: torch.ones(1, dtype=torch.float64) for n in names}
    full = float(expected(spec, None, ones)[0])
    cost = {}
    for n in names:
        off = dict(ones)
        off[n] = torch.zeros(1, dtype=torch.float64)
        cost[n] = round(full - float(expected(spec, None, off)[0]))
    classes: dict[int, list[str]] = {}
    for n in sorted(names, key=lambda n: float(layer[n].reshape(()))):  # lowest theta first
        classes.setdefault(cost[n], []).append(n)
    keys = sorted(classes)
    if math.prod(len(classes[k]) + 1 for k in keys) > MAX_COMBINATIONS:
        return None
    budget = target * dense_macs
    best: tuple[float, float, tuple[int, ...]] | None = None
    for counts in itertools.product(*(range(len(classes[k]) + 1) for k in keys)):
        left = full - sum(k * c for k, c in zip(keys, counts))
        if left > budget + 1e-6:
            continue
        cut_theta = sum(float(layer[n].reshape(())) for k, c in zip(keys, counts) for n in classes[k][:c])
        cand = (left, -cut_theta, counts)
        if best is None or cand[:2] > best[:2]:
            best = cand
    if best is None:
        return None
    cut = {n for k, c in zip(keys, best[2]) for n in classes[k][:c]}
    return {n: torch.zeros_like(t) if n in cut else torch.ones_like(t) for n, t in layer.items()}


def apply_rounding(model: GatedResNet, unit: dict[str, torch.Tensor], layer: dict[str, torch.Tensor], threshold: float,
                   round_to: int, target: float | None, dense_macs: float) -> None:
    """Set the gates' thetas (in place) to :func:`round_thetas` of ``unit`` and ``layer``."""
    rounded = round_thetas(model.spec(), unit, layer, threshold, round_to, target, dense_macs)
    gates = gates_of(model)
    with torch.no_grad():
        for n, v in rounded.items():
            gates[n].theta.copy_(v)


def fold_kept_thetas(model: GatedResNet, unit: dict[str, torch.Tensor],
                     layer: dict[str, torch.Tensor]) -> tuple[int, float, int]:
    """Fold each kept gate's theta before the rounding (``unit``, ``layer``: those thetas; the gates now hold the
    rounded 0/1) into the weights that read the gate, in place: a kept unit's theta multiplies its consumer conv's
    input channel, a kept block's layer theta its last BatchNorm's weight and bias.  A gate multiplies a ReLU's
    output (unit) or a BatchNorm's (layer), so with every kept gate at 1 the network computes what it computed
    with those gates at theta, the mean network (eval mode ``mean``), less the structures the rounding cut.
    Cut gates' weights are left (surgery removes them).  Returns what it folded, for the log: the kept units
    under theta 1, their kept units' mean theta, and the kept blocks under theta 1."""
    gates = gates_of(model)
    blocks = dict(model.named_blocks())
    kept_thetas, blocks_under = [], 0
    with torch.no_grad():
        for (n, before), consumer in zip(unit.items(), unit_modules(model, list(unit), "consumer")):
            kept = gates[n].theta.detach() > gates[n].threshold  # (the deterministic gate's own test)
            scale = torch.where(kept, before.to(consumer.weight.dtype), torch.ones_like(before))
            consumer.weight.mul_(scale.view(1, -1, 1, 1))
            kept_thetas.append(before[kept])
        for n, before in layer.items():
            if bool(gates[n].theta.detach().gt(gates[n].threshold).all()):
                bn = last_bn(blocks[block_of(n)], model.block_kind)
                bn.weight.mul_(before.to(bn.weight.dtype))
                bn.bias.mul_(before.to(bn.bias.dtype))
                blocks_under += int(bool(before.lt(1).any()))
    t = torch.cat(kept_thetas) if kept_thetas else torch.ones(0)
    return int(t.lt(1).sum()), float(t.mean()) if t.numel() else 1.0, blocks_under


def cut_by_theta(plan: PrunePlan, before: dict[str, torch.Tensor]) -> dict[str, int]:
    """The units ``plan`` cuts, counted by their theta before the rounding (:data:`CUT_BINS`): at 0 (off, but
    not taken by the rule: its importance per cost was above nu, or the check had not come), in (0, 0.2],
    (0.2, 0.5], and above 0.5 (cut only to land on a target).  The units of a block cut whole are not in
    ``plan.units`` and not counted; the counts sum to ``plan.n_channels``."""
    parts = [before[n][list(idx)] for n, idx in plan.units.items() if idx]
    t = torch.cat(parts) if parts else torch.zeros(0)
    return {name: int(((t > lo) & (t <= hi)).sum()) for name, lo, hi in CUT_BINS}
