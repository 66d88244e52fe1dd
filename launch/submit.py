"""``python -m launch.submit --config FILE [dotted.key=value ...]``: train on Slurm through submitit.

The recipe's ``launch`` section (see :mod:`launch.config`; overrides ``launch.nodes=2`` ...) says
where the job runs: nodes x tasks per node ranks, GPUs and CPUs, partition, time limit,
account/qos and extra ``#SBATCH`` options.  A ``launch.sweep`` (or ``--sweep key=v1,v2``) over
run-config keys becomes one job array, one run per combination.  Everything is validated before
anything is submitted: the configs, then the cluster itself (the partition exists, the time
limit, nodes, CPUs and GPUs fit it, and ``sbatch --test-only`` accepts the exact batch script).
It prints the job ids, the submitit log folder and the MLflow tracking URI and run names;
``--wait`` waits for the jobs and prints their result or error (with the log path).

Inside the job every task sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``
from submitit's job environment and calls :func:`launch.train.run` with ``run.resume=auto`` and a
run name fixed by the job id (which a requeued job keeps), so a restarted job continues its run.

Preemption and time limits: Slurm sends USR2 (``signal_delay_s`` before the limit; on preemption
right away).  The handler only sets a flag (:mod:`system.runtime.preemption`); at the next step all ranks
agree through one all-reduce, save a checkpoint together and stop; then rank 0 hands over to
submitit's own handler, which calls :meth:`TrainJob.checkpoint` (a resubmission of the same call),
requeues the job and exits.  The requeued job resumes from that checkpoint into the same MLflow
run.  SIGTERM (an external ``scontrol requeue``, ``scancel``) also stops the ranks at an agreed step
with a checkpoint, but leaves the requeue to Slurm; a restarted job resumes from its newest complete
checkpoint (``checkpoint.every_steps`` bounds what is lost if the kill comes first).

A lost node or rank (:class:`~system.runtime.rendezvous.PeerLost`: the survivors' collective failed
or timed out, and they named the missing ranks and hosts): with ``launch.requeue_on_failure`` the
lowest surviving rank requeues the job (at most ``launch.max_failure_requeues`` times) and it resumes
from its last complete checkpoint; without, the job ends with that error.  See docs/slurm.md.

The parts: :mod:`launch.slurm_job` builds the job (:class:`~launch.slurm_job.TrainJob`, run names,
master port, executor, batch script), :mod:`launch.cluster_checks` checks it against the cluster,
:mod:`launch.slurm_cmd` runs every Slurm command, :mod:`launch.waiting` prints and waits; this
module validates and submits.

Examples::

    python -m launch.submit --config configs/demo.yaml launch.tasks_per_node=2 launch.time_min=30
    python -m launch.submit --config configs/demo.yaml --sweep method.variational.nu=1.0,3.0 --wait
    python -m launch.submit --config configs/demo.yaml launch.partition=gpu --dry-run
    # a grid (method x budget x seed) as 2 local processes of 1 thread; a re-run skips finished runs
    python -m launch.submit --config configs/study_variational.yaml --config configs/study_taylor.yaml \
        --sweep method.target_macs=0.3,0.5,0.7 --sweep train.seed=0,1 \
        launch.cluster=local launch.array_parallelism=2 train.threads=1 --wait
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from launch.cluster_checks import check_cluster, sbatch_test_only
from launch.config import Job, LaunchConfig, load_jobs
from launch.continuing import continue_command, continue_job, is_explicit, load_resumed
from launch.preflight import check_job, check_tracking
from launch.slurm_job import TrainJob, base_name, batch_script, make_executor, run_name, train_command
from launch.waiting import Submitted, report, wait
from system.config import ConfigError, to_dict
from system.tracking.config import sqlite_file
from system.tracking.secrets import redact_text

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


def init_local_store(uri: str) -> None:
    """Create a missing embedded sqlite store now: the runs of an array would race to create its tables."""
    db = sqlite_file(uri)
    if db is None or db.exists():
        return
    from mlflow.tracking import MlflowClient

    db.parent.mkdir(parents=True, exist_ok=True)
    MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


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
    finished are skipped (``skip_finished``, default on for sweeps), unfinished ones resume.  On the
    ``local`` cluster the runs go as at most ``launch.array_parallelism`` processes at once, and
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
    if len(jobs) > 1:
        for uri in sorted({resolve_uri(j.cfg.tracking, j.cfg.run.root) for j in jobs if j.cfg.tracking.enabled}):
            init_local_store(uri)
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


def continue_args(args: argparse.Namespace) -> list[str]:
    """What the continue command repeats of a submission: its recipes (for their ``launch`` section) and its
    ``launch.*`` overrides; the run config is the one the run wrote."""
    parts = [a for c in args.config for a in ("--config", str(Path(c).resolve()))]
    return parts + [o for o in args.overrides if o.startswith("launch.")]


def parse(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(prog="parsimony-submit", description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", default=[],
                    help="recipe YAML (a `launch` section sets the allocation); repeat it for a grid over "
                         "recipes (e.g. one per method): every recipe gets the same overrides and sweeps")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides, launch.* included")
    ap.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                    help="sweep a run-config key (repeatable: the cartesian product is one job array)")
    ap.add_argument("--wait", action="store_true",
                    help="wait for the jobs, printing each state change; then results or errors")
    ap.add_argument("--poll", type=float, default=10.0, help=argparse.SUPPRESS)  # seconds between state checks
    ap.add_argument("--dry-run", action="store_true", help="validate and print the batch script; submit nothing")
    ap.add_argument("--resume", metavar="RUN_DIR", default=None,
                    help="continue that run (after a cancel or a failure) in a new job, in the same directory and "
                         "MLflow run, with the config it wrote; --config then gives only the launch section")
    return ap.parse_intermixed_args(argv)  # overrides may follow the flags


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse(argv)
    if submitit is None:
        print("error: submitit is not installed", file=sys.stderr)
        return 2
    try:
        if args.resume:
            if args.sweep:
                raise ConfigError("--sweep", "--resume continues one run; a sweep cannot")
            launch, jobs = load_resumed(args.resume, args.config, args.overrides)
        else:
            launch, jobs = load_jobs(args.config, args.overrides, args.sweep)
        if args.dry_run:
            jobs = prepare(jobs)
            preflight(launch, jobs)
            for note in check_tracking(jobs):
                print(note)
            folder = Path(launch.folder).resolve()
            ex = validate(launch, folder, base_name(dataclasses.replace(jobs[0], sweep_values={})))
            print(f"ok: {len(jobs)} run(s) on {ex.cluster}; nothing submitted")
            for j in jobs:
                print(f"each task of run {base_name(j)} runs launch.train.run(cfg) with run.resume=auto; "
                      f"the same run as a command line:\n  {redact_text(train_command(j))}")
            if ex.cluster == "slurm":
                print(batch_script(ex))
            return 0
        sub = submit(launch, jobs, continue_args=continue_args(args))
    except ConfigError as exc:
        print(redact_text(f"error: {exc}\nnothing was submitted"), file=sys.stderr)
        return 2
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(redact_text(f"error: {exc}\nnothing was submitted"), file=sys.stderr)
        return 2
    for s in sub:
        if not s.sweep_values:  # a sweep's re-run continues its unfinished runs by itself
            s.continue_cmd = continue_command(s.run_dir, continue_args(args))
    report(sub)
    sys.stdout.flush()
    return wait(sub, poll_s=args.poll) if args.wait else 0


if __name__ == "__main__":
    sys.exit(main())
