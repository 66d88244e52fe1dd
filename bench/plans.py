"""The spec-level uniform cut the benches share (``bench/bench_model.py``, ``bench/gpu_suite.py``).

Run or imported with the bench folder on ``sys.path`` (a script's own folder is; ``gpu_suite.py``
adds it).
"""

from __future__ import annotations

from system.models.spec import ArchSpec
from system.pruning.complexity import count, unit_gate_name
from system.pruning.surgery import PrunePlan, plan_spec


def uniform_plan(spec: ArchSpec, keep: float, round_to: int = 1) -> PrunePlan:
    """Cut every inner width ``n`` of every kept block to ``round(keep * n)`` rounded to a multiple of
    ``round_to`` (at least ``round_to``, at most ``n``), dropping the trailing channels."""
    units = {}
    for name, _, _, blk in spec.iter_blocks():
        if blk.removed:
            continue
        for i, n in enumerate(blk.inner):
            k = min(n, max(round_to, round_to * round(keep * n / round_to)))
            if k < n:
                units[unit_gate_name(name, i)] = tuple(range(k, n))
    return PrunePlan(units=units)


def plan_for_macs(spec: ArchSpec, target: float, round_to: int = 1) -> tuple[PrunePlan, float, float]:
    """``(plan, MACs ratio, keep)``: the uniform cut whose MACs are closest to ``target`` x dense
    (bisection on the keep fraction)."""
    dense = count(spec)[0]

    def ratio(keep: float) -> float:
        return count(plan_spec(spec, uniform_plan(spec, keep, round_to))[0])[0] / dense

    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if ratio(mid) > target:
            hi = mid
        else:
            lo = mid
    keep = min((lo, hi), key=lambda k: abs(ratio(k) - target))
    return uniform_plan(spec, keep, round_to), ratio(keep), keep
