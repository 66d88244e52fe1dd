"""The training metrics of each log interval, and the progress bar.

The loss of every step stays on the device: it is summed there and read once per interval
(``train.log_every_steps``), so a steady-state step forces no host sync for it.  What is logged
at the end of an interval: the interval's mean loss, the learning rate, the images per second,
the cumulative training MACs and the model's size (a step function over the run).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

from system import tracking as T
from system.progress import progress


class StepLog:
    """Per step :meth:`add` the loss; when :meth:`due`, :meth:`flush` logs the interval."""

    def __init__(self, tracker, every: int, total_steps: int, global_batch: int):
        self.tracker, self.every, self.total_steps, self.global_batch = tracker, every, total_steps, global_batch
        self._loss: torch.Tensor | None = None
        self._n = 0
        self._t = time.perf_counter()
        self.bar = None

    @contextlib.contextmanager
    def progress(self, show: bool, initial: int, interval_s: float) -> Iterator[None]:
        """The bar (a tqdm bar on a terminal, log lines elsewhere) while the loop runs, when ``show``."""
        ctx = progress(self.total_steps, initial, interval_s) if show else contextlib.nullcontext()
        with ctx as bar:
            self.bar = bar
            try:
                yield
            finally:
                self.bar = None

    def add(self, loss: torch.Tensor) -> None:
        """One step's mean loss (a 0-d tensor, left on its device)."""
        loss = loss.detach().float()
        self._loss = loss if self._loss is None else self._loss + loss
        self._n += 1
        if self.bar is not None:
            self.bar.update(1)

    def due(self, step: int) -> bool:
        """The interval ends after ``step`` (every ``log_every_steps``, and at the last step)."""
        return step % self.every == 0 or step >= self.total_steps

    def flush(self, step: int, lr: float, train_macs: float, macs: int, params: int,
              extra: dict[str, torch.Tensor | float] | None = None) -> float:
        """Log the interval that ends at ``step``, with ``extra`` (the method's values, device tensors
        among them): the losses and those tensors are read in one host read.  Its mean loss."""
        if self._loss is None:
            return float("nan")
        tensors = {k: v for k, v in (extra or {}).items() if isinstance(v, torch.Tensor)}
        read = torch.stack([self._loss.double(), *(v.detach().reshape(()).to(self._loss.device).double()
                                                   for v in tensors.values())]).tolist()
        values = {k: float(v) for k, v in (extra or {}).items() if k not in tensors}
        values.update(zip(tensors, read[1:]))
        loss = read[0] / self._n
        dt = time.perf_counter() - self._t
        self.tracker.log_metrics({T.TRAIN_LOSS: loss, T.TRAIN_LR: lr,
                                  T.TRAIN_TOTAL_IPS: self._n * self.global_batch / max(dt, 1e-9),
                                  T.TRAIN_CUMULATIVE_MACS: train_macs, T.MODEL_MACS: macs, T.MODEL_PARAMS: params,
                                  **values}, step=step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", macs=f"{macs / 1e6:.1f}M")
        self._loss, self._n, self._t = None, 0, time.perf_counter()
        return loss
