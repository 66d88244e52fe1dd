"""The log filter masks the tracking password from MLflow's credential file where the run tracks, and a run
that does not track leaves MLflow unread (it never uses that login)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from system.tracking import names as T
from system.tracking.secrets import RedactingFilter, install_log_redaction

REPO = Path(__file__).resolve().parents[2]
FILE_PW = "file-only-pw-90210"


def _credentials_home(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / ".mlflow").mkdir()
    (tmp_path / ".mlflow" / "credentials").write_text(
        f"[mlflow]\nmlflow_tracking_username = bob\nmlflow_tracking_password = {FILE_PW}\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)


def _masked(filt: RedactingFilter, text: str) -> str:
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "%s", (text,), None)
    filt.filter(record)
    return record.getMessage()


def test_the_credential_files_password_is_masked_where_the_run_tracks(tmp_path, monkeypatch):
    _credentials_home(tmp_path, monkeypatch)
    cfg = {"tracking": {"uri": "http://u:url-pw@h"}}
    line = f"a {FILE_PW} c url-pw"
    assert _masked(install_log_redaction(cfg, mlflow_login=True), line) == "a *** c ***"
    # tracking off: the file is not read (the run never logs in with it); the config's secrets still masked
    assert _masked(install_log_redaction(cfg, mlflow_login=False), line) == f"a {FILE_PW} c ***"
    # MLflow's environment variable is masked either way (it is read without MLflow)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "env-pw-31337")
    last = install_log_redaction(cfg, mlflow_login=False)
    assert _masked(last, "b env-pw-31337") == "b ***"
    for handler in logging.getLogger().handlers:  # (leave the root logger as the other tests find it)
        handler.removeFilter(last)


def test_a_run_without_tracking_does_not_import_mlflow(tmp_path):
    """The CLI's run path with tracking off: MLflow stays out of the process (about 2 s of imports a run), and so
    does matplotlib, since the layer-width plot is an MLflow artifact only (about 0.8 s a run)."""
    from tests.methods_util import TINY

    probe = ("import sys, launch.train as t; rc = t.main(sys.argv[1:]); "
             "print(*(f'{m}={m in sys.modules}' for m in ('mlflow', 'matplotlib'))); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", probe, *TINY, f"run.root={tmp_path}", "train.max_steps=2",
                        "train.threads=1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "mlflow=False matplotlib=False" in r.stdout, r.stdout[-500:]
    (summary,) = tmp_path.glob("*/summary.json")  # the run finished
    assert not (summary.parent / T.LAYER_WIDTHS_ARTIFACT).exists()
