"""Tables and statistics for ``launch.compare``: the per-run table, groups over seeds, the
matched-budget table and the paired-by-seed differences to a reference method.

Example::

    groups = group_runs(rows)
    print(matched_table(groups))
    print(paired_table(paired_differences(rows, reference="taylor")))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from launch.compare_runs import RunRow


def _fmt(v: Any, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "giga":
        return f"{v / 1e9:.3f}G"
    if kind == "mega":
        return f"{v / 1e6:.2f}M"
    if kind == "pct":
        return f"{v:.1f}%"
    if kind == "frac":
        return f"{v:.0%}"
    if kind == "acc":
        return f"{v:.2f}"
    if kind == "int":
        return f"{v:.0f}"
    if kind == "time":
        h, rem = divmod(round(v), 3600)
        return f"{h}:{rem // 60:02d}:{rem % 60:02d}"
    return str(v)


COLUMNS = (  # header, field, format
    ("run", "run_name", "str"), ("method", "method", "str"), ("model", "model", "str"),
    ("steps", "steps", "int"), ("target", "target_macs", "frac"),
    ("top1", "top1", "acc"), ("MACs", "macs", "giga"), ("params", "params", "mega"),
    ("MACs removed", "macs_removed_pct", "pct"), ("blocks removed", "blocks_removed", "int"),
    ("train MACs vs dense", "train_macs_pct", "pct"), ("wall", "wall_s", "time"),
)


def format_table(rows: Sequence[RunRow]) -> str:
    """Fixed-width text table, one line per run."""
    cells = [[h for h, _, _ in COLUMNS]]
    cells += [[_fmt(getattr(r, f), k) for _, f, k in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = []
    for n, line in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if COLUMNS[i][2] == "str" else c.rjust(w)
                               for i, (c, w) in enumerate(zip(line, widths))).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


@dataclass(frozen=True)
class Group:
    """The runs of one dataset x method x budget, over seeds."""

    dataset: str
    method: str
    budget: float | None       # the target MACs fraction, or None (dense, EGP)
    setting: str | None
    n: int
    top1: float                # mean over seeds
    top1_spread: float         # half the range over seeds (0 for one seed)
    macs_pct: float            # real MACs landed on, % of dense (mean)
    macs_pct_spread: float
    train_macs_pct: float | None
    wall_vs_dense: float | None  # mean wall-clock / the dense runs' mean wall-clock
    blocks_removed: float | None = None  # mean over seeds
    latency_ratio_b1: float | None = None  # mean over seeds (None where no run measured it)
    latency_ratio_b64: float | None = None


def _mean_half(values: list[float]) -> tuple[float, float]:
    return sum(values) / len(values), (max(values) - min(values)) / 2.0


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


#: two-sided 95% quantiles of Student's t by degrees of freedom (beyond 30: the normal's 1.96)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 25: 2.060, 30: 2.042}


def t975(df: int) -> float:
    """The two-sided 95% quantile of Student's t with ``df`` degrees of freedom."""
    if df in _T975:
        return _T975[df]
    return next((_T975[k] for k in sorted(_T975) if k >= df), 1.96)


@dataclass(frozen=True)
class Paired:
    """A method's top-1 minus the reference method's, paired by seed, at one dataset and budget."""

    dataset: str
    budget: float
    method: str
    reference: str
    n: int             # seeds both methods ran
    mean: float        # mean paired difference (fraction, not %)
    low: float | None  # 95% t-interval (None with one seed)
    high: float | None
    code_versions: tuple[str, ...] = ()  # of the paired runs, both methods' ("unrecorded" for a run without it)
    hardware: tuple[str, ...] = ()

    @property
    def seed_only(self) -> bool:
        """True when the paired runs came from more than one code version or processor: a seed's two runs
        then share initial weights and data order but not their arithmetic, and training amplifies the
        difference, so the pairs remove less of the seeds' spread than pairs made in one place."""
        return len(self.code_versions) > 1 or len(self.hardware) > 1


def setting_labels(rows: Sequence[RunRow]) -> dict[int, str]:
    """What a run is compared within, by ``id(row)``: its dataset, and, when the rows hold more than one
    model, the model too (``fmnist-4k resnet56``), so that runs of two networks on one dataset, which
    share seeds, budgets and method names, are never averaged or paired together."""
    several = len({r.model for r in rows}) > 1
    return {id(r): f"{r.dataset or '-'} {r.model or '-'}" if several else (r.dataset or "-") for r in rows}


