"""Compare finished runs: one row per run, and accuracy against MACs with the Pareto front.

Usage::

    python -m launch.compare                                  # embedded store runs/mlflow.db
    python -m launch.compare --tracking-uri http://127.0.0.1:5000 --experiment r50 --json
    python -m launch.compare --plot runs/pareto.png
    python -m launch.compare --runs-root runs/study --experiment study --budgets --plot docs/study.png

Reads the ``summary/*`` metrics (``final.*`` of older runs) and the ``method``/``model`` tags that
the training loop logs at the end of a run (names in ``system.tracking``), and the run's ``method.target_macs``,
``train.seed`` and ``data.root`` parameters.  Only runs with status FINISHED are listed.

``--budgets`` groups the runs by dataset, method and budget (``method.target_macs``; EGP by its
iteration count), and prints top-1 at matched budgets as mean +- half the range over seeds, the
real MACs each group landed on, and training MACs and wall-clock against the dense runs of the
same dataset.  With ``--plot`` it draws one Pareto front per method (mean over seeds, error bars
spanning the seeds), one panel per dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import logging
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from system import tracking as T

log = logging.getLogger("launch.compare")


@dataclass(frozen=True)
class RunRow:
    """One finished run as the comparison shows it; missing values are None."""

    run_id: str
    run_name: str
    method: str | None
    model: str | None
    top1: float | None
    macs: float | None
    params: float | None
    macs_removed_pct: float | None      # 100 * (1 - macs / macs_dense)
    blocks_removed: float | None
    train_macs_pct: float | None        # 100 * train_macs / train_macs_dense
    wall_s: float | None
    target_macs: float | None = None    # the run's method.target_macs
    seed: int | None = None
    dataset: str | None = None          # the last folder of data.root
    setting: str | None = None          # what else sets the operating point (EGP: its iterations)
    latency_ratio_b1: float | None = None   # the final network's CPU latency / the dense one's (batch 1)
    latency_ratio_b64: float | None = None  # (batch 64)


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


def _pct(num: float | None, den: float | None) -> float | None:
    return 100.0 * num / den if num is not None and den else None


def _int_or_none(v: float | None) -> int | None:
    return None if v is None else int(v)


def _num(text: str | None) -> float | None:
    try:
        return None if text in (None, "", "None") else float(text)
    except ValueError:
        return None


def row_from_run(run: Any) -> RunRow:
    """Build a row from an ``mlflow.entities.Run``."""
    m, tags, params = run.data.metrics, run.data.tags, getattr(run.data, "params", {}) or {}
    f = {k: m.get(T.FINAL_PREFIX + k, m.get(T.LEGACY_FINAL_PREFIX + k)) for k in T.FINAL_KEYS}
    removed = _pct(f["macs"], f["macs_dense"])
    return RunRow(
        run_id=run.info.run_id,
        run_name=run.info.run_name or tags.get("mlflow.runName", run.info.run_id),
        method=tags.get(T.TAG_METHOD),
        model=tags.get(T.TAG_MODEL),
        top1=f["top1"],
        macs=f["macs"],
        params=f["params"],
        macs_removed_pct=None if removed is None else 100.0 - removed,
        blocks_removed=f["blocks_removed"],
        train_macs_pct=_pct(f["train_macs"], f["train_macs_dense"]),
        wall_s=f["wall_s"],
        target_macs=_num(params.get("method.target_macs")),
        seed=_int_or_none(_num(params.get("train.seed"))),
        dataset=Path(params["data.root"]).name if params.get("data.root") else None,
        setting=(f"iterations={params.get('method.egp.iterations')}" if params.get("method.name") == "egp" else None),
        latency_ratio_b1=m.get(T.FINAL_PREFIX + "latency_ratio_b1"),
        latency_ratio_b64=m.get(T.FINAL_PREFIX + "latency_ratio_b64"),
    )


def load_rows(uri: str, experiment: str) -> list[RunRow]:
    """Rows of the FINISHED runs of ``experiment`` at ``uri``, oldest first.

    Raises:
        SystemExit: the store is unreachable or holds no such experiment (message names it).
    """
    if uri.startswith(("http://", "https://")):
        reason = T.http_reachable(uri, timeout=5.0)
        if reason is not None:
            raise SystemExit(f"compare: MLflow tracking server {uri} is unreachable ({reason})")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"compare: no experiment {experiment!r} in {uri}")
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time ASC"], max_results=50000)
    return [row_from_run(r) for r in runs]


def _fmt(v: Any, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "giga":
        return f"{v / 1e9:.3f}G"
    if kind == "mega":
        return f"{v / 1e6:.2f}M"
    if kind == "pct":
        return f"{v:.1f}%"
    if kind == "acc":
        return f"{v:.2f}"
    if kind == "int":
        return f"{v:.0f}"
    if kind == "time":
        h, rem = divmod(int(round(v)), 3600)
        return f"{h}:{rem // 60:02d}:{rem % 60:02d}"
    return str(v)


COLUMNS = (  # header, field, format
    ("run", "run_name", "str"), ("method", "method", "str"), ("model", "model", "str"),
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


def paired_differences(rows: Sequence[RunRow], reference: str = "taylor") -> list[Paired]:
    """For every dataset and budget, every method's per-seed top-1 difference to ``reference``
    (the same seed: the same initial weights and data order), with its mean and 95% interval."""
    by: dict[tuple, dict[int, float]] = {}
    for r in rows:
        if r.top1 is None or r.target_macs is None or r.seed is None:
            continue
        by.setdefault((r.dataset or "-", r.target_macs, r.method or "-"), {})[r.seed] = r.top1
    out = []
    for (ds, budget, method), seeds in sorted(by.items()):
        ref = by.get((ds, budget, reference))
        if method == reference or not ref:
            continue
        d = [seeds[s] - ref[s] for s in sorted(seeds) if s in ref]
        if not d:
            continue
        mean = sum(d) / len(d)
        low = high = None
        if len(d) > 1:
            sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
            half = t975(len(d) - 1) * sd / math.sqrt(len(d))
            low, high = mean - half, mean + half
        out.append(Paired(ds, budget, method, reference, len(d), mean, low, high))
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
                elif p.low is None or p.high is None:
                    row.append(f"{100 * p.mean:+.2f} ({p.n})")
                else:
                    row.append(f"{100 * p.mean:+.2f} [{100 * p.low:+.2f}, {100 * p.high:+.2f}] ({p.n})")
            cells.append(row)
        lines += _aligned(f"dataset {ds}: top-1 minus {ref}'s, paired by seed, in points: mean [95% t-interval] "
                          f"(seeds)", cells)
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
    """Aggregate runs over seeds: one group per dataset, method and budget (or EGP setting)."""
    keyed: dict[tuple, list[RunRow]] = {}
    for r in rows:
        if r.top1 is None or r.macs_removed_pct is None:
            continue
        keyed.setdefault((r.dataset or "-", r.method or "-", r.target_macs, r.setting), []).append(r)
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


#: the Pareto plot's x axes: (label, Group attribute, scale to %)
PLOT_X = {"macs": ("inference MACs (% of dense)", "macs_pct", 1.0),
          "latency_b1": ("CPU latency at batch 1 (% of dense)", "latency_ratio_b1", 100.0),
          "latency_b64": ("CPU latency at batch 64 (% of dense)", "latency_ratio_b64", 100.0)}


def plot_fronts(groups: Sequence[Group], path: str | Path, x: str = "macs") -> Path:
    """One panel per dataset: each method's front (mean top-1 against mean real MACs over seeds,
    error bars spanning the seeds), dense as a horizontal band."""
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

        def xv(g: Group) -> float:
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


def sync(run_dirs: Sequence[str], uri: str | None) -> int:
    """``--sync``: replay each run directory's backlog; 0 when every one was delivered."""
    failed = 0
    for d in run_dirs:
        try:
            n, status = T.sync_backlog(d, uri)
        except (FileNotFoundError, ValueError, T.TrackingUnavailable) as exc:
            print(f"error: {d}: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"{d}: {n} item(s) delivered" + (f", run marked {status}" if status else ""))
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.compare", description=__doc__.split("\n")[0])
    p.add_argument("--tracking-uri", default="",
                   help="MLflow URI (default: $MLFLOW_TRACKING_URI, else the embedded store "
                        "<runs-root>/mlflow.db)")
    p.add_argument("--experiment", default=None,
                   help="default: $MLFLOW_EXPERIMENT_NAME, else the tracking section's default")
    p.add_argument("--runs-root", default="runs")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--plot", default=None, metavar="PATH", help="write the accuracy-vs-MACs PNG here")
    p.add_argument("--budgets", action="store_true",
                   help="group over seeds: top-1 at matched budgets, per-method Pareto fronts (with --plot)")
    p.add_argument("--reference", default="taylor",
                   help="with --budgets: print every method's top-1 minus this method's, paired by seed, "
                        "with a 95%% interval (default: taylor)")
    p.add_argument("--plot-x", default="macs", choices=sorted(PLOT_X),
                   help="with --budgets --plot: the x axis (inference MACs, or the measured CPU latency)")
    p.add_argument("--sync", nargs="+", metavar="RUN_DIR", default=None,
                   help="deliver the tracking backlog (mlflow_unsent.jsonl) a store outage left in these run "
                        "directories, in order, and mark each run with its recorded end status")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.sync:
        return sync(args.sync, args.tracking_uri or None)

    args.experiment = args.experiment or T.experiment_name(T.TrackingConfig())
    args.tracking_uri = args.tracking_uri or os.environ.get(T.ENV_TRACKING_URI, "")
    uri = args.tracking_uri or T.local_store_uri(args.runs_root)
    if not args.tracking_uri and not (Path(args.runs_root) / "mlflow.db").is_file():
        raise SystemExit(f"compare: no runs recorded yet: {Path(args.runs_root) / 'mlflow.db'} "
                         "does not exist (pass --runs-root or --tracking-uri)")
    rows = load_rows(uri, args.experiment)
    # --budgets: groups over seeds, the matched-budget table and one front per method
    if args.budgets:
        groups = group_runs(rows)
        pairs = paired_differences(rows, args.reference)
        text = "\n\n".join(t for t in (matched_table(groups) if groups else "", paired_table(pairs)) if t)
        items = [asdict(g) for g in groups] + [{"paired": asdict(p)} for p in pairs]
        if args.plot:
            plot_fronts(groups, args.plot, args.plot_x)
    else:
        text, items = (format_table(rows) if rows else ""), [asdict(r) for r in rows]
        if args.plot:
            plot_pareto(rows, args.plot)
    if args.json:
        print(json.dumps(items, indent=2))
    else:
        print(text or f"no finished runs in experiment {args.experiment!r} at {uri}")
    if args.plot:
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
