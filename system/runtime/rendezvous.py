"""How the ranks of a job find each other on the network, and how they name each other when one is lost.

Across nodes three things go wrong first, and each is handled here with an error that names the host:

- ``MASTER_ADDR`` (the first node's hostname, under Slurm) must resolve on every other node:
  :func:`resolve_host` does it in bounded time (a hung resolver would otherwise stall the job).
- The process group must use the interface that reaches the other nodes, not a docker bridge or a
  management port: :func:`route_interface` asks the kernel which local address routes to
  ``MASTER_ADDR`` and finds the interface holding it; :func:`choose_socket_ifname` exports it as
  ``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME`` unless the environment already set them.
- A node or a rank that disappears mid-run: gloo reports "connection closed" at once, or the
  collective times out (``engine.collective_timeout_s``).  :func:`diagnose` then finds out *which*
  ranks are gone -- every survivor checks in at the rendezvous store (hosted by rank 0) and waits a
  few seconds for the others -- and returns a :class:`PeerLost` naming the missing ranks and their
  hosts from the table every rank published at start-up (:class:`Peer`).

Example::

    ip = resolve_host(os.environ["MASTER_ADDR"], timeout_s=30)
    ifname, local_ip = route_interface(ip)
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fcntl
import logging
import os
import re
import socket
import struct
import time
from datetime import timedelta

log = logging.getLogger(__name__)
#: messages every node must record (interface choice, rank table): INFO on each node's first rank
node_log = logging.getLogger("parsimony.node")

SOCKET_IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
_SIOCGIFADDR = 0x8915
#: the signature of an error raised by the communication layer itself (gloo's transport, NCCL, the c10d
#: store and process groups) -- not an HTTP "connection reset" from a data loader
_COMM_FAILURE = re.compile(r"gloo|nccl|c10d|ProcessGroup", re.IGNORECASE)
_PEER_ADDR = re.compile(r"\[?(\d{1,3}(?:\.\d{1,3}){3})\]?:\d+")


class RendezvousError(RuntimeError):
    """The ranks cannot meet: MASTER_ADDR does not resolve, or no interface reaches it."""


@dataclasses.dataclass(frozen=True)
class Peer:
    """One rank's place on the network, published by every rank at start-up."""

    rank: int
    local_rank: int
    host: str
    address: str
    interface: str


class PeerLost(RuntimeError):
    """A collective failed because ranks went away (their process or node died, or stopped answering).

    Attributes:
        rank, host: this (surviving) rank.
        missing: the ranks that did not check in after the failure, each with its host.
        survivors: the ranks that did.
    """

    def __init__(self, rank: int, host: str, missing: list[Peer], cause: str, hint: str = "",
                 survivors: list[Peer] | None = None):
        self.rank, self.host, self.missing, self.cause = rank, host, missing, cause
        self.survivors = survivors or []
        lost = ", ".join(f"rank {p.rank} on host {p.host} ({p.address})" for p in missing) or "no rank identified"
        first = cause.strip().splitlines()[0] if cause.strip() else "collective failed"
        super().__init__(f"rank {rank} on host {host}: lost contact with {lost}{hint}; the collective failed "
                         f"with: {first}")


# ------------------------------------------------------------------------------------ resolution
def resolve_host(name: str, timeout_s: float, rank: int = 0) -> str:
    """The IPv4 address of ``name``, within ``timeout_s`` seconds.

    Raises:
        RendezvousError: naming the host that cannot be resolved and this rank's own host.
    """
    if re.fullmatch(r"\d{1,3}(?:\.\d{1,3}){3}", name):
        return name
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    fut = pool.submit(socket.getaddrinfo, name, None, socket.AF_INET, socket.SOCK_STREAM)
    try:
        infos = fut.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        raise RendezvousError(f"rank {rank} on host {socket.gethostname()}: MASTER_ADDR={name!r} did not resolve "
                              f"within {timeout_s:g}s (is the name in DNS or /etc/hosts on this host?)") from None
    except OSError as exc:
        raise RendezvousError(f"rank {rank} on host {socket.gethostname()}: cannot resolve MASTER_ADDR={name!r}: "
                              f"{exc}") from None
    finally:
        pool.shutdown(wait=False)  # a hung resolver thread is left behind, not waited for
    return str(infos[0][4][0])


