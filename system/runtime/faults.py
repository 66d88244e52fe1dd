"""Fault injection: the one seam through which tests reach production code.

Read from the environment once, when a run is built (``Trainer(cfg, faults=...)`` takes an
explicit one); nothing else in the package reads these variables.

- ``PARSIMONY_STOP_AFTER_STEP=k``: after step ``k`` the loop saves a checkpoint and stops the
  process with :class:`InjectedStop` (exit status 75), as a preemption would, without changing
  any schedule.
- ``PARSIMONY_CKPT_WRITE_DELAY=s``: the checkpointer sleeps ``s`` seconds in the middle of every
  checkpoint write (so a test can SIGKILL the process while a checkpoint is half written).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

ENV_STOP = "PARSIMONY_STOP_AFTER_STEP"
ENV_WRITE_DELAY = "PARSIMONY_CKPT_WRITE_DELAY"


class InjectedStop(SystemExit):
    """Raised after the ``PARSIMONY_STOP_AFTER_STEP`` checkpoint (exit status 75, EX_TEMPFAIL)."""

    def __init__(self, step: int):
        super().__init__(75)
        self.step = step


@dataclass(frozen=True)
class Faults:
    """Injected faults of one run (all off by default)."""

    stop_after_step: int = 0
    write_delay_s: float = 0.0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Faults:
        try:
            return cls(stop_after_step=int(environ.get(ENV_STOP, "0") or 0),
                       write_delay_s=float(environ.get(ENV_WRITE_DELAY, "0") or 0))
        except ValueError as exc:
            raise ValueError(f"{ENV_STOP} / {ENV_WRITE_DELAY}: not a number ({exc})") from None

    def stops_after(self, step: int) -> bool:
        return self.stop_after_step > 0 and step == self.stop_after_step
