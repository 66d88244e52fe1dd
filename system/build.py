"""The one way to build a run's parts from its config: the trainer, preflight, export and the benches
all call these, so the parts they get are the same.

The resume order (what :class:`system.trainer.Trainer` does with them)::

    spec   = checkpoint.spec if resuming else initial_spec(cfg.model.init_from, dense_spec_for(cfg, num_classes))
    model  = build_network(cfg, spec, device)            # zero_init_residual applied
    init_network(model, cfg.model.init_from)              # a fresh run with model.init_from (and init_weights) only
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

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipelines.loaders import build_loader
from system.config import ConfigError, from_dict
from system.export import SPEC, WEIGHTS
from system.models.resnet import GatedResNet, build_model, gates_of, zero_init_residual
from system.models.spec import ArchSpec, dense_spec
from system.optim import OptimConfig, build_optimizer, resolve_restart
from system.pruning.methods import Method, build_method
from system.pruning.methods.base import smallest_macs_frac
from system.run_config import RunConfig
from system.runtime.checkpoint import MANIFEST, CheckpointError, CheckpointInfo, read_rank_state, verify
from system.runtime.engine import DistEnv, Engine, LocalEngine, saved_model_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunShape:
    """How long a run is, from its config and its training data."""

    steps_per_epoch: int
    num_classes: int
    total_steps: int  # train.epochs x steps_per_epoch, at most train.max_steps
    global_batch: int  # data.batch_size x ranks


def run_shape(cfg: RunConfig, env: DistEnv) -> RunShape:
    """The run's shape; a batch larger than the training set is a :class:`ConfigError` naming ``data.batch_size``."""
    probe = build_loader(cfg.data, "train", env.rank, env.world_size, cfg.train.seed, 0)
    if probe.batches_per_epoch == 0:
        raise ConfigError("data.batch_size", f"{cfg.data.batch_size} x {env.world_size} ranks exceeds the "
                          f"{probe.num_samples} training samples in {cfg.data.root}")
    total = cfg.train.epochs * probe.batches_per_epoch
    return RunShape(probe.batches_per_epoch, probe.num_classes,
                    min(total, cfg.train.max_steps) if cfg.train.max_steps else total,
                    cfg.data.batch_size * env.world_size)


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


def _in_bundle(p: Path, name: str) -> Path | None:
    """File ``name`` of the bundle ``p`` names: a run directory (its ``final/``) or the bundle folder itself."""
    return next((d / name for d in (p / "final", p) if (d / name).is_file()), None) if p.is_dir() else None


