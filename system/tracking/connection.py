"""The MLflow client and its process-wide settings: the reachability check, the HTTP timeouts and
retries, the experiment a run goes into, and the few MLflow internals the tracker relies on (the
fluent API's store, the system-metrics thread), each wrapped here once."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from system.tracking.config import ENV_TRACKING_URI, TrackingConfig, TrackingUnavailable, sqlite_file
from system.tracking.names import EXPERIMENT_KIND_TAG, RUNS_VIEW_TAG, runs_view_state
from system.tracking.secrets import split_login

log = logging.getLogger(__name__)


def error_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (at most 300 characters), else its type's name."""
    return str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__


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


def ui_base(uri: str) -> str | None:
    """The MLflow UI's address for an HTTP(S) store, without a URL login; None for any other store."""
    if not uri.startswith(("http://", "https://")):
        return None
    return split_login(uri)[0].rstrip("/")


def configure_http(cfg: TrackingConfig) -> None:
    """Set MLflow's per-request timeout and retries from ``cfg`` (in the environment, where its
    REST client reads them per request) and, unless the environment says otherwise, keep MLflow
    from printing run links to stdout."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(cfg.request_retries)
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, math.ceil(cfg.request_timeout)))
    # MLflow prints its own run link to stdout (without the workflow the UI needs, and into the
    # JSON summary launch.train prints there); ours goes to the log
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def connect(uri: str, experiment: str, connect_timeout: float) -> tuple[Any, str]:
    """An ``MlflowClient`` for ``uri`` and the id of ``experiment`` there (created, or restored if
    deleted; a local store keeps its artifacts beside its database).

    Raises:
        TrackingUnavailable: the store does not answer (an HTTP store is asked ``/health`` first,
            within ``connect_timeout`` seconds) or cannot be used.
    """
    if uri.startswith(("http://", "https://")):
        reason = http_reachable(uri, connect_timeout)
        if reason is not None:
            raise TrackingUnavailable(uri, reason)
    from mlflow.tracking import MlflowClient

    db = sqlite_file(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _first_open(db):
            return _experiment(MlflowClient(tracking_uri=uri), experiment, db)
    except TrackingUnavailable:
        raise
    except Exception as exc:
        raise TrackingUnavailable(uri, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                                  ) from exc


@contextlib.contextmanager
def _first_open(db: Path | None) -> Iterator[None]:
    """For an embedded sqlite store: hold ``<db>.lock`` while the store is opened. The first open
    creates and migrates the schema, and two runs starting at once on a fresh ``run.root`` would
    both migrate it (sqlite: "duplicate column name"), failing one of them."""
    if db is None:
        yield
        return
    with open(db.with_name(db.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _experiment(client: Any, experiment: str, db: Path | None) -> tuple[Any, str]:
    """``client`` and the id of ``experiment`` there (created, or restored if deleted; a local store
    keeps its artifacts beside its database), with the runs table's shared view
    (:data:`~system.tracking.names.RUNS_VIEW_TAG`) set."""
    from mlflow.exceptions import MlflowException

    view = runs_view_state()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        # Locally, artifacts live beside the database (not in ./mlruns of whatever cwd).
        location = (db.parent / "mlartifacts" / experiment).as_uri() if db is not None else None
        try:
            return client, client.create_experiment(
                experiment, artifact_location=location,
                tags={EXPERIMENT_KIND_TAG: "custom_model_development", RUNS_VIEW_TAG: view})
        except MlflowException:   # another process created it meanwhile
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    if exp.tags.get(RUNS_VIEW_TAG) != view:  # an experiment made elsewhere, or by an older version
        try:
            client.set_experiment_tag(exp.experiment_id, RUNS_VIEW_TAG, view)
        except MlflowException as exc:  # e.g. a login that may not edit the experiment: the run goes on
            log.warning("MLflow: could not set the runs table's view on experiment %r: %s", experiment,
                        error_line(exc))
    return client, exp.experiment_id


def find_run(client: Any, run_id: str) -> Any:
    """Run ``run_id`` as ``client`` sees it, or None if the store does not know it."""
    from mlflow.exceptions import MlflowException
    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


@contextlib.contextmanager
def fluent_store(uri: str) -> Iterator[None]:
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


def start_system_metrics(run_id: str, uri: str, interval_s: float) -> Any:
    """MLflow's system-metrics thread (CPU, memory, GPU) for run ``run_id``, started; None (with a
    warning) if it cannot run.  Stop it with :func:`stop_system_metrics`."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True, tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception as exc:
        log.warning("system metrics are off: %s", exc)
        return None


def stop_system_metrics(monitor: Any) -> None:
    """Stop a thread from :func:`start_system_metrics`; never raises."""
    try:
        monitor.finish()
    except Exception:
        pass
