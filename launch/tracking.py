"""``parsimony-tracking``: an MLflow server for a team, closed to strangers (``python -m launch.tracking``).

    parsimony-tracking serve --root /srv/parsimony-mlflow --host 10.0.0.5 --port 5000 \\
        --password-file ~/.parsimony-admin-password
    parsimony-tracking add-user alice --uri http://10.0.0.5:5000 --password-file alice.pw

``serve`` runs MLflow's own server with its basic-auth app (``mlflow[auth]``):

- everything under ``--root`` on this host's disk: the run store ``mlflow.db`` (SQLite is safe here:
  the server is its one writer; ``--backend-store-uri`` takes a PostgreSQL/MySQL URI instead), the
  artifacts ``artifacts/`` (served through the server: nodes upload over HTTP and need no access to
  the folder), the user database ``auth.db`` and its settings ``auth.ini``;
- the admin user ``admin``, created on the first start with the password of ``--password-file``
  (a file only its owner can read; never a command-line argument, which every user of the host sees);
- bound to ``--host`` (an address of this machine; 127.0.0.1 by default), it prints the URI to give
  jobs once the server answers, and runs until it is stopped (SIGINT/SIGTERM).

Users get ``--default-permission`` (EDIT: read every experiment, log into every experiment; an
experiment's creator manages it).  A worker remembers a login it has checked for ``--login-cache-s``
seconds (60; :func:`auth_ini` says why and what it costs).  ``add-user`` logs in as an admin with
MLflow's own credential sources (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` or
``~/.mlflow/credentials``) and reads the new user's password from ``--password-file`` or the terminal.
See docs/tracking.md, "A server for your team".
"""

from __future__ import annotations

import argparse
import getpass
import ipaddress
import logging
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from system.mounts import mount_of

log = logging.getLogger("launch.tracking")
ADMIN = "admin"
PERMISSIONS = ("READ", "EDIT", "MANAGE", "NO_PERMISSIONS")


class SetupError(Exception):
    """A bad argument or file, named in the message; nothing was started."""