def initial_weights(source: str | Path) -> dict[str, torch.Tensor]:
    """The tensors ``model.init_from`` names: a ``.safetensors`` file, a torch state-dict file (also one
    wrapped as ``{"state_dict": ...}`` or ``{"model": ...}``, ``module.`` prefixes dropped), a run directory
    or its ``final/``, or a checkpoint directory (verified, read by its engine's reader)."""
    p = Path(source)
    key = "model.init_from"
    if not p.exists():
        raise ConfigError(key, f"{p} does not exist")
    if p.is_dir():
        if (p / MANIFEST).is_file():
            try:
                return saved_weights(verify(p))
            except CheckpointError as exc:
                raise ConfigError(key, str(exc)) from None
        weights = _in_bundle(p, WEIGHTS)
        if weights is not None:
            return load_file(str(weights))
        raise ConfigError(key, f"{p} is neither a finished run (no final/{WEIGHTS}), an export, nor a checkpoint")
    if p.suffix == ".safetensors":
        return load_file(str(p))
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(key, f"{p} is not a state-dict file torch can read safely: {exc}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(key, f"{p} holds no state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def initial_spec(source: str, dense: ArchSpec) -> ArchSpec:
    """The network a fresh run with ``model.init_from`` starts as: the source's own (pruned) shape when it
    says it (a run, its ``final/`` or a checkpoint: their ``spec.json``), else ``dense``; its input size is the
    run's (it only counts MACs).

    Raises:
        ConfigError: naming ``model.init_from`` and the file: another architecture or class count.
    """
    if not source:
        return dense
    p = Path(source)
    spec_file = _in_bundle(p, SPEC)
    if spec_file is None:
        return dense
    spec = ArchSpec.from_dict(json.loads(spec_file.read_text()))
    if (spec.name, spec.in_channels) != (dense.name, dense.in_channels):
        raise ConfigError("model.init_from", f"{spec_file} is a {spec.name} on {spec.in_channels} input channels; "
                                             f"this run trains a {dense.name} on {dense.in_channels} (model.name)")
    if spec.num_classes != dense.num_classes:
        raise ConfigError("model.init_from", f"{spec_file}: {spec.num_classes} classes; this run's data has "
                                             f"{dense.num_classes}")
    return dataclasses.replace(spec, input_size=dense.input_size)


def init_network(model: GatedResNet, source: str) -> None:
    """Load ``model.init_from`` (``source``; nothing when empty) into ``model`` (built as :func:`initial_spec`
    says): every weight and BN statistic; gate parameters start fresh.

    Raises:
        ConfigError: naming ``model.init_from`` and the file: a missing or unreadable source, weights it lacks
            (another architecture), another class count, or shapes that differ (a pruned network given
            as a bare weights file: give its ``final/``, whose ``spec.json`` says its shape).
    """
    if not source:
        return
    state = initial_weights(source)
    own = model.state_dict()
    gate_params = {f"{n}.{p}" for n, g in gates_of(model).items() for p, _ in g.named_parameters()}
    wanted = [k for k in own if k not in gate_params and not k.endswith("num_batches_tracked")]
    missing = [k for k in wanted if k not in state]
    if missing:
        raise ConfigError("model.init_from", f"{source} lacks {len(missing)} of the {len(wanted)} weights of "
                                             f"{model.arch_name} (e.g. {', '.join(missing[:3])}): another "
                                             f"architecture?")
    if tuple(state["fc.weight"].shape) != tuple(own["fc.weight"].shape):
        raise ConfigError("model.init_from", f"{source}: {state['fc.weight'].shape[0]} classes; this run's data "
                                             f"has {own['fc.weight'].shape[0]}")
    differ = [k for k in wanted if tuple(state[k].shape) != tuple(own[k].shape)]
    if differ:
        k = differ[0]
        raise ConfigError("model.init_from", f"{source}: {len(differ)} weights differ in shape from the "
                                             f"{model.arch_name} this run builds (e.g. {k}: {tuple(state[k].shape)} "
                                             f"against {tuple(own[k].shape)}): a pruned network as a bare weights "
                                             f"file? give its final/ folder, whose spec.json says its shape")
    model.load_state_dict({k: state[k] for k in own if k in state and k not in gate_params}, strict=False)
    log.info("model.init_from: %s: %d tensors loaded into %s", source, len(wanted), model.arch_name)


def build_pruning_method(cfg: RunConfig, total_steps: int, model: GatedResNet | None = None) -> Method:
    """The ``method.*`` plug-in for a run of ``total_steps``; with ``model``, checked against it (a
    model it cannot prune is a :class:`ConfigError` naming ``method.name``, or the key it names; a
    ``method.target_macs`` below every plan's reach names that key)."""
    method = build_method(cfg.method, total_steps, weight_decay=cfg.optim.weight_decay)
    if model is not None:
        try:
            method.check_model(model)
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError("method.name", str(exc)) from None
        target = cfg.method.target_macs
        if target is not None:  # against the dense network (a resumed model is already pruned)
            floor = smallest_macs_frac(dense_spec_for(cfg, model.spec().num_classes))
            if target < floor:
                raise ConfigError("method.target_macs", f"{target} is below the smallest network method "
                                  f"'{cfg.method.name}' can reach on {cfg.model.name}: {floor:.4f} of the dense MACs "
                                  f"(every residual block removed; the stem, projection shortcuts and classifier stay)")
    return method


def build_schedule(cfg: RunConfig, method: Method, total_steps: int, steps_per_epoch: int) -> OptimConfig:
    """``optim.*`` with ``restart_at: final`` resolved to where ``method``'s architecture becomes final."""
    return resolve_restart(cfg.optim, method.final_step, total_steps, steps_per_epoch)


def build_opt(cfg: RunConfig, model: GatedResNet, method: Method, global_batch: int) -> torch.optim.Optimizer:
    """The optimizer of ``optim.*`` with the method's theta groups (attach the method first)."""
    return build_optimizer(model, cfg.optim, method.theta_lrs(), global_batch, method.decay_exempt(model),
                           method.theta_momentum())


def build_engine(cfg: RunConfig, model: GatedResNet, opt: torch.optim.Optimizer, env: DistEnv,
                 device: torch.device) -> Engine:
    """The engine ``engine.kind`` picks (``auto``: DeepSpeed on more than one rank); with ``train.compile`` it
    compiles every network it is given (:mod:`system.runtime.compiled`)."""
    compiler = None
    if cfg.train.compile:
        from system.runtime.compiled import Compiler, check_backend

        check_backend(cfg.train.compile_backend, device)
        compiler = Compiler(cfg.train.compile_backend)
    kind = cfg.engine.kind
    if kind == "deepspeed" or (kind == "auto" and env.world_size > 1):
        from system.runtime.engine_ds import DeepSpeedEngine, EngineSettings  # imported only when used

        return DeepSpeedEngine(model, opt, EngineSettings.of(cfg), env, device, compiler)
    return LocalEngine(model, opt, device, cfg.train.precision, cfg.train.channels_last, compiler)


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
