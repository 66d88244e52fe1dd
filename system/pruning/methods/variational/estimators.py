"""Layer-gate estimators of d E[CE] / d theta_B = E[CE | xi_B = 1] - E[CE | xi_B = 0] (ALGORITHM.md section 1).

Each returns a term whose theta_B gradient is the estimate (its value is not a loss).

- :func:`conditional_term` (free): gates sampled per example; the difference of the mean
  per-example loss of the examples with the block on and off, in the same forward.
- :func:`exact_term`: one extra forward per block, with every other gate replaying the main
  forward's draw (common random numbers).
"""

from __future__ import annotations

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
    gates = gates_of(model)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    terms = []
    try:
        for m in bns:  # the extra forwards must not move the running statistics
            m.momentum = 0.0
        for g in gates.values():
            g.replay = True
        with torch.no_grad():
            for n in names:
                g = layer[n]
                xi = g.last_xi
                g.last_xi = 1.0 - xi  # the complement of the main draw, per example
                other = loss_fn(forward(x), y)
                g.last_xi = xi
                xi = xi.reshape(-1).expand(main.shape[0]) if xi.numel() == 1 else xi.reshape(-1)
                terms.append((n, torch.where(xi > 0.5, main - other, other - main).mean()))
    finally:
        for g in gates.values():
            g.replay = False
        for m, mom in zip(bns, momenta):
            m.momentum = mom
    return cast(torch.Tensor, sum(scale * diff * layer[n].theta.reshape(()) for n, diff in terms))
