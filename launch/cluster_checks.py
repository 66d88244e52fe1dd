"""Checks of a job's allocation against the Slurm cluster, before anything is submitted."""

from __future__ import annotations

import os
import re
import tempfile

from launch.config import LaunchConfig
from launch.slurm_cmd import SlurmError, run_slurm
from system.config import ConfigError


def _minutes(limit: str) -> float | None:
    """Slurm time (``UNLIMITED``, ``MM``, ``HH:MM:SS``, ``D-HH:MM:SS``) in minutes; None = no limit."""
    limit = limit.strip()
    if limit.upper() in ("UNLIMITED", "INFINITE", "NONE", ""):
        return None
    days, _, rest = limit.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if len(parts) == 1:
        h, m, s = 0, parts[0], 0
    elif len(parts) == 2:
        h, m, s = 0, parts[0], parts[1]
    else:
        h, m, s = parts[-3:]
    return int(days or 0) * 1440 + h * 60 + m + s / 60


def _partition_info(name: str) -> dict[str, str]:
    text = run_slurm("scontrol", "show", "partition", name, "-o")
    return dict(item.split("=", 1) for item in text.split() if "=" in item)


def _gpus_per_node(partition: str) -> int:
    """The most GPUs any node of ``partition`` has (from its gres, e.g. ``gpu:a100:4(S:0-1)``)."""
    best = 0
    for gres in run_slurm("sinfo", "-h", "-p", partition, "-o", "%G").split():
        for item in gres.split(","):
            m = re.match(r"gpu(?::[^:(]+)?:(\d+)", item)
            if m:
                best = max(best, int(m.group(1)))
    return best


def check_cluster(launch: LaunchConfig) -> str:
    """Check the allocation against the cluster; return the partition that will be used.

    Raises:
        ConfigError: naming the ``launch.*`` key the cluster cannot satisfy.
        SlurmError: ``sinfo`` or ``scontrol`` failed.
    """
    lines = run_slurm("sinfo", "-h", "-o", "%P").split()
    partitions = [p.rstrip("*") for p in lines]
    default = next((p.rstrip("*") for p in lines if p.endswith("*")), partitions[0] if partitions else "")
    partition = launch.partition or default
    if launch.partition and launch.partition not in partitions:
        raise ConfigError("launch.partition", f"the cluster has no partition {launch.partition!r} "
                                              f"(it has: {', '.join(sorted(set(partitions)))})")
    if not partition:
        raise ConfigError("launch.partition", "the cluster has no default partition; name one")
    info = _partition_info(partition)
    if info.get("State", "UP") != "UP":
        raise ConfigError("launch.partition", f"partition {partition!r} is {info.get('State')}")
    max_min = _minutes(info.get("MaxTime", "UNLIMITED"))
    if max_min is not None and launch.time_min > max_min:
        raise ConfigError("launch.time_min", f"{launch.time_min} min exceeds partition {partition!r}'s "
                                             f"MaxTime {info['MaxTime']} ({max_min:g} min)")
    total_nodes = int(info.get("TotalNodes", "0") or 0)
    if total_nodes and launch.nodes > total_nodes:
        raise ConfigError("launch.nodes", f"{launch.nodes} nodes requested, partition {partition!r} has "
                                          f"{total_nodes}")
    cpus = max((int(c.rstrip("+")) for c in run_slurm("sinfo", "-h", "-p", partition, "-o", "%c").split()),
               default=0)
    need = launch.tasks_per_node * launch.cpus_per_task
    if cpus and need > cpus:
        key = "launch.tasks_per_node" if launch.tasks_per_node > cpus else "launch.cpus_per_task"
        raise ConfigError(key, f"{launch.tasks_per_node} tasks x {launch.cpus_per_task} CPUs (launch.cpus_per_task) "
                               f"= {need} CPUs per node, the nodes of partition {partition!r} have {cpus}")
    if launch.gpus_per_node:
        gpus = _gpus_per_node(partition)
        if launch.gpus_per_node > gpus:
            raise ConfigError("launch.gpus_per_node", f"{launch.gpus_per_node} GPUs per node requested, the "
                                                      f"nodes of partition {partition!r} have {gpus}")
    return partition


def sbatch_test_only(script: str) -> str | None:
    """None if ``sbatch --test-only`` accepts the batch script ``script``, else sbatch's reason.

    Raises:
        SlurmError: sbatch could not run (not found, timed out).
    """
    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as fh:
        fh.write(script)
        path = fh.name
    try:
        run_slurm("sbatch", "--test-only", path)
    except SlurmError as exc:
        if exc.status is None:
            raise
        return exc.reason
    finally:
        os.unlink(path)
    return None
