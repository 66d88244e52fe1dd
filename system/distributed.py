"""Process-group set-up from the launcher's environment (torchrun, deepspeed, Slurm via submitit)."""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from system.engine import DistEnv

log = logging.getLogger(__name__)


def init_distributed(cfg) -> DistEnv:
    """Initialise torch.distributed when WORLD_SIZE > 1; return this process's DistEnv."""
    env = DistEnv.from_environ()
    if env.world_size > 1 and not dist.is_initialized():
        backend = cfg.engine.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() and cfg.train.device != "cpu" else "gloo"
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise ValueError(f"WORLD_SIZE={env.world_size} but {key} is not set (rank {env.rank})")
        dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size)
        log.info("process group up: rank %d of %d (%s)", env.rank, env.world_size, backend)
    return env


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
