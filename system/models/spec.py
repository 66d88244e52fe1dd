"""The architecture as data: a JSON-serialisable description of a (possibly pruned) ResNet.

A spec names every residual block ``layer{s}.{b}`` (stages counted from 1, blocks from 0,
as torchvision does) and records, for each, the kept width of every gated inner conv and
whether the block was removed.  Removed blocks stay in the list so that names, and hence
state_dict keys, never shift when a neighbour is pruned.

Example::

    spec = dense_spec("resnet20")
    spec.blocks[0][1].inner          # (16,)  BasicBlock: conv1's kept output channels
    ArchSpec.from_json(spec.to_json()) == spec
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


class SpecError(ValueError):
    """A spec, model name or plan is invalid; the message names the offending item."""


@dataclass(frozen=True)
class BlockSpec:
    """One residual block.

    ``inner``: kept output channels of each gated inner conv (BasicBlock: conv1;
    Bottleneck: conv1, conv2).  ``removed``: the branch is gone, only the shortcut stays.
    """

    inner: tuple[int, ...]
    removed: bool = False


@dataclass(frozen=True)
class ArchSpec:
    """A ResNet's shape.  ``build_model(spec)`` constructs it; ``model.spec()`` returns it."""

    name: str  # the dense network it descends from, e.g. "resnet50"
    family: str  # "cifar" | "imagenet"
    block: str  # "basic" | "bottleneck"
    num_classes: int
    input_size: int
    stem_width: int
    stage_widths: tuple[int, ...]  # residual-stream (output) width of each stage
    blocks: tuple[tuple[BlockSpec, ...], ...]
    shortcut: str = "B"  # cifar: "A" (zero-pad) or "B" (1x1 conv); imagenet: "B"
    in_channels: int = 3

    # ----------------------------------------------------------------- derived
    @property
    def expansion(self) -> int:
        return 4 if self.block == "bottleneck" else 1

    def block_names(self) -> list[str]:
        return [f"layer{s + 1}.{b}" for s, stage in enumerate(self.blocks) for b in range(len(stage))]

    def iter_blocks(self) -> Iterator[tuple[str, int, int, BlockSpec]]:
        """Yield ``(name, stage_index, block_index, block_spec)`` in forward order."""
        for s, stage in enumerate(self.blocks):
            for b, blk in enumerate(stage):
                yield f"layer{s + 1}.{b}", s, b, blk

    def get_block(self, name: str) -> BlockSpec:
        s, b = parse_block_name(name, self)
        return self.blocks[s][b]

    def block_io(self, s: int, b: int) -> tuple[int, int, int]:
        """``(in_width, out_width, stride)`` of block ``b`` of stage ``s``."""
        out = self.stage_widths[s]
        if b > 0:
            return out, out, 1
        inw = self.stem_width if s == 0 else self.stage_widths[s - 1]
        stride = 1 if s == 0 else 2
        return inw, out, stride

    def has_downsample(self, s: int, b: int) -> bool:
        inw, out, stride = self.block_io(s, b)
        return stride != 1 or inw != out

    @property
    def blocks_total(self) -> int:
        return sum(len(st) for st in self.blocks)

    @property
    def blocks_kept(self) -> int:
        return sum(1 for *_, blk in self.iter_blocks() if not blk.removed)

    # --------------------------------------------------------------- serialise
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stage_widths"] = list(self.stage_widths)
        d["blocks"] = [[{"inner": list(b.inner), "removed": b.removed} for b in st] for st in self.blocks]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArchSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise SpecError(f"spec has unknown keys {sorted(unknown)}")
        missing = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING} - set(d)
        if missing:
            raise SpecError(f"spec misses keys {sorted(missing)}")
        try:
            blocks = tuple(
                tuple(BlockSpec(tuple(int(w) for w in b["inner"]), bool(b.get("removed", False))) for b in st)
                for st in d["blocks"]
            )
        except (KeyError, TypeError) as exc:
            raise SpecError(f"spec 'blocks' is malformed: {exc}") from None
        spec = cls(**{**d, "blocks": blocks, "stage_widths": tuple(int(w) for w in d["stage_widths"])})
        spec.validate()
        return spec

    @classmethod
    def from_json(cls, text: str) -> ArchSpec:
        return cls.from_dict(json.loads(text))

    # ---------------------------------------------------------------- validate
    def validate(self) -> None:
        """Raise SpecError naming the first inconsistent item."""
        if self.family not in ("cifar", "imagenet"):
            raise SpecError(f"spec.family must be 'cifar' or 'imagenet', got {self.family!r}")
        if self.block not in ("basic", "bottleneck"):
            raise SpecError(f"spec.block must be 'basic' or 'bottleneck', got {self.block!r}")
        if self.shortcut not in ("A", "B"):
            raise SpecError(f"spec.shortcut must be 'A' or 'B', got {self.shortcut!r}")
        if self.shortcut == "A" and self.family != "cifar":
            raise SpecError("spec.shortcut 'A' exists only for the cifar family")
        if len(self.stage_widths) != len(self.blocks):
            raise SpecError("spec.stage_widths and spec.blocks differ in length")
        if self.num_classes < 1 or self.input_size < 1:
            raise SpecError("spec.num_classes and spec.input_size must be positive")
        n_inner = 2 if self.block == "bottleneck" else 1
        for name, _, _, blk in self.iter_blocks():
            if len(blk.inner) != n_inner:
                raise SpecError(f"block {name}: expected {n_inner} inner widths, got {len(blk.inner)}")
            if not blk.removed and any(w < 1 for w in blk.inner):
                raise SpecError(f"block {name}: a kept block needs at least one channel per inner conv")


