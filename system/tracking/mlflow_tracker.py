"""MLflow on rank 0: a run's lifecycle (start with a reachability check and fallback, resume, end),
what the loop logs to it, and its pages in the MLflow UI (failure policy: see :mod:`system.tracking`).

The tracker composes the other modules: :mod:`~system.tracking.connection` (the client and its
settings), :mod:`~system.tracking.backlog` (delivery, and the local backlog while the store is away)
and :mod:`~system.tracking.registry` (the final network as an MLflow Model).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from system.io import atomic_write_json
from system.tracking import registry
from system.tracking.backlog import Backlog
from system.tracking.config import TrackingConfig, TrackingUnavailable, experiment_name, local_store_uri, resolve_uri
from system.tracking.connection import (
    configure_http,
    connect,
    error_line,
    find_run,
    start_system_metrics,
    stop_system_metrics,
    ui_base,
)
from system.tracking.names import (
    RUN_RECORD_FILE,
    RUN_STATUSES,
    RUNS_VIEW_KEY,
    TAG_FALLBACK,
    TAG_RESUMED_FROM,
    UI_WORKFLOW_QUERY,
    UNSENT_FILE,
)
from system.tracking.protocol import NullTracker, Tracker
from system.tracking.secrets import redact_text

log = logging.getLogger(__name__)


def _param_value(v: Any) -> str:
    text = v if isinstance(v, str) else (json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v))
    return text[:6000]   # MLflow's limit on a param value


def _finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite values of ``metrics`` as floats (a value that is not a number is skipped with a warning)."""
    clean: dict[str, float] = {}
    for k, v in metrics.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            log.warning("metric %s=%r is not a number; skipped", k, v)
            continue
        if math.isfinite(f):
            clean[str(k)] = f
    return clean


