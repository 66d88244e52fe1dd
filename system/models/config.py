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

    name: str = "resnet20"
    shortcut: Literal["", "A", "B"] = ""  # "" = the family default (A for CIFAR, B for ImageNet)
    input_size: int = 0
    zero_init_residual: bool = False

    def __post_init__(self) -> None:
        check(self.name in MODEL_NAMES, "name", f"unknown model {self.name!r}; known: {', '.join(MODEL_NAMES)}")
        check(self.input_size >= 0, "input_size", "must be >= 0")
