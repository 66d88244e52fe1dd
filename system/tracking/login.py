"""Checks of a tracking store made before anything is submitted or trained.

- :func:`check_login`: an MLflow server answers and takes the login from MLflow's sources
  (:func:`system.tracking.secrets.credentials`); a refusal names the URI and the user.
- :func:`check_store_filesystem`: the embedded SQLite store is not on a network filesystem.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

from system.config import ConfigError
from system.mounts import mount_of
from system.tracking.config import TrackingUnavailable, sqlite_file
from system.tracking.secrets import credentials, redact_text, split_login

SEARCH = "/api/2.0/mlflow/experiments/search"


class LoginRefused(RuntimeError):
    """The tracking server refused the login (HTTP 401/403)."""

    def __init__(self, uri: str, user: str | None, status: int, detail: str):
        self.uri, self.user, self.status = uri, user, status
        who = f"user {user!r}" if user else "no user (MLFLOW_TRACKING_USERNAME and ~/.mlflow/credentials are unset)"
        super().__init__(
            f"MLflow server {redact_text(uri)} refused the login of {who} (HTTP {status}: {detail}); nothing "
            f"was submitted. Set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or ~/.mlflow/credentials) "
            f"to an account of that server (parsimony-tracking add-user creates one).")


def check_login(uri: str, timeout: float = 10.0) -> str | None:
    """For an ``http(s)://`` tracking URI: one authenticated read.  Returns the user it logged in as;
    raises :class:`LoginRefused` on 401/403, :class:`TrackingUnavailable` when nothing answers."""
    if not uri.startswith(("http://", "https://")):
        return None
    bare, user, password = split_login(uri)  # a login in the URL wins, as in MLflow's client
    if user is None:
        user, password = credentials()
    req = urllib.request.Request(f"{bare.rstrip('/')}{SEARCH}", method="POST",
                                 data=json.dumps({"max_results": 1}).encode(),
                                 headers={"Content-Type": "application/json"})
    if user is not None:
        token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise LoginRefused(uri, user, exc.code, exc.reason) from None
        raise TrackingUnavailable(redact_text(uri), f"HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingUnavailable(redact_text(uri), str(reason)) from None
    return user


def check_store_filesystem(uri: str, mountinfo: str | None = None) -> str | None:
    """For a ``sqlite:///`` store: the filesystem type of its folder when that is a network filesystem
    (else None).  ``mountinfo`` as in :func:`system.mounts.mount_of`."""
    db = sqlite_file(uri)
    if db is None:
        return None
    m = mount_of(db.parent, mountinfo)
    return m.fstype if m.network else None


def network_store_error(uri: str, fstype: str, key: str = "run.root") -> ConfigError:
    return ConfigError(key, (
        f"the embedded SQLite tracking store {sqlite_file(uri)} would sit on a network filesystem "
        f"({fstype}): SQLite's locking is unreliable there and the jobs of an array would write to it at "
        f"once. Start a server for the team (parsimony-tracking serve --root <local dir> --host <address>) "
        f"and set tracking.uri=http://<address>:<port>, or put {key} on a local disk"))
