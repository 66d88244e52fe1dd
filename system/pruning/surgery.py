"""Pure surgery: remove channels and blocks from a gated ResNet.

No I/O, no collectives, no mutation of the inputs.  A :class:`PrunePlan` names unit gates
with the channels to drop and blocks to remove.  :func:`apply_plan` validates the whole
plan first (so nothing is half-applied), builds the smaller model from the new spec and
copies the surviving slices of every parameter and buffer.  The same slice map drives the
optimizer-state transplant (:mod:`system.pruning.transplant`).

The coupled tensors of one unit gate (which ones: :mod:`system.models.anatomy`) are cut here:

    BasicBlock  gate1: conv1.weight[out], bn1.*[c], gate1.theta[c], conv2.weight[:, in]
    Bottleneck  gate1: conv1.weight[out], bn1.*[c], gate1.theta[c], conv2.weight[:, in]
                gate2: conv2.weight[out], bn2.*[c], gate2.theta[c], conv3.weight[:, in]

Example::

    plan = PrunePlan(units={"layer1.0.gate1": (3, 7)}, blocks=("layer2.1",))
    small, spec, slices = apply_plan(model, plan)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch

from system.models.anatomy import LAYER_GATE, anatomy, block_of, split_gate_name
from system.models.resnet import GatedResNet, build_model, gate_modes, gates_of
from system.models.spec import ArchSpec, BlockSpec, SpecError, parse_block_name, replace_block

# dim -> kept indices, per tensor name of the *new* model; absent = copied whole.
Slices = dict[str, dict[int, list[int]]]

_BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class PrunePlan:
    """What to remove.  ``units``: unit-gate name -> channel indices (of the current model)
    to drop; ``blocks``: block names (``layer3.1``) whose branch is removed."""

    units: dict[str, tuple[int, ...]] = field(default_factory=dict)
    blocks: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.blocks and not any(self.units.values())

    @property
    def n_channels(self) -> int:
        return sum(len(v) for v in self.units.values())

    def to_dict(self) -> dict:
        return {"units": {k: sorted(int(i) for i in v) for k, v in sorted(self.units.items()) if v},
                "blocks": sorted(self.blocks)}

    @classmethod
    def from_dict(cls, d: dict) -> PrunePlan:
        return cls(units={k: tuple(v) for k, v in d.get("units", {}).items()}, blocks=tuple(d.get("blocks", ())))

    def digest(self) -> str:
        """A short hash of the canonical plan: equal on every rank iff the plans are equal."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _split_gate(name: str, spec: ArchSpec) -> tuple[str, int]:
    """``"layer1.0.gate2"`` -> ``("layer1.0", 1)``, validated against ``spec``."""
    block, gate = split_gate_name(name)
    anat = anatomy(spec.block)
    if not block or not gate.startswith("gate") or not gate[4:].isdigit():
        raise SpecError(f"plan names {name!r}, which is not a unit gate (e.g. 'layer1.0.gate1')")
    parse_block_name(block, spec)
    if gate not in {u.gate for u in anat.units}:
        raise SpecError(f"plan names {name!r}: a {spec.block} block has gates "
                        f"{'..'.join(dict.fromkeys([anat.units[0].gate, anat.units[-1].gate]))}")
    return block, anat.index(gate)


def plan_spec(spec: ArchSpec, plan: PrunePlan) -> tuple[ArchSpec, dict[str, list[int]]]:
    """Validate ``plan`` against ``spec``; return the new spec and kept indices per unit gate."""
    blocks = set()
    for name in plan.blocks:
        parse_block_name(name, spec)
        if spec.get_block(name).removed:
            raise SpecError(f"plan removes block {name!r}, which is already removed")
        blocks.add(name)
    kept: dict[str, list[int]] = {}
    new = spec
    for gname, idx in sorted(plan.units.items()):
        block, i = _split_gate(gname, spec)
        blk = spec.get_block(block)
        if blk.removed:
            raise SpecError(f"plan prunes channels of {gname!r}, but block {block!r} is already removed")
        if block in blocks or not idx:
            continue
        w = blk.inner[i]
        bad = [c for c in idx if not 0 <= int(c) < w]
        if bad:
            raise SpecError(f"plan names channels {bad} of {gname!r}, which has {w} channels")
        if len(set(idx)) != len(idx):
            raise SpecError(f"plan names a channel of {gname!r} twice")
        keep = [c for c in range(w) if c not in set(int(c) for c in idx)]
        if not keep:
            raise SpecError(f"plan removes every channel of {gname!r}; remove block {block!r} instead")
        kept[gname] = keep
    for gname, keep in kept.items():
        block, i = _split_gate(gname, spec)
        cur = new.get_block(block)
        inner = list(cur.inner)
        inner[i] = len(keep)
        new = replace_block(new, block, BlockSpec(tuple(inner)))
    for name in blocks:
        cur = new.get_block(name)
        new = replace_block(new, name, BlockSpec(tuple(0 for _ in cur.inner), removed=True))
    new.validate()
    return new, kept


def slice_map(spec: ArchSpec, kept: dict[str, list[int]]) -> Slices:
    """Per new-model tensor name, the kept indices along each sliced dim."""
    out: Slices = {}
    units = anatomy(spec.block).units
    for gname, keep in kept.items():
        block, i = _split_gate(gname, spec)
        u = units[i]
        out.setdefault(f"{block}.{u.conv}.weight", {})[0] = keep
        out.setdefault(f"{block}.{u.consumer}.weight", {})[1] = keep
        for t in _BN_TENSORS:
            out.setdefault(f"{block}.{u.bn}.{t}", {})[0] = keep
        out.setdefault(f"{block}.{u.gate}.theta", {})[0] = keep
    return out


