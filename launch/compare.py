"""Compare finished runs: one row per run, and accuracy against MACs with the Pareto front.

Usage::

    python -m launch.compare                                  # embedded store runs/mlflow.db
    python -m launch.compare --tracking-uri http://127.0.0.1:5000 --experiment r50 --json
    python -m launch.compare --plot runs/pareto.png

Reads the ``final.*`` metrics and the ``method``/``model`` tags that the training loop logs at
the end of a run (names in ``system.tracking``).  Only runs with status FINISHED are listed.
"""

from __future__ import annotations

import argparse
import json
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


def row_from_run(run: Any) -> RunRow:
    """Build a row from an ``mlflow.entities.Run``."""
    m, tags = run.data.metrics, run.data.tags
    f = {k: m.get(T.FINAL_PREFIX + k) for k in T.FINAL_KEYS}
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


def plot_pareto(rows: Sequence[RunRow], path: str | Path) -> Path:
    """Top-1 against MACs for every run with both, the Pareto front highlighted and joined."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    pts = [r for r in rows if r.macs is not None and r.top1 is not None]
    xy = [(r.macs / 1e9, r.top1) for r in pts]
    front = pareto_front(xy)
    fig = Figure(figsize=(8, 5.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if xy:
        ax.scatter([x for x, _ in xy], [y for _, y in xy], s=30, color="0.6", label="runs", zorder=2)
        ax.plot([xy[i][0] for i in front], [xy[i][1] for i in front], "-o", color="tab:red",
                markersize=8, linewidth=1.5, label="Pareto front", zorder=3)
        for r, (x, y) in zip(pts, xy):
            ax.annotate(r.run_name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("inference MACs (G)")
    ax.set_ylabel("top-1 (fraction of the test set)")
    ax.set_title("Accuracy vs MACs")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=100)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.compare", description=__doc__.split("\n")[0])
    p.add_argument("--tracking-uri", default="",
                   help="MLflow URI (default: the embedded store <runs-root>/mlflow.db)")
    p.add_argument("--experiment", default=T.TrackingConfig().experiment)
    p.add_argument("--runs-root", default="runs")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--plot", default=None, metavar="PATH", help="write the accuracy-vs-MACs PNG here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    uri = args.tracking_uri or T.local_store_uri(args.runs_root)
    if not args.tracking_uri and not (Path(args.runs_root) / "mlflow.db").is_file():
        raise SystemExit(f"compare: no runs recorded yet: {Path(args.runs_root) / 'mlflow.db'} "
                         "does not exist (pass --runs-root or --tracking-uri)")
    rows = load_rows(uri, args.experiment)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        print(format_table(rows) if rows else f"no finished runs in experiment {args.experiment!r} at {uri}")
    if args.plot:
        plot_pareto(rows, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
