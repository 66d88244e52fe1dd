"""MLflow on rank 0: start (reachability check, fallback), metrics in batches, a local backlog
when the server is away, replayed when it answers again (failure policy: see :mod:`system.tracking`)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from system.tracking.config import (ENV_TRACKING_URI, TrackingConfig, TrackingUnavailable, experiment_name,
                                    local_store_uri, resolve_uri)
from system.tracking.names import (EXPERIMENT_KIND_TAG, RUN_STATUSES, TAG_FALLBACK, TAG_RESUMED_FROM,
                                   UI_WORKFLOW_QUERY, UNSENT_FILE)
from system.tracking.protocol import NullTracker, Tracker
from system.tracking.secrets import redact_text, split_login

log = logging.getLogger(__name__)

def code_version(repo: str | Path | None = None) -> str:
    """``git describe --always --dirty --tags`` of the code, or ``"unknown"`` outside a checkout."""
    cwd = Path(repo) if repo else Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=cwd,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def _param_value(v: Any) -> str:
    text = v if isinstance(v, str) else (json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v))
    return text[:6000]   # MLflow's limit on a param value


def _chunks(items: Sequence[Any], n: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def http_reachable(uri: str, timeout: float) -> str | None:
    """None if ``<uri>/health`` answers, else the reason it does not (a URL login is not sent: the
    health check needs none, and the reason names the URL masked)."""
    url = split_login(uri)[0].rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            if resp.status == 200:
                return None
            return f"GET {url} answered HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        return f"GET {url} answered HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"GET {url} failed: {reason}"


class MLflowTracker:
    """Rank 0's tracker, writing to an MLflow server or the embedded sqlite store.

    Args:
        cfg: the ``tracking`` config section.
        runs_root: folder of the embedded store (``<runs_root>/mlflow.db``) and, unless
            ``run_dir`` is given, of ``<runs_root>/<run_name>/`` holding the unsent backlog.
        run_dir: the run's own folder; the backlog goes to ``<run_dir>/mlflow_unsent.jsonl``.
    """

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
        self._dropped = 0                          # items in the backlog not yet sent
        self._pending: list[dict[str, Any]] = []   # backlog records, in order
        self._down_until = 0.0
        self._ended = False
        self._monitor: Any = None  # MLflow's system-metrics thread (rank 0)
        self._artifact_seq = 0

    # -- properties -------------------------------------------------------------------------
    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def dropped(self) -> int:
        """Number of items (metric values, params, tags, artifacts) not (yet) sent to the store."""
        return self._dropped

    @property
    def spool_path(self) -> Path:
        """The JSONL file holding what could not be sent."""
        assert self._run_dir is not None, "spool_path is known once the run has started"
        return self._run_dir / UNSENT_FILE

    # -- start ------------------------------------------------------------------------------
    def start(self, run_name: str, params: Mapping[str, Any] | None = None,
              tags: Mapping[str, Any] | None = None, run_id: str | None = None) -> str:
        """Open run ``run_name`` (or resume ``run_id``) and return its id.

        Raises:
            TrackingUnavailable: the store cannot be reached and ``fallback_local`` is False.
            KeyError: ``run_id`` does not exist in the store (only without a fallback).
        """
        if self._run_id is not None:
            raise RuntimeError(f"tracker already started run {self._run_id}")
        if self._run_dir is None:
            self._run_dir = self.runs_root / run_name
        self._configure_http()
        try:
            self._client, exp_id = self._connect(self.uri)
        except TrackingUnavailable as exc:
            if not self.cfg.fallback_local:
                raise
            local = local_store_uri(self.runs_root)
            log.warning("%s -- fallback_local is set: recording this run in the local store %s",
                        exc.args[0].split(";")[0], local)
            self.uri, self.fell_back = local, True
            self._client, exp_id = self._connect(local)

        tags = {str(k): str(v) for k, v in (tags or {}).items()}
        if self.fell_back:
            tags[TAG_FALLBACK] = self.asked_uri
        run = None
        if run_id:
            run = self._find_run(run_id)
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
            log.info("resumed MLflow run %s (%s) in %s", self._run_id, run.info.run_name, self.uri)
        else:
            created = self._client.create_run(exp_id, run_name=run_name)
            self._run_id = created.info.run_id
            log.info("MLflow run %s (%s) in %s, experiment %r", self._run_id, run_name, self.uri,
                     self.experiment)
        self._experiment_id = exp_id
        self._start_system_metrics()
        if self.uri.startswith(("http://", "https://")):
            log.info("MLflow UI: run %s , experiment %s", self.run_url(), self.experiment_url())
        if params:
            self.log_params(params)
        if tags:
            self.set_tags(tags)
        return self._run_id

    def experiment_url(self) -> str | None:
        """The experiment's page in the MLflow UI, on its runs table (None for a file store)."""
        if self._experiment_id is None or not self.uri.startswith(("http://", "https://")):
            return None
        return f"{split_login(self.uri)[0].rstrip('/')}/#/experiments/{self._experiment_id}/runs{UI_WORKFLOW_QUERY}"

    def run_url(self) -> str | None:
        """The run's page in the MLflow UI (None for a file store)."""
        if self._experiment_id is None or not self.uri.startswith(("http://", "https://")):
            return None
        return (f"{split_login(self.uri)[0].rstrip('/')}/#/experiments/{self._experiment_id}/runs/{self._run_id}"
                f"{UI_WORKFLOW_QUERY}")

    def _configure_http(self) -> None:
        # MLflow's REST client reads these per request; the config is the one place to set them.
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(self.cfg.request_retries)
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, int(math.ceil(self.cfg.request_timeout))))
        # MLflow prints its own run link to stdout (without the workflow the UI needs, and into the
        # JSON summary launch.train prints there); ours goes to the log
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

    def _connect(self, uri: str) -> tuple[Any, str]:
        """Client for ``uri`` and the experiment's id; TrackingUnavailable if it does not answer."""
        if uri.startswith(("http://", "https://")):
            reason = http_reachable(uri, self.cfg.connect_timeout)
            if reason is not None:
                raise TrackingUnavailable(uri, reason)
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        is_local = uri.startswith("sqlite:///")
        if is_local:
            Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        client = MlflowClient(tracking_uri=uri)
        try:
            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:
                # Locally, artifacts live beside the database (not in ./mlruns of whatever cwd).
                location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / self.experiment
                            ).as_uri() if is_local else None
                try:
                    return client, client.create_experiment(
                        self.experiment, artifact_location=location,
                        tags={EXPERIMENT_KIND_TAG: "custom_model_development"})
                except MlflowException:   # another process created it meanwhile
                    exp = client.get_experiment_by_name(self.experiment)
                    if exp is None:
                        raise
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp.experiment_id)
            return client, exp.experiment_id
        except TrackingUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 -- any failure here means "store unusable"
            raise TrackingUnavailable(uri, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                                      ) from exc

    def _find_run(self, run_id: str) -> Any:
        from mlflow.exceptions import MlflowException
        try:
            return self._client.get_run(run_id)
        except MlflowException:
            return None

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
            self._submit({"kind": "params", "params": values})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self._started():
            return
        clean: dict[str, float] = {}
        for k, v in metrics.items():
            try:
                f = float(v)
            except (TypeError, ValueError):
                log.warning("metric %s=%r is not a number; skipped", k, v)
                continue
            if math.isfinite(f):
                clean[str(k)] = f
        if clean:
            self._submit({"kind": "metrics", "step": int(step), "ts": int(time.time() * 1000),
                          "metrics": clean})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if tags and self._started():
            self._submit({"kind": "tags", "tags": {str(k): str(v)[:8000] for k, v in tags.items()}})

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        if not self._started():
            return
        p = Path(path)
        if not p.is_file():
            log.warning("artifact %s does not exist; not logged", p)
            return
        self._submit({"kind": "artifact", "path": str(p.resolve()), "subdir": subdir})

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
        except Exception as exc:  # noqa: BLE001 -- never raise into the loop
            log.warning("log_figure(%s): could not render (%s); skipped", name, exc)
            return
        self._log_bytes(buf.getvalue(), name)

    def _log_bytes(self, data: bytes, name: str) -> None:
        """Write ``data`` to a temporary file called ``name`` and log it as an artifact."""
        p = Path(name)
        with tempfile.TemporaryDirectory(prefix="parsimony-artifact-") as tmp:
            local = Path(tmp) / p.name
            local.write_bytes(data)
            self._submit({"kind": "artifact", "path": str(local),
                          "subdir": str(p.parent) if str(p.parent) != "." else None})

    def log_model(self, model: Any, example: Any, metadata: Mapping[str, Any], register_as: str = "") -> str | None:
        """Log ``model`` (the exported, gate-free network) as an MLflow Model of this run with its input
        signature and ``metadata`` (the spec), registered as ``register_as`` when given; its URI, or
        None (with a warning: the files are in the run's artifacts anyway) when the store refuses."""
        if not self._started():
            return None
        try:
            import mlflow
            import mlflow.pytorch
            import torch
            from mlflow.models import infer_signature

            with torch.no_grad():
                out = model(example)
            signature = infer_signature(example.numpy(), out.numpy())
            with _fluent_store(self.uri), mlflow.start_run(run_id=self._run_id):
                info = mlflow.pytorch.log_model(
                    # pickled (loads any batch size; needs this package importable, as pip_requirements say)
                    model, name="model", signature=signature, metadata=dict(metadata), serialization_format="pickle",
                    registered_model_name=register_as or None,
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "parsimony"])
            log.info("logged the final network as MLflow Model %s%s", info.model_uri,
                     f", registered as {register_as!r}" if register_as else "")
            return str(info.model_uri)
        except Exception as exc:  # noqa: BLE001 -- never fail a finished run over its model entry
            log.warning("could not log the final network as an MLflow Model in %s: %s", self.uri,
                        str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__)
            return None

    def _start_system_metrics(self) -> None:
        if not self.cfg.system_metrics:
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self._run_id, sampling_interval=self.cfg.system_metrics_interval_s,
                                                 resume_logging=True, tracking_uri=self.uri)
            self._monitor.start()
        except Exception as exc:  # noqa: BLE001 -- optional
            log.warning("system metrics are off: %s", exc)
            self._monitor = None

    def end(self, status: str = "FINISHED") -> None:
        if not self._started() or self._ended:
            return
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception:  # noqa: BLE001
                pass
            self._monitor = None
        if status not in RUN_STATUSES:
            log.warning("unknown run status %r; recording FAILED", status)
            status = "FAILED"
        self._ended = True
        if self._pending:
            self._down_until = 0.0      # one last attempt to deliver the backlog
            self._replay()
        try:
            if self._pending:
                raise RuntimeError("backlog not delivered")
            self._client.set_terminated(self._run_id, status=status)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not mark run %s as %s in %s: %s", self._run_id, status, self.uri,
                        str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__)
            self._spool({"kind": "end", "status": status}, count=0)
        if self._dropped:
            log.warning("%d tracking item(s) were not sent to %s (run %s); they are kept in %s",
                        self._dropped, self.uri, self._run_id, self.spool_path)

    # -- delivery and backlog -------------------------------------------------------------------
    def _started(self) -> bool:
        if self._run_id is None:
            log.warning("tracker used before start(); ignored")
            return False
        return True

    def _existing_params(self) -> dict[str, str]:
        if self._pending or time.monotonic() < self._down_until:
            return {}
        try:
            return dict(self._client.get_run(self._run_id).data.params)
        except Exception:  # noqa: BLE001 -- the send below will find out and spool
            return {}

    def _submit(self, rec: dict[str, Any]) -> None:
        """Send ``rec`` now, or keep it in the backlog if the store is (known to be) down."""
        if time.monotonic() < self._down_until:
            self._spool(rec)
            return
        if self._pending and not self._replay():
            self._spool(rec)
            return
        try:
            self._send(rec)
        except Exception as exc:  # noqa: BLE001 -- logging must never stop training
            self._mark_down(exc)
            self._spool(rec)

    def _send(self, rec: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        kind = rec["kind"]
        if kind == "metrics":
            ms = [Metric(k, v, rec["ts"], rec["step"]) for k, v in rec["metrics"].items()]
            for chunk in _chunks(ms, 1000):
                self._client.log_batch(self._run_id, metrics=list(chunk), synchronous=True)
        elif kind == "params":
            ps = [Param(k, v) for k, v in rec["params"].items()]
            for chunk in _chunks(ps, 100):
                self._client.log_batch(self._run_id, params=list(chunk), synchronous=True)
        elif kind == "tags":
            ts = [RunTag(k, v) for k, v in rec["tags"].items()]
            for chunk in _chunks(ts, 100):
                self._client.log_batch(self._run_id, tags=list(chunk), synchronous=True)
        elif kind == "artifact":
            self._client.log_artifact(self._run_id, rec["path"], artifact_path=rec.get("subdir"))
        else:
            raise ValueError(f"unknown backlog record {kind!r}")

    @staticmethod
    def _count(rec: dict[str, Any]) -> int:
        kind = rec["kind"]
        return len(rec[kind]) if kind in ("metrics", "params", "tags") else 1

    def _mark_down(self, exc: BaseException) -> None:
        first = self._down_until == 0.0 and not self._pending
        self._down_until = time.monotonic() + self.cfg.retry_after_s
        msg = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        (log.warning if first else log.debug)(
            "tracking store %s failed (%s); keeping items in %s and retrying in %g s",
            self.uri, msg, self.spool_path, self.cfg.retry_after_s)

    def _spool(self, rec: dict[str, Any], count: int | None = None) -> None:
        """Append ``rec`` to the JSONL backlog (artifacts are copied beside it)."""
        rec = dict(rec)
        if rec["kind"] == "artifact":
            dest_dir = self.spool_path.parent / "mlflow_unsent_artifacts" / f"{self._artifact_seq:05d}"
            self._artifact_seq += 1
            try:
                dest_dir.mkdir(parents=True, exist_ok=True)
                rec["path"] = str(shutil.copy2(rec["path"], dest_dir / Path(rec["path"]).name))
            except OSError as exc:
                log.warning("could not keep artifact %s locally: %s", rec["path"], exc)
        rec.setdefault("time", time.time())
        if rec["kind"] != "end":
            self._pending.append(rec)
        self._dropped += self._count(rec) if count is None else count
        try:
            self.spool_path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.spool_path.exists()
            with self.spool_path.open("a") as f:
                if new:  # which run the backlog belongs to, for a later `launch.compare --sync`
                    f.write(json.dumps(self._header()) + "\n")
                f.write(json.dumps(rec) + "\n")
        except OSError as exc:
            log.warning("could not write tracking backlog %s: %s", self.spool_path, exc)

    def _replay(self) -> bool:
        """Send the backlog in order; True if it is now empty."""
        if time.monotonic() < self._down_until:
            return False
        while self._pending:
            rec = self._pending[0]
            try:
                self._send(rec)
            except Exception as exc:  # noqa: BLE001
                self._mark_down(exc)
                break
            self._pending.pop(0)
            self._dropped -= self._count(rec)
        self._rewrite_spool()
        if not self._pending:
            self._down_until = 0.0      # a later outage is announced again
            log.info("tracking store %s answers again; backlog delivered", self.uri)
        return not self._pending

    def _header(self) -> dict[str, Any]:
        return {"kind": "run", "run_id": self._run_id, "uri": self.uri, "experiment": self.experiment}

    def _rewrite_spool(self) -> None:
        try:
            if self._pending:
                self.spool_path.write_text("".join(json.dumps(r) + "\n" for r in [self._header(), *self._pending]))
            elif self.spool_path.exists():
                self.spool_path.unlink()
                shutil.rmtree(self.spool_path.parent / "mlflow_unsent_artifacts", ignore_errors=True)
        except OSError as exc:
            log.warning("could not rewrite tracking backlog %s: %s", self.spool_path, exc)


@contextlib.contextmanager
def _fluent_store(uri: str) -> Iterator[None]:
    """MLflow's fluent API on ``uri`` for a moment: its global URI and $MLFLOW_TRACKING_URI (which
    ``mlflow.set_tracking_uri`` also sets, and which later runs read as their default) are restored."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    before = os.environ.get(ENV_TRACKING_URI)
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if before is None:
            os.environ.pop(ENV_TRACKING_URI, None)
        else:
            os.environ[ENV_TRACKING_URI] = before


def sync_backlog(run_dir: str | Path, uri: str | None = None) -> tuple[int, str | None]:
    """Deliver a run's backlog (``<run_dir>/mlflow_unsent.jsonl``, left by a tracking-store outage)
    in order, then mark the run with the end status it recorded.  ``uri`` overrides the store the
    backlog names.  Returns (items delivered, end status or None); the backlog file keeps what could
    not be delivered.

    Raises:
        FileNotFoundError: no backlog in ``run_dir``.
        TrackingUnavailable: the store does not answer.
    """
    path = Path(run_dir) / UNSENT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tracking backlog (nothing to sync)")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    header = next((r for r in records if r.get("kind") == "run"), None)
    if header is None or not header.get("run_id"):
        raise ValueError(f"{path}: the backlog does not say which run it belongs to (written by an older version)")
    target = uri or header["uri"]
    cfg = TrackingConfig(uri=target if "://" in target else "", experiment=header.get("experiment") or "")
    tracker = MLflowTracker(cfg, Path(run_dir).parent, run_dir)
    tracker.uri = target
    tracker._client, _ = tracker._connect(target)
    tracker._run_id = header["run_id"]
    tracker._pending = [r for r in records if r.get("kind") not in ("run", "end")]
    tracker._dropped = sum(tracker._count(r) for r in tracker._pending)
    ends = [r["status"] for r in records if r.get("kind") == "end"]
    before = tracker._dropped
    if not tracker._replay():
        raise TrackingUnavailable(target, f"{tracker._dropped} item(s) still undelivered; kept in {path}")
    status = ends[-1] if ends else None
    if status is not None:
        try:
            tracker._client.set_terminated(tracker._run_id, status=status)
        except Exception:
            path.write_text(json.dumps(header) + "\n" + json.dumps({"kind": "end", "status": status}) + "\n")
            raise
    path.unlink(missing_ok=True)
    log.info("synced %s: %d item(s) delivered to %s, run %s%s", run_dir, before, target, tracker._run_id,
             f" marked {status}" if status else "")
    return before, status


def make_tracker(cfg: TrackingConfig, rank: int, runs_root: str | Path,
                 run_dir: str | Path | None = None) -> Tracker:
    """The one place that picks a tracker: MLflow on rank 0 when enabled, a no-op otherwise.

    Example::

        tracker = make_tracker(TrackingConfig(), rank=dist_rank, runs_root="runs")
    """
    if cfg.enabled and rank == 0:
        return MLflowTracker(cfg, runs_root, run_dir)
    return NullTracker()
