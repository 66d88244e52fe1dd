"""Gated ResNets: CIFAR-style (ResNet-20/32/44/56/110) and torchvision v1.5 (ResNet-18/34/50/101).

Plain ``nn.Module``s built from an :class:`ArchSpec`.  Unit gates sit after the BatchNorm
and ReLU of every inner conv of a residual branch (``xi * relu(bn(conv(x)))``: the same forward
values as a gate before the ReLU, but a unit sampled off still gets a data gradient); one layer
gate per block multiplies the whole branch: ``out = relu(shortcut(x) + xi_B * branch(x))``, computed, for a gate
drawn once per batch, as the branch's last BatchNorm with its weight and bias times ``xi_B`` (:class:`BranchNorm`).
Parameter and buffer names follow torchvision, so a dense model loads a torchvision state_dict.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from system.models.anatomy import anatomy, last_bn
from system.models.spec import ArchSpec, BlockSpec, SpecError

GATE_MODES = ("off", "deterministic", "sampled", "mean")


class Gate(nn.Module):
    """Multiplies channels (unit gate, ``n`` = channels) or a whole branch (layer gate, ``n`` = 1).

    ``theta`` in [0, 1] is the probability that the structure is on.  Modes:

    - ``off``: identity (the gate does nothing).
    - ``sampled``: ``xi ~ Bernoulli(theta)`` per forward (per example if ``per_example``);
      the theta gradient is the derivative of the loss w.r.t. the sampled gate value
      (straight-through: forward ``xi``, backward as if the multiplier were ``theta``).  Inside a
      :class:`GatedResNet` the model draws every sampled gate of a forward at once
      (:func:`draw_gates`: one Bernoulli draw over the concatenated thetas) and hands each gate its
      slice (``drawn``); a gate used on its own draws for itself.
    - ``deterministic``: ``xi = 1[theta > threshold]``; no gradient to theta.  When every unit
      is on (as after hardening, which cuts the rest) the multiply is skipped.
    - ``mean``: ``xi = theta`` (the mean network; with theta = 1 its theta gradient is ``dL/dz`` at z = 1,
      which Taylor reads off the BatchNorm instead).

    ``idle`` (sampled mode; the method sets it while theta is held at 1, as in its warm-up): the gate passes
    its input unchanged, which is what ``xi ~ Bernoulli(1) = 1`` multiplies by, bit for bit, with no multiply
    and no theta gradient.  Inside a :class:`GatedResNet` the draw is still made (:func:`draw_gates`), so the
    random stream, and the run, are those of a drawing gate.
    """

    def __init__(self, n: int, kind: str):
        super().__init__()
        if kind not in ("unit", "layer"):
            raise ValueError(f"gate kind must be 'unit' or 'layer', got {kind!r}")
        self.kind = kind
        self.theta = nn.Parameter(torch.ones(n))
        self.mode = "off"
        self.per_example = False
        self.threshold = 0.5
        self.straight_through = True  # sampled mode: pass dL/dxi to theta
        self.force: float | None = None  # if set, the gate value regardless of mode (exact estimator)
        self.replay = False  # sampled mode: reuse the last draw (common random numbers)
        self.last_xi: torch.Tensor | None = None  # the last sampled draw, shape (B or 1, n)
        self.drawn: torch.Tensor | None = None  # this forward's multiplier from draw_gates, (B or 1, n, 1, 1)
        self.idle = False  # sampled mode with theta held at 1: pass the input (see the class docstring)
        # sampled per example, inside a GatedResNet: the share of the batch's examples that draw; the others
        # multiply by theta, the gate's mean (see draw_gates)
        self.sampled_frac = 1.0
        self.undrawn_grad = True  # sampled_frac < 1: the undrawn examples' dL/dz at theta enters theta's gradient
        self._all_on: tuple[tuple, bool] | None = None  # (theta version key, every unit on) cache

    def all_on(self) -> bool:
        """Deterministic mode: whether every unit passes (``theta > threshold``); cached on theta's
        in-place version, so no device sync per forward."""
        key = (self.theta._version, self.theta.data_ptr(), self.threshold)
        if self._all_on is None or self._all_on[0] != key:
            self._all_on = (key, bool((self.theta.detach() > self.threshold).all()))
        return self._all_on[1]

    def extra_repr(self) -> str:
        return f"{self.kind}, n={self.theta.numel()}, mode={self.mode}"

    def value(self, batch: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The multiplier for this forward, shape (B or 1, n), or None in mode ``off``."""
        if self.mode == "off":
            return None
        if self.force is not None:
            return torch.full((1, self.theta.numel()), self.force, dtype=dtype, device=self.theta.device)
        theta = self.theta
        if self.mode == "deterministic":
            return (theta.detach() > self.threshold).to(dtype).unsqueeze(0)
        if self.mode == "mean":
            return theta.to(dtype).unsqueeze(0)
        if self.mode == "sampled":
            if self.replay and self.last_xi is not None:
                return self.last_xi.to(dtype)
            if self.drawn is not None:  # drawn with the model's other gates (draw_gates): used once
                drawn, self.drawn = self.drawn, None
                return drawn.to(dtype)
            p = theta.detach().clamp(0.0, 1.0)
            shape = (batch, p.numel()) if self.per_example else (1, p.numel())
            xi = torch.bernoulli(p.expand(shape))
            self.last_xi = xi
            if not self.straight_through:
                return xi.to(dtype)
            return (xi + theta - theta.detach()).to(dtype)
        raise ValueError(f"unknown gate mode {self.mode!r}; use one of {GATE_MODES}")

    def multiplier(self, batch: int, dtype: torch.dtype) -> torch.Tensor | None:
        """:meth:`value`, or None where the gate passes everything: mode ``off``, or ``deterministic`` with
        every unit on (after hardening every kept gate is: the multiply by ones is skipped), or ``sampled``
        and ``idle``."""
        if self.force is None and ((self.mode == "deterministic" and self.all_on())
                                   or (self.mode == "sampled" and self.idle)):
            self.drawn = None
            return None
        return self.value(batch, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.multiplier(x.shape[0], x.dtype)
        if g is None:
            return x
        if g.dim() == 2:  # (B or 1, n) -> broadcast over the channels (unit) or the whole branch (layer)
            g = g.reshape(g.shape[0], g.shape[1] if self.kind == "unit" else 1, 1, 1)
        return x * g


def draw_gates(gates: list[Gate], batch: int) -> None:
    """Draw every gate in ``gates`` that samples this forward, with one Bernoulli draw per kind of draw
    (per example or per batch; straight-through or not) over the concatenated thetas, and give each gate
    its slice as ``drawn`` (already shaped to multiply a feature map) and ``last_xi``.

    The same distribution as each gate drawing for itself, in a handful of ops for the whole network
    instead of a handful per gate (docs/benchmarks.md, "Step budget").  Gates that replay their last draw
    or are forced are left alone; ``idle`` gates are drawn (the random stream stays that of every gate
    drawing) and get no multiplier, and a group of idle gates skips the straight-through arithmetic.

    A per-example group with ``sampled_frac`` f < 1 draws for every example (the random stream is the same at
    any f) and keeps the draws of the first ``max(1, round(f B))`` examples; the others get theta itself, the
    gate's mean (straight-through: value theta, gradient 1, as a drawn example's), and ``last_xi`` holds the
    mixed values, which the estimators' replayed forwards reuse.  The batch's order is the loader's shuffle,
    so which examples draw is random.  With ``undrawn_grad`` false the undrawn examples' multiplier is a
    constant: theta's gradient is the drawn examples' straight-through sum alone."""
    groups: dict[tuple[bool, bool, float, bool], list[Gate]] = {}
    for g in gates:
        if g.mode == "sampled" and not g.replay and g.force is None:
            frac = g.sampled_frac if g.per_example else 1.0
            groups.setdefault((g.per_example, g.straight_through, frac, g.undrawn_grad), []).append(g)
    for (per_example, straight_through, frac, undrawn_grad), members in groups.items():
        thetas: list[torch.Tensor] = [g.theta for g in members]
        flat = torch.cat(thetas) if len(thetas) > 1 else thetas[0]
        rows = batch if per_example else 1
        p = flat.detach().clamp(0.0, 1.0)
        xi = torch.bernoulli(p.expand(rows, -1))
        drawn_rows = max(1, round(frac * rows))
        if drawn_rows < rows:  # the other examples multiply by theta (the mean gate)
            xi = torch.cat([xi[:drawn_rows], p.expand(rows - drawn_rows, -1)])
        sizes = [t.numel() for t in thetas]
        values: list | tuple = [None] * len(members)  # (an all-idle group multiplies nothing)
        if not all(g.idle for g in members):
            value = xi
            if straight_through and (undrawn_grad or drawn_rows == rows):
                value = xi + (flat - flat.detach())
            elif straight_through:  # the straight-through gradient of the drawn rows only
                value = torch.cat([xi[:drawn_rows] + (flat - flat.detach()), xi[drawn_rows:]])
            values = value.view(rows, -1, 1, 1).split(sizes, dim=1)
        for g, x, v in zip(members, xi.split(sizes, dim=1), values):
            g.last_xi, g.drawn = x, None if g.idle else v


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)


