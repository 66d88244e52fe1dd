"""Delivery to a run, and the local backlog ``<run_dir>/mlflow_unsent.jsonl`` when the store is away:
items are sent at once while it answers, else appended there (artifacts copied beside it) and replayed
in order once it answers again, by the tracker itself or later by :func:`sync_backlog`.

The backlog is JSON lines: first a header ``{"kind": "run", "run_id", "uri", "experiment"}``, then the
records not sent yet, in order (``metrics``, ``params``, ``tags``, ``artifact``, each with the ``time``
it was kept) and, if the run could not be marked with its end status, ``{"kind": "end", "status"}``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from system.tracking.config import TrackingConfig, TrackingUnavailable, experiment_name
from system.tracking.connection import connect, error_line
from system.tracking.names import UNSENT_FILE

log = logging.getLogger(__name__)

ARTIFACTS_DIR = "mlflow_unsent_artifacts"   # beside the backlog: copies of the artifacts it names


def _chunks(items: Sequence[Any], n: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def item_count(rec: dict[str, Any]) -> int:
    """How many items a backlog record holds: its metric values, params or tags; 1 for an artifact."""
    kind = rec["kind"]
    return len(rec[kind]) if kind in ("metrics", "params", "tags") else 1


def send(client: Any, run_id: str, rec: dict[str, Any]) -> None:
    """Send one backlog record to run ``run_id`` through ``client`` (in batches MLflow accepts); raises
    whatever the client raises."""
    from mlflow.entities import Metric, Param, RunTag

    kind = rec["kind"]
    if kind == "metrics":
        ms = [Metric(k, v, rec["ts"], rec["step"]) for k, v in rec["metrics"].items()]
        for chunk in _chunks(ms, 1000):
            client.log_batch(run_id, metrics=list(chunk), synchronous=True)
    elif kind == "params":
        ps = [Param(k, v) for k, v in rec["params"].items()]
        for chunk in _chunks(ps, 100):
            client.log_batch(run_id, params=list(chunk), synchronous=True)
    elif kind == "tags":
        ts = [RunTag(k, v) for k, v in rec["tags"].items()]
        for chunk in _chunks(ts, 100):
            client.log_batch(run_id, tags=list(chunk), synchronous=True)
    elif kind == "artifact":
        client.log_artifact(run_id, rec["path"], artifact_path=rec.get("subdir"))
    else:
        raise ValueError(f"unknown backlog record {kind!r}")


class Backlog:
    """What goes to one run: sent now while the store answers, kept in ``path`` while it does not.

    After a failed send nothing is tried for ``retry_after_s`` seconds; the next record after that
    first replays the backlog in order.  Nothing here raises on a store failure.

    Args:
        client: the ``MlflowClient`` that sends.
        run_id, uri, experiment: the run, its store and experiment (the backlog's header line).
        path: the backlog file (``<run_dir>/mlflow_unsent.jsonl``).
        retry_after_s: the pause after a failed send.
        pending: records already waiting, in order (those of an existing backlog file).

    Example::

        backlog = Backlog(client, run_id, uri, "r50", run_dir / UNSENT_FILE, retry_after_s=60.0)
        backlog.submit({"kind": "tags", "tags": {"method": "gate"}})
    """

    def __init__(self, client: Any, run_id: str, uri: str, experiment: str, path: Path, retry_after_s: float,
                 pending: Sequence[dict[str, Any]] = ()):
        self.client = client
        self.run_id = run_id
        self.uri = uri
        self.experiment = experiment
        self.path = path
        self.retry_after_s = retry_after_s
        self._pending = list(pending)                              # backlog records, in order
        self._dropped = sum(item_count(r) for r in self._pending)  # items in the backlog not yet sent
        self._down_until = 0.0
        self._artifact_seq = 0

    @property
    def dropped(self) -> int:
        """Number of items (metric values, params, tags, artifacts) not (yet) sent."""
        return self._dropped

    @property
    def pending(self) -> int:
        """Number of records waiting in the backlog."""
        return len(self._pending)

    @property
    def behind(self) -> bool:
        """True while records wait or sending is paused: the store may lack what was logged."""
        return bool(self._pending) or time.monotonic() < self._down_until

    def header(self) -> dict[str, Any]:
        """The backlog's first line: which run it belongs to (for a later ``launch.compare --sync``)."""
        return {"kind": "run", "run_id": self.run_id, "uri": self.uri, "experiment": self.experiment}

    def submit(self, rec: dict[str, Any]) -> None:
        """Send ``rec`` now, or keep it in the backlog if the store is (known to be) down."""
        if time.monotonic() < self._down_until:
            self.keep(rec)
            return
        if self._pending and not self.replay():
            self.keep(rec)
            return
        try:
            send(self.client, self.run_id, rec)
        except Exception as exc:
            self._mark_down(exc)
            self.keep(rec)

    def _mark_down(self, exc: BaseException) -> None:
        first = self._down_until == 0.0 and not self._pending
        self._down_until = time.monotonic() + self.retry_after_s
        (log.warning if first else log.debug)(
            "tracking store %s failed (%s); keeping items in %s and retrying in %g s",
            self.uri, error_line(exc), self.path, self.retry_after_s)

    def keep(self, rec: dict[str, Any], count: int | None = None) -> None:
        """Append ``rec`` to the JSONL backlog (artifacts are copied beside it) and add its items (or
        ``count``) to :attr:`dropped`.  An ``end`` record is written, not replayed."""
        rec = dict(rec)
        if rec["kind"] == "artifact":
            dest_dir = self.path.parent / ARTIFACTS_DIR / f"{self._artifact_seq:05d}"
            self._artifact_seq += 1
            try:
                dest_dir.mkdir(parents=True, exist_ok=True)
                rec["path"] = str(shutil.copy2(rec["path"], dest_dir / Path(rec["path"]).name))
            except OSError as exc:
                log.warning("could not keep artifact %s locally: %s", rec["path"], exc)
        rec.setdefault("time", time.time())
        if rec["kind"] != "end":
            self._pending.append(rec)
        self._dropped += item_count(rec) if count is None else count
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.path.exists()
            with self.path.open("a") as f:
                if new:  # which run the backlog belongs to, for a later `launch.compare --sync`
                    f.write(json.dumps(self.header()) + "\n")
                f.write(json.dumps(rec) + "\n")
        except OSError as exc:
            log.warning("could not write tracking backlog %s: %s", self.path, exc)

    def replay(self, now: bool = False) -> bool:
        """Send the backlog in order (unless sending is paused; ``now`` ends the pause first); True if
        it is now empty.  The file keeps what was not sent, and goes once everything was."""
        if now:
            self._down_until = 0.0
        if time.monotonic() < self._down_until:
            return False
        while self._pending:
            rec = self._pending[0]
            try:
                send(self.client, self.run_id, rec)
            except Exception as exc:
                self._mark_down(exc)
                break
            self._pending.pop(0)
            self._dropped -= item_count(rec)
        self._rewrite()
        if not self._pending:
            self._down_until = 0.0      # a later outage is announced again
            log.info("tracking store %s answers again; backlog delivered", self.uri)
        return not self._pending

    def _rewrite(self) -> None:
        try:
            if self._pending:
                self.path.write_text("".join(json.dumps(r) + "\n" for r in [self.header(), *self._pending]))
            elif self.path.exists():
                self.path.unlink()
                shutil.rmtree(self.path.parent / ARTIFACTS_DIR, ignore_errors=True)
        except OSError as exc:
            log.warning("could not rewrite tracking backlog %s: %s", self.path, exc)


def sync_backlog(run_dir: str | Path, uri: str | None = None) -> tuple[int, str | None]:
    """Deliver a run's backlog (``<run_dir>/mlflow_unsent.jsonl``, left by a tracking-store outage)
    in order, then mark the run with the end status it recorded.  ``uri`` overrides the store the
    backlog names.  Returns (items delivered, end status or None) once everything was delivered.

    Raises:
        FileNotFoundError: no backlog in ``run_dir``.
        TrackingUnavailable: the store does not answer, or items are still undelivered (the backlog file
            keeps them).
        ValueError: the backlog names no run.
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
    experiment = experiment_name(cfg)
    client, _ = connect(target, experiment, cfg.connect_timeout)
    backlog = Backlog(client, header["run_id"], target, experiment, path, cfg.retry_after_s,
                      pending=[r for r in records if r.get("kind") not in ("run", "end")])
    ends = [r["status"] for r in records if r.get("kind") == "end"]
    before = backlog.dropped
    if not backlog.replay():
        raise TrackingUnavailable(target, f"{backlog.dropped} item(s) still undelivered; kept in {path}")
    status = ends[-1] if ends else None
    if status is not None:
        try:
            client.set_terminated(backlog.run_id, status=status)
        except Exception:
            path.write_text(json.dumps(header) + "\n" + json.dumps({"kind": "end", "status": status}) + "\n")
            raise
    path.unlink(missing_ok=True)
    log.info("synced %s: %d item(s) delivered to %s, run %s%s", run_dir, before, target, backlog.run_id,
             f" marked {status}" if status else "")
    return before, status
