"""A real ``mlflow server`` (sqlite backend, loopback, free port) for integration tests.

One server is shared by the whole pytest session; the fixture is registered in tests/conftest.py::

    def test_x(mlflow_server):
        cfg = TrackingConfig(uri=mlflow_server.uri)

Tests that need to kill a server start their own with ``MlflowServer(tmp_path).start()``.
The shared server is a module-level singleton (a session fixture imported into several
modules would otherwise start one server per module) stopped when the interpreter exits.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.net import free_port
from tests.procs import stop_group

# Client side: fail fast against a dead server instead of retrying for minutes.
TEST_CLIENT_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


class MlflowServer:
    """An ``mlflow server`` process with its sqlite store and artifacts under ``root``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
                   MLFLOW_DISABLE_TELEMETRY="true")
        mlflow_bin = Path(sys.executable).parent / "mlflow"
        cmd = [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "server",
               "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "mlartifacts"),
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        self._log = open(self.root / "server.log", "wb")
        # Own session: kill() takes the server's worker processes down with it.
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"mlflow server not ready within {timeout} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        try:
            return (self.root / "server.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Stop the server and its workers (SIGKILL by default: a server that dies)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        stop_group(self.proc, sig)
        self._log.close()


_shared: MlflowServer | None = None


def shared_server() -> MlflowServer:
    """The session's server, started on first use."""
    global _shared
    if _shared is None:
        root = Path(tempfile.mkdtemp(prefix="parsimony-mlflow-server-"))
        server = MlflowServer(root).start()

        def _stop() -> None:
            server.kill(signal.SIGTERM)
            shutil.rmtree(root, ignore_errors=True)

        atexit.register(_stop)
        _shared = server
    return _shared


@pytest.fixture(scope="session")
def mlflow_server() -> MlflowServer:
    """A running MLflow server shared by the session (do not kill it)."""
    for k, v in TEST_CLIENT_ENV.items():
        os.environ[k] = v
    return shared_server()