def select(t: torch.Tensor, dims: dict[int, list[int]] | None) -> torch.Tensor:
    """``t`` with each dim in ``dims`` index-selected (a copy; ``t`` is untouched)."""
    if not dims:
        return t.detach().clone()
    for d, idx in dims.items():
        t = t.index_select(d, torch.as_tensor(idx, dtype=torch.long, device=t.device))
    return t.detach().clone()


def apply_plan(model: GatedResNet, plan: PrunePlan) -> tuple[GatedResNet, ArchSpec, Slices]:
    """Return ``(new_model, new_spec, slices)``; ``model`` is not modified.

    The new model has the same gate modes, train/eval mode, dtype and device; every surviving
    tensor is the corresponding slice of the old one.  Raises SpecError naming the offending
    gate, channel or block before anything is built.
    """
    spec = model.spec()
    new_spec, kept = plan_spec(spec, plan)
    slices = slice_map(spec, kept)
    ref = next(model.parameters())
    new = build_model(new_spec, gates=model.has_gates).to(device=ref.device, dtype=ref.dtype)
    old_state = model.state_dict()
    new_state = {}
    for k, v in new.state_dict().items():
        if k not in old_state:
            raise SpecError(f"internal: tensor {k!r} of the pruned model has no source")
        t = select(old_state[k], slices.get(k))
        if t.shape != v.shape:
            raise SpecError(f"internal: slice of {k!r} has shape {tuple(t.shape)}, expected {tuple(v.shape)}")
        new_state[k] = t
    new.load_state_dict(new_state, strict=True)
    modes = gate_modes(model)
    for n, g in gates_of(new).items():
        g.mode, g.per_example = modes[n]
        g.threshold = gates_of(model)[n].threshold
    new.train(model.training)
    return new, new_spec, slices


def plan_from_gates(model: GatedResNet, threshold: float = 0.5) -> PrunePlan:
    """The plan that removes every structure whose gate is off at ``theta <= threshold``.

    A block whose unit gates would all be off, or whose layer gate is off, is removed whole.
    """
    removals: dict[str, torch.Tensor] = {}
    blocks: list[str] = []
    for name, g in gates_of(model).items():
        off = g.theta.detach() <= threshold
        if g.kind == "layer":
            if bool(off.all()):
                blocks.append(block_of(name))
        else:
            removals[name] = off
    plan = plan_from_removals(removals, blocks)
    order = [b for b, _ in model.named_blocks()]
    return PrunePlan(units=plan.units, blocks=tuple(sorted(plan.blocks, key=order.index)))


def plan_from_removals(removals: dict[str, torch.Tensor], blocks=()) -> PrunePlan:
    """The plan from per-unit-gate removal masks (True = remove) and whole blocks.

    The empty-branch rule, written once: a unit gate that would lose every unit removes its block
    (the branch becomes its shortcut); a removed block's unit decisions are dropped.
    """
    gone = list(dict.fromkeys(blocks))
    for name, remove in removals.items():
        if remove.numel() and bool(remove.all()) and block_of(name) not in gone:
            gone.append(block_of(name))
    units = {name: tuple(int(i) for i in torch.nonzero(remove).flatten()) for name, remove in removals.items()
             if block_of(name) not in gone and bool(remove.any())}
    return PrunePlan(units=units, blocks=tuple(gone))


def zero_gates_for(model: GatedResNet, plan: PrunePlan) -> None:
    """Set theta to 0 for everything ``plan`` removes (in place; the *gated* equivalent)."""
    with torch.no_grad():
        for gname, idx in plan.units.items():
            gates_of(model)[gname].theta[list(idx)] = 0.0
        for b in plan.blocks:
            gates_of(model)[f"{b}.layer_gate"].theta.zero_()


def fold_gates(model: GatedResNet) -> GatedResNet:
    """A gate-free copy of ``model`` computing what it computes now in eval mode.

    Deterministic gates are 0/1 (0 must already be cut: call ``apply_plan(plan_from_gates)``
    first); ``mean`` gates scale channels by theta and are folded into the preceding BN's
    affine parameters (the layer gate into the branch's last BN).
    """
    spec = model.spec()
    out = build_model(spec, gates=False).to(next(model.parameters()).device)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith(".theta")}
    for name, g in gates_of(model).items():
        if g.mode == "off":
            continue
        val = g.value(1, torch.float32)
        if val is None:
            continue
        val = val.flatten().detach()
        block, gate = split_gate_name(name)
        anat = anatomy(spec.block)
        bn = f"{block}.{anat.last_bn if gate == LAYER_GATE else anat.unit(gate).bn}"
        if g.mode == "deterministic" and bool((val == 0).any()):
            raise SpecError(f"gate {name!r} is off but its structure is still there; prune before folding")
        state[f"{bn}.weight"] = state[f"{bn}.weight"] * val
        state[f"{bn}.bias"] = state[f"{bn}.bias"] * val
    out.load_state_dict(state, strict=True)
    return out.eval()


__all__ = [
    "PrunePlan",
    "Slices",
    "apply_plan",
    "fold_gates",
    "plan_from_gates",
    "plan_from_removals",
    "plan_spec",
    "select",
    "slice_map",
    "zero_gates_for",
]
