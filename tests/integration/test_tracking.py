"""Tracking against a real MLflow server and the embedded sqlite store."""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path

import pytest

from system.config import ConfigError, from_dict
from system.tracking import (
    FINAL_PREFIX,
    MODEL_MACS,
    SUMMARY_ARTIFACT,
    TAG_FALLBACK,
    TAG_METHOD,
    TRAIN_LOSS,
    VAL_TOP1,
    MLflowTracker,
    NullTracker,
    Tracker,
    TrackingConfig,
    TrackingUnavailable,
    final_metrics,
    local_store_uri,
    make_tracker,
    plot_layer_widths,
)
from tests.mlflow_server import TEST_CLIENT_ENV, MlflowServer, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _fast_client(monkeypatch):
    for k, v in TEST_CLIENT_ENV.items():
        monkeypatch.setenv(k, v)


def _cfg(uri: str = "", **kw) -> TrackingConfig:
    kw.setdefault("experiment", f"exp-{uuid.uuid4().hex[:8]}")
    return TrackingConfig(uri=uri, request_retries=0, request_timeout=5, connect_timeout=2, **kw)


def _client(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


@pytest.fixture(params=["server", "local"])
def store(request, tmp_path):
    """(config uri, uri to read back from, runs_root) for both backends."""
    if request.param == "server":
        server = request.getfixturevalue("mlflow_server")
        return server.uri, server.uri, tmp_path
    return "", local_store_uri(tmp_path), tmp_path


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="tracking.uri"):
        from_dict(TrackingConfig, {"uri": "localhost:5000"}, prefix="tracking")
    with pytest.raises(ConfigError, match="tracking.request_retries"):
        from_dict(TrackingConfig, {"request_retries": -1}, prefix="tracking")
    with pytest.raises(ConfigError, match="tracking.bogus"):
        from_dict(TrackingConfig, {"bogus": 1}, prefix="tracking")
    assert from_dict(TrackingConfig, {"uri": "http://h:5000", "fallback_local": True}).fallback_local


def test_make_tracker_picks_once_by_rank(tmp_path):
    assert isinstance(make_tracker(TrackingConfig(), 0, tmp_path), MLflowTracker)
    assert isinstance(make_tracker(TrackingConfig(), 1, tmp_path), NullTracker)
    assert isinstance(make_tracker(TrackingConfig(enabled=False), 0, tmp_path), NullTracker)
    for t in (MLflowTracker(TrackingConfig(), tmp_path), NullTracker()):
        assert isinstance(t, Tracker)
    null = NullTracker()
    assert null.start("x", {"a": 1}, {}, run_id="abc") == "abc"
    null.log_metrics({"a": 1.0}, step=0)
    null.end()
    assert null.dropped == 0 and not any(tmp_path.iterdir())


def test_final_metrics_names():
    out = final_metrics({"top1": 75.5, "macs": 2e9, "wall_s": 10, "other": 1, "params": None})
    assert out == {"summary/top1": 75.5, "summary/macs": 2e9, "summary/wall_s": 10.0}
    assert final_metrics({"macs_pct": 48.5}) == {"summary/macs_pct": 48.5}  # the runs table's MACs column
    # summary.json's time_s: one metric per part of the wall-clock
    assert final_metrics({"time_s": {"steps": 8.0, "eval": 1.5}}) == {"summary/time_steps_s": 8.0,
                                                                     "summary/time_eval_s": 1.5}


