"""The config reference: every key has a meaning, docs/config.md is the one the code generates, and
``--print-config`` prints every key with its meaning and still parses back to the same tree."""

from __future__ import annotations

from pathlib import Path

import yaml

from launch.config_doc import all_entries, reference
from launch.train import load
from launch.train import main as train_main
from system.config import flatten, to_dict

ROOT = Path(__file__).resolve().parents[2]


def test_every_key_has_a_meaning():
    entries = all_entries()
    assert "method.variational.patience" in entries and "launch.gpus_per_node" in entries
    assert [k for k, (_, meaning) in entries.items() if len(meaning) < 8] == []


def test_docs_config_md_is_current():
    assert (ROOT / "docs" / "config.md").read_text() == reference(), \
        "docs/config.md is stale: python -m launch.config_doc > docs/config.md"


def test_print_config_names_every_key_and_parses_back(capsys):
    args = ["--config", str(ROOT / "configs" / "demo.yaml"), "optim.lr=0.3", "--print-config"]
    assert train_main(args) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out) == to_dict(load(args[1], ["optim.lr=0.3"]))  # the comments change nothing
    leaves = [ln for ln in out.splitlines() if not ln.rstrip().endswith(":")]
    assert len(leaves) == len(flatten(to_dict(load(args[1], []))))
    assert all("  # " in ln for ln in leaves), [ln for ln in leaves if "  # " not in ln][:3]
    assert "patience: 1  # checks a structure spends at theta <= tau_theta" in out