def paired_differences(rows: Sequence[RunRow], reference: str = "taylor") -> list[Paired]:
    """For every dataset and budget, every method's per-seed top-1 difference to ``reference``
    (the same seed: the same initial weights and data order), with its mean and 95% interval.  A
    reference that runs without a target (``dense``) is paired with every budget through its own runs."""
    by: dict[tuple, dict[int, RunRow]] = {}
    label = setting_labels(rows)
    for r in rows:
        if r.top1 is None or r.seed is None or (r.target_macs is None and r.method != reference):
            continue
        by.setdefault((label[id(r)], r.target_macs, r.method or "-"), {})[r.seed] = r
    out = []
    for (ds, budget, method), seeds in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0.0, kv[0][2])):
        ref = by.get((ds, budget, reference)) or by.get((ds, None, reference))
        if method == reference or not ref:
            continue
        both = [(seeds[s], ref[s]) for s in sorted(seeds) if s in ref]
        d = [float(a.top1 or 0.0) - float(b.top1 or 0.0) for a, b in both]  # rows without top-1 were left out
        if not d:
            continue
        runs = [r for pair in both for r in pair]
        versions = tuple(sorted({r.code_version or "unrecorded" for r in runs}))
        machines = tuple(sorted({r.hardware or "unrecorded" for r in runs}))
        mean = sum(d) / len(d)
        low = high = None
        if len(d) > 1:
            sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
            half = t975(len(d) - 1) * sd / math.sqrt(len(d))
            low, high = mean - half, mean + half
        out.append(Paired(ds, budget, method, reference, len(d), mean, low, high, versions, machines))
    return out


def paired_table(pairs: Sequence[Paired]) -> str:
    """Per dataset: one row per method, one column per budget, ``+0.35 [-0.20, +0.90] (3)`` in points."""
    lines = []
    for ds in sorted({p.dataset for p in pairs}):
        ps = [p for p in pairs if p.dataset == ds]
        budgets = sorted({p.budget for p in ps})
        ref = ps[0].reference
        header = ["method"] + [f"vs {ref} at {b:.0%}" for b in budgets]
        cells = [header]
        for m in sorted({p.method for p in ps}):
            row = [m]
            for b in budgets:
                p = next((p for p in ps if p.method == m and p.budget == b), None)
                if p is None:
                    row.append("-")
                    continue
                mark = "*" if p.seed_only else ""
                if p.low is None or p.high is None:
                    row.append(f"{100 * p.mean:+.2f} ({p.n}){mark}")
                else:
                    row.append(f"{100 * p.mean:+.2f} [{100 * p.low:+.2f}, {100 * p.high:+.2f}] ({p.n}){mark}")
            cells.append(row)
        lines += _aligned(f"dataset {ds}: top-1 minus {ref}'s, paired by seed, in points: mean [95% t-interval] "
                          f"(seeds)", cells)
        mixed = [p for p in ps if p.seed_only]
        if mixed:
            versions = sorted({v for p in mixed for v in p.code_versions})
            machines = sorted({h for p in mixed for h in p.hardware})
            lines[-1:] = [f"* paired in seed only: those runs came from {len(versions)} code version(s) "
                          f"({', '.join(versions)}) and {len(machines)} processor(s) ({'; '.join(machines)}); "
                          "a seed's runs share initial weights and data order, not their arithmetic", ""]
    return "\n".join(lines).rstrip()


def _aligned(title: str, cells: list[list[str]]) -> list[str]:
    """``title``, then ``cells`` as left-aligned columns with a rule under the header row, then a blank line."""
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = [title]
    for n, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines + [""]


