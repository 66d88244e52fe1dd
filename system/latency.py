"""Measured inference latency of the final network against the dense one (docs/method.md section 6).

MACs are not speed: removing a block removes whole sequential kernels, removing channels only
narrows them.  :func:`measure_latency` times the deployed network and the dense network of the same
architecture in the same process, on the CPU, at each batch size of ``latency.batches``, and reports
the median of the repeats and the ratio.  The two networks are timed in alternation, so that a
machine that slows down or speeds up during the measurement affects both alike.

A measurement that cannot run is reported as missing, with its reason, never as 0.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from system.config import check

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatencyConfig:
    """Section ``latency``: the final network's CPU inference latency in summary.json and MLflow."""

    enabled: bool = True  # time the final network (and the dense one) at the end of the run
    batches: tuple[int, ...] = (1, 64)  # batch sizes timed
    repeats: int = 15  # timed forwards per network and batch size (median reported)
    max_seconds: float = 60.0  # fewer repeats (at least 3) when the first forwards say it would take longer

    def __post_init__(self) -> None:
        check(len(self.batches) >= 1 and all(int(b) >= 1 for b in self.batches), "batches",
              f"must be a non-empty list of batch sizes >= 1, got {list(self.batches)}")
        check(self.repeats >= 3, "repeats", f"must be >= 3 (a median of fewer says little), got {self.repeats}")
        check(self.max_seconds > 0, "max_seconds", "must be > 0")


@dataclass
class _Timer:
    net: nn.Module

    def once(self, x: torch.Tensor) -> float:
        t0 = time.perf_counter()
        self.net(x)
        return time.perf_counter() - t0


def measure_latency(deployed: nn.Module, dense: nn.Module, input_shape: tuple[int, int, int],
                    cfg: LatencyConfig) -> dict[str, Any]:
    """``{"latency_ms_b<B>", "latency_dense_ms_b<B>", "latency_ratio_b<B>"}`` for every batch size,
    plus ``latency_threads`` and ``latency_repeats``; or ``{"latency_missing": reason}``."""
    if not cfg.enabled:
        return {"latency_missing": "latency.enabled=false"}
    try:
        return _measure(deployed, dense, input_shape, cfg)
    except Exception as exc:  # a measurement must never fail a finished run; it says why it is missing
        log.warning("latency measurement failed: %s", exc)
        return {"latency_missing": f"{type(exc).__name__}: {exc}"}


def _measure(deployed: nn.Module, dense: nn.Module, input_shape: tuple[int, int, int],
             cfg: LatencyConfig) -> dict[str, Any]:
    nets = {"deployed": _Timer(copy.deepcopy(deployed).cpu().float().eval()),
            "dense": _Timer(copy.deepcopy(dense).cpu().float().eval())}
    out: dict[str, Any] = {"latency_threads": torch.get_num_threads(), "latency_device": "cpu"}
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for b in cfg.batches:
            x = torch.randn((int(b), *input_shape), generator=gen)
            first = {k: t.once(x) for k, t in nets.items()}  # warm-up (allocator, kernels)
            first = {k: t.once(x) for k, t in nets.items()}
            per_round = sum(first.values())
            repeats = max(3, min(cfg.repeats, int(cfg.max_seconds / len(cfg.batches) / max(per_round, 1e-9))))
            times: dict[str, list[float]] = {k: [] for k in nets}
            for _ in range(repeats):
                for k, t in nets.items():
                    times[k].append(t.once(x))
            mine, ref = statistics.median(times["deployed"]), statistics.median(times["dense"])
            out[f"latency_ms_b{b}"] = 1e3 * mine
            out[f"latency_dense_ms_b{b}"] = 1e3 * ref
            out[f"latency_ratio_b{b}"] = mine / ref
            out[f"latency_repeats_b{b}"] = repeats
    return out
