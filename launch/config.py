"""The ``launch`` section of a recipe: where and how a run is submitted (Slurm through submitit).

It lives beside the run config, never inside it: :func:`load_job` pops ``launch`` from the YAML
tree (and ``launch.*`` from the overrides), builds :class:`LaunchConfig` from it and
:class:`~system.run_config.RunConfig` from the rest, so ``system/`` never sees Slurm settings.
Unknown keys in either part are an error naming the dotted key.

Example recipe::

    base: demo.yaml
    launch:
      nodes: 2
      gpus_per_node: 4
      tasks_per_node: 4       # one process per GPU
      cpus_per_task: 8
      partition: gpu
      time_min: 240
      slurm_extra: {constraint: a100}
      sweep:
        method.target_macs: [0.3, 0.5]   # a job array of two runs

    python -m launch.submit --config that.yaml launch.partition=debug train.epochs=2
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from system.config import ConfigError, apply_overrides, check, from_dict, parse_override, read_yaml
from system.run_config import RunConfig

SECTION = "launch"


@dataclass(frozen=True)
class LaunchConfig:
    """Section ``launch``: the Slurm allocation of one run (or of each run of a sweep).

    Attributes:
        cluster: ``auto`` (Slurm when ``srun`` is on PATH (submitit's test), else local processes), ``slurm``,
            ``local`` (submitit's local executor: processes on this machine) or ``debug`` (in
            this process; one task only).
        nodes, tasks_per_node: processes = nodes x tasks_per_node (one training rank each).
        gpus_per_node: GPUs requested per node (0 on CPU); must be >= tasks_per_node when > 0.
        cpus_per_task: CPU cores per rank (data workers run inside them).
        mem_gb: memory per node (0 = the partition's default).
        partition, account, qos: Slurm's; empty = the cluster's default.
        time_min: time limit of one allocation in minutes (a preempted or timed-out job is
            requeued and continues from its checkpoint).
        signal_delay_s: Slurm sends the preemption signal (USR2) this long before the time limit.
        max_num_timeout: how many times a job may be requeued after reaching its time limit.
        requeue_on_failure: a job that lost ranks mid-run (a node or a process died, or stopped
            answering within ``engine.collective_timeout_s``) is requeued by its lowest surviving
            rank and resumes from its last complete checkpoint; False: the job ends with the error
            naming the lost ranks and hosts, and Slurm is told not to requeue it either.
        max_failure_requeues: at most this many such requeues per job (then it ends).
        min_nodes: elastic floor (0 = ``nodes``: never shrink).  When ranks are lost and the nodes
            still holding live ranks are at least this many, the requeued job asks for those nodes
            only and resumes on them with the same global batch (a larger per-rank batch), instead
            of waiting for the lost node.
        slurm_extra: more ``#SBATCH`` options, e.g. ``{constraint: a100, exclusive: true}``.
        setup: shell lines run in the batch script before the tasks start (module loads, ...).
        folder: submitit's folder (job pickles, stdout/stderr); ``%j`` is the job id.
        name: the Slurm job name (default: the run name).
        array_parallelism: at most this many runs of a sweep at once.
        sweep: ``{dotted.key: [v1, v2, ...]}`` of the run config; the cartesian product is
            submitted as one job array, one run per combination.
    """

    cluster: Literal["auto", "slurm", "local", "debug"] = "auto"
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float = 0.0
    partition: str = ""
    account: str = ""
    qos: str = ""
    time_min: int = 60
    signal_delay_s: int = 90
    max_num_timeout: int = 3
    requeue_on_failure: bool = True
    max_failure_requeues: int = 3
    min_nodes: int = 0
    slurm_extra: dict[str, Any] = field(default_factory=dict)
    setup: tuple[str, ...] = ()
    folder: str = "runs/submitit/%j"
    name: str = ""
    array_parallelism: int = 16
    sweep: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check(self.nodes >= 1, "nodes", "must be >= 1")
        check(self.tasks_per_node >= 1, "tasks_per_node", "must be >= 1")
        check(self.gpus_per_node >= 0, "gpus_per_node", "must be >= 0")
        check(self.gpus_per_node == 0 or self.tasks_per_node <= self.gpus_per_node, "tasks_per_node",
              f"{self.tasks_per_node} tasks per node but only {self.gpus_per_node} GPUs per node "
              f"(launch.gpus_per_node): one rank per GPU")
        check(self.cpus_per_task >= 1, "cpus_per_task", "must be >= 1")
        check(self.mem_gb >= 0, "mem_gb", "must be >= 0")
        check(self.time_min >= 1, "time_min", "must be >= 1 (minutes)")
        check(self.signal_delay_s >= 0, "signal_delay_s", "must be >= 0")
        check(self.signal_delay_s < self.time_min * 60, "signal_delay_s",
              f"{self.signal_delay_s}s is not shorter than the time limit ({self.time_min} min)")
        check(self.max_num_timeout >= 0, "max_num_timeout", "must be >= 0")
        check(self.max_failure_requeues >= 0, "max_failure_requeues", "must be >= 0")
        check(0 <= self.min_nodes <= self.nodes, "min_nodes",
              f"must be between 0 (= launch.nodes, not elastic) and launch.nodes ({self.nodes}), got {self.min_nodes}")
        check(self.array_parallelism >= 1, "array_parallelism", "must be >= 1")
        check(bool(self.folder.strip()), "folder", "must not be empty")
        check(self.cluster != "debug" or self.num_tasks == 1, "cluster",
              f"'debug' runs in this process and cannot start {self.num_tasks} tasks; use 'local' or 'slurm'")
        for key, values in self.sweep.items():
            check(isinstance(values, (list, tuple)) and len(values) > 0, f"sweep.{key}",
                  f"must be a non-empty list of values, got {values!r}")
        for key in self.slurm_extra:
            check(isinstance(key, str) and key.strip() != "", "slurm_extra", f"bad option name {key!r}")

    @property
    def num_tasks(self) -> int:
        return self.nodes * self.tasks_per_node

    @property
    def elastic(self) -> bool:
        """Whether a job may continue on fewer nodes after losing some (``min_nodes`` below ``nodes``)."""
        return 0 < self.min_nodes < self.nodes

    @property
    def elastic_worlds(self) -> tuple[int, ...]:
        """The rank counts an elastic job may continue on after losing nodes: ``min_nodes`` to
        ``nodes - 1`` nodes x ``tasks_per_node``, fewest nodes first; empty when not :attr:`elastic`."""
        if not self.elastic:
            return ()
        return tuple(n * self.tasks_per_node for n in range(self.min_nodes, self.nodes))


def indivisible_world(batch_size: int, planned: int, worlds: Iterable[int]) -> int | None:
    """The first of ``worlds`` (rank counts) that the global batch does not split over evenly, or None.

    The global batch is ``batch_size`` x ``planned`` ranks, as submitted.  A job that continues on
    fewer ranks keeps it (a larger per-rank batch), so every world it may run on must divide it.

    Example::

        indivisible_world(16, 4, [2, 1])  # None: 64 splits over 2 ranks and over 1
        indivisible_world(3, 3, LaunchConfig(nodes=3, min_nodes=2).elastic_worlds)  # 2: 9 does not split over 2
    """
    total = batch_size * planned
    return next((world for world in worlds if total % world), None)


@dataclass(frozen=True)
class Job:
    """One run to submit: its resolved config and the sweep values that made it (if any)."""

    cfg: RunConfig
    sweep_values: dict[str, Any]


def _split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    launch: list[str] = []
    run: list[str] = []
    for text in overrides:
        path, _ = parse_override(text)
        (launch if path[0] == SECTION else run).append(text)
    return launch, run


def parse_sweep_arg(text: str) -> tuple[str, list[Any]]:
    """``"method.variational.nu=1.0,3.0"`` -> ``("method.variational.nu", [1.0, 3.0])`` (values parsed as YAML)."""
    path, value = parse_override(text)
    key = ".".join(path)
    if isinstance(value, list):
        return key, value
    raw = text.split("=", 1)[1]
    values = [parse_override(f"{key}={part}")[1] for part in raw.split(",")]
    return key, values


def load_job(path: str | Path | dict[str, Any] | None, overrides: list[str] | None = None,
             sweeps: list[str] | None = None) -> tuple[LaunchConfig, list[Job]]:
    """Read a recipe with a ``launch`` section (a file, or its tree); return the launch config and every
    run to submit.

    ``overrides`` starting with ``launch.`` go to :class:`LaunchConfig`, the others to the run
    config; ``sweeps`` (``key=v1,v2``) add to ``launch.sweep``.  Every combination of the sweep is
    built and validated here, before anything is submitted.

    Raises:
        ConfigError: naming the dotted key (``launch.partition``, ``optim.lr``, ``launch.sweep.x``...).
    """
    data = json.loads(json.dumps(path)) if isinstance(path, dict) else read_yaml(path) if path else {}
    launch_data = data.pop(SECTION, None) or {}
    if not isinstance(launch_data, dict):
        raise ConfigError(SECTION, f"expected a mapping, got {launch_data!r}")
    launch_over, run_over = _split_overrides(list(overrides or []))
    launch_data = apply_overrides({SECTION: launch_data}, launch_over)[SECTION]
    if sweeps:
        sweep = dict(launch_data.get("sweep") or {})
        for text in sweeps:
            key, values = parse_sweep_arg(text)
            sweep[key] = values
        launch_data["sweep"] = sweep
    launch = from_dict(LaunchConfig, launch_data, prefix=SECTION)

    base = apply_overrides(data, run_over)
    from_dict(RunConfig, base)  # the unswept config must be valid on its own
    keys = list(launch.sweep)
    for key in keys:
        if key.split(".")[0] == SECTION:
            raise ConfigError(f"{SECTION}.sweep.{key}", "only run-config keys can be swept")
    jobs = []
    for combo in itertools.product(*(launch.sweep[k] for k in keys)):
        chosen = dict(zip(keys, combo))
        tree = apply_overrides(base, [f"{k}={json.dumps(v)}" for k, v in chosen.items()])
        try:
            cfg = from_dict(RunConfig, tree)
        except ConfigError as exc:
            raise ConfigError(f"{SECTION}.sweep.{exc.key}", f"{chosen}: {exc}") from None
        jobs.append(Job(cfg=cfg, sweep_values=chosen))
    if len(jobs) > 1 and base.get("run", {}).get("dir"):
        raise ConfigError("run.dir", "a sweep gives every run its own directory under run.root; leave run.dir empty")
    return launch, jobs


def load_jobs(paths: list[str | Path | None] | None, overrides: list[str] | None = None,
              sweeps: list[str] | None = None) -> tuple[LaunchConfig, list[Job]]:
    """:func:`load_job` for several recipes (a grid's method axis): the first recipe's ``launch``
    section (plus the ``launch.*`` overrides) holds for all; every recipe gets the same overrides and
    sweeps.  Two recipes that would give their runs the same name are refused (``run.name``)."""
    recipes: list[str | Path | None] = list(paths or [None])
    launch, jobs = load_job(recipes[0], overrides, sweeps)
    owner = {(j.cfg.run.name, json.dumps(j.sweep_values, sort_keys=True)): recipes[0] for j in jobs}
    for path in recipes[1:]:
        more = load_job(path, overrides, sweeps)[1]
        for j in more:
            key = (j.cfg.run.name, json.dumps(j.sweep_values, sort_keys=True))
            if key in owner:
                raise ConfigError("run.name", f"{owner[key]} and {path} both name their runs {j.cfg.run.name!r}; "
                                  "give each recipe its own run.name")
            owner[key] = path
        jobs += more
    return launch, jobs
