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
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from launch.cluster_checks import _sbatch_test_only, _slurm, check_cluster  # noqa: F401  (_slurm: tests)
from launch.config import Job, LaunchConfig, load_jobs
from launch.preflight import check_job, check_tracking
from system.tracking.secrets import redact_text
from system.runtime import preemption
from system.runtime.rendezvous import PeerLost
from system.config import ConfigError, from_dict, to_dict

try:  # a project dependency; only needed to submit and inside jobs
    import submitit
    from submitit.helpers import Checkpointable
except ImportError:  # pragma: no cover
    submitit = None
    Checkpointable = object  # type: ignore[misc,assignment]

log = logging.getLogger("launch.submit")

#: the MASTER_PORT of a job: derived from its id (and restart count, so a requeued job never waits
#: for its previous incarnation's socket)
PORT_BASE, PORT_SPAN = 20000, 40000
#: after a stop caused by SIGTERM alone, rank 0 waits this long for Slurm's kill or a USR2 (preemption)
SIGTERM_WAIT_S = 60.0
#: the signals this job process received (module level: never pickled with the job)
_RECEIVED: list[str] = []


def master_port(job_id: str, restart: int = 0) -> int:
    digits = int(re.sub(r"\D", "", job_id) or 0)
    return PORT_BASE + ((digits % (PORT_SPAN // 8)) * 8 + restart % 8)


def run_name(base: str, job_id: str) -> str:
    """The run name of a submitted job: stable across requeues (same job id), unique per array task."""
    return f"{base}-{job_id}"


def base_name(job: Job) -> str:
    cfg = job.cfg
    base = cfg.run.name or f"{cfg.method.display}-{cfg.model.name}"
    for key, value in job.sweep_values.items():
        base += f"-{key.split('.')[-1]}{value}"
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", base)


# ---------------------------------------------------------------------------------- in the job
def _ignore_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _scontrol(*args: str) -> None:
    """``scontrol ARGS`` from inside a job; a failure is logged (the job is ending anyway), not raised.

    scontrol runs with SIGTERM ignored: after ``scontrol requeue`` Slurm SIGTERMs every process of the
    job at once, and killed the ``scontrol update`` that followed it (measured); SIGKILL still comes
    after KillWait."""
    try:
        out = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60,
                             preexec_fn=_ignore_sigterm)
    except (OSError, subprocess.SubprocessError) as exc:
        log.error("scontrol %s failed: %s", " ".join(args), exc)
        return
    if out.returncode != 0:
        log.error("scontrol %s failed (status %d): %s", " ".join(args), out.returncode,
                  (out.stderr or out.stdout).strip())


class TrainJob(Checkpointable):
    """What every task of a submitted job runs: one rank of one training run.

    Args:
        cfg: the resolved run config as a plain dict (``system.config.to_dict``).
        name: the run's base name; the job id is appended inside the job.
    """

    def __init__(self, cfg: dict[str, Any], name: str, stable: bool = False, requeue_on_failure: bool = True,
                 max_failure_requeues: int = 3, tasks_per_node: int = 1, planned_tasks: int = 1, min_nodes: int = 0):
        self.cfg = cfg
        self.name = name
        self.stable = stable  # a sweep's run: the name alone (no job id), so a re-run finds it
        self.requeue_on_failure = requeue_on_failure
        self.max_failure_requeues = max_failure_requeues
        self.tasks_per_node = tasks_per_node
        self.planned_tasks = planned_tasks  # nodes x tasks_per_node as submitted
        self.min_nodes = min_nodes  # elastic floor (0: not elastic)

    def __call__(self) -> dict[str, Any]:
        from launch.train import run, setup_logging
        from system.run_config import RunConfig

        env = submitit.JobEnvironment()
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        os.environ.update(RANK=str(env.global_rank), WORLD_SIZE=str(env.num_tasks),
                          LOCAL_RANK=str(env.local_rank), MASTER_ADDR=str(env.hostnames[0]),
                          MASTER_PORT=str(master_port(os.environ.get("SLURM_JOB_ID", env.job_id), restart)))
        setup_logging()
        handover = self._install_signal_handler(env)
        cfg = from_dict(RunConfig, self.cfg)
        threads = cfg.train.threads or int(os.environ.get("SLURM_CPUS_PER_TASK", "0") or 0)
        name = self.name if getattr(self, "stable", False) else run_name(self.name, env.job_id)
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=name,
                                                               resume="auto"),
                                  train=dataclasses.replace(cfg.train, threads=threads))
        planned = getattr(self, "planned_tasks", env.num_tasks)
        if planned > 1 and cfg.engine.kind == "auto":
            # a distributed submission runs DeepSpeed in every incarnation, also one continuing on one rank
            # (auto would pick the local engine there, which cannot resume DeepSpeed's checkpoints)
            cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, kind="deepspeed"))
        if env.num_tasks != planned:  # an elastic job continuing on fewer nodes
            cfg = same_global_batch(cfg, planned, env.num_tasks)
        log.info("job %s (restart %d), rank %d of %d, master %s:%s, run %s", env.job_id, restart, env.global_rank,
                 env.num_tasks, os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], cfg.run.name)
        try:
            return run(cfg)
        except preemption.Preempted as stop:
            log.warning("%s", stop)
            self._after_stop(env, handover)
        except PeerLost as lost:
            self._after_peer_loss(env, lost)

    def _after_peer_loss(self, env, lost: PeerLost) -> NoReturn:
        """Ranks were lost mid-run.  With ``launch.requeue_on_failure`` (and fewer than
        ``max_failure_requeues`` such requeues so far) the lowest surviving rank requeues the job and
        every survivor leaves without a result (the rerun writes it); otherwise the job ends with the
        error, and Slurm is told not to requeue it for the lost node either."""
        job_id = os.environ.get("SLURM_JOB_ID", env.job_id)
        lowest = min((p.rank for p in lost.survivors), default=env.global_rank)
        counter = Path(env.paths.folder) / f"{job_id}_failure_requeues"
        done = int(counter.read_text()) if counter.is_file() else 0
        limit = getattr(self, "max_failure_requeues", 3)
        wanted = getattr(self, "requeue_on_failure", False)
        requeue = wanted and env.cluster == "slurm" and done < limit
        if env.global_rank == lowest and env.cluster == "slurm":
            if requeue:
                counter.write_text(str(done + 1))
                log.error("%s; requeueing job %s (failure requeue %d of %d, launch.max_failure_requeues): it "
                          "resumes from its last complete checkpoint", lost, job_id, done + 1, limit)
                _scontrol("requeue", job_id)
                self._shrink(job_id, lost)
            else:
                why = ("launch.requeue_on_failure=false" if not wanted else
                       f"already requeued {done} times after failures, launch.max_failure_requeues={limit}")
                log.error("%s; job %s ends (%s)", lost, job_id, why)
                _scontrol("update", f"JobId={job_id}", "Requeue=0")
        if requeue:
            sys.exit(1)
        raise lost

    def _shrink(self, job_id: str, lost: PeerLost) -> None:
        """Elastic jobs (``launch.min_nodes``): the requeued job asks only for the nodes that still hold
        live ranks, if they are at least ``min_nodes`` (Slurm then starts it without the lost node)."""
        min_nodes = getattr(self, "min_nodes", 0)
        alive = sorted({p.host for p in lost.survivors})
        now = int(os.environ.get("SLURM_JOB_NUM_NODES", "0") or 0)
        if not (0 < min_nodes <= len(alive) < now):
            return
        tasks = len(alive) * getattr(self, "tasks_per_node", 1)
        log.error("job %s continues on %d node(s) instead of %d (launch.min_nodes=%d): %d ranks, the same global "
                  "batch", job_id, len(alive), now, min_nodes, tasks)
        _scontrol("update", f"JobId={job_id}", f"NumNodes={len(alive)}", f"NumTasks={tasks}")

    def _after_stop(self, env, handover) -> NoReturn:
        """Every rank saved the agreed checkpoint; requeue (rank 0, on the preemption signal) and leave."""
        usr = env._usr_sig()
        if env.global_rank == 0 and handover is not None:
            # SIGTERM alone (an external `scontrol requeue`, a cancel, or the first half of a preemption):
            # Slurm itself requeues or ends the job; wait for its kill, or for the USR2 that may follow.
            deadline = time.monotonic() + SIGTERM_WAIT_S
            while usr.name not in _RECEIVED and time.monotonic() < deadline:
                time.sleep(0.2)
            if usr.name in _RECEIVED:
                # submitit's handler: checkpoint() -> resubmission pickle, scontrol requeue, exit
                handover(usr, None)
        # leave without a result (an exception would record an error for this task); the rerun
        # writes the results
        sys.exit(-1)

    def _install_signal_handler(self, env):
        """Preemption (USR2) and SIGTERM only set the stop flag; return submitit's USR2 handler."""
        usr = env._usr_sig()
        previous = signal.getsignal(usr)
        preemption.reset()
        preemption.watch()
        _RECEIVED.clear()

        def on_signal(signum, frame):
            name = signal.Signals(signum).name
            _RECEIVED.append(name)
            preemption.request_stop(name)

        signal.signal(usr, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        return previous if callable(previous) else None

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Called by submitit on preemption / time-out (rank 0): the job is resubmitted as is.

        Saving is not done here: by the time submitit calls this, every rank has already saved
        the agreed checkpoint (see the module doc); the rerun finds it through ``run.resume=auto``.
        """
        preemption.request_stop("checkpoint")
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def same_global_batch(cfg, planned: int, now: int):
    """``cfg`` for ``now`` ranks instead of the ``planned`` ones, with the same global batch (a larger
    per-rank batch), so the checkpoint's data position and schedules carry over.

    Raises:
        ConfigError: ``data.batch_size`` x ``planned`` is not divisible by ``now``.
    """
    total = cfg.data.batch_size * planned
    if total % now:
        raise ConfigError("data.batch_size", f"the job continues on {now} ranks instead of {planned}, but its "
                                             f"global batch {total} is not divisible by {now}")
    log.warning("continuing on %d ranks instead of %d: data.batch_size %d -> %d keeps the global batch %d", now,
                planned, cfg.data.batch_size, total // now, total)
    engine = dataclasses.replace(cfg.engine, global_batch=total if cfg.engine.global_batch else 0)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=total // now), engine=engine)


#: an elastic job's batch script: the task count follows the nodes the (re)started job got (after a
#: shrink, SLURM_NTASKS in the batch environment still says the submitted count, and srun obeys it)
ELASTIC_SETUP = ("export SLURM_NTASKS=$((SLURM_JOB_NUM_NODES * SLURM_NTASKS_PER_NODE)) "
                 "SLURM_NPROCS=$((SLURM_JOB_NUM_NODES * SLURM_NTASKS_PER_NODE))")


# ---------------------------------------------------------------------------------- submission
def make_executor(launch: LaunchConfig, folder: Path, job_name: str, extra: dict[str, Any] | None = None):
    cluster = None if launch.cluster == "auto" else launch.cluster
    ex = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=launch.max_num_timeout)
    params: dict[str, Any] = dict(
        name=launch.name or job_name, timeout_min=launch.time_min, nodes=launch.nodes,
        tasks_per_node=launch.tasks_per_node, cpus_per_task=launch.cpus_per_task,
    )
    if launch.gpus_per_node:
        params["gpus_per_node"] = launch.gpus_per_node
    if launch.mem_gb:
        params["mem_gb"] = launch.mem_gb
    if ex.cluster == "slurm":
        additional = {"requeue": True}  # so that `scontrol requeue` (ours or an admin's) restarts it
        additional.update(launch.slurm_extra if extra is None else extra)
        params.update(slurm_signal_delay_s=launch.signal_delay_s, slurm_array_parallelism=launch.array_parallelism,
                      slurm_additional_parameters=additional)
        if launch.partition:
            params["slurm_partition"] = launch.partition
        if launch.account:
            params["slurm_account"] = launch.account
        if launch.qos:
            params["slurm_qos"] = launch.qos
        setup = ([ELASTIC_SETUP] if launch.elastic else []) + list(launch.setup)
        if setup:
            params["slurm_setup"] = setup
    ex.update_parameters(**params)
    return ex


def batch_script(ex) -> str:
    """The sbatch script submitit submits, with the command it runs in every task."""
    inner = ex._executor
    return inner._make_submission_file_text(inner._submitit_command_str, "dry-run")


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
    reason = _sbatch_test_only(batch_script(ex))
    if reason is not None:
        key = "launch"
        if launch.slurm_extra and _sbatch_test_only(batch_script(make_executor(launch, folder, job_name, {}))) is None:
            key = "launch.slurm_extra"
        opts = [line for line in batch_script(ex).splitlines() if line.startswith("#SBATCH")]
        raise ConfigError(key, f"the cluster rejects this job: {reason}\n  batch options:\n    " + "\n    ".join(opts))
    return ex


def train_command(job: Job) -> str:
    """``launch.train`` with the job's whole resolved config as overrides (what each task runs)."""
    from system.config import flatten

    flat = flatten(to_dict(job.cfg))
    args = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in sorted(flat.items())]
    return shlex.join([sys.executable, "-m", "launch.train", *args, "run.resume=auto"])


