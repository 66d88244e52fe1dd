"""Tracking end to end: REAL (tiny) training runs recorded in MLflow, read back through MlflowClient.

* a pruning run against a real ``mlflow server`` (the shared fixture) and against the embedded
  sqlite store: metric names, params, tags, artifacts, ``final.*`` metrics == ``summary.json``;
* ``launch.compare`` on the embedded store lists the run and draws the Pareto plot;
* a run stopped mid-way (``PARSIMONY_STOP_AFTER_STEP``, exit 75) and resumed with ``run.resume=auto``
  continues the SAME MLflow run; so does a run SIGKILLed before its first checkpoint and restarted;
* an unreachable server at start: ``launch.train`` fails before training, naming the URI; with
  ``tracking.fallback_local=true`` the fallback is announced and the run lands in the local store;
* a server SIGKILLed mid-run: training finishes, ``summary.json`` says how many items were not
  sent, a warning says where they are, the local JSONL backlog holds them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from system import tracking as T
from system.trainer import Trainer
from tests.methods_util import STRONG, tiny_config
from tests.mlflow_server import TEST_CLIENT_ENV, MlflowServer, free_port
from tests.procs import wait_for_stderr

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STEPS = 20
# Short client timeouts and no retries: the tracker sets MLFLOW_HTTP_REQUEST_* from these.
FAST = ["tracking.enabled=true", "tracking.request_retries=0", "tracking.request_timeout=5",
        "tracking.connect_timeout=2", "train.log_every_steps=2", "train.threads=1"]
METRICS = (T.TRAIN_LOSS, T.TRAIN_TOTAL_IPS, T.TRAIN_LR, T.TRAIN_CUMULATIVE_MACS, T.VAL_TOP1, T.VAL_TOP5,
           T.VAL_LOSS, T.MODEL_MACS, T.MODEL_PARAMS, T.PRUNE_EVENTS, T.PRUNE_CHANNELS_REMOVED,
           T.PRUNE_BLOCKS_REMOVED, T.PRUNE_REBUILD_S)


@pytest.fixture(autouse=True)
def _fast_client(monkeypatch):
    for k, v in TEST_CLIENT_ENV.items():
        monkeypatch.setenv(k, v)


def _exp() -> str:
    return f"train-{uuid.uuid4().hex[:8]}"


def _client(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _runs(client, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment!r} was not created"
    return client.search_runs([exp.experiment_id])


def _cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, **TEST_CLIENT_ENV, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("PARSIMONY_STOP_AFTER_STEP", None)
    env.update(extra)
    return env


def _cli_args(tmp_path: Path, *overrides: str) -> list[str]:
    """``tiny_config``'s overrides as a ``launch.train`` command line."""
    from tests.methods_util import TINY
    args = TINY + [f"run.root={tmp_path}", f"run.dir={tmp_path / 'run'}"] + list(overrides)
    return [sys.executable, "-m", "launch.train"] + args


