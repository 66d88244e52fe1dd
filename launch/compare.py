"""Compare finished runs: one row per run, and accuracy against MACs with the Pareto front.

Usage::

    python -m launch.compare                                  # embedded store runs/mlflow.db
    python -m launch.compare --tracking-uri http://127.0.0.1:5000 --experiment r50 --json
    python -m launch.compare --plot runs/pareto.png
    python -m launch.compare --runs-root runs/study --experiment study --budgets --plot runs/study_pareto.png

Reads the ``summary/*`` metrics (``final.*`` of older runs) and the ``method``/``model`` tags that
the training loop logs at the end of a run (names in ``system.tracking``), and the run's ``method.target_macs``,
``train.seed`` and ``data.root`` parameters.  Only runs with status FINISHED are listed.

``--budgets`` groups the runs by dataset, method and budget (``method.target_macs``; EGP by its
iteration count), and prints top-1 at matched budgets as mean +- half the range over seeds, the
real MACs each group landed on, and training MACs and wall-clock against the dense runs of the
same dataset.  With ``--plot`` it draws one Pareto front per method (mean over seeds, error bars
spanning the seeds), one panel per dataset.

The work lives beside this command line: reading runs in ``launch.compare_runs``, tables and statistics in
``launch.compare_tables``, plots in ``launch.compare_plot``; their public names are importable from here too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from launch.compare_plot import PLOT_X, pareto_figure, pareto_front, plot_fronts, plot_pareto
from launch.compare_runs import RunRow, load_rows, row_from_run
from launch.compare_tables import (
    COLUMNS,
    Group,
    Paired,
    format_table,
    group_runs,
    matched_table,
    paired_differences,
    paired_table,
    t975,
)
from system import tracking as T

__all__ = ["COLUMNS", "PLOT_X", "Group", "Paired", "RunRow", "format_table", "group_runs", "load_rows", "main",
           "matched_table", "paired_differences", "paired_table", "pareto_figure", "pareto_front", "plot_fronts",
           "plot_pareto", "row_from_run", "sync", "t975"]

log = logging.getLogger("launch.compare")


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
    p = argparse.ArgumentParser(prog="parsimony-compare", description=__doc__.split("\n")[0])
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
                        "with a 95%% interval (default: taylor; a method without a target, e.g. dense, "
                        "pairs with every budget)")
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
        items = [asdict(g) for g in groups] + [{"paired": {**asdict(p), "seed_only": p.seed_only}} for p in pairs]
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
