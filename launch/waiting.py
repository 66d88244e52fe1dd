"""After submitting: what was submitted (:class:`Submitted`), printing it, waiting for the jobs.

:func:`report` prints each job's id, run name, run directory, logs and MLflow store; :func:`wait`
follows the jobs' states to the end and prints each result or error (``launch.submit --wait``).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from submitit.local.local import LocalJob

from system.tracking.secrets import redact_text


@dataclasses.dataclass
class Submitted:
    """One submitted run: its submitit job handle, run name and directory, MLflow store and sweep values."""

    job: Any
    run_name: str
    run_dir: Path
    tracking_uri: str
    sweep_values: dict[str, Any]
    continue_cmd: str = ""  # the command that continues this run in a new job (``parsimony-submit --resume``)


#: the line of a Python traceback that names the error (``pkg.SomeError: what``)
ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit|Interrupt|Lost|Preempted)\b.*")


#: the launcher's line for a task that died (``srun: error: node1: task 0: Exited with exit code 75``)
TASK_EXIT = re.compile(r"(error:.*(exit code|signal|killed|cancelled)|CANCELLED|DUE TO TIME LIMIT)", re.IGNORECASE)


def error_lines(exc: BaseException) -> list[str]:
    """What a failed job's exception says, whole lines only: submitit's head (the job and, when it wrote
    no result, its state), the last error line of the job's traceback, and how its task ended."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return [type(exc).__name__]
    head = lines[0] + (f" {lines[1]}" if len(lines) > 1 and lines[1].startswith("has not produced") else "")
    errors = [ln for ln in lines[1:] if ERROR_LINE.match(ln)]
    exits = [ln for ln in lines[1:] if TASK_EXIT.search(ln)]
    return [head] + [found[-1] for found in (errors, exits) if found and found[-1] not in head]


def continued_on_fewer(job) -> dict | None:
    """Rank 0's summary of an elastic job that finished on fewer ranks than submitted (the other tasks
    of the submission wrote no result), else None."""
    try:
        summary = job.task(0).result()
    except Exception:
        return None
    return _shrunk(job, summary)


def _shrunk(job, summary: Any) -> dict | None:
    if isinstance(summary, dict) and 0 < int(summary.get("world_size", 0)) < job.num_tasks:
        return summary
    return None


def outcome(job) -> tuple[list[Any] | None, dict | None, BaseException | None]:
    """A done job's ``(results, shrunk, error)``: its tasks' results; or rank 0's summary of an elastic job that
    continued on fewer ranks (:func:`continued_on_fewer`); or the exception that says why it has none.

    Task 0's result is read first and once.  submitit waits up to 15 s for a result file that is missing (a
    shared file system may show it late) every time it is asked, and a job that was killed, cancelled or left
    by ``sys.exit`` writes none: reading it twice doubled the wait for every failed job."""
    try:
        head = job.task(0).result()
    except Exception as exc:  # submitit raises the job's traceback (or why there is no result)
        return None, None, exc
    if job.num_tasks == 1:
        return [head], None, None
    shrunk = _shrunk(job, head)
    if shrunk is not None:  # the other tasks wrote no result: do not wait for theirs
        return None, shrunk, None
    try:
        return job.results(), None, None
    except Exception as exc:
        return None, None, exc


def report(sub: list[Submitted]) -> None:
    """Print each job's id and run name (and sweep values), run directory, log files and MLflow store."""
    for s in sub:
        sweep = f"  sweep {json.dumps(s.sweep_values)}" if s.sweep_values else ""
        print(f"job {s.job.job_id}: run {s.run_name}{sweep}")
        print(f"  run dir   {s.run_dir}")
        print(f"  logs      {s.job.paths.stdout}  (stderr {s.job.paths.stderr})")
        print(f"  mlflow    {redact_text(s.tracking_uri)}  run name {s.run_name}")
        if s.continue_cmd:
            print(f"  continue  {s.continue_cmd}   (after a cancel or a failure)")


#: submitit's states of a job that has not ended (``InfoWatcher.is_done``)
UNFINISHED = ("READY", "PENDING", "RUNNING", "UNKNOWN", "REQUEUED", "COMPLETING", "PREEMPTED")


def job_state(job, force: bool = False) -> str:
    """The job's state: submitit's cached scheduler state, or (``force``) a fresh ``sacct`` read; a
    local job's is always its process's."""
    try:
        if force and not isinstance(job, LocalJob):
            return str(job.watcher.get_state(job.job_id, mode="force"))
        return str(job.state)
    except Exception:
        return "UNKNOWN"


def final_state(job, settle_s: float = 60.0, poll_s: float = 1.0) -> str:
    """The state of a job that is done, read from the scheduler until it says the job ended.

    ``done()`` trusts the job's result file, which the job writes before it exits, and the cached state
    lags the scheduler by up to minutes; so a job seen done may still read PENDING or RUNNING.  Gives up
    after ``settle_s`` (the state it has then)."""
    deadline = time.monotonic() + settle_s
    while True:
        state = job_state(job, force=True)
        if state.upper() not in UNFINISHED or time.monotonic() >= deadline:
            return state
        time.sleep(poll_s)


def refresh_states(sub: list[Submitted]) -> None:
    """One ``sacct`` read for every Slurm job of ``sub`` (submitit's watcher is shared by its jobs).

    Without it a poll sees submitit's cached state, which it refreshes every min(600 s, half the time since
    it last registered a job): a job that ended without a result file was seen done up to minutes late."""
    slurm = next((s.job for s in sub if not isinstance(s.job, LocalJob)), None)
    if slurm is None:
        return
    try:
        slurm.watcher.update()
    except Exception:  # a failed read leaves the cache as it was; the next poll tries again
        pass


def wait(sub: list[Submitted], poll_s: float = 10.0) -> int:
    """Wait for every job, printing each state change (PENDING, RUNNING, ...) and, once all are done,
    each job's final state; then its summary or its error and log path; 1 if any failed.  The scheduler
    is asked every ``poll_s`` seconds (:func:`refresh_states`)."""
    last: dict[str, str] = {}

    def show(s: Submitted, state: str) -> None:
        if last.get(str(s.job.job_id)) != state:
            last[str(s.job.job_id)] = state
            print(f"job {s.job.job_id} ({s.run_name}): {state}", flush=True)

    refresh_states(sub)
    while not all(s.job.done() for s in sub):
        for s in sub:
            show(s, job_state(s.job))
        time.sleep(poll_s)
        refresh_states(sub)
    for s in sub:
        show(s, final_state(s.job))
    failed = 0
    for s in sub:
        results, shrunk, exc = outcome(s.job)
        if shrunk is not None:
            print(f"job {s.job.job_id} ({s.run_name}): continued on {shrunk.get('world_size')} of "
                  f"{s.job.num_tasks} ranks after losing nodes (launch.min_nodes)")
            results = [shrunk]
        elif exc is not None:
            failed += 1
            print(f"job {s.job.job_id} ({s.run_name}) FAILED: " + "\n  ".join(error_lines(exc)), file=sys.stderr)
            print(f"  stderr: {s.job.paths.stderr}\n  stdout: {s.job.paths.stdout}", file=sys.stderr)
            if s.continue_cmd:
                print(f"  continue it from its last checkpoint: {s.continue_cmd}", file=sys.stderr)
            continue
        summary = results[0] if results else {}
        keys = ("top1", "macs_pct", "prune_events", "steps", "world_size", "run_id")
        print(f"job {s.job.job_id} ({s.run_name}) done: " +
              ", ".join(f"{k}={summary.get(k)}" for k in keys if isinstance(summary, dict)))
    return 1 if failed else 0

