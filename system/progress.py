"""Training progress: a tqdm bar on a terminal, plain log lines elsewhere (Slurm logs, CI, pipes),
where a bar's carriage-return redraws would fill the log file."""

from __future__ import annotations

import logging
import sys
import time
from datetime import timedelta
from typing import Any

log = logging.getLogger("system.trainer")


class LogProgress:
    """The bar's interface (``update``, ``set_postfix``, a context manager), as a log line at most
    every ``interval_s`` seconds: step, %, rate, ETA and the postfix (loss, MACs)."""

    def __init__(self, total: int, initial: int, interval_s: float):
        self.total, self.n, self.interval_s = total, initial, interval_s
        self._t0 = self._last = time.monotonic()
        self._n0 = initial
        self._postfix: dict[str, Any] = {}

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.n > self._n0 and self.n >= self.total:
            self._emit()

    def set_postfix(self, **kw: Any) -> None:
        self._postfix = kw

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self._last >= self.interval_s:
            self._emit()

    def _emit(self) -> None:
        now = time.monotonic()
        rate = (self.n - self._n0) / max(now - self._t0, 1e-9)
        eta = timedelta(seconds=int((self.total - self.n) / rate)) if rate > 0 else "?"
        extra = " ".join(f"{k} {v}" for k, v in self._postfix.items())
        log.info("step %d/%d (%.0f%%) %.2f step/s ETA %s %s", self.n, self.total, 100.0 * self.n / max(1, self.total),
                 rate, eta, extra)
        self._last = now


def progress(total: int, initial: int, interval_s: float, stream=None):
    """A tqdm bar when ``stream`` (default stderr) is a terminal, else :class:`LogProgress`."""
    stream = stream or sys.stderr
    if stream.isatty():
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, file=stream)
    return LogProgress(total, initial, interval_s)
