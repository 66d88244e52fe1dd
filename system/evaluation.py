"""Top-1 / top-5 / loss of a network over a loader, summed across ranks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


def plain_forward(net: torch.nn.Module, device: torch.device, precision: str, channels_last: bool):
    """A forward for a gate-free network outside the engine, with the run's precision and layout."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def fwd(x: torch.Tensor) -> torch.Tensor:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return net(x)
    return fwd


@torch.no_grad()
def accuracy(forward: Callable[[torch.Tensor], torch.Tensor], loader: Any, max_batches: int,
             sum_scalars: Callable[[list[float]], list[float]]) -> dict[str, Any]:
    """``{"top1", "top5", "loss", "n"}`` over ``loader`` (padding labels -1 ignored; ``max_batches`` 0 =
    all), summed over ranks with ``sum_scalars``.  The caller sets the model's eval mode and gates."""
    n = correct1 = correct5 = loss_sum = 0.0
    batches = iter(loader)
    try:
        for i, (x, y) in enumerate(batches):
            if max_batches and i >= max_batches:
                break
            logits = forward(x).float()
            keep = y >= 0
            logits, y = logits[keep], y[keep]
            if y.numel() == 0:
                continue
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            correct1 += float((top[:, 0] == y).sum())
            correct5 += float((top == y[:, None]).any(dim=1).sum())
            n += y.numel()
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    n, correct1, correct5, loss_sum = sum_scalars([n, correct1, correct5, loss_sum])
    return {"top1": correct1 / max(1.0, n), "top5": correct5 / max(1.0, n), "loss": loss_sum / max(1.0, n),
            "n": int(n)}
