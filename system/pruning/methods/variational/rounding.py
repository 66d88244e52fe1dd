"""The safety-net rounding of theta to {0, 1} (``harden_at``), target- and ``round_to``-aware."""

from __future__ import annotations

import bisect

import torch

from system.models.spec import ArchSpec
from system.pruning.complexity import expected
from system.pruning.methods.base import round_removal


def round_thetas(spec: ArchSpec, unit: dict[str, torch.Tensor], layer: dict[str, torch.Tensor], threshold: float,
                 round_to: int, target: float | None, dense_macs: float) -> dict[str, torch.Tensor]:
    """0/1 values for every gate: ``theta > threshold``, kept unit widths rounded up to multiples of
    ``round_to`` (the highest thetas kept); under a ``target`` (a fraction of ``dense_macs``), the
    cut of the deterministic network nearest the target from below, by flipping the lowest-theta
    kept gates off or the highest-theta cut gates back on."""
    thetas = {**unit, **layer}
    on = {n: (t > threshold).to(t.dtype) for n, t in thetas.items()}

    def rounded(vals):  # kept unit widths up to multiples of round_to, keeping the highest thetas
        for n in unit:
            vals[n] = (~round_removal(vals[n] == 0, unit[n], round_to)).to(vals[n].dtype)
        return vals

    if target is None or not thetas:
        return rounded(on)

    def macs(vals):
        return float(expected(spec, {n: vals[n] for n in unit}, {n: vals[n] for n in layer})[0]) / dense_macs

    def with_flips(cands, k, value):
        vals = {n: t.clone() for n, t in on.items()}
        for n, i in cands[:k]:
            vals[n][i] = value
        return rounded(vals)

    order = [(float(thetas[n][i]), n, i) for n in thetas for i in range(thetas[n].numel())]
    # MACs fall monotonically with every flip to 0 (rise with every flip to 1): bisect the count
    if macs(with_flips([], 0, 0.0)) > target:  # cut more: the fewest of the lowest-theta kept ones
        cands = [(n, i) for t, n, i in sorted(order) if on[n][i] > 0]
        k = bisect.bisect_left(range(len(cands) + 1), True,
                               key=lambda k: macs(with_flips(cands, k, 0.0)) <= target)
        return with_flips(cands, min(k, len(cands)), 0.0)
    # keep more: as many of the highest-theta cut ones as stay within the target
    cands = [(n, i) for t, n, i in sorted(order, reverse=True) if on[n][i] == 0]
    k = bisect.bisect_left(range(len(cands) + 1), True,
                           key=lambda k: macs(with_flips(cands, k, 1.0)) > target)
    return with_flips(cands, k - 1, 1.0)
