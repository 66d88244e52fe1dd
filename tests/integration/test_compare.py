"""launch.compare: the run table, the JSON list, the Pareto plot and the front itself."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from launch.compare import RunRow, format_table, main, pareto_front
from system.tracking import (
    TAG_CODE_VERSION,
    TAG_DEVICE,
    TAG_HARDWARE,
    TAG_METHOD,
    TAG_MODEL,
    TAG_WORLD_SIZE,
    TRAIN_LOSS,
    TrackingConfig,
    final_metrics,
    make_tracker,
)
from tests.mlflow_server import TEST_CLIENT_ENV

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _fast_client(monkeypatch):
    for k, v in TEST_CLIENT_ENV.items():
        monkeypatch.setenv(k, v)


def test_pareto_front():
    # (MACs, top1): lower MACs and higher accuracy are better
    pts = [(4.0, 76.0), (2.0, 74.0), (3.0, 73.0), (1.0, 60.0), (4.0, 75.0), (2.0, 74.0),
           (5.0, 76.0), (math.nan, 99.0), (0.5, math.nan)]
    assert pareto_front(pts) == [3, 1, 0]
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 1.0)]) == [0]
    # every point off the front is dominated by one on it, and no front point dominates another
    front = pareto_front(pts)
    for i, (x, y) in enumerate(pts):
        if i in front or math.isnan(x) or math.isnan(y):
            continue
        assert any(pts[j][0] <= x and pts[j][1] >= y for j in front)
    for a in front:
        for b in front:
            assert a == b or not (pts[a][0] <= pts[b][0] and pts[a][1] >= pts[b][1])


def _log_run(cfg: TrackingConfig, runs_root: Path, name: str, method: str, summary: dict,
             finish: bool = True) -> str:
    """Simulate a training run the way the loop records its end: final.* metrics, tags, summary.json."""
    tracker = make_tracker(cfg, 0, runs_root)
    run_id = tracker.start(name, params={"method.name": method},
                           tags={TAG_METHOD: method, TAG_MODEL: "resnet50", TAG_WORLD_SIZE: 2,
                                 TAG_DEVICE: "cpu", TAG_CODE_VERSION: "test"})
    tracker.log_metrics({TRAIN_LOSS: 1.0}, step=0)
    if finish:
        tracker.log_metrics(final_metrics(summary), step=1)
        tracker.log_dict(summary, "summary.json")
        tracker.end("FINISHED")
    return run_id


DENSE = dict(top1=76.0, macs=4.0e9, params=25.0e6, macs_dense=4.0e9, params_dense=25.0e6,
             blocks_removed=0, channels_removed=0, train_macs=1.0e15, train_macs_dense=1.0e15, wall_s=3725,
             steps=300)
PRUNED = dict(top1=74.5, macs=1.0e9, params=10.0e6, macs_dense=4.0e9, params_dense=25.0e6,
              blocks_removed=3, channels_removed=1234, train_macs=6.0e14, train_macs_dense=1.0e15,
              wall_s=1800, steps=300)
WORSE = dict(PRUNED, top1=70.0, macs=2.0e9)   # more MACs and lower accuracy than PRUNED


def _populate(cfg: TrackingConfig, runs_root: Path) -> None:
    _log_run(cfg, runs_root, "dense", "dense", DENSE)
    _log_run(cfg, runs_root, "gate", "gate", PRUNED)
    _log_run(cfg, runs_root, "l1", "l1", WORSE)
    _log_run(cfg, runs_root, "crashed", "gate", PRUNED, finish=False)   # still RUNNING: not listed


def _check_rows(rows: list[dict]) -> None:
    assert [r["run_name"] for r in rows] == ["dense", "gate", "l1"]
    dense, gate = rows[0], rows[1]
    assert (dense["method"], dense["model"]) == ("dense", "resnet50")
    assert dense["top1"] == 76.0 and dense["macs_removed_pct"] == 0.0 and dense["train_macs_pct"] == 100.0
    assert gate["method"] == "gate" and gate["top1"] == 74.5
    assert gate["macs"] == 1.0e9 and gate["params"] == 10.0e6
    assert gate["macs_removed_pct"] == pytest.approx(75.0)
    assert gate["blocks_removed"] == 3
    assert gate["train_macs_pct"] == pytest.approx(60.0)
    assert gate["wall_s"] == 1800 and gate["steps"] == 300


def test_compare_embedded_store(tmp_path, capsys):
    cfg = TrackingConfig()                     # the default: sqlite under runs_root
    runs_root = tmp_path / "runs"
    _populate(cfg, runs_root)

    assert main(["--runs-root", str(runs_root), "--json"]) == 0
    _check_rows(json.loads(capsys.readouterr().out))

    plot = tmp_path / "pareto.png"
    assert main(["--runs-root", str(runs_root), "--plot", str(plot)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:6] == ["run", "method", "model", "steps", "target", "top1"]
    assert "MACs removed" in table[0] and "train MACs vs dense" in table[0]
    gate = next(line for line in table if line.startswith("gate "))
    assert gate.split() == ["gate", "gate", "resnet50", "300", "-", "74.50", "1.000G", "10.00M", "75.0%", "3",
                            "60.0%", "0:30:00"]
    assert len(table) == 2 + 3
    assert plot.read_bytes()[:8] == PNG


def test_compare_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no runs recorded yet"):
        main(["--runs-root", str(tmp_path / "nothing")])


def test_compare_cli_against_server(mlflow_server, tmp_path):
    experiment = f"cmp-{uuid.uuid4().hex[:8]}"
    cfg = TrackingConfig(uri=mlflow_server.uri, experiment=experiment, request_retries=0)
    _populate(cfg, tmp_path)
    plot = tmp_path / "front.png"
    env = dict(os.environ, **TEST_CLIENT_ENV)
    out = subprocess.run(
        [sys.executable, "-m", "launch.compare", "--tracking-uri", mlflow_server.uri,
         "--experiment", experiment, "--json", "--plot", str(plot)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    _check_rows(json.loads(out.stdout))
    assert plot.read_bytes()[:8] == PNG

    with pytest.raises(SystemExit, match="no experiment 'nope'"):
        main(["--tracking-uri", mlflow_server.uri, "--experiment", "nope"])


def test_format_table_handles_missing_values():
    from launch.compare import RunRow
    row = RunRow("id", "partial", None, None, 70.0, None, None, None, None, None, None)
    lines = format_table([row]).splitlines()
    assert lines[2].split() == ["partial", "-", "-", "-", "-", "70.00"] + ["-"] * 6


def test_pareto_plot_colours_methods_with_a_dense_reference_and_the_legend_outside(tmp_path):
    from launch.compare import pareto_figure, plot_pareto

    def row(name, method, top1, pct):
        return RunRow(run_id=name, run_name=name, method=method, model="resnet20", top1=top1,
                      macs=40e6 * pct / 100, params=None, macs_removed_pct=100 - pct, blocks_removed=None,
                      train_macs_pct=None, wall_s=None)

    rows = [row("d", "none", 0.92, 100), row("v1", "variational", 0.91, 50), row("v2", "variational", 0.89, 30),
            row("t1", "taylor", 0.90, 50), row("t2", "taylor", 0.85, 30)]
    fig = pareto_figure(rows)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "inference MACs (% of dense)"
    # colour encodes the method: one scatter per method, distinct colours
    scatters = {c.get_label(): tuple(c.get_facecolor()[0]) for c in ax.collections}
    assert set(scatters) == {"variational", "taylor"} and len(set(scatters.values())) == 2
    # the dense reference line at its top-1
    dense = [ln for ln in ax.get_lines() if ln.get_label().startswith("dense")]
    assert dense and dense[0].get_ydata()[0] == pytest.approx(92.0)
    # absolute MACs on a second axis
    assert any(getattr(a, "get_xlabel", lambda: "")() == "inference GMACs" for a in ax.child_axes)
    # the legend sits outside the axes (it never covers the points)
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 >= ax.get_window_extent().x1
    # every point is labelled with its run
    assert {t.get_text() for t in ax.texts} == {"v1", "v2", "t1", "t2"}
    # runs at nearly one MACs value: the axis still spans 0 to dense, it does not zoom to a sliver
    near = [row("d", "none", 0.92, 100), *(row(f"r{i}", "taylor", 0.9, 39.6 + 0.1 * i) for i in range(3))]
    lo, hi = pareto_figure(near).axes[0].get_xlim()
    assert lo == 0.0 and hi >= 100.0
    out = plot_pareto(rows, tmp_path / "p.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _log_study_run(cfg: TrackingConfig, runs_root: Path, method: str, target: float | None, seed: int,
                   top1: float, version: str = "c68d42c", hardware: str = "cpu: AMD EPYC, avx2 (torch 2.13.0)"):
    """A finished study run as the loop records it: the params compare groups by, its provenance tags."""
    params = {"method.name": method, "train.seed": seed, "data.root": "data/fmnist-4k"}
    if target is not None:
        params["method.target_macs"] = target
    tracker = make_tracker(cfg, 0, runs_root)
    tracker.start(f"{method}-{target}-{seed}", params=params,
                  tags={TAG_METHOD: method, TAG_MODEL: "resnet56", TAG_CODE_VERSION: version, TAG_HARDWARE: hardware})
    tracker.log_metrics(final_metrics(dict(PRUNED, top1=top1)), step=1)
    tracker.end("FINISHED")


def test_pairs_whose_runs_came_from_another_machine_or_code_are_flagged_as_paired_in_seed_only(tmp_path, capsys):
    """``--budgets``: a seed's runs share initial weights and data order, but a run made by another code version
    or on another processor does not share their arithmetic (session 21: the same commit and recipe on a new
    machine moved a ResNet-56 run by 1.84 points). Such pairs are marked, named in a footnote and in the JSON;
    pairs made in one place are not."""
    cfg, root = TrackingConfig(), tmp_path / "runs"
    for seed, (dense, taylor, comb) in enumerate([(0.848, 0.834, 0.842), (0.832, 0.863, 0.823), (0.821, 0.825, 0.812)]):
        _log_study_run(cfg, root, "dense", None, seed, dense)
        _log_study_run(cfg, root, "taylor", 0.7, seed, taylor)
        _log_study_run(cfg, root, "variational", 0.7, seed, comb,
                       hardware="cpu: Intel Xeon, avx512f (torch 2.13.0)" if seed == 1 else
                       "cpu: AMD EPYC, avx2 (torch 2.13.0)")
    assert main(["--runs-root", str(root), "--budgets", "--reference", "dense"]) == 0
    out = capsys.readouterr().out.splitlines()
    row = {ln.split()[0]: ln for ln in out if ln.startswith(("taylor ", "variational "))}
    assert row["taylor"].rstrip().endswith("(3)") and "*" not in row["taylor"]
    assert row["variational"].rstrip().endswith("(3)*")
    note = next(ln for ln in out if ln.startswith("* paired in seed only"))
    assert "1 code version(s) (c68d42c)" in note and "2 processor(s)" in note and "Intel Xeon, avx512f" in note

    assert main(["--runs-root", str(root), "--budgets", "--reference", "dense", "--json"]) == 0
    pairs = {p["paired"]["method"]: p["paired"] for p in json.loads(capsys.readouterr().out) if "paired" in p}
    assert pairs["taylor"]["seed_only"] is False
    assert pairs["taylor"]["hardware"] == ["cpu: AMD EPYC, avx2 (torch 2.13.0)"]
    assert pairs["variational"]["seed_only"] is True and len(pairs["variational"]["hardware"]) == 2
    assert pairs["variational"]["n"] == 3
    assert pairs["variational"]["mean"] == pytest.approx((-0.006 - 0.009 - 0.009) / 3)
