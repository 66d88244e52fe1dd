"""Engines: how a training step runs.  ``LocalEngine`` is plain torch in one process;
``system.runtime.engine_ds.DeepSpeedEngine`` wraps the same model and optimizer with DeepSpeed.

Both implement :class:`Engine`: they expose the unwrapped ``model`` and the torch ``optimizer``
(pruning always works on those) and ``rebuild(model, optimizer)`` for after a pruning event.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import torch
import torch.distributed as dist

from system.config import check

log = logging.getLogger(__name__)


@runtime_checkable
class Engine(Protocol):
    """What the loop, the coordinator and the checkpointer use of an engine."""

    kind: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer

    def rebuild(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None: ...

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def grad_scale(self) -> float: ...

    def step(self) -> None: ...

    def save_state(self, directory: Path) -> None: ...

    def load_state(self, directory: Path) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, from the usual launcher variables."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environ(cls) -> DistEnv:
        env = os.environ
        return cls(rank=int(env.get("RANK", 0)), world_size=int(env.get("WORLD_SIZE", 1)),
                   local_rank=int(env.get("LOCAL_RANK", 0)))


def pick_device(pref: str, local_rank: int) -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("config key 'train.device': cuda requested but no GPU is visible")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


@dataclass(frozen=True)
class EngineConfig:
    """Section ``engine``: ``local`` (plain torch, one process) or ``deepspeed``."""

    kind: Literal["auto", "local", "deepspeed"] = "auto"  # auto: deepspeed when launched distributed
    zero_stage: int = 0  # DeepSpeed ZeRO stage (pruning needs 0: surgery slices whole parameters)
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # process group: auto = nccl on GPUs, gloo on CPU
    global_batch: int = 0  # 0 = data.batch_size x world size; else must divide evenly
    # a collective (or the start-up rendezvous) that waits longer than this fails, naming the lost ranks
    # and hosts, instead of hanging: longer than the slowest step, evaluation or checkpoint write
    collective_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        check(self.zero_stage in (0, 1, 2, 3), "zero_stage", "must be 0, 1, 2 or 3")
        check(self.global_batch >= 0, "global_batch", "must be >= 0")
        check(self.collective_timeout_s >= 1, "collective_timeout_s", "must be >= 1 (seconds)")


class LocalEngine:
    """One process, plain torch: forward, backward, step."""

    kind = "local"

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 precision: str = "fp32", channels_last: bool = False,
                 compiler: Callable[[torch.nn.Module], None] | None = None):
        """``compiler``: called on every network this engine is given (``train.compile``, see
        :mod:`system.runtime.compiled`)."""
        self.device, self.precision, self.channels_last = device, precision, channels_last
        self.compiler = compiler
        # fp16 needs loss scaling; methods read gradients divided by grad_scale()
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.rebuild(model, optimizer)

    def rebuild(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model.to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if self.compiler is not None:
            self.compiler(self.model)
        self.optimizer = optimizer

    def _autocast(self):
        if self.precision == "fp32":
            return torch.autocast(self.device.type, enabled=False)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            return self.model(x)

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def grad_scale(self) -> float:
        """The loss scale the gradients carry after :meth:`backward` (1.0 without a scaler)."""
        return float(self.scaler.get_scale()) if self.scaler is not None else 1.0

    def step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # -- checkpoint contract (DeepSpeedEngine implements the same two calls) ------------
    def save_state(self, directory: Path) -> None:
        """Write model and optimizer state into ``directory`` (all ranks call; rank 0 writes)."""
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()},
                   Path(directory) / "engine_state.pt")

    def load_state(self, directory: Path) -> None:
        """Load what :meth:`save_state` wrote; the model must already have the saved spec."""
        state = torch.load(Path(directory) / "engine_state.pt", map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def close(self) -> None:
        pass



def saved_model_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """The model weights :meth:`LocalEngine.save_state` wrote into ``directory``, on the CPU, without
    building the engine."""
    return torch.load(Path(directory) / "engine_state.pt", map_location="cpu", weights_only=True)["model"]
