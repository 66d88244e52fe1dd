"""A run's parts, built once from its config: the run directory (claimed), the run's shape, the
model, the method, the optimizer and the engine, the loop state, the tracker, and the checkpointer.

With ``run.resume``, the checkpoint's architecture and method state are read first, so the (already
pruned) model, its optimizer and its engine are built once and then loaded (the resume order of
:mod:`system.build`).  The parts that carry state (loop state, method, model buffers, RNG,
coordinator events, tracking run, engine) save and restore their own state; the
:class:`~system.runtime.checkpoint.Checkpointer` moves those states to and from disk.
:class:`system.trainer.Trainer` runs the loop on them.
"""

from __future__ import annotations

import logging
from dataclasses import astuple
from pathlib import Path
from typing import Any

import torch

from system import tracking as T
from system.build import (
    build_engine,
    build_network,
    build_opt,
    build_pruning_method,
    build_schedule,
    dense_spec_for,
    init_network,
    initial_spec,
    run_shape,
)
from system.config import to_dict
from system.models.resnet import GatedResNet
from system.models.spec import ArchSpec
from system.pruning.complexity import count
from system.run_config import RunConfig
from system.runtime.checkpoint import Checkpointer, ModelBuffers, RngState, Value
from system.runtime.collectives import Collectives
from system.runtime.coordinator import Coordinator
from system.runtime.engine import DistEnv, Engine, pick_device
from system.runtime.faults import Faults
from system.runtime.rundir import RunLock, claim, remove_empty
from system.skips import SkipWatch
from system.state import LoopState, seed_everything, seed_rank_stream
from system.step_log import StepLog

log = logging.getLogger(__name__)


