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
run name fixed by the job id (which a requeued job keeps; a sweep's runs and a continued run keep their stable
name instead), so a restarted job continues its run.

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
:mod:`launch.slurm_cmd` runs every Slurm command, :mod:`launch.waiting` prints and waits,
:mod:`launch.submitting` validates and submits; this module is the command.

Examples::

    python -m launch.submit --config configs/demo.yaml launch.tasks_per_node=2 launch.time_min=30
    python -m launch.submit --config configs/demo.yaml --sweep method.target_macs=0.3,0.5 --wait
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
from pathlib import Path


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
    # the machinery (torch through the typed config tree, submitit) once the arguments are read
    from launch.config import load_jobs
    from launch.continuing import continue_command, load_resumed
    from launch.preflight import check_tracking
    from launch.slurm_job import base_name, batch_script, train_command
    from launch.submitting import preflight, prepare, submit, submitit, validate
    from launch.waiting import report, wait
    from system.config import ConfigError
    from system.tracking.secrets import redact_text

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