def test_log_and_read_back(store):
    cfg_uri, read_uri, runs_root = store
    cfg = _cfg(cfg_uri)
    tracker = make_tracker(cfg, 0, runs_root)
    run_id = tracker.start("r50-gate", params={"optim.lr": 0.1, "prune.layers": [1, 2], "name": "x"},
                           tags={TAG_METHOD: "gate", "world_size": 2})
    assert tracker.run_id == run_id
    for step in range(3):
        tracker.log_metrics({TRAIN_LOSS: 2.0 - step, VAL_TOP1: float("nan")}, step=step)
    tracker.log_metrics({MODEL_MACS: 4.1e9}, step=2)
    tracker.log_metrics(final_metrics({"top1": 71.25, "macs": 2e9}), step=3)
    extra = runs_root / "notes.txt"
    extra.write_text("hello")
    tracker.log_artifact(extra, "misc")
    tracker.log_dict({"top1": 71.25, "blocks_removed": 2}, SUMMARY_ARTIFACT)
    from matplotlib.figure import Figure
    fig = Figure()
    fig.add_subplot(1, 1, 1).plot([0, 1], [1, 0])
    tracker.log_figure(fig, "plots/curve.png")
    tracker.end("FINISHED")
    assert tracker.dropped == 0

    client = _client(read_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r50-gate"
    assert run.data.params == {"optim.lr": "0.1", "prune.layers": "[1, 2]", "name": "x"}
    assert run.data.tags[TAG_METHOD] == "gate" and run.data.tags["world_size"] == "2"
    hist = client.get_metric_history(run_id, TRAIN_LOSS)
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == [(0, 2.0), (1, 1.0), (2, 0.0)]
    assert VAL_TOP1 not in run.data.metrics          # NaN is skipped, not sent
    assert run.data.metrics[FINAL_PREFIX + "top1"] == 71.25
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"misc", SUMMARY_ARTIFACT, "plots"} <= names
    local = client.download_artifacts(run_id, SUMMARY_ARTIFACT, str(runs_root / "dl"))
    assert json.loads(Path(local).read_text()) == {"blocks_removed": 2, "top1": 71.25}
    png = Path(client.download_artifacts(run_id, "plots/curve.png", str(runs_root / "dl")))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if cfg_uri == "":
        # the embedded store keeps its database and artifacts under runs_root, not in cwd
        assert (runs_root / "mlflow.db").is_file()
        assert any((runs_root / "mlartifacts").rglob(SUMMARY_ARTIFACT))


def test_resume_continues_the_same_run(store):
    cfg_uri, read_uri, runs_root = store
    cfg = _cfg(cfg_uri)
    first = make_tracker(cfg, 0, runs_root)
    run_id = first.start("requeued", params={"optim.lr": 0.1}, tags={TAG_METHOD: "l1"})
    for step in range(3):
        first.log_metrics({TRAIN_LOSS: float(step)}, step=step)
    first.end("KILLED")                                   # preempted
    assert _client(read_uri).get_run(run_id).info.status == "KILLED"

    second = make_tracker(cfg, 0, runs_root)              # the requeued job
    assert second.start("requeued", params={"optim.lr": 0.1}, tags={TAG_METHOD: "l1"},
                        run_id=run_id) == run_id
    assert _client(read_uri).get_run(run_id).info.status == "RUNNING"
    for step in range(3, 6):
        second.log_metrics({TRAIN_LOSS: float(step)}, step=step)
    second.end("FINISHED")

    client = _client(read_uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    assert runs[0].info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run_id, TRAIN_LOSS))
    assert steps == [0, 1, 2, 3, 4, 5]
    assert second.dropped == 0


def test_resume_unknown_run_is_an_error(tmp_path):
    tracker = make_tracker(_cfg(), 0, tmp_path)
    with pytest.raises(KeyError, match="0123456789abcdef"):
        tracker.start("x", run_id="0123456789abcdef")


def test_unreachable_server_is_a_clear_error(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    tracker = make_tracker(_cfg(uri), 0, tmp_path)
    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailable) as info:
        tracker.start("x", params={"a": 1})
    assert time.monotonic() - t0 < 10
    assert uri in str(info.value) and "fallback_local" in str(info.value)
    assert info.value.uri == uri
    assert not (tmp_path / "mlflow.db").exists()          # nothing recorded anywhere


def test_fallback_local_is_announced(tmp_path, caplog):
    uri = f"http://127.0.0.1:{free_port()}"
    tracker = make_tracker(_cfg(uri, fallback_local=True), 0, tmp_path)
    with caplog.at_level(logging.WARNING, logger="system.tracking"):
        run_id = tracker.start("fb", params={"a": 1}, run_id="feedfacefeedface")
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert uri in warnings and local_store_uri(tmp_path) in warnings
    assert tracker.fell_back and tracker.uri == local_store_uri(tmp_path)
    tracker.log_metrics({TRAIN_LOSS: 1.5}, step=7)
    tracker.end()
    run = _client(local_store_uri(tmp_path)).get_run(run_id)
    assert run.data.tags[TAG_FALLBACK] == uri
    assert run.data.tags["parsimony.resumed_from"] == "feedfacefeedface"
    assert run.data.metrics[TRAIN_LOSS] == 1.5 and run.info.status == "FINISHED"


