"""The everyday commands: console scripts matching the module entry points, the config tree on
demand, a recipe's launch: section set aside by launch.train, the runs listed, make clean keeping
the runs, and a summary that counts the epochs a run really did."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch.inspect import main as inspect_main
from system.trainer import Trainer
from tests.methods_util import tiny_config

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize("name, module", [("train", "launch.train"), ("submit", "launch.submit"),
                                          ("compare", "launch.compare"), ("inspect", "launch.inspect"),
                                          ("export", "launch.export")])
def test_console_commands_match_the_modules(name, module):
    script = BIN / f"parsimony-{name}"
    assert script.is_file(), f"{script} missing: pyproject.toml [project.scripts]"
    a = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    b = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert a.returncode == 0 == b.returncode, a.stderr + b.stderr
    strip = [line for line in a.stdout.splitlines() if not line.startswith("usage:")]
    assert strip == [line for line in b.stdout.splitlines() if not line.startswith("usage:")]


def test_print_config_shows_the_whole_resolved_tree(tmp_path):
    out = subprocess.run([str(BIN / "parsimony-train"), "--config", str(ROOT / "configs" / "demo.yaml"),
                          "optim.lr=0.05", "--print-config"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    tree = yaml.safe_load(out.stdout)
    assert tree["optim"]["lr"] == 0.05 and tree["method"]["name"] == "variational"  # override, recipe
    assert tree["optim"]["momentum"] == 0.9 and "variational" in tree["method"]  # defaults
    assert {"model", "data", "optim", "train", "method", "engine", "checkpoint", "tracking", "run"} <= set(tree)
    assert "--print-config" in subprocess.run([str(BIN / "parsimony-train"), "--help"], capture_output=True,
                                              text=True, timeout=120).stdout


def test_launch_train_sets_a_recipes_launch_section_aside(tmp_path):
    recipe = tmp_path / "job.yaml"
    recipe.write_text(yaml.safe_dump({"launch": {"nodes": 2, "tasks_per_node": 2}, "optim": {"lr": 0.02}}))
    out = subprocess.run([sys.executable, "-m", "launch.train", "--config", str(recipe), "--print-config"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["optim"]["lr"] == 0.02
    assert "ignoring its launch: section" in out.stderr


def test_inspect_runs_lists_status_top1_and_macs(tmp_path, capsys):
    runs = tmp_path / "runs"
    Trainer(tiny_config(runs, "train.max_steps=4", "run.dir=", "run.name=done")).run()
    (runs / "empty-dir").mkdir()  # not a run: not listed
    assert inspect_main(["runs", "--root", str(runs), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["run"] for r in rows] == ["done"]
    assert rows[0]["status"] == "finished" and rows[0]["steps"] == 4 and rows[0]["top1"] is not None
    assert inspect_main(["runs", "--root", str(runs)]) == 0
    table = capsys.readouterr().out
    assert "done" in table and "finished" in table and "%" in table


def test_make_clean_keeps_the_runs():
    plan = subprocess.run(["make", "-n", "clean"], capture_output=True, text=True, cwd=ROOT, timeout=60).stdout
    assert "rm -rf" in plan and "runs" not in plan.split()
    plan = subprocess.run(["make", "-n", "clean-runs"], capture_output=True, text=True, cwd=ROOT, timeout=60).stdout
    assert "rm -rf runs" in plan


def test_the_summary_counts_the_epochs_done(tmp_path):
    # 512 synthetic samples / batch 16 = 32 steps an epoch; 6 epochs configured, capped at 8 steps
    summary = Trainer(tiny_config(tmp_path, "train.epochs=6", "train.max_steps=8")).run()
    assert summary["steps"] == 8 and summary["epochs"] == 0.25 and summary["epochs_configured"] == 6
