"""Pruning methods as plug-ins: ``build_method(cfg, total_steps)`` picks one by name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from system.config import check
from system.pruning.methods.base import Batch, Event, Method, StepContext
from system.pruning.methods.egp import EGP, EGPConfig
from system.pruning.methods.l1 import L1, L1Config
from system.pruning.methods.taylor import Taylor, TaylorConfig
from system.pruning.methods.variational import Variational, VariationalConfig

METHODS: dict[str, type[Method]] = {"none": Method, "variational": Variational, "taylor": Taylor, "egp": EGP,
                                    "l1": L1}


@dataclass(frozen=True)
class MethodConfig:
    """Section ``method``: which plug-in, and each plug-in's own sub-section.

    Unit-only and layer-only are ``name: variational`` with ``variational.layer_gates=false``
    (and ``alpha: 0``) or ``variational.unit_gates=false``; ``label`` names the row in tables.
    """

    name: Literal["none", "variational", "taylor", "egp", "l1"] = "none"  # the pruning method (none: dense)
    label: str = ""  # e.g. "unit_only"; defaults to name
    #: budget mode: the final network's inference MACs as a fraction of the dense network's
    #: (None = off; each structured method steers its own pressure to land there)
    target_macs: float | None = None
    #: every kept inner width a multiple of this (8 suits tensor cores); the decisions keep the
    #: strongest units up to the next multiple, and the target search counts the rounded widths
    round_to: int = 1
    variational: VariationalConfig = field(default_factory=VariationalConfig)
    taylor: TaylorConfig = field(default_factory=TaylorConfig)
    egp: EGPConfig = field(default_factory=EGPConfig)
    l1: L1Config = field(default_factory=L1Config)

    def __post_init__(self) -> None:
        check(self.round_to >= 1, "round_to", f"must be an integer >= 1, got {self.round_to}")
        check(self.name in METHODS, "name", f"unknown method {self.name!r}; known: {sorted(METHODS)}")
        if self.target_macs is not None:
            check(0.0 < self.target_macs <= 1.0, "target_macs",
                  f"must be a fraction of the dense MACs in (0, 1], got {self.target_macs}")
            plugin = METHODS[self.name]
            check(plugin.supports_target, "target_macs",
                  f"method '{self.name}' takes no target: {plugin.no_target_reason}; drop it with "
                  f"method.target_macs=null" + (" (a dense baseline)" if self.name == "none" else ""))

    @property
    def display(self) -> str:
        return self.label or self.name


def build_method(cfg: MethodConfig, total_steps: int, weight_decay: float = 0.0) -> Method:
    """The plug-in ``cfg.name`` with its own sub-section; ``weight_decay`` is ``optim.weight_decay``
    (a method that decays weights in its own loss needs it)."""
    sub = getattr(cfg, cfg.name, None)
    return METHODS[cfg.name](sub, total_steps, target_macs=cfg.target_macs, round_to=cfg.round_to,
                             weight_decay=weight_decay)


__all__ = [
    "METHODS",
    "Batch",
    "EGPConfig",
    "Event",
    "L1Config",
    "Method",
    "MethodConfig",
    "StepContext",
    "TaylorConfig",
    "VariationalConfig",
    "build_method",
]
