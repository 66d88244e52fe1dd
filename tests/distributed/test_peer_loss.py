"""A rank lost mid-run: the survivors stop within a bounded time and name the lost rank and host.

Two real ``launch.train`` processes (DeepSpeed on gloo, CPU) on this host, started as a launcher
would (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT).  Rank 1 is SIGKILLed (its sockets close:
gloo fails at once) or SIGSTOPped (it stops answering: the collective times out after
``engine.collective_timeout_s``).  The same code runs across nodes (tests/integration/test_multinode.py).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from system.runtime.rendezvous import (
    RendezvousError,
    choose_socket_ifname,
    is_comm_failure,
    resolve_host,
    route_interface,
)
from tests.distributed.test_distributed import ROOT, SMALL, _env, ds_ops  # noqa: F401  (fixture)
from tests.net import free_port

PY = sys.executable



def _start(tmp: Path, port: int, *over: str) -> list[tuple[subprocess.Popen, Path]]:
    procs = []
    for rank in range(2):
        env = {**_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        err = tmp / f"rank{rank}.err"
        p = subprocess.Popen([PY, "-m", "launch.train", *SMALL, "engine.kind=deepspeed", "train.epochs=50",
                              "data.batch_size=16", "train.log_every_steps=1", f"run.root={tmp / 'runs'}",
                              "run.name=lost", *over],
                             cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err.open("w"))
        procs.append((p, err))
    return procs


def _wait_checkpoint(tmp: Path, err: Path, timeout: float = 240) -> Path:
    """The first complete checkpoint (both ranks trained to it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = sorted((tmp / "runs").glob("lost*/checkpoints/step-*/manifest.json"))
        if done:
            return done[0].parent
        time.sleep(0.5)
    raise AssertionError(f"no checkpoint: {err.read_text()[-2000:]}")


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("how", ["killed", "silent", "rank0-killed"])
def test_lost_rank_is_named_and_the_survivor_stops(ds_ops, tmp_path: Path, how: str):  # noqa: F811
    timeout_s = 8
    procs = _start(tmp_path, free_port(), f"engine.collective_timeout_s={timeout_s}", "checkpoint.every_steps=3")
    (_p0, err0), (_p1, _err1) = procs
    # rank0-killed: the lost rank hosts the rendezvous store; rank 1 survives and must name it
    (victim, _), (survivor, err) = (procs[0], procs[1]) if how == "rank0-killed" else (procs[1], procs[0])
    try:
        ckpt = _wait_checkpoint(tmp_path, err0)
        manifest = (ckpt / "manifest.json").read_text()
        t0 = time.monotonic()
        os.kill(victim.pid, signal.SIGSTOP if how == "silent" else signal.SIGKILL)
        rc = survivor.wait(timeout=120)
        took = time.monotonic() - t0
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    text = err.read_text()
    assert rc == 1, text[-3000:]
    host = socket.gethostname()
    me, lost = (1, 0) if how == "rank0-killed" else (0, 1)
    assert f"rank {me} on host {host}: lost contact with rank {lost} on host {host} (127.0.0.1)" in text, text[-3000:]
    if how == "rank0-killed":
        assert "the rendezvous store on rank 0" in text and "does not answer" in text
    # bounded: at once when the peer's sockets close; after the collective timeout when it is silent
    # (plus the 5 s check-in grace)
    assert took < (30 if how == "killed" else timeout_s + 40), took
    if how == "silent":
        assert took >= timeout_s - 1, took
    # the process group used the interface that routes to MASTER_ADDR, and said so
    assert "MASTER_ADDR 127.0.0.1 = 127.0.0.1; process group on interface lo (127.0.0.1, route to 127.0.0.1)" in \
        err0.read_text()
    assert (ckpt / "manifest.json").read_text() == manifest  # what was checkpointed is still there


def test_unresolvable_master_addr_fails_fast_naming_the_host(tmp_path: Path):
    env = {**_env(), "RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "no-such-node.invalid",
           "MASTER_PORT": str(free_port())}
    t0 = time.monotonic()
    r = subprocess.run([PY, "-m", "launch.train", *SMALL, f"run.root={tmp_path}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr[-2000:]
    assert f"rank 1 on host {socket.gethostname()}" in r.stderr and "no-such-node.invalid" in r.stderr
    assert "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 90
    assert not list(tmp_path.iterdir())  # nothing written


def test_interface_is_the_one_routing_to_the_master(monkeypatch):
    assert route_interface("127.0.0.1") == ("lo", "127.0.0.1")
    assert resolve_host("localhost", 5) == "127.0.0.1"
    with pytest.raises(RendezvousError, match="no-such-node.invalid"):
        resolve_host("no-such-node.invalid", 5, rank=3)
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        # (set, then delete: monkeypatch then restores the variable as it was, also when
        # choose_socket_ifname wrote it; a leaked GLOO_SOCKET_IFNAME=lo broke later multi-node jobs)
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    assert choose_socket_ifname("127.0.0.1") == ("lo", "127.0.0.1", "route to 127.0.0.1")
    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo" == os.environ["NCCL_SOCKET_IFNAME"]
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # a user's choice wins and is reported as such
    assert choose_socket_ifname("127.0.0.1")[2] == "GLOO_SOCKET_IFNAME set by the environment"
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "nosuchif0")
    with pytest.raises(RendezvousError, match="GLOO_SOCKET_IFNAME=nosuchif0 names no interface"):
        choose_socket_ifname("127.0.0.1")


def test_only_communication_errors_count_as_a_lost_peer():
    gloo = RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [10.77.0.12]:24280: "
                        "Connection reset by peer")
    assert is_comm_failure(gloo)
    assert is_comm_failure(RuntimeError("Timed out waiting 8000ms ... ProcessGroupGloo"))
    # a data loader's network error or a bug is not a lost rank: it is re-raised as it is
    assert not is_comm_failure(RuntimeError("fetching http://host/shard-000003.tar: Connection reset by peer"))
    assert not is_comm_failure(ValueError("shape mismatch"))