def _gate(n: int, kind: str, gates: bool) -> nn.Module:
    return Gate(n, kind) if gates else nn.Identity()


class BranchNorm(nn.BatchNorm2d):
    """The BatchNorm that closes a residual branch.  ``forward(x, scale)`` with a 1-element ``scale`` is
    ``BatchNorm2d(x) * scale`` computed as a BatchNorm whose weight and bias are multiplied by ``scale``:
    the block's per-batch layer gate costs two multiplies of ``C`` numbers instead of a pass over the
    branch's ``B x C x H x W`` output, forward and backward.  Autograd gives the same gradients: the
    scale's is ``sum_c gamma_c dL/dgamma'_c + beta_c dL/dbeta'_c = sum dL/dout * BN(x)`` (and a branch
    drawn off, scale 0, still measures it, as the multiply did).  The state dict is a BatchNorm2d's."""

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        if scale is None:
            return super().forward(x)
        # nn.BatchNorm2d.forward (torch 2.x) with the affine parameters scaled
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return F.batch_norm(x, self.running_mean if track else None, self.running_var if track else None,
                            self.weight * scale, self.bias * scale, use_batch, factor, self.eps)


def _gated_close(gate: nn.Module, bn: BranchNorm, h: torch.Tensor) -> torch.Tensor:
    """``layer_gate(bn(h))``, the branch's last BatchNorm times the block's layer gate: a per-batch
    multiplier (how every layer estimator but ``conditional`` draws) is folded into the BatchNorm
    (:class:`BranchNorm`), a per-example one multiplies the feature map."""
    z = gate.multiplier(h.shape[0], h.dtype) if isinstance(gate, Gate) else None
    if z is None:
        return bn(h)
    if z.numel() == 1:
        return bn(h, z.reshape(1))
    return bn(h) * z.reshape(-1, 1, 1, 1)