def resolve_paths(job: Job) -> Job:
    """Absolute run.root (jobs may start in another directory): what is printed is where it lands."""
    run = job.cfg.run
    root = str(Path(run.root).resolve())
    new = dataclasses.replace(run, root=root, dir=str(Path(run.dir).resolve()) if run.dir else "")
    return dataclasses.replace(job, cfg=dataclasses.replace(job.cfg, run=new))


def init_local_store(uri: str) -> None:
    """Create a missing embedded sqlite store now: the runs of an array would race to create its tables."""
    if not uri.startswith("sqlite:///") or Path(uri[len("sqlite:///"):]).exists():
        return
    from mlflow.tracking import MlflowClient

    Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


@dataclasses.dataclass
class Submitted:
    job: Any
    run_name: str
    run_dir: Path
    tracking_uri: str
    sweep_values: dict[str, Any]


def finished(job: Job, name: str) -> bool:
    """Whether the run ``name`` of ``job`` already finished: a FINISHED run of that name in its
    tracking store (or, with tracking off, its ``summary.json``, written only at the very end)."""
    from system.tracking import experiment_name, resolve_uri

    cfg = job.cfg
    if not cfg.tracking.enabled:
        return (Path(cfg.run.root) / name / "summary.json").is_file()
    uri = resolve_uri(cfg.tracking, cfg.run.root)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
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


