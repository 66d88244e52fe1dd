"""Block anatomy as data: which conv, BatchNorm, ReLU and gate belong together in each block kind.

Written once here; the model classes, surgery, the methods and export read it instead of
re-deriving the coupling from attribute names (the optimizer groups select the gates by their
parameter names, ``*.theta`` and ``*.layer_gate.theta``).

A *unit layer* is one prunable inner layer of a residual branch: its ``conv`` produces the units
(output channels), its ``bn`` and ``relu`` follow, its ``gate`` multiplies them, and ``consumer``
is the next conv, whose input channels are the same units::

    basic       gate1: conv1 -> bn1 -> relu1 -> gate1 -> conv2 (consumer)      last: conv2, bn2
    bottleneck  gate1: conv1 -> bn1 -> relu1 -> gate1 -> conv2 (consumer)
                gate2: conv2 -> bn2 -> relu2 -> gate2 -> conv3 (consumer)      last: conv3, bn3

The branch's ``last_conv`` / ``last_bn`` produce the residual-stream channels (never pruned);
the block's ``layer_gate`` multiplies the whole branch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from system.models.spec import SpecError

LAYER_GATE = "layer_gate"


@dataclass(frozen=True)
class UnitLayer:
    """One prunable inner layer of a branch (module names inside the block)."""

    gate: str
    conv: str
    bn: str
    relu: str
    consumer: str


@dataclass(frozen=True)
class BlockAnatomy:
    """The module names of one block kind."""

    kind: str
    units: tuple[UnitLayer, ...]
    last_conv: str
    last_bn: str
    layer_gate: str = LAYER_GATE

    @property
    def convs(self) -> tuple[str, ...]:
        """Every conv of the branch, in order."""
        return tuple(u.conv for u in self.units) + (self.last_conv,)

    def unit(self, gate: str) -> UnitLayer:
        for u in self.units:
            if u.gate == gate:
                return u
        raise SpecError(f"a {self.kind} block has unit gates {', '.join(u.gate for u in self.units)}, not {gate!r}")

    def index(self, gate: str) -> int:
        """Position of unit gate ``gate`` among the block's inner widths."""
        return self.units.index(self.unit(gate))


def _chain(n: int) -> tuple[UnitLayer, ...]:
    """Inner layers 1..n, conv{i} feeding conv{i+1}: the naming every block kind shares."""
    return tuple(UnitLayer(f"gate{i}", f"conv{i}", f"bn{i}", f"relu{i}", f"conv{i + 1}") for i in range(1, n + 1))


def unit_gate(block: str, i: int) -> str:
    """Name of the i-th (0-based) unit gate of a block, e.g. ``layer1.0.gate1`` (any block kind)."""
    return f"{block}.{_chain(i + 1)[i].gate}"


ANATOMY: dict[str, BlockAnatomy] = {
    "basic": BlockAnatomy("basic", _chain(1), "conv2", "bn2"),
    "bottleneck": BlockAnatomy("bottleneck", _chain(2), "conv3", "bn3"),
}


def anatomy(kind: str) -> BlockAnatomy:
    try:
        return ANATOMY[kind]
    except KeyError:
        raise SpecError(f"unknown block kind {kind!r}; known: {sorted(ANATOMY)}") from None


def split_gate_name(name: str) -> tuple[str, str]:
    """``"layer1.0.gate2"`` -> ``("layer1.0", "gate2")``."""
    block, _, gate = name.rpartition(".")
    return block, gate


def unit_modules(model, names, part: str) -> list[Any]:
    """For each unit gate of ``names`` (``layer1.0.gate2``), the module ``part`` of its unit layer in
    ``model`` (a :class:`~system.models.resnet.GatedResNet`): ``"conv"`` and ``"consumer"`` (``nn.Conv2d``),
    ``"bn"`` (``nn.BatchNorm2d``) or ``"relu"``."""
    blocks = dict(model.named_blocks())
    anat = anatomy(model.block_kind)
    out = []
    for name in names:
        block, gate = split_gate_name(name)
        out.append(getattr(blocks[block], getattr(anat.unit(gate), part)))
    return out


def block_of(name: str) -> str:
    """The block a gate (or any block member) belongs to: ``"layer1.0.gate2"`` -> ``"layer1.0"``."""
    return name.rpartition(".")[0]


def last_bn(block: nn.Module, kind: str) -> nn.BatchNorm2d:
    """The BatchNorm that ends the branch of ``block`` (zero-init-residual, the layer gate's fold)."""
    return getattr(block, anatomy(kind).last_bn)
