"""Layer-gate estimators of d E[CE] / d theta_B = E[CE | xi_B = 1] - E[CE | xi_B = 0] (docs/method.md section 1).

Each returns a term whose theta_B gradient is the estimate (its value is not a loss).

- :func:`conditional_term` (free): gates sampled per example; the difference of the mean
  per-example loss of the examples with the block on and off, in the same forward.
- :func:`exact_term`: one extra forward per block, with every other gate replaying the main
  forward's draw (common random numbers).
- :func:`paired_differences` (the default, ``paired``): layer gates sampled once per batch, so
  E[CE] is affine in theta_B *with train-mode BatchNorm* and ``CE(xi_B=1) - CE(xi_B=0)`` of the
  whole batch, every other gate replaying the main draw, is an unbiased estimate of
  d E[CE] / d theta_B.  The second forward starts at block B's input, kept by the main forward
  (the prefix is shared), so it costs only the suffix (counted from
  :func:`system.pruning.complexity.suffix_macs`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import cast

import torch

from system.models.resnet import gates_of


def conditional_term(layer, per_example_loss: torch.Tensor) -> torch.Tensor | None:
    """sum_B [mean CE(xi_B = 1) - mean CE(xi_B = 0)] * theta_B over the examples of this batch."""
    loss = per_example_loss.detach()
    terms = []
    for g in layer.values():
        xi = g.last_xi.reshape(-1)
        if xi.numel() != loss.numel():
            raise RuntimeError("conditional estimator: gates must be sampled per example")
        on = xi > 0.5
        n_on, n_off = int(on.sum()), int((~on).sum())
        if n_on == 0 or n_off == 0:
            continue  # no contrast in this batch (theta at 0 or 1): the price alone moves theta
        diff = loss[on].mean() - loss[~on].mean()
        terms.append(diff * g.theta.reshape(()))
    return cast(torch.Tensor, sum(terms)) if terms else None


def exact_term(model, layer, names: list[str], forward, x, y, loss_fn, per_example_loss) -> torch.Tensor:
    """CE(xi_B=1) - CE(xi_B=0) per example for the blocks ``names`` (one forward each, rescaled to
    all of ``layer``), every other gate replaying the main draw; BN running statistics untouched."""
    scale = len(layer) / len(names)
    main = per_example_loss.detach()
    terms = []
    with replaying(model):
        for n in names:
            g = layer[n]
            xi = g.last_xi
            g.last_xi = 1.0 - xi  # the complement of the main draw, per example
            other = loss_fn(forward(x), y)
            g.last_xi = xi
            xi = xi.reshape(-1).expand(main.shape[0]) if xi.numel() == 1 else xi.reshape(-1)
            terms.append((n, torch.where(xi > 0.5, main - other, other - main).mean()))
    return cast(torch.Tensor, sum(scale * diff * layer[n].theta.reshape(()) for n, diff in terms))


@contextlib.contextmanager
def replaying(model) -> Iterator[None]:
    """Extra forwards under common random numbers: every gate replays its last draw; BatchNorm
    uses the batch statistics but its running statistics and counters are left untouched."""
    gates = gates_of(model)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in bns]
    try:
        for m in bns:
            m.momentum = 0.0
        for g in gates.values():
            g.replay = True
        with torch.no_grad():
            yield
    finally:
        for g in gates.values():
            g.replay = False
        for m, (mom, nbt) in zip(bns, saved):
            m.momentum = mom
            if nbt is not None and m.num_batches_tracked is not None:
                m.num_batches_tracked.copy_(nbt)


def paired_differences(model, layer, picks: list[tuple[int, str]], forward, x, y, loss_fn,
                       per_example_loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """Batch-mean ``CE(xi_B=1) - CE(xi_B=0)`` for each block ``(flat index, gate name)`` in ``picks``
    (negative: the block helps), from the main forward's loss and one suffix forward per block with
    the block's per-batch draw flipped and every other gate replaying its draw.

    Needs the main forward to have run with ``model.keep_block_inputs`` (the suffix starts from the
    block's kept input).  Returns 0-d tensors on the loss's device (no host sync)."""
    main = per_example_loss.detach().float().mean()
    out: dict[str, torch.Tensor] = {}
    inputs = model.block_inputs
    if len(inputs) <= max((i for i, _ in picks), default=-1):
        raise RuntimeError("paired estimator: the main forward kept no block inputs (model.keep_block_inputs)")
    with replaying(model):
        for i, n in picks:
            g = layer[n]
            xi = g.last_xi
            if xi is None or xi.numel() != 1:
                raise RuntimeError(f"paired estimator: layer gate {n} must be sampled once per batch")
            g.last_xi = 1.0 - xi
            model.start_at = (i, inputs[i])
            try:
                other = loss_fn(forward(x), y).float().mean()
            finally:
                model.start_at = None
                g.last_xi = xi
            on = xi.reshape(()).to(main.dtype)
            out[n] = (main - other) * (2.0 * on - 1.0)  # CE(on) - CE(off), whichever the main draw was
    return out
