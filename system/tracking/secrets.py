"""Secrets in a run's records: masked wherever the run writes what it was given, never lost where it uses it.

- :func:`redacted` masks a config tree before it is written (``config.json``) or logged (MLflow
  params): the user and password of every URL (``http://alice:pw@host`` -> ``http://***:***@host``)
  and every value whose key names a password, token or secret.  The run itself keeps the real values.
- :class:`RedactingFilter` masks the same in log records, plus every secret value it was told about
  (:func:`install_log_redaction`: the config's secret values and MLflow's tracking password).
- :func:`credentials` reads the tracking login from MLflow's own sources, in MLflow's order:
  ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``, else ``~/.mlflow/credentials``
  (``MLFLOW_TRACKING_AUTH`` and tokens are MLflow's too: they reach the client the same way, and
  never the run's files).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

MASK = "***"
#: a key whose value is a secret: ``password``, ``passwd``, ``token``, ``secret``, ``api_key`` in its last part
SECRET_KEY = re.compile(r"(pass(word|wd)?|token|secret|api_?key|credential)s?$", re.IGNORECASE)
#: the user[:password]@ of a URL
URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<info>[^/@\s'\"]+)@")
ENV_USER, ENV_PASSWORD = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"


def redact_text(text: str, secrets: tuple[str, ...] = ()) -> str:
    """``text`` with every URL's user info masked, and every string of ``secrets`` too."""
    out = URL_USERINFO.sub(lambda m: f"{m['scheme']}{MASK}:{MASK}@" if ":" in m["info"] else f"{m['scheme']}{MASK}@",
                           text)
    for s in secrets:
        if s:
            out = out.replace(s, MASK)
    return out


def split_login(url: str) -> tuple[str, str | None, str | None]:
    """``http://user:pw@host/x`` -> (``http://host/x``, user, pw); a URL without a login: (url, None, None)."""
    m = URL_USERINFO.match(url)
    if not m:
        return url, None, None
    user, sep, password = m["info"].partition(":")
    from urllib.parse import unquote

    return m["scheme"] + url[m.end():], unquote(user), unquote(password) if sep else None


def is_secret_key(key: str) -> bool:
    """Whether a (dotted) config key names a secret, by its last part."""
    return bool(SECRET_KEY.search(key.rsplit(".", 1)[-1]))


def redacted(tree: Any, key: str = "") -> Any:
    """A copy of a config tree (dicts, lists, scalars) with its secrets masked: URL user info in every
    string, the whole value of a non-empty secret key."""
    if isinstance(tree, dict):
        return {k: redacted(v, f"{key}.{k}" if key else str(k)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(redacted(v, key) for v in tree)
    if key and is_secret_key(key) and tree not in (None, ""):
        return MASK
    if isinstance(tree, str):
        return redact_text(tree)
    return tree


def secret_values(tree: Any, key: str = "") -> list[str]:
    """Every secret a config tree holds (secret keys' values, URL passwords): what logs must not show."""
    out: list[str] = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += secret_values(v, f"{key}.{k}" if key else str(k))
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            out += secret_values(v, key)
    elif key and is_secret_key(key) and tree not in (None, ""):
        out.append(str(tree))
    elif isinstance(tree, str):
        for m in URL_USERINFO.finditer(tree):
            _user, _, password = m["info"].partition(":")
            out += [password] if password else []
    return out


def credentials() -> tuple[str | None, str | None]:
    """(user, password) from MLflow's sources: its environment variables, else ``~/.mlflow/credentials``."""
    from mlflow.utils.credentials import read_mlflow_creds

    creds = read_mlflow_creds()
    return creds.username or None, creds.password or None


class RedactingFilter(logging.Filter):
    """Masks URL user info and the given secret values in every record that passes a handler."""

    def __init__(self, secrets: tuple[str, ...] = ()):
        super().__init__()
        self.secrets = tuple(sorted({s for s in secrets if s and len(s) >= 3}, key=len, reverse=True))

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact_text(msg, self.secrets)
        if clean != msg:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info), self.secrets)
        return True


def install_log_redaction(config_tree: Any = None, mlflow_login: bool = True) -> RedactingFilter:
    """Put one :class:`RedactingFilter` on every handler of the root logger (replacing an earlier one):
    the secrets are the config's, ``MLFLOW_TRACKING_PASSWORD``'s and, with ``mlflow_login``, the password of
    ``~/.mlflow/credentials`` (read through MLflow, which a process that does not track need not import: a
    run with tracking off never reads that file, so no line of it can carry the password).  Call it after
    logging is set up."""
    secrets = secret_values(config_tree) if config_tree is not None else []
    secrets += [v for v in (os.environ.get(ENV_PASSWORD, ""), credentials()[1] if mlflow_login else "") if v]
    filt = RedactingFilter(tuple(secrets))
    for handler in logging.getLogger().handlers:
        for old in [f for f in handler.filters if isinstance(f, RedactingFilter)]:
            handler.removeFilter(old)
        handler.addFilter(filt)
    return filt
