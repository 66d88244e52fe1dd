"""The job a submission runs: its callable, its names and port, its executor and batch script.

:class:`TrainJob` is what every task of a submitted job runs (one rank of one training run; see
:mod:`launch.submit` for preemption, requeue and lost nodes); :func:`make_executor` builds the
submitit executor that submits it, :func:`batch_script` shows the sbatch script it writes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from launch.config import Job, LaunchConfig, indivisible_world
from launch.continuing import continue_command
from launch.slurm_cmd import SlurmError, run_slurm
from system.config import ConfigError, from_dict, to_dict
from system.runtime import preemption
from system.runtime.rendezvous import PeerLost
from system.tracking.secrets import redact_text

try:  # a project dependency; only needed to submit and inside jobs
    import submitit
    from submitit.helpers import Checkpointable
except ImportError:  # pragma: no cover
    submitit = None
    Checkpointable = object  # type: ignore[misc,assignment]

log = logging.getLogger("launch.slurm_job")

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
def _scontrol(*args: str) -> None:
    """``scontrol ARGS`` from inside a job, with SIGTERM ignored (see :func:`run_slurm`); a failure is
    logged (the job is ending anyway), not raised."""
    try:
        run_slurm("scontrol", *args, ignore_sigterm=True)
    except SlurmError as exc:
        log.error("%s", exc)


class TrainJob(Checkpointable):
    """What every task of a submitted job runs: one rank of one training run.

    Args:
        cfg: the resolved run config as a plain dict (``system.config.to_dict``).
        name: the run's base name; the job id is appended inside the job unless the run is stable (a sweep's
            or a continued run keeps its name).
    """

    def __init__(self, cfg: dict[str, Any], name: str, stable: bool = False, requeue_on_failure: bool = True,
                 max_failure_requeues: int = 3, tasks_per_node: int = 1, planned_tasks: int = 1, min_nodes: int = 0,
                 continue_args: list[str] | None = None):
        self.cfg = cfg
        self.name = name
        self.stable = stable  # a sweep's run: the name alone (no job id), so a re-run finds it
        self.requeue_on_failure = requeue_on_failure
        self.max_failure_requeues = max_failure_requeues
        self.tasks_per_node = tasks_per_node
        self.planned_tasks = planned_tasks  # nodes x tasks_per_node as submitted
        self.min_nodes = min_nodes  # elastic floor (0: not elastic)
        # --config and launch.* of the submission: a failed job's last log line says how to continue it
        self.continue_args = list(continue_args or [])

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
            summary = run(cfg)
            if env.global_rank == 0:  # the job's own log holds the result, as the CLI prints it
                log.info("run %s finished: %s", cfg.run.name, json.dumps(summary, default=str))
            return summary
        except preemption.Preempted as stop:
            log.warning("%s", stop)
            self._after_stop(env, handover)
        except PeerLost as lost:
            self._after_peer_loss(env, lost)
        except BaseException as exc:  # the log's last line says what failed, where, and how to continue
            run_dir = Path(cfg.run.dir) if cfg.run.dir else Path(cfg.run.root) / cfg.run.name
            cont = continue_command(run_dir.resolve(), getattr(self, "continue_args", []))
            log.error("run %s failed: %s: %s; run dir %s; continue it: %s", cfg.run.name, type(exc).__name__,
                      redact_text(str(exc).strip().splitlines()[-1] if str(exc).strip() else ""), run_dir, cont)
            raise

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
    if indivisible_world(cfg.data.batch_size, planned, [now]) is not None:
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


# ---------------------------------------------------------------------------------- the executor
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


def train_command(job: Job) -> str:
    """``launch.train`` with the job's resolved config as overrides (what each task runs): the keys whose
    value differs from the default, one per line, then ``run.resume=auto`` (what the job sets)."""
    from system.config import flatten
    from system.run_config import RunConfig

    default = flatten(to_dict(RunConfig()))
    flat = {k: v for k, v in flatten(to_dict(job.cfg)).items() if k != "run.resume"}
    args = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in sorted(flat.items())
            if k not in default or default[k] != v]
    return " \\\n    ".join([shlex.join([sys.executable, "-m", "launch.train"]),
                              *(shlex.quote(a) for a in args), "run.resume=auto"])