def test_server_killed_mid_run_keeps_training(tmp_path, caplog):
    server = MlflowServer(tmp_path / "server").start()
    try:
        run_dir = tmp_path / "run"
        tracker = make_tracker(_cfg(server.uri, retry_after_s=0.2), 0, tmp_path / "runs", run_dir=run_dir)
        run_id = tracker.start("doomed", params={"a": 1})
        tracker.log_metrics({TRAIN_LOSS: 0.0}, step=0)
        assert tracker.dropped == 0
        server.kill()                                      # SIGKILL, mid-run
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="system.tracking"):
            for step in range(1, 21):
                tracker.log_metrics({TRAIN_LOSS: float(step), VAL_TOP1: 50.0}, step=step)
                if step == 10:
                    time.sleep(0.25)                       # past retry_after_s: server tried again
            tracker.set_tags({"late": "tag"})
            tracker.log_dict({"top1": 50.0}, SUMMARY_ARTIFACT)
            tracker.end("FINISHED")
        assert time.monotonic() - t0 < 30
    finally:
        server.kill()
    assert tracker.dropped == 20 * 2 + 1 + 1
    spool = run_dir / "mlflow_unsent.jsonl"
    recs = [json.loads(line) for line in spool.read_text().splitlines()]
    steps = [r["step"] for r in recs if r["kind"] == "metrics"]
    assert steps == list(range(1, 21))
    assert all(r["metrics"] == {TRAIN_LOSS: float(r["step"]), VAL_TOP1: 50.0}
               for r in recs if r["kind"] == "metrics")
    art = [r for r in recs if r["kind"] == "artifact"]
    assert len(art) == 1 and json.loads(Path(art[0]["path"]).read_text()) == {"top1": 50.0}
    assert recs[-1] == {"kind": "end", "status": "FINISHED", "time": recs[-1]["time"]}
    summary = [r.getMessage() for r in caplog.records if "were not sent" in r.getMessage()]
    assert len(summary) == 1 and "42" in summary[0] and str(spool) in summary[0]
    assert run_id in summary[0]


def test_backlog_is_replayed_when_the_store_answers_again(tmp_path):
    """A real server killed, then started again on the same port and store: what the outage held back is
    delivered, in order, at the first log after it answers."""
    server = MlflowServer(tmp_path / "server").start()
    try:
        tracker = make_tracker(_cfg(server.uri, retry_after_s=0.0), 0, tmp_path / "runs", run_dir=tmp_path / "run")
        run_id = tracker.start("flaky")
        tracker.log_metrics({TRAIN_LOSS: 0.0}, step=0)
        server.kill()                                      # the server dies
        tracker.log_metrics({TRAIN_LOSS: 1.0}, step=1)
        tracker.log_metrics({TRAIN_LOSS: 2.0}, step=2)
        assert tracker.dropped == 2 and tracker.spool_path.is_file()
        server.start()                                     # and comes back: the same port, the same store
        tracker.log_metrics({TRAIN_LOSS: 3.0}, step=3)
        assert tracker.dropped == 0 and not tracker.spool_path.exists()
        tracker.end()
        hist = _client(server.uri).get_metric_history(run_id, TRAIN_LOSS)
        assert sorted((m.step, m.value) for m in hist) == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0)]
    finally:
        server.kill()


def test_logging_before_start_or_after_end_does_not_raise(tmp_path):
    tracker = make_tracker(_cfg(), 0, tmp_path)
    tracker.log_metrics({TRAIN_LOSS: 1.0}, step=0)
    tracker.log_artifact(tmp_path / "missing.txt")
    tracker.end()
    tracker.start("x")
    tracker.log_artifact(tmp_path / "missing.txt")
    tracker.log_dict({"not json": object()}, "bad.json")  # default=str makes it serialisable
    tracker.log_metrics({"bad": "abc"}, step=0)
    tracker.end()
    tracker.end()
    assert tracker.dropped == 0


