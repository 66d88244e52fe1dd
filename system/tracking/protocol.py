"""The narrow ``Tracker`` interface the loop talks to, and the no-op tracker of ranks > 0."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Tracker(Protocol):
    """What the training loop may do with a run.  Only ``start`` may raise.

    ``run_id`` is None before ``start``; ``dropped`` counts items that never reached the store; ``records``
    is False for a tracker that keeps nothing (what only the store would show, such as the layer-width plot, is
    then not drawn).
    """

    records: bool

    @property
    def run_id(self) -> str | None: ...

    @property
    def dropped(self) -> int: ...

    def start(self, run_name: str, params: Mapping[str, Any] | None = None,
              tags: Mapping[str, Any] | None = None, run_id: str | None = None) -> str:
        """Open a run (or resume ``run_id``), record params (a flattened config) and tags."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Record params; a value that differs from one already logged is kept as is, with a warning."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record metric values at ``step``; non-finite values are skipped."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set (or overwrite) run tags."""

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        """Upload a local file under ``subdir`` of the run's artifacts."""

    def log_dict(self, obj: Any, name: str) -> None:
        """Upload ``obj`` as JSON artifact ``name`` (e.g. ``"summary.json"``)."""

    def log_figure(self, figure: Any, name: str) -> None:
        """Upload a matplotlib figure as PNG artifact ``name``."""

    def run_url(self) -> str | None:
        """The run's page in the MLflow UI (None without a UI)."""

    def log_model(self, model: Any, example: Any, metadata: Mapping[str, Any], register_as: str = "") -> str | None:
        """Log ``model`` as an MLflow Model (signature from ``example``); its URI, or None."""

    def end(self, status: str = "FINISHED") -> None:
        """Close the run with ``status`` (FINISHED, FAILED or KILLED); report what was not sent."""


class NullTracker:
    """The tracker of ranks other than 0 (and of ``enabled=False``): records nothing."""

    records = False

    def __init__(self) -> None:
        self._run_id: str | None = None

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def dropped(self) -> int:
        return 0

    def start(self, run_name: str, params: Mapping[str, Any] | None = None,
              tags: Mapping[str, Any] | None = None, run_id: str | None = None) -> str:
        self._run_id = run_id or ""
        return self._run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        pass

    def log_dict(self, obj: Any, name: str) -> None:
        pass

    def log_figure(self, figure: Any, name: str) -> None:
        pass

    def log_model(self, model: Any, example: Any, metadata: Mapping[str, Any], register_as: str = "") -> str | None:
        return None

    def run_url(self) -> str | None:
        return None

    def end(self, status: str = "FINISHED") -> None:
        pass
