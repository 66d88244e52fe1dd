"""Process-group set-up, in one place, with one "auto" backend rule (nccl on a GPU, else gloo).

Launchers (torchrun, deepspeed, Slurm via submitit) set RANK / WORLD_SIZE / LOCAL_RANK and
MASTER_ADDR / MASTER_PORT; :func:`init_distributed` brings the group up from them: it resolves
MASTER_ADDR in bounded time, picks the interface that routes to it for gloo/NCCL (and logs the
choice on every node), sets the collective timeout (``engine.collective_timeout_s``) and publishes
every rank's host.  :func:`lost_peers` turns a failed collective into a
:class:`~system.runtime.rendezvous.PeerLost` naming the missing ranks and hosts.  DeepSpeed needs
a group even for one process: :func:`ensure_process_group` makes a one-rank group then.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from system.runtime.engine import DistEnv, pick_device
from system.runtime.rendezvous import (
    Peer,
    PeerLost,
    RendezvousError,
    choose_socket_ifname,
    diagnose,
    node_log,
    resolve_host,
)

log = logging.getLogger(__name__)

#: MASTER_ADDR must resolve within this many seconds (a hung resolver would stall every rank)
RESOLVE_TIMEOUT_S = 30.0
#: every rank's place on the network, by rank (set by init_distributed; empty in one process)
_PEERS: list[Peer] = []


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

    ``cfg`` is the run config (``engine.backend``, ``engine.collective_timeout_s`` and ``train.device`` are read).
    """
    env = DistEnv.from_environ()
    if env.world_size > 1 and not dist.is_initialized():
        backend = pick_backend(cfg.engine.backend, pick_device(cfg.train.device, env.local_rank))
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise ValueError(f"WORLD_SIZE={env.world_size} but {key} is not set (rank {env.rank})")
        host = socket.gethostname()
        master = os.environ["MASTER_ADDR"]
        master_ip = resolve_host(master, RESOLVE_TIMEOUT_S, env.rank)
        ifname, local_ip, why = choose_socket_ifname(master_ip)
        node_log.info("rank %d (local rank %d) on host %s: MASTER_ADDR %s = %s; process group on interface %s "
                      "(%s, %s)", env.rank, env.local_rank, host, master, master_ip, ifname, local_ip, why)
        timeout = timedelta(seconds=cfg.engine.collective_timeout_s)
        try:
            dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size, timeout=timeout)
        except (RuntimeError, TimeoutError) as exc:
            port = os.environ["MASTER_PORT"]
            raise RendezvousError(f"rank {env.rank} on host {host}: the rendezvous at {master}:{port} did not "
                                  f"complete within engine.collective_timeout_s="
                                  f"{cfg.engine.collective_timeout_s:g}s ({str(exc).strip().splitlines()[0]})") from exc
        _subgroups_inherit(timeout)
        me = Peer(env.rank, env.local_rank, host, local_ip, ifname)
        peers: list[Peer | None] = [None] * env.world_size
        dist.all_gather_object(peers, me)
        _PEERS[:] = [p for p in peers if p is not None]
        log.info("process group up: rank %d of %d (%s, collective timeout %gs)", env.rank, env.world_size, backend,
                 cfg.engine.collective_timeout_s)
        node_log.info("ranks: %s", ", ".join(f"{p.rank}={p.host}/{p.address}" for p in _PEERS))
    return env


def _subgroups_inherit(timeout: timedelta) -> None:
    """Make groups created later without a timeout use ours.  DeepSpeed builds its data-parallel group
    with ``dist.new_group(ranks)``, which takes torch's module default (30 min), not the default
    group's: its gradient all-reduce then hung for 30 minutes on a silent peer (measured)."""
    from torch.distributed import distributed_c10d as c10d

    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if isinstance(getattr(c10d, name, None), timedelta):
            setattr(c10d, name, timeout)


def lost_peers(exc: BaseException) -> PeerLost | None:
    """A :class:`PeerLost` naming the missing ranks and hosts if ``exc`` is a collective that failed
    because ranks went away; None otherwise (or in one process)."""
    if not _PEERS:
        return None
    master = (os.environ.get("MASTER_ADDR", ""), int(os.environ.get("MASTER_PORT", "0") or 0))
    return diagnose(exc, _PEERS[dist.get_rank()], list(_PEERS), master, tag="parsimony")


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
    _PEERS.clear()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
