"""Exact and expected complexity (MACs and parameters) of a spec.

Counting convention (matches docs/method.md's reference counts): multiply-accumulates of
convs and the classifier, BatchNorm excluded; parameters of convs, BN (weight, bias) and
the classifier (weight, bias).  Gate parameters are not counted: they are folded away.

:func:`count` gives exact integers.  :func:`expected` gives E[MACs] and E[Params] under
independent Bernoulli gates as multilinear polynomials in theta, built from torch ops so
that autograd yields each structure's marginal cost (the automatic regularisation
coefficients of the variational method).  Both run the same formula; ``count`` feeds it
kept widths, ``expected`` feeds it sums of theta.

Example::

    macs, params = count(dense_spec("resnet20"))       # 40_551_040, 269_722
    em, ep = expected(spec, unit_theta, layer_theta)    # torch scalars, differentiable
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from system.models.anatomy import LAYER_GATE, unit_gate
from system.models.spec import ArchSpec

Number = int | float | torch.Tensor


def _out(h: int, k: int, s: int, p: int) -> int:
    return (h + 2 * p - k) // s + 1


@dataclass
class _Acc:
    macs: Number = 0
    params: Number = 0
    marks: list = field(default_factory=list)  # MACs counted before each block (flat order)

    def conv(self, k: int, cin: Number, cout: Number, h: int, scale: Number = 1) -> None:
        self.macs = self.macs + scale * (k * k * h * h) * cin * cout
        self.params = self.params + scale * (k * k) * cin * cout

    def bn(self, c: Number, scale: Number = 1) -> None:
        self.params = self.params + scale * 2 * c


def _walk(spec: ArchSpec, width: Callable[[str, int, int], Number],
          layer: Callable[[str], Number]) -> _Acc:
    """The shared formula.  ``width(block, i, dense_w)`` = kept or expected width of inner conv i;
    ``layer(block)`` = 1/0 or the layer theta."""
    acc = _Acc()
    h = spec.input_size
    if spec.family == "cifar":
        acc.conv(3, spec.in_channels, spec.stem_width, h)
    else:
        h = _out(h, 7, 2, 3)
        acc.conv(7, spec.in_channels, spec.stem_width, h)
        h = _out(h, 3, 2, 1)
    acc.bn(spec.stem_width)
    for name, s, b, blk in spec.iter_blocks():
        acc.marks.append(acc.macs)
        cin, cout, stride = spec.block_io(s, b)
        h_out = _out(h, 3, stride, 1)
        if spec.has_downsample(s, b) and spec.shortcut == "B":
            acc.conv(1, cin, cout, _out(h, 1, stride, 0))
            acc.bn(cout)
        if not blk.removed:
            g = layer(name)
            if spec.block == "basic":
                u = width(name, 0, blk.inner[0])
                acc.conv(3, cin, u, h_out, g)
                acc.bn(u, g)
                acc.conv(3, u, cout, h_out, g)
                acc.bn(cout, g)
            else:
                u1, u2 = width(name, 0, blk.inner[0]), width(name, 1, blk.inner[1])
                acc.conv(1, cin, u1, h, g)
                acc.bn(u1, g)
                acc.conv(3, u1, u2, h_out, g)
                acc.bn(u2, g)
                acc.conv(1, u2, cout, h_out, g)
                acc.bn(cout, g)
        h = h_out
    feat = spec.stage_widths[-1]
    acc.macs = acc.macs + feat * spec.num_classes
    acc.params = acc.params + feat * spec.num_classes + spec.num_classes
    return acc


def count(spec: ArchSpec) -> tuple[int, int]:
    """Exact ``(macs, params)`` of the deterministic network ``spec`` describes."""
    acc = _walk(spec, lambda name, i, w: w, lambda name: 1)
    return int(acc.macs), int(acc.params)


def suffix_macs(spec: ArchSpec) -> list[int]:
    """For every block (flat order, removed ones included), the MACs of a forward that starts at
    its input: that block, the ones after it (shortcuts included) and the classifier."""
    acc = _walk(spec, lambda name, i, w: w, lambda name: 1)
    return [int(acc.macs - m) for m in acc.marks]


def unit_gate_name(block: str, i: int) -> str:
    """Name of the i-th unit gate of a block, e.g. ``layer1.0.gate1`` (see :mod:`system.models.anatomy`)."""
    return unit_gate(block, i)


def layer_gate_name(block: str) -> str:
    return f"{block}.{LAYER_GATE}"


def expected(spec: ArchSpec, unit_theta: dict[str, torch.Tensor] | None,
             layer_theta: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E[MACs], E[Params])`` with gates ``xi ~ Bernoulli(theta)`` independent.

    ``unit_theta`` maps unit-gate names (``layer1.0.gate1``) to theta vectors; ``layer_theta``
    maps layer-gate names (``layer1.0.layer_gate``) to 1-element thetas.  A gate missing from
    the dicts (or a dict that is None) counts as always on.
    """
    unit_theta = unit_theta or {}
    layer_theta = layer_theta or {}

    def width(name: str, i: int, w: int) -> Number:
        t = unit_theta.get(unit_gate_name(name, i))
        return w if t is None else t.sum()

    def layer(name: str) -> Number:
        t = layer_theta.get(layer_gate_name(name))
        return 1 if t is None else t.reshape(())

    acc = _walk(spec, width, layer)
    ref = next(iter(list(unit_theta.values()) + list(layer_theta.values())), None)
    def as_t(v: Number) -> torch.Tensor:
        return v if isinstance(v, torch.Tensor) else \
            torch.tensor(float(v), dtype=ref.dtype if ref is not None else torch.float64)

    return as_t(acc.macs), as_t(acc.params)


