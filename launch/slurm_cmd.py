"""The one way ``launch`` runs Slurm's commands (``sinfo``, ``scontrol``, ``sacct``, ``squeue``, ``sbatch``).

:func:`run_slurm` returns a command's stdout or raises :class:`SlurmError`, which names the command
and why it failed.  The submitter lets the error reach its command line (``error: ... nothing was
submitted``); code inside a running job logs it instead (the job is ending anyway).  submitit runs
its own ``sbatch``/``sacct``/``scancel`` calls.
"""

from __future__ import annotations

import signal
import subprocess

#: seconds a Slurm command may take before it counts as failed
TIMEOUT_S = 60.0


class SlurmError(RuntimeError):
    """A Slurm command failed: ``<command line> failed: <reason>``.

    Attributes:
        cmd: the command and its arguments.
        status: its exit status; None when it could not start or ran past its timeout.
        reason: its stderr (else its stdout), stripped; or why it could not run.
    """

    def __init__(self, cmd: tuple[str, ...], status: int | None, reason: str):
        super().__init__(f"{' '.join(cmd)} failed: {reason}")
        self.cmd = cmd
        self.status = status
        self.reason = reason


def _ignore_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def run_slurm(*cmd: str, timeout: float = TIMEOUT_S, ignore_sigterm: bool = False) -> str:
    """Run the Slurm command ``cmd`` and return its stdout.

    Args:
        cmd: the command and its arguments.
        timeout: seconds before the command counts as failed.
        ignore_sigterm: run the command with SIGTERM ignored.  Inside a job: after ``scontrol requeue``
            Slurm SIGTERMs every process of the job at once, and killed the ``scontrol update`` that
            followed it (measured); SIGKILL still comes after KillWait.

    Raises:
        SlurmError: the command exited non-zero (``status`` set), could not start or timed out
            (``status`` None).

    Example::

        partitions = run_slurm("sinfo", "-h", "-o", "%P").split()
    """
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                             preexec_fn=_ignore_sigterm if ignore_sigterm else None)
    except (OSError, subprocess.SubprocessError) as exc:
        raise SlurmError(cmd, None, str(exc)) from exc
    if out.returncode != 0:
        raise SlurmError(cmd, out.returncode, (out.stderr or out.stdout).strip())
    return out.stdout
