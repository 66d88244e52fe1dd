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
from system.latency import LatencyConfig
from system.models.config import ModelConfig
from system.optim import OptimConfig
from system.pruning.methods import MethodConfig
from system.runtime.checkpoint.manager import CheckpointConfig
from system.runtime.engine import EngineConfig
from system.tracking import TrackingConfig

# each section lives next to its owner; the root tree composes them (and re-exports them here)
__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "EngineConfig",
    "LatencyConfig",
    "MethodConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "RunSection",
    "TrackingConfig",
    "TrainConfig",
]


@dataclass(frozen=True)
class TrainConfig:
    """Section ``train``."""

    epochs: int = 1  # passes over the training split
    max_steps: int = 0  # > 0 caps the run (smoke tests)
    seed: int = 0  # weights, data order and gate samples (the same seed: the same run, per method)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when a GPU is visible
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast dtype; bf16/fp16 need a GPU
    channels_last: bool = False  # NHWC memory format (faster convolutions on tensor cores)
    eval_every_steps: int = 0  # 0 = at the end of every epoch
    eval_batches: int = 0  # 0 = the whole validation split
    log_every_steps: int = 20  # train metrics (loss read from the device) every this many steps
    progress: bool = True  # a bar on a terminal, a log line every progress_interval_s elsewhere
    progress_interval_s: float = 30.0  # seconds between progress lines off a terminal
    threads: int = 0  # torch intra-op threads on CPU (0 = torch default)
    #: torch.compile the training network, once per network: each pruning event recompiles the new one
    #: (system/runtime/compiled.py); ``compile_backend``: inductor, or aot_eager/eager (no C++ compiler needed)
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile backend of train.compile

    def __post_init__(self) -> None:
        check(self.epochs >= 1, "epochs", "must be >= 1")
        check(self.max_steps >= 0, "max_steps", "must be >= 0")
        check(self.eval_every_steps >= 0, "eval_every_steps", "must be >= 0")
        check(self.eval_batches >= 0, "eval_batches", "must be >= 0")
        check(self.log_every_steps >= 1, "log_every_steps", "must be >= 1")
        check(self.progress_interval_s > 0, "progress_interval_s", "must be > 0")
        check(self.threads >= 0, "threads", "must be >= 0")


@dataclass(frozen=True)
class RunSection:
    """Section ``run``: where the run lives and whether it resumes."""

    dir: str = ""  # the run's directory (default: run.root/run.name)
    name: str = ""  # default: <method label>-<model>; a taken name gets the next version, <name>-v2 ...
    root: str = "runs"  # holds run dirs and the embedded MLflow store
    resume: str = ""  # "": a fresh run; auto: the newest checkpoint of this run, if any; or a checkpoint path
    # how the gates fold into the exported network: deterministic (kept where theta > threshold), mean (E[xi]
    # scales the weights), auto (the method's own choice)
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
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    run: RunSection = field(default_factory=RunSection)