class ExpectedCost:
    """:func:`expected` in closed form per block, for the per-step price: a few vector ops for the whole
    network instead of one small op per conv.

    E[MACs] (and E[Params]) is multilinear: ``c0 + sum_B g_B (k0_B + k1_B s1_B + k2_B s2_B + k12_B s1_B s2_B)``
    with ``g_B`` the layer theta of block B and ``s_i`` the sum of its i-th unit gate's thetas (bottleneck
    blocks have two unit gates, basic blocks one).  The coefficients come from the same formula as
    :func:`count` and :func:`expected` (:func:`_walk`, run with one-hot layer values at the corners of
    the unit square), so the three cannot disagree; build one per spec (the spec changes only at a
    pruning event)."""

    def __init__(self, spec: ArchSpec):
        self.spec = spec
        self.blocks = [(name, blk) for name, _s, _b, blk in spec.iter_blocks() if not blk.removed]
        n = len(self.blocks)
        index = {name: i for i, (name, _) in enumerate(self.blocks)}

        eye = torch.eye(n, dtype=torch.float64)

        def corner(s1: float, s2: float) -> tuple[torch.Tensor, torch.Tensor]:
            acc = _walk(spec, lambda name, i, w: s1 if i == 0 else s2, lambda name: eye[index[name]])
            return (torch.as_tensor(acc.macs, dtype=torch.float64).expand(n),
                    torch.as_tensor(acc.params, dtype=torch.float64).expand(n))

        f00, f10, f01, f11 = (corner(a, b) for a, b in ((0, 0), (1, 0), (0, 1), (1, 1)))
        zero = _walk(spec, lambda *a: 0, lambda name: 0)  # every block off: Python numbers, no tensor read
        self.c0 = (float(zero.macs), float(zero.params))
        #: rows k0, k1, k2, k12; columns: the live blocks; one table for MACs, one for params
        self.k = tuple(torch.stack([f00[j] - self.c0[j], f10[j] - f00[j], f01[j] - f00[j],
                                    f11[j] - f10[j] - f01[j] + f00[j]]) for j in (0, 1))
        self.dense_width = [[float(w) for w in blk.inner] + [0.0] * (2 - len(blk.inner)) for _, blk in self.blocks]
        self._k_cast: tuple = (None, None)
        self._unit_names = [[unit_gate_name(name, i) for name, _ in self.blocks] for i in range(2)]
        self._layer_names = [layer_gate_name(name) for name, _ in self.blocks]
        self._segments: dict[tuple, torch.Tensor] = {}

    def __call__(self, unit_theta: dict[str, torch.Tensor] | None,
                 layer_theta: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E[MACs], E[Params])`` as :func:`expected` gives them (a gate missing from the dicts is on)."""
        unit_theta, layer_theta = unit_theta or {}, layer_theta or {}
        ref = next(iter(list(unit_theta.values()) + list(layer_theta.values())), None)
        dtype = ref.dtype if ref is not None else torch.float64
        device = ref.device if ref is not None else None
        if not self.blocks:
            return (torch.tensor(self.c0[0], dtype=dtype, device=device),
                    torch.tensor(self.c0[1], dtype=dtype, device=device))

        s1 = self._unit_sums(unit_theta, 0, dtype, device)
        g = self._layer_values(layer_theta, dtype, device)
        if self.spec.block == "basic":  # one unit gate a block: k2 = k12 = 0
            terms, rows = torch.stack([torch.ones_like(s1), s1]), 2
        else:
            s2 = self._unit_sums(unit_theta, 1, dtype, device)
            terms, rows = torch.stack([torch.ones_like(s1), s1, s2, s1 * s2]), 4
        key = (dtype, g.device)
        if self._k_cast[0] != key:  # the coefficient tables in the thetas' dtype and device, cast once
            self._k_cast = (key, torch.stack([k[:rows] for k in self.k]).to(dtype=dtype, device=g.device))
        per_block = (self._k_cast[1] * terms).sum(dim=1)  # (2, blocks): MACs and params of each block at g = 1
        out = (per_block * g).sum(dim=1)
        return self.c0[0] + out[0], self.c0[1] + out[1]

    def _unit_sums(self, unit_theta: dict[str, torch.Tensor], i: int, dtype, device) -> torch.Tensor:
        """s_i of every live block, (blocks,): when every block has its i-th unit gate (as in training),
        one concatenation and one matrix-vector product with a 0/1 block-membership matrix (kept per
        widths, dtype and device); a missing gate counts as on (its dense width)."""
        ts = [unit_theta.get(n) for n in self._unit_names[i]]
        if all(t is not None and t.dim() == 1 for t in ts):
            sizes = tuple(t.numel() for t in ts)  # type: ignore[union-attr]
            key = (i, sizes, dtype, device)
            seg = self._segments.get(key)
            if seg is None:
                seg = torch.zeros(len(ts), sum(sizes), dtype=dtype, device=device)
                start = 0
                for row, k in enumerate(sizes):
                    seg[row, start:start + k] = 1.0
                    start += k
                self._segments[key] = seg
            return seg @ torch.cat(ts)  # type: ignore[arg-type]
        return torch.stack([t.sum() if t is not None else
                            torch.tensor(self.dense_width[j][i], dtype=dtype, device=device) for j, t in enumerate(ts)])

    def _layer_values(self, layer_theta: dict[str, torch.Tensor], dtype, device) -> torch.Tensor:
        """g_B of every live block, (blocks,): the layer thetas concatenated; a missing gate is on (1)."""
        ts = [layer_theta.get(n) for n in self._layer_names]
        if all(t is not None and t.dim() == 1 for t in ts):
            return torch.cat(ts)  # type: ignore[arg-type]
        return torch.stack([t.reshape(()) if t is not None else torch.ones((), dtype=dtype, device=device)
                            for t in ts])


def width_table(spec: ArchSpec) -> list[dict]:
    """Per-stage widths and blocks kept, for ``launch.inspect``."""
    rows = []
    for s, stage in enumerate(spec.blocks):
        kept = [b for b in stage if not b.removed]
        rows.append({
            "stage": s + 1,
            "stream_width": spec.stage_widths[s],
            "blocks_kept": len(kept),
            "blocks_total": len(stage),
            "inner_widths": [list(b.inner) if not b.removed else None for b in stage],
        })
    return rows
