"""``model.init_from``: a run starts from trained weights (a finished run, a checkpoint, a torchvision-layout
state dict), prunes from there, and a source that does not fit is refused naming the key, before anything
is written."""

from __future__ import annotations

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


def test_torchvision_weights_fit(tmp_path):
    probe = Trainer(tiny_config(tmp_path / "probe", "method.name=none", "model.name=resnet18"))
    classes = probe.model.fc.weight.shape[0]  # the data's
    tv = torchvision.models.resnet18(num_classes=classes)  # the layout of torchvision's ImageNet files
    torch.nn.init.normal_(tv.bn1.running_mean)  # so that BN statistics are seen to load
    src = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tv.state_dict().items()}}, src)  # a wrapped DDP file
    trainer = Trainer(tiny_config(tmp_path, "method.name=none", "model.name=resnet18", f"model.init_from={src}"))
    assert len(_same(trainer.model, tv.state_dict())) == len(tv.state_dict())
    # ImageNet's 1000 classes are not this data's: refused, naming the key, the file and both counts
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), src)
    with pytest.raises(ConfigError) as err:
        Trainer(tiny_config(tmp_path / "other", "method.name=none", "model.name=resnet18",
                            f"model.init_from={src}"))
    assert err.value.key == "model.init_from" and str(src) in str(err.value)
    assert f"1000 classes; this run's data has {classes}" in str(err.value)


@pytest.mark.parametrize("method", ["taylor", "variational"])
def test_a_pruned_run_is_a_start_too_and_every_method_prunes_it(trained, tmp_path, method):
    _, pruned_run = trained
    start, _, _ = load_bundle(pruned_run / "final")
    trainer = Trainer(tiny_config(tmp_path, *STRONG[method], f"model.init_from={pruned_run}", "train.max_steps=12",
                                  "checkpoint.every_steps=0"))
    assert trainer.spec().stage_widths == start.spec().stage_widths  # it starts in the pruned shape
    assert [b.inner for _, _, _, b in trainer.spec().iter_blocks()] == \
        [b.inner for _, _, _, b in start.spec().iter_blocks()]
    _same(trainer.model, start.state_dict())
    start_macs = trainer.current_size()[0]
    summary = trainer.run()
    assert summary["prune_events"] > 0 and summary["macs"] < start_macs  # it prunes further, from there


def test_init_weights_false_takes_the_shape_alone_with_the_fresh_init_of_the_seed(trained, tmp_path):
    """The "scratch" baseline: the pruned run's shape, none of its weights, the random init a run of that shape
    and seed gets (so two methods' architectures are retrained alike)."""
    _, pruned_run = trained
    start, _, _ = load_bundle(pruned_run / "final")
    trainer = Trainer(tiny_config(tmp_path / "a", "method.name=none", f"model.init_from={pruned_run}",
                                  "model.init_weights=false", "train.max_steps=2"))
    assert [b.inner for _, _, _, b in trainer.spec().iter_blocks()] == \
        [b.inner for _, _, _, b in start.spec().iter_blocks()]
    own, src = trainer.model.state_dict(), start.state_dict()
    convs = [k for k in src if k.endswith("conv1.weight") and k in own]
    assert convs and all(not torch.equal(own[k].cpu(), src[k]) for k in convs)  # none of the trained weights
    again = Trainer(tiny_config(tmp_path / "b", "method.name=none", f"model.init_from={pruned_run}",
                                "model.init_weights=false", "train.max_steps=2"))
    _same(again.model, {k: v.cpu() for k, v in own.items()})  # the seed's init: the same for any source of that shape
    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path / "c", "model.init_weights=false")
    assert err.value.key == "model.init_weights" and "model.init_from" in str(err.value)


@pytest.mark.parametrize("which, needle", [
    ("nowhere", "does not exist"),
    ("pruned_weights", "a pruned network as a bare weights file"),
    ("resnet56", "is a resnet20 on 3 input channels; this run trains a resnet56"),
    ("garbage", "not a state-dict file"),
])
def test_a_source_that_does_not_fit_is_refused_naming_the_key(trained, tmp_path, which, needle):
    dense_run, pruned_run = trained
    garbage = tmp_path / "x.pt"
    garbage.write_bytes(b"not a tensor file")
    source, model = {"nowhere": (tmp_path / "none.pt", "resnet20"),
                     "pruned_weights": (pruned_run / "final" / "model.safetensors", "resnet20"),
                     "resnet56": (dense_run, "resnet56"), "garbage": (garbage, "resnet20")}[which]
    with pytest.raises(ConfigError) as err:
        Trainer(tiny_config(tmp_path, "method.name=none", f"model.name={model}", f"model.init_from={source}"))
    assert err.value.key == "model.init_from" and needle in str(err.value) and str(source.name) in str(err.value)
    assert not (tmp_path / "run").exists()  # nothing half-written
