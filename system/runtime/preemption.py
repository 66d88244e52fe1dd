"""Cooperative stop requests (preemption, time limits) for the training loop.

A launcher that can be preempted (``launch.slurm_job.TrainJob`` under Slurm; ``launch.train`` for Ctrl-C) installs a
signal handler that
only calls :func:`request_stop` -- nothing else is safe inside a handler that interrupts a
training step, a collective or a checkpoint write -- and turns watching on with :func:`watch`.
The trainer then asks, once per step, whether *any* rank saw a request
(``comm.any_flag(stop_requested())``, the :class:`Collectives`' one all-reduce): every rank gets the same answer at the
same step, they save a checkpoint together and the loop raises :class:`Preempted`.  The launcher
catches it and requeues the job, which resumes from that checkpoint.

This module knows nothing of Slurm or submitit; without :func:`watch` the loop never checks, so
plain runs pay no extra collective.

Example::

    from system.runtime import preemption
    preemption.watch()
    signal.signal(signal.SIGUSR2, lambda *_: preemption.request_stop("SIGUSR2"))
    try:
        summary = launch.train.run(cfg)
    except preemption.Preempted as stop:
        requeue()      # the checkpoint of step ``stop.step`` is on disk
"""

from __future__ import annotations

_state = {"watching": False, "requested": False, "reason": ""}


class Preempted(Exception):
    """The run stopped at an agreed step after saving a checkpoint there; resume it to continue.

    Attributes:
        step: the step whose checkpoint was written (every rank stopped after it).
        checkpoint: path of that checkpoint (or "" when checkpoints are not configured).
    """

    def __init__(self, step: int, checkpoint: str = "", reason: str = ""):
        self.step, self.checkpoint, self.reason = step, checkpoint, reason
        super().__init__(f"stopped after step {step} ({reason or 'stop requested'}); "
                         f"checkpoint {checkpoint or '(none)'}")


def watch(enabled: bool = True) -> None:
    """Make the training loop check for stop requests at every step (all ranks must agree on this)."""
    _state["watching"] = bool(enabled)


def watching() -> bool:
    return bool(_state["watching"])


def request_stop(reason: str = "signal") -> None:
    """Ask the loop to stop at the next step; safe to call from a signal handler (sets a flag)."""
    _state["requested"] = True
    _state["reason"] = reason


def stop_requested() -> bool:
    """True once this process has seen a stop request (other ranks may not have: all-reduce it)."""
    return bool(_state["requested"])


def reason() -> str:
    return str(_state["reason"])


def reset() -> None:
    """Forget requests and stop watching (a fresh run in the same process)."""
    _state.update(watching=False, requested=False, reason="")
