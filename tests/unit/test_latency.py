"""The final network's measured CPU latency: in summary.json and the MLflow final metrics, against the
dense network measured in the same process; a measurement that cannot run is missing, with its reason."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from system.config import ConfigError
from system.latency import LatencyConfig, measure_latency
from system.models.resnet import build_model
from system.models.spec import dense_spec
from system.tracking import final_metrics
from system.trainer import Trainer
from tests.methods_util import tiny_config


def test_summary_reports_latency_of_the_deployed_network_against_dense(tmp_path):
    cfg = tiny_config(tmp_path, "train.max_steps=3", "method.name=taylor", "method.taylor.keep_ratio=0.5",
                      "method.taylor.check_every=1", "method.taylor.per_step=200", "method.taylor.start_frac=0.0",
                      "latency.batches=[1, 8]", "latency.repeats=4")
    trainer = Trainer(cfg)
    summary = trainer.run()
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    for b in (1, 8):
        for key in (f"latency_ms_b{b}", f"latency_dense_ms_b{b}", f"latency_ratio_b{b}"):
            assert on_disk[key] > 0 and on_disk[key] == summary[key]
        assert on_disk[f"latency_ratio_b{b}"] == pytest.approx(on_disk[f"latency_ms_b{b}"]
                                                               / on_disk[f"latency_dense_ms_b{b}"])
        assert on_disk[f"latency_repeats_b{b}"] == 4  # as configured: 4 rounds fit latency.max_seconds (60)
    assert "latency_missing" not in on_disk
    metrics = final_metrics(on_disk)
    assert metrics["summary/latency_ratio_b1"] == on_disk["latency_ratio_b1"]
    # the same networks under a time budget the configured rounds would exceed: fewer rounds, never under 3
    spec = trainer.model.spec()
    short = measure_latency(trainer.model, build_model(trainer.dense, gates=False),
                            (spec.in_channels, spec.input_size, spec.input_size),
                            LatencyConfig(batches=(1,), repeats=15, max_seconds=1e-6))
    assert short["latency_repeats_b1"] == 3 and short["latency_ms_b1"] > 0


class _Broken(nn.Module):
    def forward(self, x):
        raise RuntimeError("no kernel for this layer here")


def test_a_measurement_that_cannot_run_is_missing_with_its_reason_never_zero():
    dense = build_model(dense_spec("resnet20", num_classes=4, input_size=16), gates=False)
    out = measure_latency(_Broken(), dense, (3, 16, 16), LatencyConfig(batches=(1,), repeats=3))
    assert out == {"latency_missing": "RuntimeError: no kernel for this layer here"}
    off = measure_latency(dense, dense, (3, 16, 16), LatencyConfig(enabled=False))
    assert set(off) == {"latency_missing"} and "latency.enabled=false" in off["latency_missing"]
    assert not any(k.startswith("summary/latency_ms") for k in final_metrics(off))


def test_the_measurement_does_not_touch_the_networks_it_times():
    torch.manual_seed(0)
    net = build_model(dense_spec("resnet20", num_classes=4, input_size=16), gates=False).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    measure_latency(net, net, (3, 16, 16), LatencyConfig(batches=(2,), repeats=3))
    assert net.training and all(torch.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("over, key", [("latency.repeats=1", "latency.repeats"),
                                       ("latency.batches=[0]", "latency.batches")])
def test_bad_latency_settings_name_their_key(tmp_path, over, key):
    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path, over)
    assert err.value.key == key