def test_plot_layer_widths_writes_png(tmp_path):
    history = [
        (0, {"layer1.0.conv1": 64, "layer1.1.conv1": 64, "layer2.0.conv1": 128}),
        (100, {"layer1.0.conv1": 48, "layer1.1.conv1": 64, "layer2.0.conv1": 96}),
        (200, {"layer1.0.conv1": 40, "layer2.0.conv1": 80}),          # block layer1.1 removed
    ]
    out = plot_layer_widths(history, tmp_path / "sub" / "widths.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    from PIL import Image
    with Image.open(out) as im:
        assert im.size == (1000, 600)


def _chromium() -> str | None:
    import shutil
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="chromium not installed (Debian package `chromium`)")
def test_mlflow_ui_renders_runs(mlflow_server, tmp_path):
    """The MLflow UI (headless Chromium) shows our runs on its runs table and compare page."""
    import subprocess
    from urllib.parse import quote

    cfg = _cfg(mlflow_server.uri)
    ids = []
    for name, top1 in (("ui-dense-run", 76.25), ("ui-gate-run", 74.75)):
        tracker = make_tracker(cfg, 0, tmp_path)
        ids.append(tracker.start(name, tags={TAG_METHOD: name}))
        tracker.log_metrics({VAL_TOP1: top1}, step=1)
        tracker.end()
    exp_id = _client(mlflow_server.uri).get_experiment_by_name(cfg.experiment).experiment_id

    def dom(fragment: str) -> str:
        out = subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=15000", "--dump-dom",
             f"{mlflow_server.uri}/#/{fragment}"],
            capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    runs_page = dom(f"experiments/{exp_id}/runs")
    assert "ui-dense-run" in runs_page and "ui-gate-run" in runs_page
    compare = dom("compare-runs?runs=" + quote(json.dumps(ids)) + "&experiments=" + quote(json.dumps([exp_id])))
    assert "ui-dense-run" in compare and "ui-gate-run" in compare
    assert "76.25" in compare and "74.75" in compare


@pytest.mark.skipif(_chromium() is None, reason="chromium not installed (Debian package `chromium`)")
def test_the_runs_table_shows_top1_and_macs_through_the_printed_link(mlflow_server, tmp_path):
    """docs/tracking.md, "The runs table": the experiment link a run prints opens the runs table with
    the columns top-1, MACs %, latency, steps, wall time and method, best top-1 first (a shared view
    the tracker sets on the experiment); the bare experiment page shows none of them, which is why
    the view exists. A screenshot of the page is written too (headless Chromium)."""
    import subprocess

    cfg = _cfg(mlflow_server.uri)
    for name, top1, pct in (("table-a", 77.25, 31.5), ("table-b", 79.75, 48.5)):
        tracker = make_tracker(cfg, 0, tmp_path)
        tracker.start(name, tags={TAG_METHOD: "taylor"})
        tracker.log_metrics(final_metrics({"top1": top1, "macs_pct": pct, "steps": 310, "wall_s": 12.5,
                                           "latency_ratio_b1": 0.625}), step=310)
        link = tracker.experiment_url()
        tracker.end()

    def chromium(url: str, *mode: str) -> str:
        out = subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=15000", "--window-size=1600,900",
             *mode, url], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    page = chromium(link, "--dump-dom")
    for column in ("summary/top1", "summary/macs_pct", "summary/latency_ratio_b1", "summary/steps", "method"):
        assert column in page, column
    assert "79.75" in page and "48.5" in page and "0.625" in page
    assert page.index("table-b") < page.index("table-a")   # sorted by top-1, best first
    bare = chromium(link.split("&viewStateShareKey")[0], "--dump-dom")
    assert "table-a" in bare and "summary/top1" not in bare
    shot = tmp_path / "runs-table.png"
    chromium(link, f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def _open_store(uri: str, start: float) -> str:
    """One process opening the embedded store at ``start`` (a wall-clock time shared by all)."""
    from system.tracking.connection import connect
    time.sleep(max(0.0, start - time.time()))
    return connect(uri, "race", 5.0)[1]


def test_runs_starting_together_share_a_fresh_embedded_store(tmp_path):
    """Runs started at once on a new ``run.root`` (a local sweep, a study grid) all open its sqlite
    store: the schema is created once and every run gets the same experiment (without the lock, the
    second migration failed one run with "duplicate column name")."""
    import multiprocessing as mp
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with mp.get_context("spawn").Pool(4) as pool:
        start = time.time() + 8.0  # after the 4 interpreters have imported mlflow
        ids = pool.starmap(_open_store, [(uri, start)] * 4)
    assert len(set(ids)) == 1, ids
