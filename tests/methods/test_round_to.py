"""method.round_to: every kept inner width a multiple of it, the target still met, bad values refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from system.config import ConfigError
from system.trainer import Trainer
from tests.methods_util import TARGETED, tiny_config

ROOT = Path(__file__).resolve().parents[2]



def _inner_widths(record: dict) -> list[int]:
    return [w for stage in record["stages"] for block in stage["inner_widths"] if block for w in block]


@pytest.mark.parametrize("method", sorted(TARGETED))
def test_kept_widths_are_multiples_and_the_target_holds(tmp_path, method):
    cfg = tiny_config(tmp_path, "train.max_steps=40", "method.target_macs=0.5", "method.round_to=8",
                      *TARGETED[method])
    summary = Trainer(cfg).run()
    assert summary["macs"] < summary["macs_dense"]  # something was pruned
    assert summary["target_reached"] is True
    assert summary["macs"] / summary["macs_dense"] <= 0.5 + 1e-9  # the rounded widths were counted
    # what a user sees: launch.inspect on the run directory (the exported final/spec.json)
    out = subprocess.run([sys.executable, "-m", "launch.inspect", str(tmp_path / "run"), "--json"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    widths = _inner_widths(json.loads(out))
    assert widths and all(w % 8 == 0 for w in widths), widths
    assert any(w not in (16, 32, 64) for w in widths) or any(
        not b for s in json.loads(out)["stages"] for b in s["inner_widths"])  # cut widths, or whole blocks


def test_without_rounding_widths_are_free(tmp_path):
    """The counter-test: the same Taylor run at round_to=1 keeps widths that are not multiples of 8."""
    cfg = tiny_config(tmp_path, "train.max_steps=40", "method.target_macs=0.5", *TARGETED["taylor"])
    trainer = Trainer(cfg)
    trainer.run()
    from launch.inspect import describe
    widths = _inner_widths(describe(trainer.model.spec()))
    assert any(w % 8 for w in widths), widths


@pytest.mark.parametrize("value, needle", [(0, ">= 1"), (-8, ">= 1")])
def test_round_to_below_one_is_refused(tmp_path, value, needle):
    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path, "method.name=taylor", f"method.round_to={value}")
    assert err.value.key == "method.round_to" and needle in str(err.value)


@pytest.mark.parametrize("method, value, needle", [("variational", 32, "16 channels"), ("l1", 32, "16 channels"),
                                                   ("l1", 3, "does not divide")])
def test_round_to_that_does_not_divide_a_layer_is_refused(tmp_path, method, value, needle):
    # resnet20's narrowest inner layers have 16 channels
    cfg = tiny_config(tmp_path, f"method.name={method}", f"method.round_to={value}")
    with pytest.raises(ConfigError) as err:
        Trainer(cfg)
    assert err.value.key == "method.round_to" and needle in str(err.value)
