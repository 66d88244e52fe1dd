"""DeepSpeed data-parallel engine: the same contract as :class:`system.runtime.engine.LocalEngine`.

DeepSpeed wraps the unwrapped model and *our* torch optimizer (passed as the client
optimizer): with ZeRO stage 0 and fp32 or ``torch_autocast`` precision DeepSpeed steps that
very optimizer object, so ``engine.optimizer`` is the torch optimizer whose per-group
``lr``/``name``/``base_lr`` :func:`system.optim.set_lrs` sets and whose state
:func:`system.pruning.transplant.transplant_optimizer` reads.  Gradients (gate thetas included: they
are in the optimizer) are averaged by DeepSpeed's all-reduce in ``backward``.

After a pruning event :meth:`DeepSpeedEngine.rebuild` destroys the previous DeepSpeed engine
(its hooks on the old module removed, ``destroy()`` called, references dropped, a GC pass)
and initialises a new one around the pruned model and the transplanted optimizer.

The DeepSpeed JSON is derived from the run config by one pure function::

    ds = deepspeed_config(cfg, world_size=2)   # {"train_batch_size": 128, ...}

Precision: ``train.precision=bf16|fp16`` maps to DeepSpeed's ``torch_autocast`` block (fp16 with
a gradient scaler), not to the ``bf16``/``fp16`` blocks: those wrap the optimizer in flat
master-weight copies whose state is no longer per parameter, which pruning must slice.
ZeRO stages >= 1 flatten and partition the optimizer state for the same reason and are refused.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from system.config import ConfigError
from system.runtime.distributed import ensure_process_group
from system.runtime.engine import DistEnv, EngineConfig

log = logging.getLogger(__name__)


def use_environment_extension_dir() -> str | None:
    """Keep DeepSpeed's JIT-built ops (on CPU its ``deepspeed_shm_comm``) inside this Python environment.

    torch builds a JIT extension under ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``)
    in a folder named after the op alone, and rebuilds it (about 65 s here) whenever the cached build was
    made against another environment's torch: two checkouts with two venvs on one machine rebuilt the op
    at every switch. In a virtual environment the ops now go to ``<venv>/torch_extensions``, built once per
    environment; a ``TORCH_EXTENSIONS_DIR`` already set wins, and outside a venv (a GPU machine's system
    Python, say) torch's default stays. Returns the folder in force (None: torch's default).
    """
    if "TORCH_EXTENSIONS_DIR" not in os.environ and sys.prefix != sys.base_prefix:
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")
    return os.environ.get("TORCH_EXTENSIONS_DIR")


#: checkpoint tag used by :meth:`DeepSpeedEngine.save_state` / :meth:`DeepSpeedEngine.load_state`
CHECKPOINT_TAG = "engine"


@dataclass(frozen=True)
class EngineSettings:
    """What this engine reads of a run: its section, the micro-batch, precision and layout."""

    engine: EngineConfig
    micro_batch: int
    precision: str = "fp32"
    channels_last: bool = False

    @classmethod
    def of(cls, cfg: Any) -> EngineSettings:
        """From a run config (or settings already): ``engine``, ``data.batch_size``, ``train.precision``
        and ``train.channels_last``."""
        if isinstance(cfg, EngineSettings):
            return cfg
        return cls(cfg.engine, cfg.data.batch_size, cfg.train.precision, cfg.train.channels_last)


def check_engine_config(cfg: Any, world_size: int, device: torch.device | str) -> None:
    """Raise :class:`ConfigError` naming the key when the engine cannot run ``cfg`` (a run config or
    :class:`EngineSettings`)."""
    device = torch.device(device)
    cfg = EngineSettings.of(cfg)
    e = cfg.engine
    if e.zero_stage != 0:
        raise ConfigError("engine.zero_stage",
                          f"ZeRO stage {e.zero_stage} flattens and partitions the optimizer state, which a pruning "
                          "event must slice per parameter (and the engine rebuild would re-partition); only "
                          "stage 0 is supported: set engine.zero_stage=0")
    if e.global_batch:
        if e.global_batch % world_size:
            raise ConfigError("engine.global_batch",
                              f"{e.global_batch} is not divisible by the world size {world_size}")
        if e.global_batch != cfg.micro_batch * world_size:
            raise ConfigError("engine.global_batch",
                              f"{e.global_batch} contradicts data.batch_size ({cfg.micro_batch}) x world size "
                              f"({world_size}) = {cfg.micro_batch * world_size} (no gradient accumulation); "
                              "set engine.global_batch=0 or make them agree")
    if cfg.precision != "fp32" and device.type != "cuda":
        raise ConfigError("train.precision",
                          f"{cfg.precision} needs a GPU (BatchNorm under low precision fails on CPU); "
                          "use train.precision=fp32 on CPU")
    if e.backend == "nccl" and device.type != "cuda":
        raise ConfigError("engine.backend", "nccl needs a GPU; use engine.backend=gloo (or auto) on CPU")


def deepspeed_config(cfg: Any, world_size: int) -> dict[str, Any]:
    """DeepSpeed's JSON for ``cfg`` at ``world_size`` ranks (pure; the only place it is written).

    Example::

        >>> deepspeed_config(RunConfig(), 2)["train_batch_size"]
        128
    """
    cfg = EngineSettings.of(cfg)
    micro = cfg.micro_batch
    ds: dict[str, Any] = {
        "train_batch_size": micro * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
        "prescale_gradients": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
    if cfg.precision in ("bf16", "fp16"):
        ds["torch_autocast"] = {"enabled": True,
                                "dtype": "bfloat16" if cfg.precision == "bf16" else "float16"}
    return ds


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them after a model of another shape
    is freed, which reads as a slow RSS leak over many rebuilds)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class DeepSpeedEngine:
    """DeepSpeed data parallelism (ZeRO stage 0) around the unwrapped model and torch optimizer.

    Args:
        model: the unwrapped :class:`~system.models.resnet.GatedResNet` (``engine.model`` stays it).
        optimizer: the torch optimizer built by :func:`system.optim.build_optimizer`.
        cfg: :class:`EngineSettings`, or a run config to read them from.
        env: this process's rank and world size.
        device: where the model lives.

    Raises:
        ConfigError: naming the key, for a config this engine cannot run (see :func:`check_engine_config`).
    """

    kind = "deepspeed"

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Any, env: DistEnv,
                 device: torch.device, compiler: Callable[[torch.nn.Module], None] | None = None):
        cfg = EngineSettings.of(cfg)
        check_engine_config(cfg, env.world_size, device)
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
        use_environment_extension_dir()
        import deepspeed  # imported only when this engine is used

        if not log.isEnabledFor(logging.DEBUG):  # DeepSpeed logs every initialize at INFO
            deepspeed.utils.logger.setLevel(logging.WARNING)
        self._deepspeed = deepspeed
        self.cfg, self.env, self.device = cfg, env, device
        self.channels_last = cfg.channels_last
        self.ds_config = deepspeed_config(cfg, env.world_size)
        ensure_process_group(env, device, cfg.engine.backend)
        self._ds: Any = None  # the DeepSpeed engine (untyped)
        self.compiler = compiler  # train.compile: called on every network (system/runtime/compiled.py)
        self.rebuild(model, optimizer)

    # -- lifecycle -------------------------------------------------------------------------
    def rebuild(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Destroy the current DeepSpeed engine (if any) and wrap ``model``/``optimizer`` anew."""
        self._destroy()
        # DeepSpeed broadcasts parameters at initialize and that needs contiguous storage:
        # channels_last is applied after (parameters keep their identity, so the optimizer holds).
        model = model.to(self.device, memory_format=torch.contiguous_format)  # type: ignore[call-overload]
        ds, opt, _, _ = self._deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config,
                                                   dist_init_required=False)
        if opt is not optimizer:  # would break set_lrs and the optimizer transplant
            ds.destroy()
            raise RuntimeError(f"DeepSpeed wrapped the optimizer in {type(opt).__name__}; pruning needs the "
                               "torch optimizer itself (ZeRO stage 0, fp32 or torch_autocast precision)")
        if self.channels_last:
            model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if self.compiler is not None:
            self.compiler(model)  # in place: DeepSpeed calls the module, which runs its compiled forward
        self._ds, self.model, self.optimizer = ds, model, optimizer

    def _destroy(self) -> None:
        """Release the DeepSpeed engine so that nothing keeps the old model or optimizer alive."""
        ds, self._ds = self._ds, None
        if ds is None:
            return
        # the engine's forward hooks on the module close over the engine: a reused module would
        # run every old engine's prologue and keep it alive
        for name in ("module_forward_pre_hook", "module_forward_post_hook", "first_dataloader_check"):
            handle = getattr(ds, name, None)
            if handle is not None and hasattr(handle, "remove"):
                handle.remove()
        ds.destroy()
        for name in ("module", "optimizer", "basic_optimizer", "client_model_parameters", "lr_scheduler"):
            if hasattr(ds, name):
                try:
                    setattr(ds, name, None)
                except Exception:  # some are read-only properties
                    pass
        del ds
        gc.collect()
        _trim_heap()

    def close(self) -> None:
        self._destroy()

    # -- a step ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._ds(x)

    def backward(self, loss: torch.Tensor) -> None:
        self._ds.backward(loss)  # all-reduces (averages) the gradients across ranks

    def grad_scale(self) -> float:
        """The loss scale the gradients carry between backward and step (fp16 under ZeRO 0 with
        ``torch_autocast`` scales the loss with a GradScaler and unscales only inside ``step``)."""
        scaler = getattr(self._ds, "torch_autocast_z0_gradscaler", None)
        return float(scaler.get_scale()) if scaler is not None else 1.0

    def step(self) -> None:
        self._ds.step()  # optimizer step (lrs as set_lrs left them) + zero_grad
        self.optimizer.zero_grad(set_to_none=True)

    # -- checkpoint contract ---------------------------------------------------------------
    def save_state(self, directory: Path) -> None:
        """DeepSpeed checkpoint of model + optimizer under ``directory/engine`` (all ranks call)."""
        self._ds.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, client_state={"kind": self.kind},
                                 save_latest=False)

    def load_state(self, directory: Path) -> None:
        """Load what :meth:`save_state` wrote; the model must already have the saved spec."""
        path, _ = self._ds.load_checkpoint(str(directory), tag=CHECKPOINT_TAG, load_optimizer_states=True,
                                           load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed engine checkpoint '{CHECKPOINT_TAG}' in {directory}")


def saved_model_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The model weights :meth:`DeepSpeedEngine.save_state` wrote under ``directory`` (DeepSpeed's
    model-states file of tag ``engine``), on the CPU, without DeepSpeed."""
    return torch.load(Path(directory) / CHECKPOINT_TAG / "mp_rank_00_model_states.pt", map_location="cpu",
                      weights_only=True)["module"]
