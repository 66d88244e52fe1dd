"""Shared helpers for tests that train tiny runs in-process."""

from __future__ import annotations

from dataclasses import dataclass

from system.config import apply_overrides, from_dict
from system.run_config import RunConfig

TINY = [
    "model.name=resnet20", "data.loader=synthetic", "data.synthetic_classes=4", "data.synthetic_samples=512",
    "data.batch_size=16", "data.train_size=16", "data.val_resize=16", "data.val_crop=16", "data.workers=0",
    "train.epochs=1", "train.progress=false", "train.log_every_steps=5", "train.eval_batches=2",
    "tracking.enabled=false", "optim.lr=0.05",
    "latency.repeats=3",  # the final timing at its minimum: tests read its figures, not their precision
]


def tiny_config(tmp_path, *overrides: str) -> RunConfig:
    data = apply_overrides({}, TINY + [f"run.root={tmp_path}", f"run.dir={tmp_path / 'run'}"] + list(overrides))
    return from_dict(RunConfig, data)


@dataclass(frozen=True)
class MethodSettings:
    """One registered method's test settings: the one table every method test reads."""

    run: list[str]  # a short tiny run in which it prunes
    zero: list[str]  # the same at zero strength: it prunes nothing
    target: list[str] | None = None  # its overrides for a method.target_macs run (None: it refuses a target)


_VAR = ["method.name=variational", "method.variational.nu=30", "method.variational.lr_unit=0.5",
        "method.variational.lr_layer=0.5", "method.variational.warmup_frac=0", "method.variational.check_every=2",
        "method.variational.patience=1", "method.variational.harden=none", "method.variational.weight_condition=none"]
_TAYLOR = ["method.name=taylor", "method.taylor.keep_ratio=0.5", "method.taylor.check_every=3",
           "method.taylor.per_step=40", "method.taylor.start_frac=0.1", "method.taylor.stop_frac=0.9"]
_L1 = ["method.name=l1", "method.l1.keep_ratio=0.5", "method.l1.check_every=3", "method.l1.per_step=40",
       "method.l1.start_frac=0.1", "method.l1.stop_frac=0.9"]
_EGP = ["method.name=egp", "method.egp.iterations=3", "method.egp.prune_frac=0.9", "method.egp.start_frac=0.2",
        "method.egp.stop_frac=0.9"]

SETTINGS: dict[str, MethodSettings] = {
    "none": MethodSettings(run=["method.name=none"], zero=["method.name=none"]),
    "variational": MethodSettings(run=_VAR, zero=[o for o in _VAR if "nu=" not in o] + ["method.variational.nu=0"],
                                  target=["method.name=variational", "method.variational.check_every=2"]),
    "taylor": MethodSettings(run=_TAYLOR, zero=_TAYLOR + ["method.taylor.keep_ratio=1.0"],
                             target=["method.name=taylor", "method.taylor.check_every=3"]),
    "l1": MethodSettings(run=_L1, zero=_L1 + ["method.l1.keep_ratio=1.0"],
                         target=["method.name=l1", "method.l1.check_every=3"]),
    "egp": MethodSettings(run=_EGP, zero=_EGP + ["method.egp.prune_frac=0.000001",
                                                 "method.egp.remove_dead_units=false"]),
}
#: the methods that steer to method.target_macs, with their target-run overrides
TARGETED = {n: s.target for n, s in SETTINGS.items() if s.target is not None}

#: short runs that prune: every registered method's, and the variational special cases
STRONG = {
    **{n: s.run for n, s in SETTINGS.items() if n != "none"},
    "unit_only": ["method.name=variational", "method.label=unit_only", "method.variational.layer_gates=false",
                  "method.variational.alpha=0", "method.variational.nu=30", "method.variational.lr_unit=0.5",
                  "method.variational.warmup_frac=0", "method.variational.check_every=2",
                  "method.variational.patience=1", "method.variational.harden=none",
                  "method.variational.weight_condition=none"],
    "layer_only": ["method.name=variational", "method.label=layer_only", "method.variational.unit_gates=false",
                   "method.variational.nu=30", "method.variational.lr_layer=1.0",
                   "method.variational.warmup_frac=0", "method.variational.check_every=2",
                   "method.variational.patience=1", "method.variational.harden=none",
                   "method.variational.weight_condition=none"],
}