def parse_block_name(name: str, spec: ArchSpec) -> tuple[int, int]:
    """``"layer2.3"`` -> ``(1, 3)``; SpecError if the block does not exist in ``spec``."""
    try:
        head, b = name.split(".")
        assert head.startswith("layer")
        s = int(head[5:]) - 1
        bi = int(b)
        if s < 0 or bi < 0:
            raise ValueError
        spec.blocks[s][bi]
    except (ValueError, AssertionError, IndexError):
        raise SpecError(f"no block named {name!r} in {spec.name} (blocks: layer1.0 .. "
                        f"layer{len(spec.blocks)}.{len(spec.blocks[-1]) - 1})") from None
    return s, bi


# ---------------------------------------------------------------- model zoo
_CIFAR_DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}
_IMAGENET = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}
MODEL_NAMES = tuple(list(_CIFAR_DEPTHS) + list(_IMAGENET))


def dense_spec(name: str, num_classes: int | None = None, input_size: int | None = None,
               shortcut: str | None = None, in_channels: int = 3) -> ArchSpec:
    """The unpruned spec of a named network (usual input size and classes unless given)."""
    if name in _CIFAR_DEPTHS:
        n = _CIFAR_DEPTHS[name]
        widths = (16, 32, 64)
        spec = ArchSpec(
            name=name, family="cifar", block="basic",
            num_classes=num_classes or 10, input_size=input_size or 32,
            stem_width=16, stage_widths=widths,
            blocks=tuple(tuple(BlockSpec((w,)) for _ in range(n)) for w in widths),
            shortcut=shortcut or "A", in_channels=in_channels,
        )
    elif name in _IMAGENET:
        kind, layers = _IMAGENET[name]
        planes = (64, 128, 256, 512)
        exp = 4 if kind == "bottleneck" else 1
        inner = (lambda p: (p, p)) if kind == "bottleneck" else (lambda p: (p,))
        spec = ArchSpec(
            name=name, family="imagenet", block=kind,
            num_classes=num_classes or 1000, input_size=input_size or 224,
            stem_width=64, stage_widths=tuple(p * exp for p in planes),
            blocks=tuple(tuple(BlockSpec(inner(p)) for _ in range(n)) for p, n in zip(planes, layers)),
            shortcut=shortcut or "B", in_channels=in_channels,
        )
    else:
        raise SpecError(f"unknown model name {name!r}; known: {', '.join(MODEL_NAMES)}")
    spec.validate()
    return spec


def replace_block(spec: ArchSpec, name: str, new: BlockSpec) -> ArchSpec:
    """A copy of ``spec`` with block ``name`` replaced."""
    s, b = parse_block_name(name, spec)
    stage = list(spec.blocks[s])
    stage[b] = new
    blocks = list(spec.blocks)
    blocks[s] = tuple(stage)
    return dataclasses.replace(spec, blocks=tuple(blocks))


__all__ = ["MODEL_NAMES", "ArchSpec", "BlockSpec", "SpecError", "dense_spec", "parse_block_name", "replace_block"]
