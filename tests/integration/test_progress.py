"""Progress in a log file (Slurm, CI, a pipe): plain lines with step, rate, ETA, loss and MACs, no
carriage-return redraws; a terminal gets the bar."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from system.progress import LogProgress, progress

ROOT = Path(__file__).resolve().parents[2]


def test_a_piped_run_logs_plain_progress_lines(tmp_path):
    out = subprocess.run([sys.executable, "-m", "launch.train", "model.name=resnet20", "data.loader=synthetic",
                          "data.synthetic_classes=4", "data.synthetic_samples=256", "data.batch_size=16",
                          "data.train_size=16", "data.val_resize=16", "data.val_crop=16", "data.workers=0",
                          "train.eval_batches=1", "tracking.enabled=false", "train.threads=1",
                          "train.progress=true", "train.progress_interval_s=0.001", f"run.dir={tmp_path / 'r'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "\r" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if "step/s ETA" in ln]
    assert lines and "step 16/16 (100%)" in lines[-1] and "loss" in lines[-1] and "macs" in lines[-1]


def test_a_terminal_gets_the_bar():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    bar = progress(10, 0, 30.0, stream=Tty())
    assert type(bar).__name__ == "tqdm"
    bar.close()
    assert isinstance(progress(10, 0, 30.0, stream=io.StringIO()), LogProgress)
