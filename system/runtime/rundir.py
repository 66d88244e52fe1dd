"""Run directories: a new run never writes into an earlier run's directory, and one process owns a
directory while its run is alive.

Where a run lives (:func:`resolve_run_dir`):

- ``run.dir`` given: that directory.  A fresh run (no ``run.resume``) into a directory that already
  holds a run is refused, naming it: an explicit path is never silently redirected.
- otherwise ``<run.root>/<run.name>`` (default name ``<method label>-<model>``).  When a fresh run
  finds that directory taken, it gets the next free version ``<name>-v2``, ``<name>-v3``, ... (as
  Lightning and timm version their log directories), with an info line.  With ``run.resume`` the
  newest version of the name is the run that continues.

One writer (:class:`RunLock`): rank 0 of a live run holds ``<run_dir>/.lock`` (host, pid, Slurm
job id, a heartbeat refreshed as it trains).  A second launch into the directory refuses, naming
the holder.  A lock whose process is gone (same host: its pid no longer runs; another host: no
heartbeat for ``stale_after_s``; the same Slurm job, restarted: its previous incarnation) is stale
and taken over with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK = ".lock"
#: what marks a directory as holding a run
_RUN_FILES = ("config.json", "summary.json", "checkpoints")
_VERSION = re.compile(r"^(?P<base>.+)-v(?P<n>\d+)$")


class RunDirError(ValueError):
    """A run directory cannot be used as asked (taken, or locked by a live run)."""


def holds_run(d: Path) -> bool:
    return d.is_dir() and any((d / f).exists() for f in _RUN_FILES)


def versions(base: Path) -> list[Path]:
    """``base`` and its versions ``base-v2, base-v3, ...`` that exist, oldest first."""
    found = [(1, base)] if base.exists() else []
    if base.parent.is_dir():
        for p in base.parent.iterdir():
            m = _VERSION.match(p.name)
            if m and m.group("base") == base.name and p.is_dir():
                found.append((int(m.group("n")), p))
    return [p for _, p in sorted(found)]


def resolve_run_dir(run_dir: Path, explicit: bool, resume: str) -> Path:
    """Where this run writes (see the module docstring); pure apart from reading the file system."""
    if resume:
        if explicit:
            return run_dir
        existing = versions(run_dir)
        return existing[-1] if existing else run_dir
    if not holds_run(run_dir):
        return run_dir
    what = describe(run_dir)
    if explicit:
        raise RunDirError(f"config key 'run.dir': {run_dir} already holds a run ({what}); continue it with "
                          f"run.resume=auto, or give this run another run.dir (nothing was written)")
    n = max([2] + [int(m.group("n")) + 1 for p in versions(run_dir) if (m := _VERSION.match(p.name))])
    new = run_dir.with_name(f"{run_dir.name}-v{n}")
    log.info("%s holds an earlier run (%s): this run writes %s (continue the earlier one with run.resume=auto)",
             run_dir, what, new)
    return new


def describe(d: Path) -> str:
    """A few words on the run a directory holds, for messages."""
    try:
        s = json.loads((d / "summary.json").read_text())
        return f"finished, {s.get('steps')} steps, {s.get('macs_pct', 0):.1f}% MACs"
    except (OSError, ValueError):
        pass
    steps = sorted(p.name for p in (d / "checkpoints").glob("step-*")) if (d / "checkpoints").is_dir() else []
    return f"unfinished, checkpoints up to {steps[-1]}" if steps else "unfinished, no checkpoint"


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    slurm_job_id: str
    restart: int
    started: float

    @classmethod
    def me(cls) -> Holder:
        env = os.environ
        return cls(host=socket.gethostname(), pid=os.getpid(), slurm_job_id=env.get("SLURM_JOB_ID", ""),
                   restart=int(env.get("SLURM_RESTART_COUNT", "0") or 0), started=time.time())

    def __str__(self) -> str:
        job = f", Slurm job {self.slurm_job_id}" if self.slurm_job_id else ""
        return f"host {self.host}, pid {self.pid}{job}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``<run_dir>/.lock`` held by rank 0 of the live run (see the module docstring)."""

    def __init__(self, run_dir: Path, stale_after_s: float = 300.0):
        self.path = Path(run_dir) / LOCK
        self.stale_after_s = stale_after_s
        self.me = Holder.me()
        self.held = False
        self._last_beat = 0.0

    def _read(self) -> tuple[Holder, float] | None:
        try:
            data: dict[str, Any] = json.loads(self.path.read_text())
            return Holder(**data), self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):
            return Holder("?", -1, "", 0, 0.0), 0.0  # unreadable: treated as stale below

    def _stale(self, other: Holder, beat: float) -> str | None:
        """Why ``other``'s lock is stale, or None if its run may be alive."""
        me = self.me
        if other.pid < 0:
            return "an unreadable lock file"
        if other.host == me.host and other.pid == me.pid:
            return "this process (an earlier run object that did not finish)"
        if other.slurm_job_id and other.slurm_job_id == me.slurm_job_id and other.restart < me.restart:
            return f"the previous incarnation (restart {other.restart}) of this Slurm job"
        if other.host == me.host:
            return None if _pid_alive(other.pid) else f"pid {other.pid} is no longer running"
        age = time.time() - beat
        return f"no heartbeat for {age:.0f} s" if age > self.stale_after_s else None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`RunDirError` naming the live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                found = self._read()
                if found is None:
                    continue  # released meanwhile
                other, beat = found
                why = self._stale(other, beat)
                if why is None:
                    raise RunDirError(
                        f"{self.path.parent} is in use by a live run ({other}, heartbeat {time.time() - beat:.0f} s "
                        f"ago); a second writer would overwrite its checkpoints and results. Wait for it, stop it, "
                        f"or give this run another run.name / run.dir") from None
                log.warning("taking over the stale lock %s of %s: %s", self.path, other, why)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(self.me.__dict__, fh)
            self.held = True
            self._last_beat = time.monotonic()
            return
        raise RunDirError(f"{self.path}: could not take the lock (another launch keeps taking it)")

    def heartbeat(self, every_s: float = 10.0) -> None:
        """Refresh the lock's mtime (cheap; at most every ``every_s`` seconds)."""
        now = time.monotonic()
        if self.held and now - self._last_beat >= every_s:
            try:
                os.utime(self.path)
            except OSError:
                pass
            self._last_beat = now

    def release(self) -> None:
        if self.held:
            found = self._read()
            if found is not None and found[0].pid == self.me.pid and found[0].host == self.me.host:
                self.path.unlink(missing_ok=True)
            self.held = False


@dataclass
class Claimed:
    """A claimed run directory: its path, rank 0's lock, and the folders the claim created."""

    path: Path
    lock: RunLock | None
    made: list[Path]


def claim(base: Path, explicit: bool, resume: str, rank: int, broadcast: Callable[[Any], Any]) -> Claimed:
    """Rank 0 resolves the directory (:func:`resolve_run_dir`) and takes its lock; ``broadcast``
    sends rank 0's path to every rank.  Raises :class:`RunDirError` on every rank if rank 0 cannot."""
    path, error, lock, made = "", None, None, []
    if rank == 0:
        try:
            chosen = resolve_run_dir(base, explicit=explicit, resume=resume)
            made = [d for d in [chosen, *chosen.parents] if not d.exists()]  # innermost first
            lock = RunLock(chosen)
            lock.acquire()
            path = str(chosen)
        except RunDirError as exc:
            error = exc
    path = broadcast(path)
    if error is not None:
        raise error
    if not path:
        raise RunDirError(f"rank 0 could not use the run directory {base} (see its log)")
    return Claimed(Path(path), lock, made)


def remove_empty(dirs: list[Path]) -> None:
    """Remove ``dirs`` (innermost first) while they are empty."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            break