def read_password_file(path: str | Path, what: str = "--password-file") -> str:
    """The password in ``path`` (its first line): refused when missing, empty, not a regular file, or
    readable or writable by others than its owner."""
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except OSError as exc:
        raise SetupError(f"{what} {p}: cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise SetupError(f"{what} {p}: not a regular file")
    if st.st_mode & 0o077:
        raise SetupError(f"{what} {p}: others can read or write it (mode {stat.S_IMODE(st.st_mode):04o}); "
                         f"run: chmod 600 {p}")
    lines = p.read_text().splitlines()
    password = lines[0].strip() if lines else ""
    if not password:
        raise SetupError(f"{what} {p}: empty (the password is its first line)")
    return password


def check_host(host: str) -> str:
    """``host`` resolved to an address this machine can bind (0.0.0.0 and :: included)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise SetupError(f"--host {host}: does not resolve ({exc.strerror})") from None
    for family, _, _, _, addr in infos:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((addr[0], 0))
                return str(addr[0])
            except OSError:
                continue
    raise SetupError(f"--host {host}: not an address of this machine ({socket.gethostname()}); give one of its "
                     f"interfaces' addresses (ip -brief address), or 127.0.0.1")


def _check_port(address: str, port: int) -> None:
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError as exc:
            raise SetupError(f"--port {port}: cannot listen on {address}:{port} ({exc.strerror})") from None


def auth_ini(root: Path, default_permission: str, login_cache_s: int = 60) -> Path:
    """``<root>/auth.ini``: MLflow's basic-auth settings (the user database under ``root``; no password).

    ``login_cache_s``: how long a worker remembers a login it has checked (MLflow's
    ``auth_cache_ttl_seconds``; 0: never, MLflow's default).  Checking a password is slow by design (scrypt:
    0.12 s of CPU here, and MLflow's server checked each request more than once: 0.45 s a request on a
    2-core host), and a training run makes its requests in bursts (logging its model: 34 of them, one
    per metric), so without the cache a 6-step run took 44 s, 30 of them in its final logging; 10 s
    with it (docs/tracking.md, "A server for your team").  The cache is MLflow's own: per worker,
    in memory, keyed by an HMAC of the password (a wrong password is never remembered as right); the
    price is that a changed password or a deleted user still logs in for up to ``login_cache_s``."""
    ini = root / "auth.ini"
    ini.write_text("[mlflow]\n"
                   f"default_permission = {default_permission}\n"
                   f"database_uri = sqlite:///{root / 'auth.db'}\n"
                   f"admin_username = {ADMIN}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                   f"auth_cache_ttl_seconds = {int(login_cache_s)}\n")
    return ini


def flask_secret(root: Path) -> str:
    """The server's CSRF signing key, made once and kept in ``<root>/flask_secret`` (mode 600), so that
    sessions survive a restart and every worker signs alike."""
    path = root / "flask_secret"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip()


def server_command(root: Path, address: str, port: int, backend: str | None, workers: int,
                   host_names: list[str]) -> list[str]:
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    allowed = sorted({h for name in host_names for h in (name, f"{name}:*")})
    return [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "server", "--app-name", "basic-auth",
            "--backend-store-uri", backend or f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts",
            "--host", address, "--port", str(port), "--workers", str(workers),
            "--allowed-hosts", ",".join(allowed)]


def uri_of(host: str, address: str, port: int) -> str:
    shown = host if host not in ("0.0.0.0", "::") else socket.getfqdn()
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


def serve(args: argparse.Namespace) -> int:
    if args.login_cache_s < 0:
        raise SetupError(f"--login-cache-s {args.login_cache_s}: must be >= 0 (0: check every request's password)")
    root = Path(args.root).expanduser().resolve()
    password = read_password_file(args.password_file)
    address = check_host(args.host)
    _check_port(address, args.port)
    if args.default_permission not in PERMISSIONS:
        raise SetupError(f"--default-permission {args.default_permission}: one of {', '.join(PERMISSIONS)}")
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)  # the stores and the user database: the server's account only
    if args.backend_store_uri is None:
        m = mount_of(root)
        if m.network:
            raise SetupError(f"--root {root}: on a network filesystem ({m.fstype}), where SQLite's locking is "
                             f"unreliable; give a folder on this host's local disk, or --backend-store-uri "
                             f"postgresql://...")
    (root / "artifacts").mkdir(exist_ok=True)
    ini = auth_ini(root, args.default_permission, args.login_cache_s)
    env = dict(os.environ, MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_AUTH_ADMIN_USERNAME=ADMIN,
               MLFLOW_FLASK_SERVER_SECRET_KEY=flask_secret(root),
               MLFLOW_AUTH_ADMIN_PASSWORD=password,  # read by MLflow on the first start only
               MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    names = ["localhost", "127.0.0.1", args.host, address, socket.gethostname(), socket.getfqdn()]
    cmd = server_command(root, address, args.port, args.backend_store_uri, args.workers, names)
    uri = uri_of(args.host, address, args.port)
    logf = open(root / "server.log", "ab")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        probe = f"http://{'127.0.0.1' if address in ('0.0.0.0', '::') else address}:{args.port}/health"
        if ":" in address and address != "::":
            probe = f"http://[{address}]:{args.port}/health"
        deadline = time.monotonic() + args.start_timeout
        while True:
            if proc.poll() is not None:
                tail = (root / "server.log").read_text(errors="replace")[-3000:]
                raise SetupError(f"mlflow server exited with status {proc.returncode} (log {root / 'server.log'}):"
                                 f"\n{tail}")
            try:
                with urllib.request.urlopen(probe, timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SetupError(f"mlflow server did not answer within {args.start_timeout:.0f} s "
                                 f"(log {root / 'server.log'})")
            time.sleep(0.3)
        print(f"serving {uri}  (store {args.backend_store_uri or root / 'mlflow.db'}, artifacts {root / 'artifacts'},"
              f" users {root / 'auth.db'}, log {root / 'server.log'})", flush=True)
        print(f"give jobs: tracking.uri={uri}  (and MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, "
              f"or ~/.mlflow/credentials)", flush=True)
        proc.wait()
        return proc.returncode or 0
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        logf.close()


def add_user(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    from system.tracking.login import LoginRefused, check_login

    if args.password_file:
        password = read_password_file(args.password_file)
    else:
        password = getpass.getpass(f"password for {args.name}: ")
        if password != getpass.getpass("again: "):
            raise SetupError("the two passwords differ; nothing was created")
    if not password:
        raise SetupError("an empty password; nothing was created")
    try:
        admin = check_login(args.uri)
    except LoginRefused as exc:
        raise SetupError(str(exc).replace("nothing was submitted", "nothing was created")) from None
    client = get_app_client("basic-auth", tracking_uri=args.uri)
    try:
        client.create_user(username=args.name, password=password)
    except MlflowException as exc:
        raise SetupError(f"{args.uri}: creating user {args.name!r} as {admin!r} failed: {exc.message}") from None
    print(f"created user {args.name!r} on {args.uri}")
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="parsimony-tracking", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the team's MLflow server (basic auth) until stopped")
    s.add_argument("--root", required=True, help="folder on this host's disk for the store, artifacts and users")
    s.add_argument("--host", default="127.0.0.1", help="the address to listen on (an address of this machine)")
    s.add_argument("--port", type=int, default=5000)
    s.add_argument("--password-file", required=True, help="the admin's password (first line; chmod 600)")
    s.add_argument("--backend-store-uri", default=None, help="postgresql://... or mysql://... instead of "
                                                             "<root>/mlflow.db")
    s.add_argument("--default-permission", default="EDIT", help="what every user may do on experiments "
                                                                "they did not create (READ, EDIT, MANAGE)")
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--login-cache-s", type=int, default=60,
                   help="seconds a worker remembers a checked login (0: check the password on every request; "
                        "a changed password or a removed user still logs in for up to this long)")
    s.add_argument("--start-timeout", type=float, default=120.0, help=argparse.SUPPRESS)
    a = sub.add_parser("add-user", help="create a user (you log in as an admin with MLflow's credentials)")
    a.add_argument("name")
    a.add_argument("--uri", default=os.environ.get("MLFLOW_TRACKING_URI", ""), help="the server (default: "
                                                                                    "$MLFLOW_TRACKING_URI)")
    a.add_argument("--password-file", default=None, help="the new user's password (else asked on the terminal)")
    return ap


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args)
        if not args.uri:
            raise SetupError("add-user: no server: pass --uri or set MLFLOW_TRACKING_URI")
        return add_user(args)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