def _run_local_pool(ex, calls: list["TrainJob"], parallel: int) -> list[Any]:
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


def submit(launch: LaunchConfig, jobs: list[Job], skip_finished: bool | None = None) -> list[Submitted]:
    """Validate, then submit every run (one job, or a job array for a sweep).

    A sweep's runs are named by their values alone, so a re-run finds them: the ones that already
    finished are skipped (``skip_finished``, default on for sweeps), unfinished ones resume.  On the
    ``local`` cluster the runs go as at most ``launch.array_parallelism`` processes at once, and
    this call returns when all of them ended.
    """
    from system.tracking import resolve_uri

    jobs = [resolve_paths(j) for j in jobs]
    preflight(launch, jobs)
    for note in check_tracking(jobs):  # the store: not SQLite on a network filesystem; a server takes the login
        print(note, flush=True)
    folder = Path(launch.folder).resolve()
    name = base_name(dataclasses.replace(jobs[0], sweep_values={}))
    ex = validate(launch, folder, name)
    stable = len(jobs) > 1
    calls = [TrainJob(to_dict(j.cfg), base_name(j), stable=stable, requeue_on_failure=launch.requeue_on_failure,
                      max_failure_requeues=launch.max_failure_requeues, tasks_per_node=launch.tasks_per_node,
                      planned_tasks=launch.num_tasks, min_nodes=launch.min_nodes if launch.elastic else 0)
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


def continued_on_fewer(job) -> dict | None:
    """Rank 0's summary of an elastic job that finished on fewer ranks than submitted (the other tasks
    of the submission wrote no result), else None."""
    try:
        summary = job.task(0).result()
    except Exception:  # noqa: BLE001 -- no result: the job did fail
        return None
    if isinstance(summary, dict) and 0 < int(summary.get("world_size", 0)) < job.num_tasks:
        return summary
    return None


def report(sub: list[Submitted]) -> None:
    for s in sub:
        sweep = f"  sweep {json.dumps(s.sweep_values)}" if s.sweep_values else ""
        print(f"job {s.job.job_id}: run {s.run_name}{sweep}")
        print(f"  run dir   {s.run_dir}")
        print(f"  logs      {s.job.paths.stdout}  (stderr {s.job.paths.stderr})")
        print(f"  mlflow    {redact_text(s.tracking_uri)}  run name {s.run_name}")


def wait(sub: list[Submitted], poll_s: float = 10.0) -> int:
    """Wait for every job, printing each state change (PENDING, RUNNING, ...); then its summary or
    its error and log path; 1 if any failed."""
    last: dict[str, str] = {}
    while True:
        for s in sub:
            try:
                state = s.job.state
            except Exception:  # noqa: BLE001 -- sacct may lag behind a fresh submission
                state = "UNKNOWN"
            if last.get(str(s.job.job_id)) != state:
                last[str(s.job.job_id)] = state
                print(f"job {s.job.job_id} ({s.run_name}): {state}", flush=True)
        if all(s.job.done() for s in sub):
            break
        time.sleep(poll_s)
    failed = 0
    for s in sub:
        try:
            results = s.job.results()
        except Exception as exc:  # submitit raises the job's traceback (or why there is no result)
            shrunk = continued_on_fewer(s.job)
            if shrunk is not None:
                print(f"job {s.job.job_id} ({s.run_name}): continued on {shrunk.get('world_size')} of "
                      f"{s.job.num_tasks} ranks after losing nodes (launch.min_nodes)")
                results = [shrunk]
            else:
                failed += 1
                print(f"job {s.job.job_id} ({s.run_name}) FAILED: {str(exc).strip()[-3000:]}", file=sys.stderr)
                print(f"  stderr: {s.job.paths.stderr}\n  stdout: {s.job.paths.stdout}", file=sys.stderr)
                continue
        summary = results[0] if results else {}
        keys = ("top1", "macs_pct", "prune_events", "steps", "world_size", "run_id")
        print(f"job {s.job.job_id} ({s.run_name}) done: " +
              ", ".join(f"{k}={summary.get(k)}" for k in keys if isinstance(summary, dict)))
    return 1 if failed else 0


def parse(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(prog="python -m launch.submit", description=__doc__.splitlines()[0])
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
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse(argv)
    if submitit is None:
        print("error: submitit is not installed", file=sys.stderr)
        return 2
    try:
        launch, jobs = load_jobs(args.config, args.overrides, args.sweep)
        if args.dry_run:
            jobs = [resolve_paths(j) for j in jobs]
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
        sub = submit(launch, jobs)
    except ConfigError as exc:
        print(redact_text(f"error: {exc}\nnothing was submitted"), file=sys.stderr)
        return 2
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(redact_text(f"error: {exc}\nnothing was submitted"), file=sys.stderr)
        return 2
    report(sub)
    sys.stdout.flush()
    return wait(sub, poll_s=args.poll) if args.wait else 0


if __name__ == "__main__":
    sys.exit(main())
