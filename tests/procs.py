"""Process helpers shared by the tests' service fixtures."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


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
