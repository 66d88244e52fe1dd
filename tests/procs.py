"""Process helpers shared by the tests (service fixtures, command-line runs)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time


def stop_group(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, wait_s: float = 10.0) -> None:
    """Send ``sig`` to the process group of ``proc`` (started with ``start_new_session=True``, so its
    workers go too) and wait for it; SIGKILL if it has not ended within ``wait_s``.  An ended or
    never-started process is left alone."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def wait_for_stderr(proc: subprocess.Popen, needle: str, timeout: float = 120.0) -> str:
    """Read ``proc``'s stderr (a text pipe) line by line until ``needle`` appears; return what was read.
    Fails, with the tail of what was read, if the process ends or ``timeout`` passes first."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"{needle!r} never appeared:\n{''.join(seen)[-3000:]}")
