"""Checks a submitted job would otherwise fail inside Slurm, run on the submitting host first.

Pure checks of each run's config against the allocation (no GPU, no data loading):

- the device: a recipe that trains on CUDA (``train.device=cuda``, or bf16/fp16) with no
  ``launch.gpus_per_node`` -- an error naming that key;
- the engine: ``engine.*`` at ``launch.nodes x launch.tasks_per_node`` ranks on the allocation's
  device (ZeRO stage, global batch, precision, backend) -- an error naming the key;
- the method against the model (block kind, zero-initialised residuals with layer gates,
  ``method.round_to`` against the widths) -- an error naming the key;
- the data root: missing or unreadable *from this host* is a warning naming ``data.root`` (the
  cluster's nodes may see other file systems).

``launch.submit`` runs them at ``--dry-run`` and before every real submission.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from launch.config import Job, LaunchConfig, indivisible_world
from system.config import ConfigError


def check_job(launch: LaunchConfig, job: Job) -> list[str]:
    """Raise :class:`ConfigError` for what the job would fail on; return warnings."""
    cfg = job.cfg
    world = launch.nodes * launch.tasks_per_node
    device = torch.device("cuda" if launch.gpus_per_node else "cpu")
    if device.type != "cuda" and (cfg.train.device == "cuda" or cfg.train.precision != "fp32"):
        wants = "train.device=cuda" if cfg.train.device == "cuda" else f"train.precision={cfg.train.precision}"
        raise ConfigError("launch.gpus_per_node",
                          f"this recipe trains on CUDA ({wants}) but the job requests no GPU: request GPUs with "
                          f"launch.gpus_per_node (one per rank: launch.tasks_per_node={launch.tasks_per_node}), or "
                          f"train on CPU with train.device=cpu train.precision=fp32")
    if cfg.engine.kind == "deepspeed" or (cfg.engine.kind == "auto" and world > 1):
        from system.runtime.engine_ds import check_engine_config

        check_engine_config(cfg, world, device)
    if launch.elastic:
        _check_elastic(launch, cfg)
    _check_method(cfg)
    return _check_data(cfg)


def _check_elastic(launch: LaunchConfig, cfg) -> None:
    """A job that may continue on ``min_nodes`` .. ``nodes`` nodes must resume its checkpoints on each."""
    if cfg.engine.kind == "local":
        raise ConfigError("engine.kind", f"an elastic job (launch.min_nodes={launch.min_nodes}) runs on several "
                                         f"ranks, which the local engine cannot; use engine.kind=deepspeed (or auto)")
    world = indivisible_world(cfg.data.batch_size, launch.num_tasks, launch.elastic_worlds)
    if world is not None:
        raise ConfigError("data.batch_size", f"the global batch {cfg.data.batch_size * launch.num_tasks} "
                                             f"(data.batch_size x {launch.num_tasks} ranks) is not divisible by "
                                             f"{world} ranks, which an elastic job on "
                                             f"{world // launch.tasks_per_node} node(s) would have")


def _check_method(cfg) -> None:
    """The method against the dense model, as the run builds them (:mod:`system.build`)."""
    from system.build import build_network, build_pruning_method, dense_spec_for

    build_pruning_method(cfg, 1000, build_network(cfg, dense_spec_for(cfg, num_classes=1000)))


def _check_data(cfg) -> list[str]:
    if cfg.data.loader == "synthetic":
        return []
    from pipelines.shardset import MANIFEST, ShardSetError, fetch_text, is_remote

    if is_remote(cfg.data.root):
        try:
            fetch_text(f"{cfg.data.root.rstrip('/')}/{MANIFEST}", tries=1)
        except ShardSetError as exc:
            return [f"data.root: {exc} (from this host; the nodes may reach it)"]
        return []
    root = Path(cfg.data.root)
    if not root.exists():
        return [f"data.root: {root} does not exist on this host ({os.uname().nodename}); the job fails unless "
                f"the cluster's nodes see it there"]
    if not os.access(root, os.R_OK | os.X_OK):
        return [f"data.root: {root} is not readable on this host ({os.uname().nodename})"]
    if not (root / "manifest.json").is_file():
        return [f"data.root: {root} holds no manifest.json (not a shard directory from pipelines.shards)"]
    return []


def check_tracking(jobs: list[Job]) -> list[str]:
    """The stores the jobs record into, once each: an embedded SQLite store on a network filesystem is a
    :class:`ConfigError` naming ``run.root``, its path and type; a server must answer and take the login
    from MLflow's sources (:class:`system.tracking.login.LoginRefused` names the URI and the user,
    :class:`system.tracking.TrackingUnavailable` the URI).  Returns notes on what was checked."""
    from system.tracking import resolve_uri
    from system.tracking.login import check_login, check_store_filesystem, network_store_error
    from system.tracking.secrets import redact_text

    notes: list[str] = []
    for uri, job in {resolve_uri(j.cfg.tracking, j.cfg.run.root): j for j in jobs if j.cfg.tracking.enabled}.items():
        fstype = check_store_filesystem(uri)
        if fstype is not None:
            raise network_store_error(uri, fstype)
        if uri.startswith(("http://", "https://")):
            user = check_login(uri, timeout=job.cfg.tracking.connect_timeout)
            notes.append(f"tracking: {redact_text(uri)} takes the login of {user!r}" if user else
                         f"tracking: {redact_text(uri)} answers without a login")
    return notes