def _interface_address(name: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:  # no IPv4 address on it
            return None
    return socket.inet_ntoa(raw[20:24])


def route_interface(ip: str) -> tuple[str, str]:
    """(interface, local address) this host uses to reach ``ip``: the kernel's route lookup (a UDP
    ``connect`` sends nothing), then the interface that holds the chosen local address.

    Raises:
        RendezvousError: no route to ``ip``, or no interface holds the local address.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((ip, 9))
        except OSError as exc:
            raise RendezvousError(f"host {socket.gethostname()} has no route to MASTER_ADDR {ip}: {exc}") from None
        local = s.getsockname()[0]
    for _, name in socket.if_nameindex():
        if _interface_address(name) == local:
            return name, local
    raise RendezvousError(f"host {socket.gethostname()}: no interface holds {local}, the address routing to {ip}")


def choose_socket_ifname(master_ip: str) -> tuple[str, str, str]:
    """Export the interface that reaches ``master_ip`` for gloo and NCCL, unless already set.

    Returns:
        (interface, local address, where the choice came from: ``route to <ip>`` or the variable).

    Raises:
        RendezvousError: a preset variable names no interface here, or a loopback one while
            ``master_ip`` is another host (e.g. ``GLOO_SOCKET_IFNAME=lo`` exported from a one-host
            test shell into a multi-node job, which would time out in the rendezvous).
    """
    ifname, local = route_interface(master_ip)
    preset = {v: os.environ[v] for v in SOCKET_IFNAME_VARS if os.environ.get(v)}
    if preset:
        var, value = next(iter(preset.items()))
        first = value.split(",")[0].lstrip("^=")
        address = _interface_address(first)
        if address is None:
            raise RendezvousError(f"host {socket.gethostname()}: {var}={value} names no interface with an IPv4 "
                                  f"address here; the route to MASTER_ADDR {master_ip} goes through {ifname}")
        if address.startswith("127.") and not master_ip.startswith("127."):
            raise RendezvousError(f"host {socket.gethostname()}: {var}={value} is a loopback interface, which "
                                  f"cannot reach MASTER_ADDR {master_ip} on another host (the route goes through "
                                  f"{ifname}); unset {var} or name that interface")
        return value, address, f"{var} set by the environment"
    for var in SOCKET_IFNAME_VARS:
        os.environ[var] = ifname
    return ifname, local, f"route to {master_ip}"


# ------------------------------------------------------------------------------------ peer loss
def is_comm_failure(exc: BaseException) -> bool:
    """Whether ``exc`` comes from a failed collective (a lost or silent peer), not from the step's own code
    or the data: one of torch.distributed's errors, or a RuntimeError carrying the signature of gloo,
    NCCL or c10d."""
    try:
        import torch.distributed as dist

        if isinstance(exc, dist.DistError):
            return True
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    return isinstance(exc, (RuntimeError, ConnectionError, TimeoutError)) and bool(_COMM_FAILURE.search(str(exc)))


def diagnose(exc: BaseException, me: Peer, peers: list[Peer], master: tuple[str, int], tag: str,
             grace_s: float = 5.0) -> PeerLost | None:
    """After a failed collective: which ranks are gone?  None if ``exc`` is not a communication failure
    or every rank checked in.

    Every survivor sets ``<tag>/alive/<rank>`` in the rendezvous store (a new client of the TCPStore
    that rank 0 hosts) and waits up to ``grace_s`` for all ranks' keys; the ranks without one are
    missing.  If the store itself is unreachable, rank 0 -- its host -- is the one lost.
    """
    if not is_comm_failure(exc) or len(peers) < 2:
        return None
    import torch.distributed as dist

    by_rank = {p.rank: p for p in peers}
    hint = ""
    m = _PEER_ADDR.search(str(exc))
    if m:
        named = sorted({p.host for p in peers if p.address == m.group(1)})
        if named:
            hint = f" (the error names peer {m.group(1)} = host {', '.join(named)})"
    try:
        store = dist.TCPStore(master[0], master[1], is_master=False, timeout=timedelta(seconds=grace_s),
                              wait_for_workers=False)
        store.set(f"{tag}/alive/{me.rank}", me.host)
        keys = [f"{tag}/alive/{p.rank}" for p in peers]
        deadline = time.monotonic() + grace_s
        alive: set[int] = set()
        while time.monotonic() < deadline:
            alive = {p.rank for p, k in zip(peers, keys) if store.check([k])}
            if len(alive) == len(peers):
                break
            time.sleep(0.2)
        missing = [p for p in peers if p.rank not in alive]
        if me.rank == 0:
            # this process hosts the store: stay a moment, so slower survivors can still check in
            time.sleep(min(2.0, grace_s))
    except Exception as probe:
        log.debug("rendezvous store unreachable: %s", probe)
        missing = [by_rank[0]] if 0 in by_rank else []
        hint += f" (the rendezvous store on rank 0, {master[0]}:{master[1]}, does not answer)"
    if not missing:
        return None  # every rank is there: not a lost peer (the caller re-raises the original error)
    return PeerLost(me.rank, me.host, missing, str(exc), hint, [p for p in peers if p not in missing])