class ShortcutA(nn.Module):
    """CIFAR option A: subsample by ``stride`` and zero-pad channels (no parameters)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride, self.pad = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        lo = self.pad // 2
        return F.pad(x, (0, 0, 0, 0, lo, self.pad - lo))


def _shortcut(spec: ArchSpec, cin: int, cout: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    if spec.shortcut == "A":
        return ShortcutA(cin, cout, stride)
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class _ResidualBlock(nn.Module):
    """What both block kinds share: ``relu(shortcut(x) + layer_gate(branch(x)))``, the branch being the kind's
    ``body`` closed by its last BatchNorm (the anatomy's ``last_bn``, a :class:`BranchNorm` that takes the
    layer gate's per-batch multiplier)."""

    kind: str
    layer_gate: nn.Module
    downsample: nn.Module | None
    relu: nn.Module

    def body(self, x: torch.Tensor) -> torch.Tensor:
        """The branch up to its last conv's output (the last BatchNorm not yet applied)."""
        raise NotImplementedError

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return last_bn(self, self.kind)(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        bn = cast(BranchNorm, last_bn(self, self.kind))
        return self.relu(identity + _gated_close(self.layer_gate, bn, self.body(x)))


class BasicBlock(_ResidualBlock):
    """conv3x3-BN-ReLU-gate1-conv3x3-BN, times the layer gate, plus the shortcut, ReLU."""

    kind = "basic"

    def __init__(self, spec: ArchSpec, cin: int, width: int, cout: int, stride: int, gates: bool):
        super().__init__()
        self.conv1, self.bn1 = _conv(cin, width, 3, stride), nn.BatchNorm2d(width)
        self.gate1, self.relu1 = _gate(width, "unit", gates), nn.ReLU(inplace=True)
        self.conv2, self.bn2 = _conv(width, cout, 3), BranchNorm(cout)
        self.layer_gate = _gate(1, "layer", gates)
        self.downsample = _shortcut(spec, cin, cout, stride)
        self.relu = nn.ReLU(inplace=True)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.gate1(self.relu1(self.bn1(self.conv1(x)))))


class Bottleneck(_ResidualBlock):
    """torchvision v1.5 bottleneck (stride on the 3x3) with unit gates after bn1-ReLU and bn2-ReLU."""

    kind = "bottleneck"

    def __init__(self, spec: ArchSpec, cin: int, widths: tuple[int, int], cout: int, stride: int, gates: bool):
        super().__init__()
        w1, w2 = widths
        self.conv1, self.bn1 = _conv(cin, w1, 1), nn.BatchNorm2d(w1)
        self.gate1, self.relu1 = _gate(w1, "unit", gates), nn.ReLU(inplace=True)
        self.conv2, self.bn2 = _conv(w1, w2, 3, stride), nn.BatchNorm2d(w2)
        self.gate2, self.relu2 = _gate(w2, "unit", gates), nn.ReLU(inplace=True)
        self.conv3, self.bn3 = _conv(w2, cout, 1), BranchNorm(cout)
        self.layer_gate = _gate(1, "layer", gates)
        self.downsample = _shortcut(spec, cin, cout, stride)
        self.relu = nn.ReLU(inplace=True)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        out = self.gate1(self.relu1(self.bn1(self.conv1(x))))
        return self.conv3(self.gate2(self.relu2(self.bn2(self.conv2(out)))))


class RemovedBlock(nn.Module):
    """What is left of a removed block: its shortcut (identity, option A, or projection)."""

    def __init__(self, spec: ArchSpec, cin: int, cout: int, stride: int):
        super().__init__()
        self.downsample = _shortcut(spec, cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is None:
            return x  # relu(x) == x: the input is already the output of a ReLU
        return F.relu(self.downsample(x))


class GatedResNet(nn.Module):
    """A (possibly pruned) ResNet built from ``spec``; ``gates=False`` builds it without gates."""

    def __init__(self, spec: ArchSpec, gates: bool = True):
        super().__init__()
        spec.validate()
        self.family, self.block_kind, self.shortcut_kind = spec.family, spec.block, spec.shortcut
        self.arch_name, self.input_size, self.has_gates = spec.name, spec.input_size, gates
        self.stage_widths = tuple(spec.stage_widths)
        self._spec: ArchSpec | None = None
        self._gate_list: list[Gate] | None = None
        # the paired layer estimator's shared prefix: in training mode with ``keep_block_inputs`` the
        # forward keeps (detached) every block's input in ``block_inputs`` (autograd holds those tensors
        # until backward anyway); ``start_at = (i, x)`` makes the next forward skip the stem and the
        # blocks before the i-th (flat index) and start from ``x``
        self.keep_block_inputs = False
        self.block_inputs: list[torch.Tensor] = []
        self.start_at: tuple[int, torch.Tensor] | None = None
        if spec.family == "cifar":
            self.conv1 = _conv(spec.in_channels, spec.stem_width, 3)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(spec.in_channels, spec.stem_width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(spec.stem_width)
        self.relu = nn.ReLU(inplace=True)
        for s, stage in enumerate(spec.blocks):
            mods = []
            for b, blk in enumerate(stage):
                cin, cout, stride = spec.block_io(s, b)
                mods.append(self._make_block(spec, blk, cin, cout, stride, gates))
            self.add_module(f"layer{s + 1}", nn.Sequential(*mods))
        self.num_stages = len(spec.blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(spec.stage_widths[-1], spec.num_classes)
        self._init_weights()

    @staticmethod
    def _make_block(spec: ArchSpec, blk: BlockSpec, cin: int, cout: int, stride: int, gates: bool) -> nn.Module:
        if blk.removed:
            return RemovedBlock(spec, cin, cout, stride)
        if spec.block == "basic":
            return BasicBlock(spec, cin, blk.inner[0], cout, stride, gates)
        return Bottleneck(spec, cin, (blk.inner[0], blk.inner[1]), cout, stride, gates)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{s + 1}") for s in range(self.num_stages)]

    def named_blocks(self) -> Iterator[tuple[str, nn.Module]]:
        for s, stage in enumerate(self.stages()):
            for b, blk in enumerate(stage):
                yield f"layer{s + 1}.{b}", blk

    def features(self, x: torch.Tensor, start: int | None = None) -> torch.Tensor:
        """Pooled features of image ``x`` (``start`` None), or of ``x`` as the input of block ``start`` (flat index)."""
        keep = self.keep_block_inputs and self.training and start is None
        if start is None:
            x, start = self.maxpool(self.relu(self.bn1(self.conv1(x)))), 0
        if keep:
            self.block_inputs = []
        i = 0
        for stage in self.stages():
            for blk in stage:
                if i >= start:
                    if keep:
                        self.block_inputs.append(x.detach())
                    x = blk(x)
                i += 1
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.start_at is not None:
            return self._suffix(*self.start_at)
        if self.has_gates:
            draw_gates(self._gates(), x.shape[0])
        return self.fc(self.features(x))

    def _gates(self) -> list[Gate]:
        """Every gate, in module order (kept: the modules of a model never change; surgery builds a new one)."""
        if self._gate_list is None:
            self._gate_list = list(gates_of(self).values())
        return self._gate_list

    def _suffix(self, start: int, x: torch.Tensor) -> torch.Tensor:
        """The paired estimator's suffix forward.  Under ``train.compile`` it runs eagerly
        (:class:`system.runtime.compiled.Compiler` disables it per model): a graph per start block would
        recompile at every step of the round-robin."""
        return self.fc(self.features(x, start))

    def spec(self) -> ArchSpec:
        """The spec read off the modules' actual shapes (so spec -> model -> spec is a real check).

        Read once and kept: a model's shape never changes (surgery builds a new model), and the
        loop and the variational cost ask for it every step.
        """
        if self._spec is None:
            self._spec = self._read_spec()
        return self._spec

    def _read_spec(self) -> ArchSpec:
        units = anatomy(self.block_kind).units
        blocks = []
        for stage in self.stages():
            row = []
            for blk in stage:
                if isinstance(blk, RemovedBlock):
                    row.append(BlockSpec((0,) * len(units), removed=True))
                else:
                    row.append(BlockSpec(tuple(getattr(blk, u.conv).out_channels for u in units)))
            blocks.append(tuple(row))
        return ArchSpec(
            name=self.arch_name, family=self.family, block=self.block_kind,
            num_classes=self.fc.out_features, input_size=self.input_size,
            stem_width=self.conv1.out_channels,
            stage_widths=self.stage_widths,  # the residual stream is never pruned
            blocks=tuple(blocks), shortcut=self.shortcut_kind, in_channels=self.conv1.in_channels,
        )


def build_model(spec: ArchSpec, gates: bool = True) -> GatedResNet:
    """Pure constructor: the network ``spec`` describes, freshly initialised."""
    return GatedResNet(spec, gates=gates)


def zero_init_residual(model: GatedResNet) -> None:
    """Zero the last BatchNorm's scale of every kept branch (``model.zero_init_residual``)."""
    with torch.no_grad():
        for _, blk in model.named_blocks():
            if not isinstance(blk, RemovedBlock):
                last_bn(blk, model.block_kind).weight.zero_()


def gates_of(model: nn.Module) -> dict[str, Gate]:
    """All gates by module name, e.g. ``{"layer1.0.gate1": Gate, "layer1.0.layer_gate": Gate}``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Gate)}


@contextlib.contextmanager
def with_gate_modes(model: nn.Module, unit: str | None = None, layer: str | None = None) -> Iterator[None]:
    """:func:`set_gate_mode` for the ``with`` block; every gate's mode is restored after it."""
    saved = {n: g.mode for n, g in gates_of(model).items()}
    set_gate_mode(model, unit=unit, layer=layer)
    try:
        yield
    finally:
        for n, g in gates_of(model).items():
            g.mode = saved[n]


def set_gate_mode(model: nn.Module, unit: str | None = None, layer: str | None = None,
                  per_example: bool | None = None) -> None:
    """Set the mode of every unit and/or layer gate (``None`` leaves that kind unchanged)."""
    for g in gates_of(model).values():
        mode = unit if g.kind == "unit" else layer
        if mode is not None:
            if mode not in GATE_MODES:
                raise ValueError(f"unknown gate mode {mode!r}; use one of {GATE_MODES}")
            g.mode = mode
        if per_example is not None:
            g.per_example = per_example


def set_gates_idle(model: nn.Module, unit: bool, layer: bool) -> None:
    """Mark the unit and the layer gates ``idle`` or not (:class:`Gate`: sampled gates with theta held at 1
    pass their input)."""
    for g in gates_of(model).values():
        g.idle = unit if g.kind == "unit" else layer


def gate_modes(model: nn.Module) -> dict[str, tuple[str, bool]]:
    return {n: (g.mode, g.per_example) for n, g in gates_of(model).items()}


def load_torchvision_state_dict(model: GatedResNet, state: dict[str, torch.Tensor]) -> None:
    """Load a torchvision ``resnetXX`` state_dict; only gate parameters may be missing."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad_missing = [k for k in missing if not k.endswith(".theta")]
    if bad_missing or unexpected:
        raise SpecError(f"state_dict does not match {model.arch_name}: missing {bad_missing[:5]}, "
                        f"unexpected {list(unexpected)[:5]}")
