"""``parsimony-tracking serve`` as a test fixture: the team's MLflow server with basic auth, for real.

    server = TeamServer(tmp_path / "srv", host="127.0.0.1").start()
    server.add_user("alice", "alice-password-1")
    ... server.uri, server.admin_password ...
    server.stop()
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.mlflow_server import TEST_CLIENT_ENV
from tests.net import free_port
from tests.procs import stop_group

REPO = Path(__file__).resolve().parents[1]
ADMIN_PASSWORD = "admin-Pa55word-for-tests"


def write_password(path: Path, password: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(password + "\n")
    path.chmod(mode)
    return path


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m launch.tracking ARGS`` (returns when it exits)."""
    full = dict(os.environ, **TEST_CLIENT_ENV, PYTHONPATH=str(REPO))
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "launch.tracking", *args], cwd=REPO, env=full,
                          capture_output=True, text=True, timeout=timeout)


class TeamServer:
    def __init__(self, root: Path, host: str = "127.0.0.1"):
        self.root, self.host, self.port = Path(root), host, free_port()
        self.uri = f"http://{host}:{self.port}"
        self.admin_password = ADMIN_PASSWORD
        self.proc: subprocess.Popen | None = None
        self.out = ""

    def start(self, timeout: float = 120.0) -> TeamServer:
        pw = write_password(self.root.parent / f"{self.root.name}-admin.pw", self.admin_password)
        env = dict(os.environ, **TEST_CLIENT_ENV, PYTHONPATH=str(REPO))
        self._log = open(self.root.parent / f"{self.root.name}-serve.out", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "launch.tracking", "serve", "--root", str(self.root),
                                      "--host", self.host, "--port", str(self.port), "--password-file", str(pw),
                                      "--workers", "1"],
                                     cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._log.seek(0)
            self.out = self._log.read()
            if "serving http://" in self.out:
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"parsimony-tracking serve exited with {self.proc.returncode}:\n{self.out}")
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"parsimony-tracking serve not ready within {timeout} s:\n{self.out}")

    def admin_env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": self.admin_password}

    def add_user(self, name: str, password: str) -> None:
        pw = write_password(self.root.parent / f"{name}.pw", password)
        r = cli("add-user", name, "--uri", self.uri, "--password-file", str(pw), env=self.admin_env())
        assert r.returncode == 0, r.stderr[-2000:]

    def stop(self) -> None:
        stop_group(self.proc, signal.SIGTERM, wait_s=30)
        self._log.close()
