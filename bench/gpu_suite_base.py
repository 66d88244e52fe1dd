"""What every GPU-suite row reads (``bench/gpu_suite_rows.py``, ``bench/gpu_suite_trainer.py``): the
suite's settings, the "skipped: <reason>" signal, the device sync, and the import of a sibling bench script.
Imports nothing of the suite, so the row modules can import it and each other without a circle."""

from __future__ import annotations

import importlib.util
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from system.models.spec import ArchSpec, dense_spec

ROOT = Path(__file__).resolve().parents[1]


class Skip(Exception):
    """A row that cannot run here; the message is the reason."""


@dataclass(frozen=True)
class Settings:
    device: torch.device
    model: str
    size: int
    batch: int
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    warmup: int
    iters: int
    target: float  # MACs fraction of the pruned rows
    compile: bool
    threads: int
    deadline: float  # time.perf_counter() by which the suite should be done

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def spec(self) -> ArchSpec:
        return dense_spec(self.model, input_size=self.size)

    def left_s(self) -> float:
        return self.deadline - time.perf_counter()


def sibling(name: str):
    """Import ``bench/<name>.py`` (the bench folder is no package)."""
    key = f"_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "bench" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[key]
            raise
    return sys.modules[key]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
