"""The root run config: one typed tree composed of every component's section.

``python -m launch.train --config configs/demo.yaml optim.lr=0.05 train.max_steps=20``
loads the defaults below, then the recipe, then the overrides, and validates all of it
before anything runs (an unknown key or out-of-range value names the dotted key).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipelines.config import DataConfig
from system.config import check
from system.methods import MethodConfig
from system.tracking import TrackingConfig


@dataclass(frozen=True)
class ModelConfig:
    """Section ``model``.  Classes come from the data; input size from ``data.train_size``
    unless ``input_size`` is set (it only affects MACs accounting, not the network)."""

    name: str = "resnet20"
    shortcut: Literal["", "A", "B"] = ""  # "" = the family default (A for CIFAR, B for ImageNet)
    input_size: int = 0
    zero_init_residual: bool = False

    def __post_init__(self) -> None:
        from system.models.spec import MODEL_NAMES

        check(self.name in MODEL_NAMES, "name", f"unknown model {self.name!r}; known: {', '.join(MODEL_NAMES)}")
        check(self.input_size >= 0, "input_size", "must be >= 0")


@dataclass(frozen=True)
class OptimConfig:
    """Section ``optim``: SGD (momentum, optional Nesterov) or AdamW, warm-up + cosine."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1  # at ``lr_batch`` images per step; scaled linearly to the global batch
    lr_batch: int = 0  # 0 = no scaling (lr is used as is); 256 = DeepLearningExamples convention
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    decay_bn_bias: bool = False  # weight decay on BN parameters and biases (gates never decay)
    label_smoothing: float = 0.0
    schedule: Literal["cosine", "constant", "step"] = "cosine"
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    step_milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of training, for ``step``
    step_gamma: float = 0.1

    def __post_init__(self) -> None:
        check(self.lr > 0, "lr", "must be > 0")
        check(self.lr_batch >= 0, "lr_batch", "must be >= 0")
        check(0.0 <= self.momentum < 1.0, "momentum", "must be in [0, 1)")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(0.0 <= self.label_smoothing < 1.0, "label_smoothing", "must be in [0, 1)")
        check(self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")
        check(self.min_lr >= 0, "min_lr", "must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    """Section ``train``."""

    epochs: int = 1
    max_steps: int = 0  # > 0 caps the run (smoke tests)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False
    eval_every_steps: int = 0  # 0 = at the end of every epoch
    eval_batches: int = 0  # 0 = the whole validation split
    log_every_steps: int = 20
    progress: bool = True
    threads: int = 0  # torch intra-op threads on CPU (0 = torch default)

    def __post_init__(self) -> None:
        check(self.epochs >= 1, "epochs", "must be >= 1")
        check(self.max_steps >= 0, "max_steps", "must be >= 0")
        check(self.eval_every_steps >= 0, "eval_every_steps", "must be >= 0")
        check(self.eval_batches >= 0, "eval_batches", "must be >= 0")
        check(self.log_every_steps >= 1, "log_every_steps", "must be >= 1")
        check(self.threads >= 0, "threads", "must be >= 0")


@dataclass(frozen=True)
class EngineConfig:
    """Section ``engine``: ``local`` (plain torch, one process) or ``deepspeed``."""

    kind: Literal["auto", "local", "deepspeed"] = "auto"  # auto: deepspeed when launched distributed
    zero_stage: int = 0
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    global_batch: int = 0  # 0 = data.batch_size x world size; else must divide evenly

    def __post_init__(self) -> None:
        check(self.zero_stage in (0, 1, 2, 3), "zero_stage", "must be 0, 1, 2 or 3")
        check(self.global_batch >= 0, "global_batch", "must be >= 0")


@dataclass(frozen=True)
class CheckpointConfig:
    """Section ``checkpoint``."""

    every_steps: int = 0  # 0 = only at the end of every epoch
    at_epoch_end: bool = True
    keep_last: int = 3

    def __post_init__(self) -> None:
        check(self.every_steps >= 0, "every_steps", "must be >= 0")
        check(self.keep_last >= 1, "keep_last", "must be >= 1")


@dataclass(frozen=True)
class RunSection:
    """Section ``run``: where the run lives and whether it resumes."""

    dir: str = ""  # default: runs/<name>
    name: str = ""  # default: <method label>-<model>-<time>
    root: str = "runs"  # holds run dirs and the embedded MLflow store
    resume: str = ""  # "" | "auto" | a checkpoint path
    export_gates: Literal["auto", "deterministic", "mean"] = "auto"


@dataclass(frozen=True)
class RunConfig:
    """The whole tree.  Every section has defaults; recipes override a few keys."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunSection = field(default_factory=RunSection)
