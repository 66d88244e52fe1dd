"""Section ``model`` of the run config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from system.config import check
from system.models.spec import MODEL_NAMES


@dataclass(frozen=True)
class ModelConfig:
    """Section ``model``.  Classes come from the data; input size from ``data.train_size``
    unless ``input_size`` is set (it only affects MACs accounting, not the network)."""

    name: str = "resnet20"  # the dense network: resnet20/32/44/56/110 (CIFAR family), resnet18/34/50/101 (ImageNet)
    shortcut: Literal["", "A", "B"] = ""  # "" = the family default (A for CIFAR, B for ImageNet)
    input_size: int = 0  # the side MACs are counted at (0: data.train_size); the network is the same
    zero_init_residual: bool = False  # each block's last BN scale starts at 0 (refused with layer gates)
    #: start from a trained network instead of a random init: a finished run or its ``final/`` (dense or
    #: pruned: the run starts in its shape), a checkpoint directory, or a ``.safetensors`` / torch state-dict
    #: file of the dense network (torchvision's ImageNet ResNets fit ``resnet18/34/50``); the same model and
    #: class count; gates start fresh; ignored when resuming (system/build.py: initial_spec, init_network)
    init_from: str = ""
    #: with ``init_from``: load its weights (true) or take only its shape and start from a fresh random init
    #: (false: a pruned architecture trained from scratch, the "scratch" baseline of Liu et al. 2019, which tells
    #: the quality of a method's decisions from the cost of its pruning-while-training; docs/results.md)
    init_weights: bool = True

    def __post_init__(self) -> None:
        check(self.name in MODEL_NAMES, "name", f"unknown model {self.name!r}; known: {', '.join(MODEL_NAMES)}")
        check(self.input_size >= 0, "input_size", "must be >= 0")
        check(self.init_weights or bool(self.init_from), "init_weights",
              "false takes the shape of model.init_from with fresh weights: set model.init_from too")