class Run:
    """A run's parts, built once from its :class:`RunConfig` (and its checkpoint, resuming)."""

    def __init__(self, cfg: RunConfig, env: DistEnv | None = None, engine_factory=None,
                 faults: Faults | None = None):
        """``engine_factory(model, optimizer) -> Engine`` replaces the engine ``engine.kind`` picks;
        ``faults``: injected faults (default: from the environment, see :mod:`system.runtime.faults`)."""
        self.cfg = cfg
        self.env = env or DistEnv.from_environ()
        self.faults = faults if faults is not None else Faults.from_environ()
        self.device = pick_device(cfg.train.device, self.env.local_rank)
        if cfg.train.threads and self.device.type == "cpu":
            torch.set_num_threads(cfg.train.threads)
        self.comm = Collectives(self.env.rank, self.env.world_size, self.device)
        self.coord = Coordinator(self.comm)
        self.lock: RunLock | None = None
        self._made_dirs: list[Path] = []
        self.run_dir = self._run_dir()
        try:
            self._build(engine_factory)
        except BaseException:
            self._abandon()  # a run that could not be built leaves nothing behind
            raise

    def _build(self, engine_factory) -> None:
        """Everything after the run directory, in the resume order of :mod:`system.build`: the checkpoint's
        architecture and method state first, so the (pruned) model, optimizer and engine are built once."""
        cfg, env = self.cfg, self.env
        seed_everything(cfg.train.seed)
        self.steps_per_epoch, self.num_classes, self.total_steps, self.global_batch = astuple(run_shape(cfg, env))
        self.dense = dense_spec_for(cfg, self.num_classes)
        self.dense_macs, self.dense_params = count(self.dense)
        self.checkpointer = Checkpointer(cfg.checkpoint, self.run_dir, env.rank, env.world_size, self.comm,
                                         self.faults)
        resume = self.checkpointer.find(cfg.run.resume)
        if resume is not None:
            self.checkpointer.check_fits(resume, config=to_dict(cfg), global_batch=self.global_batch,
                                         per_rank_batch=cfg.data.batch_size, total_steps=self.total_steps)
        start = resume.spec if resume else initial_spec(cfg.model.init_from, self.dense)  # init_from: its shape
        model = build_network(cfg, start, self.device)  # method state: same device
        if resume is None and cfg.model.init_weights:
            init_network(model, cfg.model.init_from)  # trained weights to start from (model.init_from)
        self.method = build_pruning_method(cfg, self.total_steps, model)
        if resume is not None:
            self.method.load_state_dict(self.checkpointer.rank_state(resume, "method"))
        self.method.attach(model)
        # the learning-rate schedule, with restart_at: final resolved to where this method's architecture is final
        self.schedule = build_schedule(cfg, self.method, self.total_steps, self.steps_per_epoch)
        if self.schedule.restart_at:
            log.info("learning rate: the cosine restarts at %.3f of the steps after the warm-up (optim.restart_at=%s)",
                     self.schedule.restart_at, cfg.optim.restart_at)
        seed_rank_stream(cfg.train.seed, env.rank)  # gate samples: per rank (docs/method.md section 1)
        opt = build_opt(cfg, model, self.method, self.global_batch)
        self.engine: Engine = (engine_factory or self._default_engine)(model, opt)
        self.state, self.rng, self.tracking_run = LoopState(), RngState(), Value(run_id="")
        self.skips = SkipWatch(self.comm, cfg.data.max_skip_frac)
        if resume is not None:
            parts = {k: v for k, v in self._rank_parts().items() if k != "method"}  # loaded above
            self.checkpointer.restore(resume, self.engine, parts, self._run_parts(), seed=cfg.train.seed)
        self.tracker = T.make_tracker(cfg.tracking, env.rank, cfg.run.root, self.run_dir) \
            if cfg.tracking.enabled else T.NullTracker()
        self.steps = StepLog(self.tracker, cfg.train.log_every_steps, self.total_steps, self.global_batch)
        self._t_start, self._lr = 0.0, 0.0

    # ------------------------------------------------------------------ checkpointed parts
    def _rank_parts(self) -> dict[str, Any]:
        """Saved by every rank (``<name>_rank{r}.pt``); ``rng`` is restored last."""
        return {"method": self.method, "buffers": ModelBuffers(lambda: self.model), "rng": self.rng}

    def _run_parts(self) -> dict[str, Any]:
        """Saved once, in the manifest."""
        return {"loop": self.state, "coordinator": self.coord, "tracking": self.tracking_run}

    def save_checkpoint(self, reason: str) -> Path:
        """A checkpoint of this step (every rank calls this)."""
        cfg, s = self.cfg, self.state
        meta = {"step": s.step, "epoch": s.epoch, "batch": s.batch, "global_batch": self.global_batch,
                "per_rank_batch": cfg.data.batch_size, "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps, "samples_in_epoch": s.batch * self.global_batch,
                "engine": getattr(self.engine, "kind", type(self.engine).__name__), "method": cfg.method.name,
                "config": to_dict(cfg)}
        return self.checkpointer.save(self.engine, self.spec(), meta, self._rank_parts(), self._run_parts(), reason)

    # ------------------------------------------------------------------ set-up helpers
    def _run_dir(self) -> Path:
        """Rank 0 claims the directory (:func:`system.runtime.rundir.claim`); every rank gets its path."""
        c = self.cfg.run
        base = Path(c.dir) if c.dir else Path(c.root) / (c.name or f"{self.cfg.method.display}-{self.cfg.model.name}")
        claimed = claim(base, explicit=bool(c.dir), resume=c.resume, rank=self.env.rank,
                        broadcast=self.comm.broadcast_object)
        self.lock, self._made_dirs = claimed.lock, claimed.made
        return claimed.path

    def _abandon(self) -> None:
        """Release the run directory, and remove what this run created if nothing else was written."""
        if self.lock is not None:
            self.lock.release()
        remove_empty(self._made_dirs)

    def _default_engine(self, model, opt) -> Engine:
        return build_engine(self.cfg, model, opt, self.env, self.device)

    @property
    def model(self) -> GatedResNet:
        model = self.engine.model
        assert isinstance(model, GatedResNet)
        return model

    def spec(self) -> ArchSpec:
        return self.model.spec()

    def current_size(self) -> tuple[int, int]:
        """(MACs, params) of the network as it is now (cached per spec: it changes at every pruning event)."""
        spec = self.spec()
        if getattr(self, "_size_spec", None) is not spec:
            self._size_spec, self._size = spec, count(spec)
        return self._size

