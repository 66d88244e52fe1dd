"""The complexity price of the variational method (docs/method.md section 1).

``cost = alpha * E[MACs]/MACs_full + (1 - alpha) * E[Params]/Params_full`` over the active gates (the layer
part's gradient x beta), from the exact multilinear polynomials of :mod:`system.pruning.complexity`, so
autograd gives each structure its marginal cost; :meth:`Price.prices` is each gate's coefficient c_j with
every gate of the current network on (cached per spec: the spec changes only at a pruning event).
"""

from __future__ import annotations

from typing import Any

import torch

from system.models.resnet import GatedResNet, gates_of
from system.pruning.complexity import ExpectedCost, count
from system.pruning.methods.base import unit_and_layer_gates
from system.pruning.methods.variational.config import VariationalConfig
from system.pruning.surgery import PrunePlan, plan_spec


def scale_grad(t: torch.Tensor, scale: float) -> torch.Tensor:
    """Value ``t``, gradient ``scale * dt``."""
    if scale == 1.0:
        return t
    return t * scale + (t * (1.0 - scale)).detach()


class Price:
    """The dense network's size (set once, from the first network attached), the expected cost of
    the gates, and the per-gate prices."""

    def __init__(self, cfg: VariationalConfig):
        self.cfg = cfg
        self.full: tuple[float, float] | None = None
        self._spec: Any = None  # the spec the cached prices belong to
        self._price: dict[str, torch.Tensor] = {}
        self._expected: ExpectedCost | None = None

    def expected(self, model: GatedResNet, unit: dict, layer: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(E[MACs], E[Params]) of ``model``'s current spec in closed form (:class:`ExpectedCost`, built
        once per spec)."""
        spec = model.spec()
        if self._expected is None or self._expected.spec is not spec:
            self._expected = ExpectedCost(spec)
        return self._expected(unit, layer)

    def set_dense(self, model: GatedResNet) -> None:
        if self.full is None:
            macs, params = count(model.spec())
            self.full = (float(macs), float(params))

    @property
    def dense(self) -> tuple[float, float]:
        """(MACs, params) of the dense network (known once a model is attached)."""
        if self.full is None:
            raise RuntimeError("method 'variational': attach() the model first")
        return self.full

    def thetas(self, model: GatedResNet,
               detach: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The (unit, layer) thetas of the kinds this method trains, detached (``detach=False``: the
        parameters themselves, for a caller under ``torch.no_grad``)."""
        unit, layer = unit_and_layer_gates(model)
        get = (lambda g: g.theta.detach()) if detach else (lambda g: g.theta)
        u = {n: get(g) for n, g in unit.items()} if self.cfg.unit_gates else {}
        lyr = {n: get(g) for n, g in layer.items()} if self.cfg.layer_gates else {}
        return u, lyr

    def cost(self, model: GatedResNet, thetas: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The expected cost of the gates' thetas (or of ``thetas``), relative to the dense network."""
        c = self.cfg
        unit, layer = unit_and_layer_gates(model)
        get = (lambda n, g: g.theta) if thetas is None else (lambda n, g: thetas[n])
        u = {n: get(n, g) for n, g in unit.items()} if c.unit_gates else {}
        lyr = {n: scale_grad(get(n, g), c.beta) for n, g in layer.items()} if c.layer_gates else {}
        em, ep = self.expected(model, u, lyr)
        return c.alpha * em / self.dense[0] + (1.0 - c.alpha) * ep / self.dense[1]

    def prices(self, model: GatedResNet) -> dict[str, torch.Tensor]:
        """Each gate's price coefficient c_j (layer part x beta) with every gate of the current network on."""
        spec = model.spec()
        if self._spec is not spec:
            ones = {n: torch.ones_like(g.theta.detach(), dtype=torch.float64).requires_grad_(True)
                    for n, g in gates_of(model).items()}
            if not ones:  # every block is gone
                self._price, self._spec = {}, spec
                return self._price
            cost = self.cost(model, ones)
            grads = torch.autograd.grad(cost, list(ones.values()), allow_unused=True)
            self._price = {n: (gr if gr is not None else torch.zeros_like(t)).to(torch.float32).clamp_min(1e-12)
                           .to(model.fc.weight.device) for (n, t), gr in zip(ones.items(), grads)}
            self._spec = spec
        return self._price

    def expected_macs_t(self, model: GatedResNet) -> torch.Tensor:
        """E[MACs] of the current thetas, as a share of the dense network's MACs: a 0-d float64 tensor on
        the thetas' device (no host sync)."""
        with torch.no_grad():  # the thetas as they are (no detach per gate: each would be an op)
            return self.expected(model, *self.thetas(model, detach=False))[0].double() / self.dense[0]

    def expected_macs(self, model: GatedResNet) -> float:
        """:meth:`expected_macs_t`, read on the host."""
        return float(self.expected_macs_t(model))

    def macs_after(self, model: GatedResNet, plan: PrunePlan) -> float:
        """The network's MACs after ``plan``, as a share of the dense network's."""
        return count(plan_spec(model.spec(), plan)[0])[0] / self.dense[0]