def group_runs(rows: Sequence[RunRow]) -> list[Group]:
    """Aggregate runs over seeds: one group per dataset (and model, :func:`setting_labels`), method and
    budget (or EGP setting)."""
    keyed: dict[tuple, list[RunRow]] = {}
    label = setting_labels(rows)
    for r in rows:
        if r.top1 is None or r.macs_removed_pct is None:
            continue
        keyed.setdefault((label[id(r)], r.method or "-", r.target_macs, r.setting), []).append(r)
    dense_wall: dict[str, float] = {}
    for (ds, method, target, _), rs in keyed.items():
        if target is None and method in ("dense", "none"):
            walls = [r.wall_s for r in rs if r.wall_s]
            if walls:
                dense_wall[ds] = sum(walls) / len(walls)
    out = []
    for (ds, method, target, setting), rs in sorted(keyed.items(), key=lambda kv: (
            kv[0][0], kv[0][1], -1.0 if kv[0][2] is None else kv[0][2], kv[0][3] or "")):
        top1, top1_s = _mean_half([r.top1 for r in rs if r.top1 is not None])
        macs, macs_s = _mean_half([100.0 - r.macs_removed_pct for r in rs if r.macs_removed_pct is not None])
        tm = [r.train_macs_pct for r in rs if r.train_macs_pct is not None]
        walls = [r.wall_s for r in rs if r.wall_s]
        wall = (sum(walls) / len(walls)) / dense_wall[ds] if walls and ds in dense_wall else None
        out.append(Group(ds, method, target, setting, len(rs), top1, top1_s, macs, macs_s,
                         sum(tm) / len(tm) if tm else None, wall, _mean([r.blocks_removed for r in rs]),
                         _mean([r.latency_ratio_b1 for r in rs]), _mean([r.latency_ratio_b64 for r in rs])))
    return out


def matched_table(groups: Sequence[Group]) -> str:
    """Top-1 at matched budgets: per dataset, one row per method, one column per target.

    A cell is ``top1 +- half-range (n) @ real MACs% B<blocks removed> L<latency b1>/<b64>`` (latency
    as a ratio to dense, measured on the CPU at batch 1 and 64; ``L?`` where no run measured it); the
    best mean of each column is marked with ``*``.  Runs without a target (dense, EGP) are listed
    under ``own`` with their real MACs.
    """
    lines = []
    for ds in sorted({g.dataset for g in groups}):
        gs = [g for g in groups if g.dataset == ds]
        budgets = sorted({g.budget for g in gs if g.budget is not None})
        methods = sorted({g.method for g in gs}, key=lambda m: (m not in ("dense", "none"), m))
        best = {b: max((g.top1 for g in gs if g.budget == b), default=None) for b in budgets}
        header = ["method"] + [f"MACs target {b:.0%}" for b in budgets] + ["own operating point", "train MACs",
                                                                          "wall vs dense"]
        cells = [header]
        for m in methods:
            row = [m]
            for b in budgets:
                g = next((g for g in gs if g.method == m and g.budget == b), None)
                row.append("-" if g is None else
                           f"{100 * g.top1:.2f}+-{100 * g.top1_spread:.2f} ({g.n}) @{g.macs_pct:.0f}%"
                           + ("*" if g.top1 == best[b] else "") + _extras(g))
            own = [g for g in gs if g.method == m and g.budget is None]
            row.append("; ".join(f"{100 * g.top1:.2f}+-{100 * g.top1_spread:.2f} ({g.n}) @{g.macs_pct:.0f}%"
                                 + (f" [{g.setting}]" if g.setting else "") for g in own) or "-")
            mine = [g for g in gs if g.method == m]
            tm = [g.train_macs_pct for g in mine if g.train_macs_pct is not None]
            wl = [g.wall_vs_dense for g in mine if g.wall_vs_dense is not None]
            row.append(f"{min(tm):.0f}-{max(tm):.0f}%" if tm else "-")
            row.append(f"x{min(wl):.2f}-{max(wl):.2f}" if wl else "-")
            cells.append(row)
        lines += _aligned(f"dataset {ds}: top-1 % (mean +- half-range over seeds, (runs) @ real MACs % of dense; "
                          f"* best at that target)", cells)
    return "\n".join(lines).rstrip()


def _extras(g: Group) -> str:
    blocks = "" if g.blocks_removed is None else f" B{g.blocks_removed:.1f}"
    if g.latency_ratio_b1 is None and g.latency_ratio_b64 is None:
        return blocks + " L?"
    fmt = lambda v: "?" if v is None else f"{v:.2f}"  # noqa: E731
    return blocks + f" L{fmt(g.latency_ratio_b1)}/{fmt(g.latency_ratio_b64)}"
