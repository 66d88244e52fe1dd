"""Process helpers shared by the tests (service fixtures, command-line runs)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time


def stop_group(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, wait_s: float = 10.0) -> None:
    """Send ``sig`` to the process group of ``proc`` (started with ``start_new_session=True``, so its
    workers go too) and wait for it; SIGKILL if it has not ended within ``wait_s``.  An ended or
    never-started process is left alone."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def wait_for_stderr(proc: subprocess.Popen, needle: str, timeout: float = 120.0) -> str:
    """Read ``proc``'s stderr (a text pipe) line by line until ``needle`` appears; return what was read.
    Fails, with the tail of what was read, if the process ends or ``timeout`` passes first."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"{needle!r} never appeared:\n{''.join(seen)[-3000:]}")


def build_ds_ops(env: dict[str, str], cwd: str | os.PathLike) -> None:
    """Build (or find cached) DeepSpeed's CPU comm op in a process started as a run starts its engine
    (``system.runtime.engine_ds.use_environment_extension_dir`` first), outside the timed tests, and check
    that it landed where every run of this environment will look: ``$TORCH_EXTENSIONS_DIR`` if ``env`` sets
    it, else ``<venv>/torch_extensions`` (``~/.cache/torch_extensions`` held one build for every venv, and
    each venv's build replaced the other's)."""
    import sys
    from pathlib import Path

    code = ("from system.runtime.engine_ds import use_environment_extension_dir as use\nwhere = use()\n"
            "from deepspeed.comm.torch import build_shm_op\nbuild_shm_op()\nprint(where)")
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    where = env.get("TORCH_EXTENSIONS_DIR") or (str(Path(sys.prefix) / "torch_extensions")
                                                if sys.prefix != sys.base_prefix else None)
    assert r.stdout.strip().splitlines()[-1] == str(where), r.stdout[-1000:]
    if where is not None:
        assert list(Path(where).glob("deepspeed_shm_comm*/*.so")), f"no deepspeed_shm_comm built under {where}"
