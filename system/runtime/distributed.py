"""Process-group set-up, in one place, with one "auto" backend rule (nccl on a GPU, else gloo).

Launchers (torchrun, deepspeed, Slurm via submitit) set RANK / WORLD_SIZE / LOCAL_RANK and
MASTER_ADDR / MASTER_PORT; :func:`init_distributed` brings the group up from them.  DeepSpeed
needs a group even for one process: :func:`ensure_process_group` makes a one-rank group then.
"""

from __future__ import annotations

import logging
import os
import socket

import torch
import torch.distributed as dist

from system.runtime.engine import DistEnv, pick_device

log = logging.getLogger(__name__)


def pick_backend(requested: str, device: torch.device) -> str:
    """``engine.backend``: ``auto`` is nccl on a GPU and gloo on CPU."""
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    return requested


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg) -> DistEnv:
    """Initialise torch.distributed when WORLD_SIZE > 1; return this process's DistEnv.

    ``cfg`` is the run config (``engine.backend`` and ``train.device`` are read).
    """
    env = DistEnv.from_environ()
    if env.world_size > 1 and not dist.is_initialized():
        backend = pick_backend(cfg.engine.backend, pick_device(cfg.train.device, env.local_rank))
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise ValueError(f"WORLD_SIZE={env.world_size} but {key} is not set (rank {env.rank})")
        dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size)
        log.info("process group up: rank %d of %d (%s)", env.rank, env.world_size, backend)
    return env


def ensure_process_group(env: DistEnv, device: torch.device, backend: str) -> None:
    """A process group for DeepSpeed, which needs one (and the launcher variables) even at world size 1."""
    for key, value in (("RANK", env.rank), ("LOCAL_RANK", env.local_rank), ("WORLD_SIZE", env.world_size)):
        os.environ.setdefault(key, str(value))
    if dist.is_initialized():
        return
    if env.world_size > 1:
        raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not initialised "
                           "(launch through launch.train, which calls system.runtime.distributed.init_distributed)")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    dist.init_process_group(backend=pick_backend(backend, device), rank=0, world_size=1)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
