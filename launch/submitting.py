"""What ``parsimony-submit`` does once its arguments are read (:mod:`launch.submit` is the command):
check every job before anything is submitted (:mod:`launch.preflight`, the cluster through
:mod:`launch.cluster_checks`), skip a sweep's finished runs, and submit one job, a job array or
the local pool.  Kept apart from the command so that ``--help`` answers without importing torch."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

from launch.cluster_checks import check_cluster, sbatch_test_only
from launch.config import Job, LaunchConfig
from launch.continuing import continue_job, is_explicit
from launch.preflight import check_job, check_tracking
from launch.slurm_job import TrainJob, base_name, batch_script, make_executor, run_name
from launch.waiting import Submitted
from system.config import ConfigError, to_dict
from system.tracking.config import sqlite_file

try:  # a project dependency; only needed to submit and inside jobs
    import submitit
except ImportError:  # pragma: no cover
    submitit = None


def preflight(launch: LaunchConfig, jobs: list[Job]) -> None:
    """Every check a job would otherwise fail inside Slurm (:mod:`launch.preflight`); warnings printed."""
    seen: set[str] = set()
    for job in jobs:
        for w in check_job(launch, job):
            if w not in seen:
                seen.add(w)
                print(f"warning: {w}", file=sys.stderr)


def validate(launch: LaunchConfig, folder: Path, job_name: str) -> Any:
    """Build the executor and check it against the cluster; nothing is submitted.

    Raises:
        ConfigError: the allocation does not fit the cluster (naming the key), or sbatch rejects
            the batch script (``launch.slurm_extra`` when only the extra options make it fail).
    """
    ex = make_executor(launch, folder, job_name)
    if ex.cluster != "slurm":
        return ex
    check_cluster(launch)
    reason = sbatch_test_only(batch_script(ex))
    if reason is not None:
        key = "launch"
        if launch.slurm_extra and sbatch_test_only(batch_script(make_executor(launch, folder, job_name, {}))) is None:
            key = "launch.slurm_extra"
        opts = [line for line in batch_script(ex).splitlines() if line.startswith("#SBATCH")]
        raise ConfigError(key, f"the cluster rejects this job: {reason}\n  batch options:\n    " + "\n    ".join(opts))
    return ex


def resolve_paths(job: Job) -> Job:
    """Absolute run.root (jobs may start in another directory): what is printed is where it lands."""
    run = job.cfg.run
    root = str(Path(run.root).resolve())
    new = dataclasses.replace(run, root=root, dir=str(Path(run.dir).resolve()) if run.dir else "")
    return dataclasses.replace(job, cfg=dataclasses.replace(job.cfg, run=new))


def prepare(jobs: list[Job]) -> list[Job]:
    """Absolute paths, and an explicit ``run.resume`` turned into the run the job continues
    (:func:`launch.continuing.continue_job`); a sweep cannot continue one run."""
    if len(jobs) > 1 and any(is_explicit(j.cfg.run.resume) for j in jobs):
        raise ConfigError("run.resume", "every run of a sweep would continue the same run; submit it alone")
    return [continue_job(resolve_paths(j)) for j in jobs]


def finished(job: Job, name: str) -> bool:
    """Whether the run ``name`` of ``job`` already finished: a FINISHED run of that name in its
    tracking store (or, with tracking off, its ``summary.json``, written only at the very end)."""
    from system.tracking import experiment_name, resolve_uri

    cfg = job.cfg
    if not cfg.tracking.enabled:
        return (Path(cfg.run.root) / name / "summary.json").is_file()
    uri = resolve_uri(cfg.tracking, cfg.run.root)
    db = sqlite_file(uri)
    if db is not None and not db.exists():
        return False
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment_name(cfg.tracking))
    if exp is None:
        return False
    safe = name.replace("'", "")
    runs = client.search_runs([exp.experiment_id], max_results=1,
                              filter_string=f"attributes.run_name = '{safe}' and attributes.status = 'FINISHED'")
    return len(runs) > 0


def _run_local_pool(ex, calls: list[TrainJob], parallel: int) -> list[Any]:
    """submitit's local executor starts every job at once; keep at most ``parallel`` running
    (each with its own thread budget: oversubscribed cores made training 5-10x slower here)."""
    handles: list[Any] = []
    pending = list(calls)
    running: list[Any] = []
    while pending or running:
        while pending and len(running) < parallel:
            call = pending.pop(0)
            h = ex.submit(call)
            handles.append(h)
            running.append(h)
            print(f"started {call.name} (job {h.job_id}); {len(pending)} waiting", flush=True)
        time.sleep(1.0)
        for h in [h for h in running if h.done()]:
            running.remove(h)
            state = "failed" if h.exception() is not None else "done"
            print(f"{state}: job {h.job_id}", flush=True)
    return handles


def submit(launch: LaunchConfig, jobs: list[Job], skip_finished: bool | None = None,
           continue_args: list[str] | None = None) -> list[Submitted]:
    """Validate, then submit every run (one job, or a job array for a sweep).

    A sweep's runs are named by their values alone, so a re-run finds them: the ones that already
    finished are skipped (``skip_finished``, default on for sweeps and for a continued run), unfinished ones
    resume.  On the ``local`` cluster the runs go as at most ``launch.array_parallelism`` processes at once, and
    this call returns when all of them ended.
    """
    from system.tracking import resolve_uri

    jobs = prepare(jobs)
    preflight(launch, jobs)
    for note in check_tracking(jobs):  # the store: not SQLite on a network filesystem; a server takes the login
        print(note, flush=True)
    folder = Path(launch.folder).resolve()
    name = base_name(dataclasses.replace(jobs[0], sweep_values={}))
    ex = validate(launch, folder, name)
    # a sweep's runs and a continued run keep their names (no job id): a re-run or a new job finds them
    stable = len(jobs) > 1 or bool(jobs[0].cfg.run.dir and jobs[0].cfg.run.resume == "auto")
    calls = [TrainJob(to_dict(j.cfg), base_name(j), stable=stable, requeue_on_failure=launch.requeue_on_failure,
                      max_failure_requeues=launch.max_failure_requeues, tasks_per_node=launch.tasks_per_node,
                      planned_tasks=launch.num_tasks, min_nodes=launch.min_nodes if launch.elastic else 0,
                      continue_args=continue_args)
             for j in jobs]
    if skip_finished if skip_finished is not None else stable:
        todo = [(j, c) for j, c in zip(jobs, calls) if not finished(j, c.name)]
        if len(todo) < len(jobs):
            print(f"skipping {len(jobs) - len(todo)} finished run(s); {len(todo)} to run", flush=True)
        jobs, calls = [j for j, _ in todo], [c for _, c in todo]
    if not calls:
        return []
    if ex.cluster == "local" and len(calls) > 1:
        handles = _run_local_pool(ex, calls, launch.array_parallelism)
    elif len(calls) == 1:
        handles = [ex.submit(calls[0])]
    else:
        with ex.batch():
            handles = [ex.submit(c) for c in calls]
    out = []
    for job, call, handle in zip(jobs, calls, handles):
        rname = call.name if call.stable else run_name(call.name, str(handle.job_id))
        run_dir = Path(job.cfg.run.dir) if job.cfg.run.dir else Path(job.cfg.run.root) / rname
        out.append(Submitted(handle, rname, run_dir, resolve_uri(job.cfg.tracking, job.cfg.run.root),
                             job.sweep_values))
    return out