class MLflowTracker:
    """Rank 0's tracker, writing to an MLflow server or the embedded sqlite store.

    Args:
        cfg: the ``tracking`` config section.
        runs_root: folder of the embedded store (``<runs_root>/mlflow.db``) and, unless
            ``run_dir`` is given, of ``<runs_root>/<run_name>/`` holding the unsent backlog.
        run_dir: the run's own folder; the backlog goes to ``<run_dir>/mlflow_unsent.jsonl``.
    """

    records = True

    def __init__(self, cfg: TrackingConfig, runs_root: str | Path, run_dir: str | Path | None = None):
        self.cfg = cfg
        self.runs_root = Path(runs_root)
        self._run_dir = Path(run_dir) if run_dir is not None else None
        self.uri = resolve_uri(cfg, runs_root)     # the store actually used (after any fallback)
        self.asked_uri = self.uri                  # the store asked for (config, else $MLFLOW_TRACKING_URI)
        self.experiment = experiment_name(cfg)     # config, else $MLFLOW_EXPERIMENT_NAME
        self._experiment_id: str | None = None
        self.fell_back = False
        self._client: Any = None
        self._run_id: str | None = None
        self._backlog: Backlog | None = None       # delivery to the run, from start() on
        self._ended = False
        self._monitor: Any = None  # MLflow's system-metrics thread (rank 0)

    # -- properties -------------------------------------------------------------------------
    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def dropped(self) -> int:
        """Number of items (metric values, params, tags, artifacts) not (yet) sent to the store."""
        return self._backlog.dropped if self._backlog is not None else 0

    @property
    def spool_path(self) -> Path:
        """The JSONL file holding what could not be sent."""
        assert self._run_dir is not None, "spool_path is known once the run has started"
        return self._run_dir / UNSENT_FILE

    @property
    def record_path(self) -> Path:
        """The run directory's record of its MLflow run (:data:`RUN_RECORD_FILE`)."""
        assert self._run_dir is not None, "record_path is known once the run has started"
        return self._run_dir / RUN_RECORD_FILE

    # -- start ------------------------------------------------------------------------------
    def _recorded_run_id(self) -> str | None:
        """The run id this run directory recorded for the store in use, if any."""
        path = self.record_path
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("%s cannot be read (%s); starting a new MLflow run", path, exc)
            return None
        if record.get("uri") != redact_text(self.uri):
            return None   # recorded in another store: nothing to continue here
        log.info("%s: continuing MLflow run %s (this run directory opened it before any checkpoint)",
                 path.name, record.get("run_id"))
        return record.get("run_id") or None

    def _record_run(self) -> None:
        try:
            atomic_write_json(self.record_path,
                              {"run_id": self._run_id, "uri": redact_text(self.uri), "experiment": self.experiment})
        except OSError as exc:   # the record only saves a duplicate run on an early restart
            log.warning("could not record MLflow run %s in %s: %s", self._run_id, self._run_dir, exc)

    def start(self, run_name: str, params: Mapping[str, Any] | None = None,
              tags: Mapping[str, Any] | None = None, run_id: str | None = None) -> str:
        """Open run ``run_name`` (or resume ``run_id``) and return its id.

        Without ``run_id`` (no checkpoint carried one), the run directory's record of an earlier start in
        the same store (:data:`RUN_RECORD_FILE`, written here) names the run to continue: a job killed or
        requeued before its first checkpoint goes on in the MLflow run it opened.  A fresh run never
        finds one, since it never writes into a directory that holds a run
        (:func:`system.runtime.rundir.resolve_run_dir`).

        Raises:
            TrackingUnavailable: the store cannot be reached and ``fallback_local`` is False.
            KeyError: ``run_id`` does not exist in the store (only without a fallback).
        """
        if self._run_id is not None:
            raise RuntimeError(f"tracker already started run {self._run_id}")
        if self._run_dir is None:
            self._run_dir = self.runs_root / run_name
        configure_http(self.cfg)
        try:
            self._client, exp_id = connect(self.uri, self.experiment, self.cfg.connect_timeout)
        except TrackingUnavailable as exc:
            if not self.cfg.fallback_local:
                raise
            local = local_store_uri(self.runs_root)
            log.warning("%s -- fallback_local is set: recording this run in the local store %s",
                        exc.args[0].split(";")[0], local)
            self.uri, self.fell_back = local, True
            self._client, exp_id = connect(local, self.experiment, self.cfg.connect_timeout)

        tags = {str(k): str(v) for k, v in (tags or {}).items()}
        if self.fell_back:
            tags[TAG_FALLBACK] = self.asked_uri
        run = None
        if not run_id:
            run_id = self._recorded_run_id()
        if run_id:
            run = find_run(self._client, run_id)
            if run is None and not self.fell_back:
                raise KeyError(f"run {run_id} not found in tracking store {redact_text(self.uri)}; "
                               "cannot resume it")
            if run is None:
                log.warning("run %s is not in the fallback store %s; starting a new run there",
                            run_id, self.uri)
                tags[TAG_RESUMED_FROM] = run_id
        if run is not None:
            self._client.update_run(run.info.run_id, status="RUNNING")
            self._run_id = run.info.run_id
            self._record_run()
            log.info("resumed MLflow run %s (%s) in %s", self._run_id, run.info.run_name, self.uri)
        else:
            created = self._client.create_run(exp_id, run_name=run_name)
            self._run_id = created.info.run_id
            self._record_run()   # before anything else can fail or be killed
            log.info("MLflow run %s (%s) in %s, experiment %r", self._run_id, run_name, self.uri,
                     self.experiment)
        assert self._run_id is not None
        self._backlog = Backlog(self._client, self._run_id, self.uri, self.experiment, self.spool_path,
                                self.cfg.retry_after_s)
        self._experiment_id = exp_id
        if self.cfg.system_metrics:
            self._monitor = start_system_metrics(self._run_id, self.uri, self.cfg.system_metrics_interval_s)
        if ui_base(self.uri) is not None:
            log.info("MLflow UI: run %s , experiment %s", self.run_url(), self.experiment_url())
        if params:
            self.log_params(params)
        if tags:
            self.set_tags(tags)
        return self._run_id

    def experiment_url(self) -> str | None:
        """The experiment's page in the MLflow UI, on its runs table in the shared view that shows top-1,
        MACs and latency (None for a file store)."""
        base = ui_base(self.uri)
        if self._experiment_id is None or base is None:
            return None
        return f"{base}/#/experiments/{self._experiment_id}/runs{UI_WORKFLOW_QUERY}&viewStateShareKey={RUNS_VIEW_KEY}"

    def run_url(self) -> str | None:
        """The run's page in the MLflow UI (None for a file store)."""
        base = ui_base(self.uri)
        if self._experiment_id is None or base is None:
            return None
        return f"{base}/#/experiments/{self._experiment_id}/runs/{self._run_id}{UI_WORKFLOW_QUERY}"

    # -- logging (never raises) -----------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        values = {str(k): _param_value(v) for k, v in params.items()}
        if not values or not self._started():
            return
        # On resume the run already holds params; MLflow refuses to change them.
        old = self._existing_params()
        changed = {k: (old[k], v) for k, v in values.items() if k in old and old[k] != v}
        if changed:
            log.warning("params changed since the run started; MLflow keeps the old values: %s",
                        ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items())))
        values = {k: v for k, v in values.items() if k not in old}
        if values:
            self._delivery().submit({"kind": "params", "params": values})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self._started():
            return
        clean = _finite_metrics(metrics)
        if clean:
            self._delivery().submit({"kind": "metrics", "step": int(step), "ts": int(time.time() * 1000),
                                     "metrics": clean})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if tags and self._started():
            self._delivery().submit({"kind": "tags", "tags": {str(k): str(v)[:8000] for k, v in tags.items()}})

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        if not self._started():
            return
        p = Path(path)
        if not p.is_file():
            log.warning("artifact %s does not exist; not logged", p)
            return
        self._delivery().submit({"kind": "artifact", "path": str(p.resolve()), "subdir": subdir})

    def log_dict(self, obj: Any, name: str) -> None:
        if not self._started():
            return
        try:
            text = json.dumps(obj, indent=2, sort_keys=True, default=str)
        except (TypeError, ValueError) as exc:
            log.warning("log_dict(%s): not JSON-serialisable (%s); skipped", name, exc)
            return
        self._log_bytes(text.encode(), name)

    def log_figure(self, figure: Any, name: str) -> None:
        if not self._started():
            return
        try:
            from io import BytesIO
            buf = BytesIO()
            figure.savefig(buf, format="png", dpi=100)
        except Exception as exc:
            log.warning("log_figure(%s): could not render (%s); skipped", name, exc)
            return
        self._log_bytes(buf.getvalue(), name)

    def _log_bytes(self, data: bytes, name: str) -> None:
        """Write ``data`` to a temporary file called ``name`` and log it as an artifact."""
        p = Path(name)
        with tempfile.TemporaryDirectory(prefix="parsimony-artifact-") as tmp:
            local = Path(tmp) / p.name
            local.write_bytes(data)
            self._delivery().submit({"kind": "artifact", "path": str(local),
                                     "subdir": str(p.parent) if str(p.parent) != "." else None})

    def log_model(self, model: Any, example: Any, metadata: Mapping[str, Any], register_as: str = "") -> str | None:
        """Log ``model`` (the exported, gate-free network) as an MLflow Model of this run with its input
        signature and ``metadata`` (the spec), registered as ``register_as`` when given; its URI, or
        None (with a warning: the files are in the run's artifacts anyway) when the store refuses."""
        if not self._started():
            return None
        assert self._run_id is not None
        return registry.log_model(self.uri, self._run_id, model, example, metadata, register_as)

    def end(self, status: str = "FINISHED") -> None:
        if not self._started() or self._ended:
            return
        if self._monitor is not None:
            stop_system_metrics(self._monitor)
            self._monitor = None
        if status not in RUN_STATUSES:
            log.warning("unknown run status %r; recording FAILED", status)
            status = "FAILED"
        self._ended = True
        backlog = self._delivery()
        if backlog.pending:
            backlog.replay(now=True)    # one last attempt to deliver the backlog
        try:
            if backlog.pending:
                raise RuntimeError("backlog not delivered")
            self._client.set_terminated(self._run_id, status=status)
        except Exception as exc:
            log.warning("could not mark run %s as %s in %s: %s", self._run_id, status, self.uri, error_line(exc))
            backlog.keep({"kind": "end", "status": status}, count=0)
        if backlog.dropped:
            log.warning("%d tracking item(s) were not sent to %s (run %s); they are kept in %s",
                        backlog.dropped, self.uri, self._run_id, self.spool_path)

    # -- state -----------------------------------------------------------------------------------
    def _started(self) -> bool:
        if self._run_id is None:
            log.warning("tracker used before start(); ignored")
            return False
        return True

    def _delivery(self) -> Backlog:
        assert self._backlog is not None, "the backlog exists once the run has started"
        return self._backlog

    def _existing_params(self) -> dict[str, str]:
        if self._delivery().behind:
            return {}
        try:
            return dict(self._client.get_run(self._run_id).data.params)
        except Exception:
            return {}


def make_tracker(cfg: TrackingConfig, rank: int, runs_root: str | Path,
                 run_dir: str | Path | None = None) -> Tracker:
    """The one place that picks a tracker: MLflow on rank 0 when enabled, a no-op otherwise.

    Example::

        tracker = make_tracker(TrackingConfig(), rank=dist_rank, runs_root="runs")
    """
    if cfg.enabled and rank == 0:
        return MLflowTracker(cfg, runs_root, run_dir)
    return NullTracker()