def _train_cli(tmp_path: Path, *overrides: str, timeout: float = 180, **env: str):
    return subprocess.run(_cli_args(tmp_path, *overrides), cwd=REPO, env=_cli_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def _check_recorded_run(uri: str, summary: dict, run_dir: Path, tmp_path: Path, experiment: str) -> None:
    """Everything issue 7 says a finished pruning run records, read back from ``uri``."""
    client = _client(uri)
    runs = _runs(client, experiment)
    assert [r.info.run_id for r in runs] == [summary["run_id"]]
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    rid = run.info.run_id

    # metrics: every name, with values at real steps
    hist = {k: _history(client, rid, k) for k in METRICS}
    missing = [k for k, h in hist.items() if not h]
    assert not missing, f"metrics never logged: {missing}"
    loss_steps = [s for s, _ in hist[T.TRAIN_LOSS]]
    assert loss_steps == list(range(2, STEPS + 1, 2))
    assert all(v > 0 for _, v in hist[T.TRAIN_TOTAL_IPS])
    cum = [v for _, v in hist[T.TRAIN_CUMULATIVE_MACS]]
    assert cum == sorted(cum) and cum[0] > 0
    assert hist[T.VAL_TOP1][-1] == (STEPS, pytest.approx(summary["top1"]))
    assert max(v for _, v in hist[T.PRUNE_EVENTS]) == summary["prune_events"] >= 1
    assert hist[T.PRUNE_BLOCKS_REMOVED][-1][1] >= 1          # STRONG variational removes blocks
    # model/macs starts dense and drops at the first pruning event; never grows (in logging order: at
    # an event's step the interval's value comes before the event's)
    macs = [(m.step, m.value) for m in sorted(client.get_metric_history(rid, T.MODEL_MACS),
                                              key=lambda m: (m.step, m.timestamp))]
    assert macs[0] == (0, summary["macs_dense"])
    first_event = hist[T.PRUNE_EVENTS][0][0]
    at_event = [v for s, v in macs if s == first_event]
    assert at_event and at_event[-1] < summary["macs_dense"]
    assert [v for _, v in macs] == sorted((v for _, v in macs), reverse=True)
    assert macs[-1] == (STEPS, summary["macs"])
    params = [(m.step, m.value) for m in sorted(client.get_metric_history(rid, T.MODEL_PARAMS),
                                                key=lambda m: (m.step, m.timestamp))]
    assert params[0] == (0, summary["params_dense"])
    assert params[-1] == (STEPS, summary["params"])  # the deployed network's, logged last
    # the model's size at every log interval (a step function in the chart, the events visible)
    assert set(loss_steps) <= {s for s, _ in macs}
    assert len({v for _, v in macs}) >= 2
    # names in sections: "<section>/<name>"
    assert all("/" in k for k in run.data.metrics)
    ours = {"train", "val", "model", "prune", "summary"}
    assert ours <= {k.split("/")[0] for k in run.data.metrics} <= ours | {"system"}  # + MLflow's system metrics

    # final.* metrics are summary.json's values
    on_disk = json.loads((run_dir / "summary.json").read_text())
    finals = {k: v for k, v in run.data.metrics.items() if k.startswith(T.FINAL_PREFIX)}
    # ... and every latency figure the run measured (the final network against dense, on the CPU)
    latency = {k for k, v in on_disk.items() if k.startswith("latency_") and isinstance(v, (int, float))}
    assert {"latency_ratio_b1", "latency_ratio_b64", "latency_ms_b1"} <= latency
    # ... and the steps it trained (runs of other lengths compare apart)
    # ... and where the wall-clock went (summary.json's time_s)
    split = {f"time_{k}_s": v for k, v in on_disk["time_s"].items()}
    assert set(split) == {"time_steps_s", "time_eval_s", "time_prune_s", "time_checkpoint_s"}
    assert set(finals) == {T.FINAL_PREFIX + k for k in (*T.FINAL_KEYS, *latency, *split, "steps")}
    for k in (*T.FINAL_KEYS, *latency, "steps"):
        assert finals[T.FINAL_PREFIX + k] == pytest.approx(float(on_disk[k]), rel=1e-6), k
    for k, v in split.items():
        assert finals[T.FINAL_PREFIX + k] == pytest.approx(float(v), rel=1e-6), k

    # params: the whole resolved config, flattened
    p = run.data.params
    assert float(p["method.variational.nu"]) == 30
    assert p["method.name"] == "variational" and p["model.name"] == "resnet20"
    assert p["train.max_steps"] == str(STEPS) and p["data.batch_size"] == "16"
    assert p["run.dir"] == str(run_dir) and p["tracking.experiment"] == experiment
    # tags
    t = run.data.tags
    assert t[T.TAG_METHOD] == summary["method"] and t[T.TAG_MODEL] == "resnet20"
    assert t[T.TAG_WORLD_SIZE] == "1" and t[T.TAG_DEVICE] == "cpu"
    assert t[T.TAG_CODE_VERSION] == T.code_version() != "unknown"
    assert t[T.TAG_HARDWARE] == T.hardware("cpu") and t[T.TAG_HARDWARE].startswith("cpu: ")
    assert f"(torch {torch.__version__})" in t[T.TAG_HARDWARE]
    # MLflow's standard tags: who, from what source, which commit (the UI's "Created by" / "Source")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert t["mlflow.user"] and t["mlflow.source.name"] and t["mlflow.source.type"] == "LOCAL"
    assert t["mlflow.source.git.commit"] == head
    # the UI link in the summary opens the runs view
    if uri.startswith("http"):
        assert summary["mlflow_run_url"].startswith(f"{uri}/#/experiments/") and rid in summary["mlflow_run_url"]
        assert summary["mlflow_run_url"].endswith("?workflowType=machine_learning")

    # artifacts
    top = {a.path for a in client.list_artifacts(rid)}
    assert {"specs", "final", T.SUMMARY_ARTIFACT, T.LAYER_WIDTHS_ARTIFACT, T.CONFIG_ARTIFACT} <= top, top
    specs = sorted(a.path for a in client.list_artifacts(rid, "specs"))
    event_steps = [s for s, _ in hist[T.PRUNE_EVENTS]]
    assert [int(name[len("specs/step"):][:8]) for name in specs] == event_steps, specs
    assert all(name.endswith(".json") for name in specs)
    assert len(specs) == summary["prune_events"]
    assert {a.path for a in client.list_artifacts(rid, "final")} >= {"final/model.safetensors", "final/spec.json"}
    dl = tmp_path / f"download-{uuid.uuid4().hex[:6]}"
    dl.mkdir()
    got_summary = json.loads(Path(client.download_artifacts(rid, T.SUMMARY_ARTIFACT, str(dl))).read_text())
    assert {k: got_summary[k] for k in T.FINAL_KEYS} == {k: on_disk[k] for k in T.FINAL_KEYS}
    assert got_summary["run_id"] == rid
    spec = json.loads(Path(client.download_artifacts(rid, specs[0], str(dl))).read_text())
    assert isinstance(spec, dict) and spec
    config = Path(client.download_artifacts(rid, T.CONFIG_ARTIFACT, str(dl))).read_text()
    assert json.loads(config) == json.loads((run_dir / "config.json").read_text())
    final_spec = Path(client.download_artifacts(rid, "final/spec.json", str(dl))).read_text()
    assert final_spec == (run_dir / "final" / "spec.json").read_text()
    weights = Path(client.download_artifacts(rid, "final/model.safetensors", str(dl)))
    assert weights.read_bytes() == (run_dir / "final" / "model.safetensors").read_bytes()
    png = Path(client.download_artifacts(rid, T.LAYER_WIDTHS_ARTIFACT, str(dl))).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "tracking_unsent" not in on_disk and not (run_dir / T.UNSENT_FILE).exists()


def _pruning_run(tmp_path: Path, uri: str, experiment: str) -> dict:
    cfg = tiny_config(tmp_path, *STRONG["variational"], *FAST, f"tracking.uri={uri}",
                      f"tracking.experiment={experiment}", f"train.max_steps={STEPS}")
    return Trainer(cfg).run()


# ------------------------------------------------------------------------------------------ 1
def test_pruning_run_against_server(mlflow_server, tmp_path):
    exp = _exp()
    summary = _pruning_run(tmp_path, mlflow_server.uri, exp)
    _check_recorded_run(mlflow_server.uri, summary, tmp_path / "run", tmp_path, exp)


# ------------------------------------------------------------------------------------------ 2
def test_pruning_run_in_embedded_store_and_compare(tmp_path):
    exp = "parsimony"          # the default experiment, so compare needs no --experiment
    summary = _pruning_run(tmp_path, "", exp)
    assert (tmp_path / "mlflow.db").is_file()
    assert (tmp_path / "mlartifacts").is_dir()            # artifacts beside the database, not ./mlruns
    _check_recorded_run(T.local_store_uri(tmp_path), summary, tmp_path / "run", tmp_path, exp)

    plot = tmp_path / "pareto.png"
    out = subprocess.run([sys.executable, "-m", "launch.compare", "--runs-root", str(tmp_path), "--json",
                          "--plot", str(plot)], cwd=tmp_path, env=_cli_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert len(rows) == 1
    row = rows[0]
    assert row["run_id"] == summary["run_id"] and row["run_name"] == "run"
    assert row["method"] == summary["method"] and row["model"] == "resnet20"
    assert row["top1"] == pytest.approx(summary["top1"])
    assert row["macs"] == summary["macs"] and row["params"] == summary["params"]
    assert row["macs_removed_pct"] == pytest.approx(100.0 * (1 - summary["macs"] / summary["macs_dense"]))
    assert row["macs_removed_pct"] > 0
    assert row["blocks_removed"] == summary["blocks_removed"] >= 1
    assert row["train_macs_pct"] == pytest.approx(summary["train_macs_pct"])
    assert row["wall_s"] == pytest.approx(summary["wall_s"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = subprocess.run([sys.executable, "-m", "launch.compare", "--runs-root", str(tmp_path)],
                           cwd=tmp_path, env=_cli_env(), capture_output=True, text=True, timeout=120)
    assert table.returncode == 0 and "resnet20" in table.stdout and summary["method"] in table.stdout


# ------------------------------------------------------------------------------------------ 3
def test_stopped_and_resumed_run_continues_the_same_mlflow_run(mlflow_server, tmp_path):
    exp = _exp()
    # Taylor: STRONG variational removes every block, and resuming a run whose layer gates are all gone
    # is a checkpoint bug of its own (optimizer groups); this test is about the MLflow run.
    common = [*STRONG["taylor"], *FAST, f"tracking.uri={mlflow_server.uri}", f"tracking.experiment={exp}",
              f"train.max_steps={STEPS}", "checkpoint.at_epoch_end=false"]
    first = _train_cli(tmp_path, *common, PARSIMONY_STOP_AFTER_STEP="10")
    assert first.returncode == 75, first.stderr[-3000:]
    client = _client(mlflow_server.uri)
    runs = _runs(client, exp)
    assert len(runs) == 1
    rid = runs[0].info.run_id
    assert runs[0].info.status == "KILLED"                 # preempted, not failed
    assert [s for s, _ in _history(client, rid, T.TRAIN_LOSS)] == list(range(2, 11, 2))
    manifest = json.loads(next((tmp_path / "run" / "checkpoints").glob("step-*/manifest.json")).read_text())
    assert manifest["parts"]["tracking"]["run_id"] == rid
    assert not (tmp_path / "run" / "summary.json").exists()

    second = _train_cli(tmp_path, *common, "run.resume=auto")
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["run_id"] == rid and summary["steps"] == STEPS
    runs = _runs(client, exp)
    assert [r.info.run_id for r in runs] == [rid]          # a requeued job does not create a second run
    run = client.get_run(rid)
    assert run.info.status == "FINISHED"
    assert [s for s, _ in _history(client, rid, T.TRAIN_LOSS)] == list(range(2, STEPS + 1, 2))
    assert run.data.metrics[T.FINAL_PREFIX + "top1"] == pytest.approx(summary["top1"])
    assert run.data.params["train.max_steps"] == str(STEPS)
    assert "resumed MLflow run " + rid in second.stderr
    # the final network is logged as a (pickled) MLflow Model without MLflow's pickle caution on every run
    assert "logged the final network as MLflow Model" in second.stderr and "CloudPickle" not in second.stderr


def test_a_run_killed_before_its_first_checkpoint_continues_its_mlflow_run(mlflow_server, tmp_path):
    """SIGKILL after the MLflow run opened and before any checkpoint (as a lost node does to a job that
    Slurm then requeues): the restart trains from scratch in the same run directory and goes on in the
    SAME MLflow run (the run directory's record), not a second one; in another store it opens its own."""
    exp = _exp()
    common = [*FAST, f"tracking.uri={mlflow_server.uri}", f"tracking.experiment={exp}",
              "checkpoint.at_epoch_end=false", "checkpoint.every_steps=1000", "run.resume=auto"]
    first = subprocess.Popen(_cli_args(tmp_path, *common, "train.max_steps=100000"), cwd=REPO, env=_cli_env(),
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for_stderr(first, "MLflow run ", 180)
    finally:
        first.kill()   # SIGKILL: no checkpoint, no end of the run
        first.wait()
        first.stderr.close()
    client = _client(mlflow_server.uri)
    (killed,) = _runs(client, exp)
    assert not list((tmp_path / "run").glob("checkpoints/step-*"))
    record = json.loads((tmp_path / "run" / "mlflow_run.json").read_text())
    assert record["run_id"] == killed.info.run_id

    second = _train_cli(tmp_path, *common, f"train.max_steps={STEPS}")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "starting from scratch" in second.stderr and "resumed MLflow run " + killed.info.run_id in second.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [r.info.run_id for r in _runs(client, exp)] == [killed.info.run_id] == [summary["run_id"]]
    assert client.get_run(summary["run_id"]).info.status == "FINISHED"
    assert summary["steps"] == STEPS

    # the record names its store: the same directory continued against another store opens a run there
    (tmp_path / "run" / "summary.json").unlink()
    shutil.rmtree(tmp_path / "run" / "checkpoints", ignore_errors=True)
    local = _train_cli(tmp_path, *[c for c in common if not c.startswith("tracking.uri=")],
                       f"tracking.uri=sqlite:///{tmp_path / 'other.db'}", f"train.max_steps={STEPS}")
    assert local.returncode == 0, local.stderr[-3000:]
    other = json.loads((tmp_path / "run" / "summary.json").read_text())["run_id"]
    assert other != killed.info.run_id and "resumed MLflow run" not in local.stderr


# ------------------------------------------------------------------------------------------ 4
def test_unreachable_server_fails_before_training(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    out = _train_cli(tmp_path, *FAST, f"tracking.uri={uri}", "train.max_steps=4", timeout=120)
    assert out.returncode != 0
    assert uri in out.stderr
    assert "is unreachable" in out.stderr and "nothing was trained" in out.stderr, out.stderr[-3000:]
    run_dir = tmp_path / "run"
    assert not (run_dir / "summary.json").exists() and not (run_dir / "checkpoints").exists()
    assert not (run_dir / "final").exists()
    assert "step " not in out.stderr                                # no evaluation or pruning happened


def test_unreachable_server_with_fallback_uses_local_store(tmp_path, caplog):
    uri = f"http://127.0.0.1:{free_port()}"
    exp = _exp()
    cfg = tiny_config(tmp_path, *FAST, f"tracking.uri={uri}", "tracking.fallback_local=true",
                      f"tracking.experiment={exp}", "train.max_steps=4")
    with caplog.at_level(logging.WARNING, logger="system.tracking"):
        summary = Trainer(cfg).run()
    announced = [r.getMessage() for r in caplog.records if "fallback_local" in r.getMessage()]
    assert announced and uri in announced[0] and T.local_store_uri(tmp_path) in announced[0]
    client = _client(T.local_store_uri(tmp_path))
    runs = _runs(client, exp)
    assert [r.info.run_id for r in runs] == [summary["run_id"]]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags[T.TAG_FALLBACK] == uri
    assert run.data.metrics[T.FINAL_PREFIX + "top1"] == pytest.approx(summary["top1"])
    assert [s for s, _ in _history(client, run.info.run_id, T.TRAIN_LOSS)] == [2, 4]


# ------------------------------------------------------------------------------------------ 5
def test_server_killed_mid_run_training_finishes(tmp_path, caplog):
    server = MlflowServer(tmp_path / "server").start()
    exp = _exp()
    steps = 32
    cfg = tiny_config(tmp_path, *STRONG["variational"], *FAST, f"tracking.uri={server.uri}",
                      f"tracking.experiment={exp}", f"train.max_steps={steps}", "checkpoint.at_epoch_end=false")
    trainer = Trainer(cfg)
    killed_at: list[int] = []

    def kill_when_logging() -> None:
        client = _client(server.uri)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and trainer.state.step < steps:
            rid = getattr(trainer, "run_id", None)
            try:
                if rid and client.get_metric_history(rid, T.TRAIN_LOSS):
                    break
            except Exception:
                pass
            time.sleep(0.05)
        killed_at.append(trainer.state.step)
        server.kill()

    killer = threading.Thread(target=kill_when_logging, daemon=True)
    try:
        killer.start()
        with caplog.at_level(logging.WARNING, logger="system.tracking"):
            summary = trainer.run()
        killer.join(30)
    finally:
        server.kill()
    assert killed_at and 2 <= killed_at[0] < steps, killed_at
    assert summary["steps"] == steps
    run_dir = tmp_path / "run"
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert summary["tracking_unsent"] > 0
    assert on_disk["tracking_unsent"] == summary["tracking_unsent"]   # the file says so too
    assert (run_dir / "final" / "model.safetensors").is_file()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(f"{summary['tracking_unsent']} tracking item(s) were not sent to {server.uri}" in w
               and str(run_dir / T.UNSENT_FILE) in w for w in warnings), warnings
    recs = [json.loads(line) for line in (run_dir / T.UNSENT_FILE).read_text().splitlines()]
    metric_recs = [r for r in recs if r["kind"] == "metrics"]
    unsent_loss_steps = [r["step"] for r in metric_recs if T.TRAIN_LOSS in r["metrics"]]
    assert unsent_loss_steps and unsent_loss_steps[-1] == steps
    assert any(T.FINAL_PREFIX + "top1" in r["metrics"] and
               r["metrics"][T.FINAL_PREFIX + "top1"] == pytest.approx(summary["top1"]) for r in metric_recs)
    artifacts = [r for r in recs if r["kind"] == "artifact"]
    assert any(Path(r["path"]).name == "summary.json" and Path(r["path"]).is_file() for r in artifacts)
    assert any(r["kind"] == "end" and r["status"] == "FINISHED" for r in recs)


# ------------------------------------------------------------------------------------------ 5b
def test_a_backlog_left_by_an_outage_is_delivered_after_the_run(tmp_path):
    """The server dies in the last stretch: the run ends with a backlog and stays RUNNING in MLflow;
    ``launch.compare --sync RUN_DIR`` delivers the backlog in order and marks the run FINISHED."""
    server = MlflowServer(tmp_path / "server").start()
    exp = _exp()
    cfg = tiny_config(tmp_path, *STRONG["taylor"], *FAST, f"tracking.uri={server.uri}",
                      f"tracking.experiment={exp}", "train.max_steps=12", "checkpoint.at_epoch_end=false")
    trainer = Trainer(cfg)
    inner = trainer.train_step

    def step(x, y):  # the server dies after step 8
        loss = inner(x, y)
        if trainer.state.step == 8:
            server.kill()
        return loss

    trainer.train_step = step
    try:
        summary = trainer.run()
    finally:
        server.kill()
    run_dir = tmp_path / "run"
    assert summary["tracking_unsent"] > 0 and (run_dir / T.UNSENT_FILE).is_file()
    again = MlflowServer(tmp_path / "server").start()  # the same store, back (on another port)
    try:
        client = _client(again.uri)
        assert client.get_run(summary["run_id"]).info.status == "RUNNING"  # what the outage left
        out = subprocess.run([sys.executable, "-m", "launch.compare", "--sync", str(run_dir),
                              "--tracking-uri", again.uri], cwd=REPO, env=_cli_env(), capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert f"{summary['tracking_unsent']} item(s) delivered, run marked FINISHED" in out.stdout
        run = client.get_run(summary["run_id"])
        assert run.info.status == "FINISHED"
        assert [s for s, _ in _history(client, run.info.run_id, T.TRAIN_LOSS)] == list(range(2, 13, 2))
        assert run.data.metrics[T.FINAL_PREFIX + "top1"] == pytest.approx(summary["top1"])
        assert T.SUMMARY_ARTIFACT in {a.path for a in client.list_artifacts(run.info.run_id)}
        assert not (run_dir / T.UNSENT_FILE).exists()
        # nothing left: a second sync says so and fails
        again_out = subprocess.run([sys.executable, "-m", "launch.compare", "--sync", str(run_dir)], cwd=REPO,
                                   env=_cli_env(), capture_output=True, text=True, timeout=120)
        assert again_out.returncode == 1 and "no tracking backlog" in again_out.stderr
    finally:
        again.kill()


# ------------------------------------------------------------------------------------------ env
def test_mlflow_environment_variables_are_the_defaults(mlflow_server, tmp_path):
    exp, explicit = _exp(), _exp()
    env = {"MLFLOW_TRACKING_URI": mlflow_server.uri, "MLFLOW_EXPERIMENT_NAME": exp}
    out = _train_cli(tmp_path, "tracking.enabled=true", "train.max_steps=2", **env)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    client = _client(mlflow_server.uri)
    assert [r.info.run_id for r in _runs(client, exp)] == [summary["run_id"]]
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to the embedded store
    # an explicit key wins over the environment
    out = _train_cli(tmp_path / "b", "tracking.enabled=true", "train.max_steps=2",
                     f"tracking.experiment={explicit}", **env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [r.info.run_id for r in _runs(client, explicit)] == [json.loads(out.stdout)["run_id"]]
    # launch.compare reads the same variables
    cmp = subprocess.run([sys.executable, "-m", "launch.compare", "--json"], cwd=REPO,
                         env=_cli_env(**env), capture_output=True, text=True, timeout=120)
    assert cmp.returncode == 0, cmp.stderr[-2000:]
    assert [r["run_id"] for r in json.loads(cmp.stdout)] == [summary["run_id"]]


def _chromium() -> str | None:
    import shutil
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _page_text(url: str, profile: Path) -> tuple[str, str]:
    """(title, visible text) of ``url`` rendered by headless Chromium."""
    out = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          f"--user-data-dir={profile}", "--virtual-time-budget=20000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    html = out.stdout
    title = re.search(r"<title>(.*?)</title>", html, re.S)
    text = re.sub(r"<style[^>]*>.*?</style>|<script[^>]*>.*?</script>", " ", html, flags=re.S)
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text))
    return (title.group(1) if title else ""), text


@pytest.mark.skipif(_chromium() is None, reason="chromium not installed (Debian package `chromium`)")
def test_the_mlflow_ui_opens_on_the_training_runs_and_shows_sections(mlflow_server, tmp_path):
    """What the page shows in headless Chromium: the link we print opens the experiment on its runs
    table (the bare experiment URL opens MLflow's GenAI overview); the run's metrics come in sections."""
    exp = _exp()
    summary = Trainer(tiny_config(tmp_path, *STRONG["taylor"], *FAST, f"tracking.uri={mlflow_server.uri}",
                                  f"tracking.experiment={exp}", "train.max_steps=6")).run()
    url = summary["mlflow_run_url"]
    exp_url = url.split("/runs/")[0] + "/runs?workflowType=machine_learning"
    title, text = _page_text(exp_url, tmp_path / "chromium-a")
    assert title.startswith("Runs"), title
    assert "run" in text and Path(summary["run_dir"]).name in text  # the run's row
    bare_title, _ = _page_text(exp_url.split("/runs")[0], tmp_path / "chromium-b")
    assert bare_title.startswith("Overview"), bare_title  # why the printed link carries the workflow
    metrics_url = url.replace("?workflowType", "/model-metrics?workflowType")
    _, metrics_text = _page_text(metrics_url, tmp_path / "chromium-a")
    for section in ("model", "prune", "summary", "train", "val"):
        assert f"{section} (" in metrics_text, section
    assert "final." not in metrics_text


# ------------------------------------------------------------------------------------------ MLflow Model
def test_the_final_network_is_an_mlflow_model_and_registered(mlflow_server, tmp_path):
    """mlflow.pytorch.load_model on the run's model gives what system.export.load_exported gives; the
    model is registered under tracking.register_as; the run has MLflow's system metrics."""
    import mlflow
    import mlflow.pytorch

    from system.export import load_exported

    exp, name = _exp(), f"parsimony-{uuid.uuid4().hex[:6]}"
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    summary = Trainer(tiny_config(tmp_path, *STRONG["taylor"], *FAST, f"tracking.uri={mlflow_server.uri}",
                                  f"tracking.experiment={exp}", "train.max_steps=12", f"tracking.register_as={name}",
                                  "tracking.system_metrics_interval_s=0.2")).run()
    # MLflow's fluent API left no global store behind (a later run in this process would read it)
    assert os.environ.get("MLFLOW_TRACKING_URI") == env_before
    uri = summary["mlflow_model_uri"]
    assert uri.startswith("models:/") or uri.startswith("runs:/")
    mlflow.set_tracking_uri(mlflow_server.uri)
    model = mlflow.pytorch.load_model(uri)
    plain = load_exported(tmp_path / "run" / "final")
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    client = _client(mlflow_server.uri)
    versions = client.search_model_versions(f"name='{name}'")
    assert len(versions) == 1 and versions[0].run_id == summary["run_id"]
    info = mlflow.models.get_model_info(uri)
    assert info.signature is not None and info.metadata["spec"]["name"] == "resnet20"
    system = [k for k in client.get_run(summary["run_id"]).data.metrics if k.startswith("system/")]
    assert system, "no system metrics were logged"
