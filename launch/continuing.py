"""Continuing a run in a new job: after a ``scancel``, a failure, or a job that ran out of requeues.

A requeued job continues its run by itself (same job id, same run name, ``run.resume=auto``).  A *new*
job continues one when it is told which (:func:`continue_job`):

- ``run.resume=RUN_DIR`` or ``run.resume=RUN_DIR/checkpoints/step-N`` (N the run's newest intact
  checkpoint): the job writes into that same directory under its old name, resumes from its newest
  checkpoint, and its rank 0 continues the same MLflow run (the run id is in the checkpoint);
- ``parsimony-submit --resume RUN_DIR`` (:func:`load_resumed`): the same, with the run config that
  run wrote (``RUN_DIR/config.json``) in place of a recipe; overrides still apply (``train.epochs=120``
  to train longer), and ``--config`` gives the ``launch`` section.

A checkpoint older than the run's newest is refused: the job continues its run in place, and every
later incarnation (a preemption, a requeue) resumes from the run's newest checkpoint, which would be
the abandoned one.  To branch from an older checkpoint, train it with ``parsimony-train`` into a new
``run.dir``.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path
from typing import Any

from launch.config import SECTION, Job, LaunchConfig, load_job, load_jobs
from system.config import ConfigError
from system.runtime.checkpoint import CKPT_SUBDIR, MANIFEST, CheckpointError, find_resumable
from system.tracking.secrets import MASK, URL_USERINFO, redact_text

CONFIG_FILE = "config.json"


def continue_command(run_dir: str | Path, args: list[str]) -> str:
    """``parsimony-submit --resume RUN_DIR`` with ``args`` (the submission's ``--config`` and ``launch.*``),
    logins masked: what the submission report, ``--wait`` and a failed job's last log line print."""
    return redact_text(shlex.join(["parsimony-submit", "--resume", str(run_dir), *args]))


def is_explicit(resume: str) -> bool:
    """Whether ``run.resume`` names a run or a checkpoint (not empty, not ``auto``)."""
    return bool(resume) and resume != "auto"


def run_dir_of(target: Path) -> Path:
    """The run directory of ``target``: a run directory itself, or a checkpoint directory in one."""
    if (target / MANIFEST).exists() or target.parent.name == CKPT_SUBDIR:
        return target.parent.parent
    return target


def continue_job(job: Job) -> Job:
    """``job`` with an explicit ``run.resume`` turned into what a job can continue: ``run.dir`` that run's
    directory, ``run.name`` its name, ``run.resume=auto``.  Jobs without one are returned unchanged.

    Raises:
        ConfigError: ``run.resume`` names nothing, a run without a checkpoint, or a checkpoint older
            than the run's newest (naming it).
    """
    run = job.cfg.run
    if not is_explicit(run.resume):
        return job
    target = Path(run.resume).resolve()
    if not target.exists():
        raise ConfigError("run.resume", f"{target} does not exist")
    run_dir = run_dir_of(target)
    try:
        newest = find_resumable(run_dir)
    except CheckpointError as exc:
        raise ConfigError("run.resume", str(exc)) from None
    if newest is None:
        raise ConfigError("run.resume", f"{run_dir} holds no checkpoint to continue from")
    if target != run_dir and target != Path(newest.path).resolve():
        raise ConfigError("run.resume", f"{target.name} is not the newest checkpoint of {run_dir} "
                                        f"({Path(newest.path).name} is): a job continues its run from the newest, "
                                        f"and so would every requeue; pass run.resume={run_dir} (or branch from "
                                        f"{target.name} with parsimony-train into a new run.dir)")
    if run.dir and Path(run.dir).resolve() != run_dir:
        raise ConfigError("run.dir", f"{run.dir} is not the directory of run.resume ({run_dir}); leave run.dir "
                                     "empty to continue the run where it is")
    new = dataclasses.replace(run, dir=str(run_dir), root=str(run_dir.parent), name=run_dir.name, resume="auto")
    return dataclasses.replace(job, cfg=dataclasses.replace(job.cfg, run=new))


def _unmasked(tree: dict[str, Any], source: Path, overrides: list[str]) -> dict[str, Any]:
    """``tree`` (a run's ``config.json``) with masked URL logins dropped (the job takes the login from
    MLflow's credential sources, as the run did) and every other masked value required as an override."""
    given = {o.split("=", 1)[0] for o in overrides}

    def walk(node: Any, key: str) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, f"{key}.{k}" if key else k) for k, v in node.items()}
        if isinstance(node, str) and MASK in node:
            plain = URL_USERINFO.sub(lambda m: m["scheme"] if MASK in m["info"] else m[0], node)
            if MASK in plain and key not in given:
                raise ConfigError(key, f"{source} holds this secret masked; pass it again as an override ({key}=...)")
            return plain
        return node

    return walk(tree, "")


def load_resumed(run_dir: str | Path, recipes: list[str | Path | None],
                 overrides: list[str]) -> tuple[LaunchConfig, list[Job]]:
    """The job that continues ``run_dir``: its own ``config.json`` plus ``overrides``, the ``launch`` section
    of ``recipes`` (their run configs are not used) plus the ``launch.*`` overrides."""
    run_dir = Path(run_dir).resolve()
    source = run_dir / CONFIG_FILE
    if not source.is_file():
        raise ConfigError("--resume", f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    for text in overrides:
        if text.split("=", 1)[0] in ("run.resume", "run.dir", "run.root", "run.name"):
            raise ConfigError(text.split("=", 1)[0], "--resume continues the run where it is; leave this key out")
    tree = _unmasked(json.loads(source.read_text()), source, overrides)
    launch = load_jobs(list(recipes), [o for o in overrides if o.startswith(f"{SECTION}.")])[0] if recipes else None
    if launch is not None:
        tree[SECTION] = dataclasses.asdict(launch)
    tree.setdefault("run", {}).update(resume=str(run_dir), dir="")  # where it is now, even if moved
    over = [o for o in overrides if not (launch is not None and o.startswith(f"{SECTION}."))]
    launch, jobs = load_job(tree, over)
    return launch, [continue_job(j) for j in jobs]
