"""``model.init_from``: a run starts from trained weights (a finished run, a checkpoint, a torchvision-layout
state dict), prunes from there, and a source that does not fit is refused naming the key, before anything
is written."""

from __future__ import annotations

import logging

import pytest
import torch
import torchvision

from system.config import ConfigError
from system.export import load_bundle
from system.trainer import Trainer
from tests.methods_util import STRONG, tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A dense ResNet-20 trained 12 steps (a checkpoint at 6), and a Taylor-pruned one."""
    tmp = tmp_path_factory.mktemp("init")
    Trainer(tiny_config(tmp / "dense", "method.name=none", "train.max_steps=12", "checkpoint.every_steps=6")).run()
    Trainer(tiny_config(tmp / "pruned", *STRONG["taylor"], "train.max_steps=12", "checkpoint.every_steps=0")).run()
    return tmp / "dense" / "run", tmp / "pruned" / "run"


def _same(model, state, skip=()):
    own = model.state_dict()
    keys = [k for k in state if k in own and not k.startswith(tuple(skip))]
    assert keys
    for k in keys:
        torch.testing.assert_close(own[k].cpu(), state[k].to(own[k].dtype), rtol=0, atol=0, msg=k)
    return keys


def test_a_run_starts_from_a_finished_run_and_prunes(trained, tmp_path):
    dense_run, _ = trained
    final, _, _ = load_bundle(dense_run / "final")
    trainer = Trainer(tiny_config(tmp_path, *STRONG["taylor"], f"model.init_from={dense_run}", "train.max_steps=12",
                                  "checkpoint.every_steps=0"))
    assert len(_same(trainer.model, final.state_dict())) == len(final.state_dict())  # every weight, BN stats too
    summary = trainer.run()
    assert summary["prune_events"] > 0 and summary["macs"] < summary["macs_dense"]


def test_a_checkpoint_is_a_source_too(trained, tmp_path):
    dense_run, _ = trained
    ckpt = dense_run / "checkpoints" / "step-00000006"
    from system.build import saved_weights
    from system.runtime.checkpoint import verify

    trainer = Trainer(tiny_config(tmp_path, "method.name=variational", f"model.init_from={ckpt}"))
    gates = [k for k in trainer.model.state_dict() if k.endswith(".theta")]
    assert gates and all(float(trainer.model.state_dict()[k].min()) == 1.0 for k in gates)  # gates start fresh
    _same(trainer.model, {k: v for k, v in saved_weights(verify(ckpt)).items() if not k.endswith(".theta")})


def test_torchvision_weights_fit_and_the_head_is_reinitialised(tmp_path, caplog):
    tv = torchvision.models.resnet18(num_classes=1000)  # the layout of torchvision's ImageNet files
    torch.nn.init.normal_(tv.bn1.running_mean)  # so that BN statistics are seen to load
    src = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tv.state_dict().items()}}, src)  # a wrapped DDP file
    with caplog.at_level(logging.INFO):
        trainer = Trainer(tiny_config(tmp_path, "method.name=none", "model.name=resnet18", f"model.init_from={src}"))
    _same(trainer.model, tv.state_dict(), skip=("fc.",))
    n = trainer.model.fc.weight.shape[0]  # the data's classes
    assert n != 1000 and f"head is re-initialised (1000 classes there, {n} here)" in caplog.text


@pytest.mark.parametrize("which, needle", [
    ("nowhere", "does not exist"),
    ("pruned", "differ in shape from the dense resnet20"),
    ("resnet56", "lacks"),
    ("garbage", "not a state-dict file"),
])
def test_a_source_that_does_not_fit_is_refused_naming_the_key(trained, tmp_path, which, needle):
    dense_run, pruned_run = trained
    garbage = tmp_path / "x.pt"
    garbage.write_bytes(b"not a tensor file")
    source, model = {"nowhere": (tmp_path / "none.pt", "resnet20"), "pruned": (pruned_run, "resnet20"),
                     "resnet56": (dense_run, "resnet56"), "garbage": (garbage, "resnet20")}[which]
    with pytest.raises(ConfigError) as err:
        Trainer(tiny_config(tmp_path, "method.name=none", f"model.name={model}", f"model.init_from={source}"))
    assert err.value.key == "model.init_from" and needle in str(err.value)
    assert not (tmp_path / "run").exists()  # nothing half-written
