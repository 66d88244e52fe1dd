"""The one way to build a run's parts from its config: the trainer, preflight, export and the benches
all call these, so the parts they get are the same.

The resume order (what :class:`system.trainer.Trainer` does with them)::

    spec   = checkpoint.spec if resuming else dense_spec_for(cfg, num_classes)
    model  = build_network(cfg, spec, device)            # zero_init_residual applied
    method = build_pruning_method(cfg, total_steps, model)   # refuses what it cannot prune, naming the key
    method.load_state_dict(...)                           # resuming: before attach
    method.attach(model)
    opt    = build_opt(cfg, model, method, global_batch)
    engine = build_engine(cfg, model, opt, env, device)
    checkpointer.restore(...)                             # resuming: engine state, then the parts

:func:`load_checkpoint_network` reads a checkpoint's network with its method attached, through the
checkpoint package's and the engines' public readers (never through an engine's file names).
"""

from __future__ import annotations

from pathlib import Path

import torch

from system.config import ConfigError, from_dict
from system.models.resnet import GatedResNet, build_model, zero_init_residual
from system.models.spec import ArchSpec, dense_spec
from system.optim import build_optimizer
from system.pruning.methods import Method, build_method
from system.run_config import RunConfig
from system.runtime.checkpoint import CheckpointInfo, read_rank_state, verify
from system.runtime.engine import DistEnv, Engine, LocalEngine, saved_model_weights


def dense_spec_for(cfg: RunConfig, num_classes: int) -> ArchSpec:
    """The dense network of ``model.*`` at the run's input size."""
    size = cfg.model.input_size or cfg.data.train_size
    return dense_spec(cfg.model.name, num_classes=num_classes, input_size=size, shortcut=cfg.model.shortcut or None)


def build_network(cfg: RunConfig, spec: ArchSpec, device: torch.device | str = "cpu") -> GatedResNet:
    """The gated network of ``spec`` on ``device`` (``model.zero_init_residual`` applied)."""
    model = build_model(spec).to(device)
    if cfg.model.zero_init_residual:
        zero_init_residual(model)
    return model


def build_pruning_method(cfg: RunConfig, total_steps: int, model: GatedResNet | None = None) -> Method:
    """The ``method.*`` plug-in for a run of ``total_steps``; with ``model``, checked against it (a
    model it cannot prune is a :class:`ConfigError` naming ``method.name``, or the key it names)."""
    method = build_method(cfg.method, total_steps, weight_decay=cfg.optim.weight_decay)
    if model is not None:
        try:
            method.check_model(model)
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError("method.name", str(exc)) from None
    return method


def build_opt(cfg: RunConfig, model: GatedResNet, method: Method, global_batch: int) -> torch.optim.Optimizer:
    """The optimizer of ``optim.*`` with the method's theta groups (attach the method first)."""
    return build_optimizer(model, cfg.optim, method.theta_lrs(), global_batch, method.decay_exempt(model),
                           method.theta_momentum())


def build_engine(cfg: RunConfig, model: GatedResNet, opt: torch.optim.Optimizer, env: DistEnv,
                 device: torch.device) -> Engine:
    """The engine ``engine.kind`` picks (``auto``: DeepSpeed on more than one rank)."""
    kind = cfg.engine.kind
    if kind == "deepspeed" or (kind == "auto" and env.world_size > 1):
        from system.runtime.engine_ds import DeepSpeedEngine, EngineSettings  # imported only when used

        return DeepSpeedEngine(model, opt, EngineSettings.of(cfg), env, device)
    return LocalEngine(model, opt, device, cfg.train.precision, cfg.train.channels_last)


def saved_weights(info: CheckpointInfo) -> dict[str, torch.Tensor]:
    """The model weights of checkpoint ``info``, read by the reader of the engine that wrote them."""
    if info.manifest.get("engine") == "deepspeed":
        from system.runtime.engine_ds import saved_model_weights as deepspeed_weights  # imported only when used

        return deepspeed_weights(info.path)
    return saved_model_weights(info.path)


def load_checkpoint_network(path: str | Path) -> tuple[GatedResNet, Method, RunConfig, CheckpointInfo]:
    """Checkpoint ``path`` (verified first): its network on the CPU with its weights, and its method
    (rank 0's state) attached, as the run had them; with the run's config and the checkpoint's info."""
    info = verify(path)
    cfg = from_dict(RunConfig, info.manifest["config"])
    model = build_model(info.spec)
    model.load_state_dict(saved_weights(info))
    method = build_pruning_method(cfg, int(info.manifest["total_steps"]))
    method.load_state_dict(read_rank_state(info, "method", rank=0))
    method.attach(model)
    return model, method, cfg, info
