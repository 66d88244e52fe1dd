"""Plots for ``launch.compare``: accuracy against MACs with the Pareto front (one point per run), and
one front per method over seeds (one panel per dataset).  matplotlib is imported when a plot is drawn.

Example::

    plot_pareto(rows, "runs/pareto.png")
    plot_fronts(group_runs(rows), "runs/study_pareto.png", x="latency_b1")
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from launch.compare_runs import RunRow
from launch.compare_tables import Group


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: fewer (or equal) MACs and higher (or equal) accuracy.

    ``points`` are ``(macs, top1)``: lower x and higher y are better.  The result is ordered by
    increasing x (so joining it draws the front).  Of identical points only the first is kept;
    points with a NaN coordinate are never on the front.

    Example::

        pareto_front([(4.0, 76.0), (2.0, 74.0), (3.0, 73.0)])  # -> [1, 0]
    """
    order = sorted((i for i, (x, y) in enumerate(points) if not (math.isnan(x) or math.isnan(y))),
                   key=lambda i: (points[i][0], -points[i][1], i))
    front: list[int] = []
    best = -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


#: the Pareto plot's x axes: (label, Group attribute, scale to %)
PLOT_X = {"macs": ("inference MACs (% of dense)", "macs_pct", 1.0),
          "latency_b1": ("CPU latency at batch 1 (% of dense)", "latency_ratio_b1", 100.0),
          "latency_b64": ("CPU latency at batch 64 (% of dense)", "latency_ratio_b64", 100.0)}


def plot_fronts(groups: Sequence[Group], path: str | Path, x: str = "macs") -> Path:
    """One panel per dataset: each method's front (mean top-1 against the ``x`` axis of :data:`PLOT_X`, mean
    real MACs by default, over seeds; error bars spanning the seeds, on x for MACs only), dense as a horizontal
    band."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    datasets = sorted({g.dataset for g in groups}) or ["-"]
    fig = Figure(figsize=(6.5 * len(datasets), 5))
    FigureCanvasAgg(fig)
    for k, ds in enumerate(datasets):
        ax = fig.add_subplot(1, len(datasets), k + 1)
        gs = [g for g in groups if g.dataset == ds]
        label, attr, scale = PLOT_X[x]

        def xv(g: Group, attr: str = attr, scale: float = scale) -> float:
            v = getattr(g, attr)
            return math.nan if v is None else scale * v

        for m in sorted({g.method for g in gs}):
            pts = sorted((g for g in gs if g.method == m), key=xv)
            if m in ("dense", "none"):
                for g in pts:
                    ax.axhspan(100 * (g.top1 - g.top1_spread), 100 * (g.top1 + g.top1_spread), color="0.85")
                    ax.axhline(100 * g.top1, color="0.3", linestyle="--", linewidth=1, label=f"dense ({g.n} seeds)")
                continue
            ax.errorbar([xv(g) for g in pts], [100 * g.top1 for g in pts],
                        xerr=[g.macs_pct_spread for g in pts] if x == "macs" else None,
                        yerr=[100 * g.top1_spread for g in pts], marker="o", capsize=3, linewidth=1.3, label=m)
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"{ds}: accuracy vs MACs (mean over seeds)")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=100)
    return out


def pareto_figure(rows: Sequence[RunRow]):
    """Top-1 against MACs (% of dense) for every run with both: colour = method, the Pareto front
    joined, the dense runs as a reference line, absolute GMACs on a second axis, the legend outside."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pts = [r for r in rows if r.macs is not None and r.top1 is not None and r.macs_removed_pct is not None]
    fig = Figure(figsize=(9.5, 5.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    dense = [r for r in pts if (r.method or "") in ("dense", "none")]
    pruned = [r for r in pts if r not in dense]
    for r in dense:
        ax.axhline(100 * float(r.top1 or 0.0), color="0.3", linestyle="--", linewidth=1,
                   label=f"dense: {r.run_name}")
    methods = sorted({r.method or "?" for r in pruned})
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    xy = [(100.0 - float(r.macs_removed_pct or 0.0), 100 * float(r.top1 or 0.0)) for r in pruned]
    for m in methods:
        mine = [(x, y) for r, (x, y) in zip(pruned, xy) if (r.method or "?") == m]
        ax.scatter([x for x, _ in mine], [y for _, y in mine], s=36, color=colours[m], label=m, zorder=3)
    for r, (x, y) in zip(pruned, xy):  # every point says which run it is
        ax.annotate(r.run_name, (x, y), xytext=(4, 3), textcoords="offset points", fontsize=7, color="0.25")
    # the whole MACs range, dense (100%) included: runs at nearly one MACs value must not zoom to a sliver
    ax.set_xlim(0.0, max(102.0, *(x + 2.0 for x, _ in xy)) if xy else 102.0)
    front = pareto_front(xy)
    if front:
        ax.plot([xy[i][0] for i in front], [xy[i][1] for i in front], "-", color="0.2", linewidth=1.2,
                label="Pareto front", zorder=2)
    dense_macs = {float(r.macs or 0.0) / max(1e-9, 1 - float(r.macs_removed_pct or 0.0) / 100) for r in pts}
    if len({round(d) for d in dense_macs}) == 1:  # one dense network: its MACs in G on the top axis
        g_dense = dense_macs.pop() / 1e9

        def to_g(pct):
            return pct * g_dense / 100

        def to_pct(g):
            return g * 100 / g_dense

        top = ax.secondary_xaxis("top", functions=(to_g, to_pct))
        top.set_xlabel("inference GMACs")
    ax.set_xlabel("inference MACs (% of dense)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Accuracy vs MACs")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, borderaxespad=0.0)
    fig.tight_layout()
    return fig


def plot_pareto(rows: Sequence[RunRow], path: str | Path) -> Path:
    """:func:`pareto_figure` written to ``path`` (PNG)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    pareto_figure(rows).savefig(out, format="png", dpi=100)
    return out
