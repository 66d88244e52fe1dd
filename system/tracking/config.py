"""Section ``tracking`` of the run config, the store URI it resolves to, and the start-up error."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from system.config import check

#: MLflow's own environment variables: defaults for ``tracking.uri`` / ``tracking.experiment``
ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
ENV_EXPERIMENT_NAME = "MLFLOW_EXPERIMENT_NAME"
DEFAULT_EXPERIMENT = "parsimony"


@dataclass(frozen=True)
class TrackingConfig:
    """Where and how runs are recorded (section ``tracking`` of the run config).

    Attributes:
        enabled: False makes every rank use the no-op tracker.
        uri: MLflow tracking URI (``http://host:5000``, ``sqlite:///...``, ``postgresql://...``);
            empty means ``$MLFLOW_TRACKING_URI``, else the embedded sqlite store
            ``sqlite:///<runs_root>/mlflow.db``.
        experiment: experiment name, created on first use; empty means ``$MLFLOW_EXPERIMENT_NAME``,
            else ``parsimony``.
        fallback_local: if the server is unreachable at start, False fails before training,
            True announces it and records the run in the embedded store instead.
        connect_timeout: seconds allowed for the reachability check at start.
        request_timeout: seconds per HTTP request to the server (``MLFLOW_HTTP_REQUEST_TIMEOUT``).
        request_retries: retries per HTTP request (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``); keep it
            small, a dead server otherwise stalls each call for minutes.
        retry_after_s: after a failed send, items go straight to the local backlog for this long
            before the server is tried again.
        register_as: register the run's final network in the model registry under this name
            (empty: logged as an MLflow Model, not registered).
        system_metrics: log MLflow's system metrics (CPU, memory, GPU) for the run, every
            ``system_metrics_interval_s`` seconds.

    Example::

        TrackingConfig(uri="http://127.0.0.1:5000", experiment="r50", fallback_local=True)
    """

    enabled: bool = True
    uri: str = ""
    experiment: str = ""
    fallback_local: bool = False
    connect_timeout: float = 5.0
    request_timeout: float = 30.0
    request_retries: int = 2
    retry_after_s: float = 60.0
    register_as: str = ""
    system_metrics: bool = True
    system_metrics_interval_s: float = 10.0  # seconds between system metrics (CPU, memory, GPU)

    def __post_init__(self) -> None:
        check(self.uri == self.uri.strip(), "uri", "must not have surrounding spaces")
        check(self.system_metrics_interval_s > 0, "system_metrics_interval_s", "must be > 0")
        check(self.register_as == self.register_as.strip(), "register_as", "must not have surrounding spaces")
        check(self.uri == "" or "://" in self.uri or self.uri.startswith("databricks"),
              "uri", f"{self.uri!r} is not a URI (e.g. http://host:5000 or sqlite:///path.db)")
        check(self.experiment == self.experiment.strip(), "experiment", "must not have surrounding spaces")
        check(self.connect_timeout > 0, "connect_timeout", "must be > 0")
        check(self.request_timeout > 0, "request_timeout", "must be > 0")
        check(self.request_retries >= 0, "request_retries", "must be >= 0")
        check(self.retry_after_s >= 0, "retry_after_s", "must be >= 0")


class TrackingUnavailable(RuntimeError):
    """The tracking store could not be reached when the run started; ``uri`` names it."""

    def __init__(self, uri: str, reason: str):
        self.uri = uri
        super().__init__(
            f"MLflow tracking server {uri} is unreachable ({reason}); nothing was trained. "
            "Start the server, fix tracking.uri, or set tracking.fallback_local=true "
            "to record the run in the local store.")


SQLITE = "sqlite:///"


def local_store_uri(runs_root: str | Path) -> str:
    """URI of the embedded sqlite store under ``runs_root`` (absolute, so cwd does not matter)."""
    return f"{SQLITE}{Path(runs_root).resolve() / 'mlflow.db'}"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` store URI (None for any other store)."""
    return Path(uri[len(SQLITE):]) if uri.startswith(SQLITE) else None


def resolve_uri(cfg: TrackingConfig, runs_root: str | Path) -> str:
    """``cfg.uri``, else ``$MLFLOW_TRACKING_URI``, else the embedded store's URI (an explicit key wins)."""
    return cfg.uri or os.environ.get(ENV_TRACKING_URI, "").strip() or local_store_uri(runs_root)


def experiment_name(cfg: TrackingConfig) -> str:
    """``cfg.experiment``, else ``$MLFLOW_EXPERIMENT_NAME``, else ``parsimony``."""
    return cfg.experiment or os.environ.get(ENV_EXPERIMENT_NAME, "").strip() or DEFAULT_EXPERIMENT
