"""The training loop that drives a pruning method, on one process or under an engine.

``Trainer(cfg).run()`` trains, lets the method prune through the coordinator, evaluates,
exports ``final/`` and writes ``summary.json``.  The loop holds no method-specific logic:
it raises :class:`~system.pruning.methods.Event` s and applies the plans the coordinator agrees on.

The run is built once, in ``__init__``: with ``run.resume``, the checkpoint's architecture and
method state are read first, so the (already pruned) model, its optimizer and its engine are
built once and then loaded.  The parts that carry state (loop state, method, model buffers,
RNG, coordinator events, tracking run, engine) save and restore their own state; the
:class:`~system.runtime.checkpoint.Checkpointer` moves those states to and from disk.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pipelines.loaders import build_loader, class_names
from system import report
from system import tracking as T
from system.build import build_engine, build_network, build_opt, build_pruning_method, dense_spec_for
from system.config import flatten, to_dict
from system.evaluation import accuracy, plain_forward
from system.export import save_deployed
from system.io import atomic_write_json
from system.latency import measure_latency
from system.models.resnet import GatedResNet, build_model
from system.models.spec import ArchSpec
from system.optim import set_lrs
from system.progress import progress
from system.pruning.complexity import count
from system.pruning.methods import Batch, Event, StepContext
from system.run_config import RunConfig
from system.runtime import preemption
from system.runtime.checkpoint import Checkpointer, ModelBuffers, RngState, Value
from system.runtime.collectives import Collectives
from system.runtime.coordinator import Coordinator
from system.runtime.engine import DistEnv, Engine, pick_device
from system.runtime.faults import ENV_STOP, Faults, InjectedStop
from system.runtime.rundir import RunLock, claim, remove_empty
from system.skips import SkipLimitExceeded, SkipWatch
from system.state import LoopState, rng_neutral, seed_everything, seed_rank_stream, widths_of
from system.tracking.secrets import redacted

log = logging.getLogger(__name__)


class Trainer:
    """Builds everything from a :class:`RunConfig` and runs it."""

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
        """Everything after the run directory: data, model, method, optimizer, engine (resumed ones
        from their checkpoint), tracker."""
        cfg = self.cfg
        seed_everything(cfg.train.seed)

        probe = build_loader(cfg.data, "train", self.env.rank, self.env.world_size, cfg.train.seed, 0)
        self.steps_per_epoch = probe.batches_per_epoch
        if self.steps_per_epoch == 0:
            raise ValueError(f"config key 'data.batch_size': {cfg.data.batch_size} x {self.env.world_size} ranks "
                             f"exceeds the {probe.num_samples} training samples in {cfg.data.root}")
        self.num_classes = probe.num_classes
        total = cfg.train.epochs * self.steps_per_epoch
        self.total_steps = min(total, cfg.train.max_steps) if cfg.train.max_steps else total
        self.global_batch = cfg.data.batch_size * self.env.world_size

        self.dense = dense_spec_for(cfg, self.num_classes)
        self.dense_macs, self.dense_params = count(self.dense)

        # resuming: the checkpoint's architecture and method state first, so the run is built once
        self.checkpointer = Checkpointer(cfg.checkpoint, self.run_dir, self.env.rank, self.env.world_size,
                                         self.comm, self.faults)
        resume = self.checkpointer.find(cfg.run.resume)
        if resume is not None:
            self.checkpointer.check_fits(resume, config=to_dict(cfg), global_batch=self.global_batch,
                                         per_rank_batch=cfg.data.batch_size, total_steps=self.total_steps)
        model = build_network(cfg, resume.spec if resume else self.dense, self.device)  # method state: same device
        self.method = build_pruning_method(cfg, self.total_steps, model)
        if resume is not None:
            self.method.load_state_dict(self.checkpointer.rank_state(resume, "method"))
        self.method.attach(model)
        seed_rank_stream(cfg.train.seed, self.env.rank)  # gate samples: per rank (docs/method.md section 1)
        opt = build_opt(cfg, model, self.method, self.global_batch)
        self.engine: Engine = (engine_factory or self._default_engine)(model, opt)
        self.state = LoopState()
        self.tracking_run = Value(run_id="")
        self.skips = SkipWatch(self.comm, cfg.data.max_skip_frac)
        self.rng = RngState()
        if resume is not None:
            parts = {k: v for k, v in self._rank_parts().items() if k != "method"}  # loaded above
            self.checkpointer.restore(resume, self.engine, parts, self._run_parts(), seed=cfg.train.seed)
        self.tracker = T.make_tracker(cfg.tracking, self.env.rank, cfg.run.root, self.run_dir) \
            if cfg.tracking.enabled else T.NullTracker()
        self._t_start = 0.0

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

    def current_macs(self) -> int:
        """MACs of the network as it is now (cached per spec; the spec changes at every pruning event)."""
        spec = self.spec()
        if getattr(self, "_macs_spec", None) is not spec:
            self._macs_spec, (self._macs, self._params) = spec, count(spec)
        return self._macs

    def current_params(self) -> int:
        self.current_macs()
        return self._params

    # ------------------------------------------------------------------ one step
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        cfg = self.cfg
        model = self.model
        model.train()
        lr = set_lrs(self.engine.optimizer, cfg.optim, self.state.step, self.total_steps, self.steps_per_epoch,
                     self.method.theta_active(self.state.step))
        self._lr = lr
        logits = self.engine.forward(x)

        def per_example(lg: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(lg.float(), t, label_smoothing=cfg.optim.label_smoothing, reduction="none")

        losses = per_example(logits, y)
        loss = losses.mean()
        total = loss
        batch = Batch(x=x, y=y, forward=self.engine.forward, loss_fn=per_example, per_example_loss=losses)
        for term in self.method.loss_terms(model, self.state.step, batch):
            total = total + term
        self.engine.backward(total)
        self.method.after_backward(model, grad_scale=self.engine.grad_scale())
        self.engine.step()
        self.method.after_step(model)
        macs = self.current_macs()
        # forward + backward ~ 3 forwards; an estimator's extra forwards (no backward) count once each
        self.state.train_macs += (3.0 + self.method.extra_forwards()) * macs * self.global_batch
        self.state.train_macs_dense += 3.0 * self.dense_macs * self.global_batch
        self.state.step += 1
        return float(loss.detach())

    def maybe_prune(self, event: Event) -> None:
        """The decision of ``event`` (sync -> decide -> agree -> apply), for the events the method
        declares: for any other, no collective runs."""
        if event not in self.method.events:
            return
        ctx = StepContext(step=self.state.step, epoch=self.state.epoch, total_steps=self.total_steps, model=self.model)
        plan = self.coord.decide(self.method, self.model, lambda: self.method.decide(event, ctx))
        if plan is None:
            return
        ev = self.coord.apply(plan, self.engine, self.method, self.state.step)
        s = self.state
        s.prune_events += 1
        s.channels_removed += ev.channels
        s.blocks_removed += ev.blocks
        spec = self.spec()
        macs, params = count(spec)
        s.width_history.append((s.step, widths_of(spec)))
        self.tracker.log_metrics({T.PRUNE_EVENTS: s.prune_events, T.PRUNE_CHANNELS_REMOVED: s.channels_removed,
                                  T.PRUNE_BLOCKS_REMOVED: s.blocks_removed, T.PRUNE_REBUILD_S: ev.rebuild_s,
                                  T.MODEL_MACS: macs, T.MODEL_PARAMS: params}, step=s.step)
        self.tracker.log_dict(spec.to_dict(), f"specs/step{s.step:08d}.json")

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, net: GatedResNet | None = None) -> dict[str, float]:
        """Top-1/top-5/loss on ``data.eval_split``: of the training model under the method's eval
        gates, or of ``net`` (the deployed network) when given."""
        cfg = self.cfg
        loader = build_loader(cfg.data, cfg.data.eval_split, self.env.rank, self.env.world_size, cfg.train.seed, 0,
                              device=self.device)
        model = self.model if net is None else net
        forward = self.engine.forward if net is None else \
            plain_forward(net, self.device, cfg.train.precision, cfg.train.channels_last)
        was_training = model.training
        model.eval()
        with self.method.eval_gates(model):
            res = accuracy(forward, loader, cfg.train.eval_batches, self.comm.sum_scalars)
        model.train(was_training)
        self.state.last_eval = res
        self.state.best_top1 = max(self.state.best_top1, res["top1"])
        self.tracker.log_metrics({T.VAL_TOP1: res["top1"], T.VAL_TOP5: res["top5"], T.VAL_LOSS: res["loss"]},
                                 step=self.state.step)
        log.info("step %d: val top1 %.4f top5 %.4f loss %.4f (%d images)", self.state.step, res["top1"],
                 res["top5"], res["loss"], res["n"])
        return res

    # ------------------------------------------------------------------ the run
    def _start_tracking(self) -> None:
        cfg = self.cfg
        run_id = self.tracking_run["run_id"] or None
        params = flatten(redacted(to_dict(cfg)))  # no password, token or URL login in the params
        tags = {T.TAG_METHOD: cfg.method.display, T.TAG_MODEL: cfg.model.name,
                T.TAG_WORLD_SIZE: self.env.world_size, T.TAG_DEVICE: str(self.device),
                T.TAG_CODE_VERSION: T.code_version(), **T.standard_tags()}
        self.run_id = self.tracker.start(self.run_dir.name, params=params, tags=tags, run_id=run_id)
        self.tracking_run["run_id"] = self.run_id or run_id or ""
        self.tracker.log_artifact(self.run_dir / T.CONFIG_ARTIFACT)  # the resolved config, as written

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.env.rank == 0:
            atomic_write_json(self.run_dir / "config.json", redacted(to_dict(cfg)))  # secrets masked
        self._start_tracking()
        s = self.state
        if not s.width_history:
            s.width_history.append((0, widths_of(self.spec())))
            # a fresh run: the model.macs curve starts at the dense network
            self.tracker.log_metrics({T.MODEL_MACS: self.current_macs(), T.MODEL_PARAMS: count(self.spec())[1]},
                                     step=s.step)
        self._t_start = time.perf_counter() - s.wall_s
        status = "FAILED"
        try:
            try:
                self._loop()
                status = "FINISHED"
            except (preemption.Preempted, SystemExit, KeyboardInterrupt):  # incl. faults.InjectedStop
                status = "KILLED"  # resumed later into the same MLflow run
                raise
            finally:
                if status != "FINISHED":
                    self.tracker.end("FAILED" if status == "FAILED" else status)
            summary = self.finish()
        finally:
            if self.lock is not None:
                self.lock.release()
        return summary

    def _progress(self, total: int, initial: int):
        if self.cfg.train.progress and self.env.rank == 0:
            return progress(total, initial, self.cfg.train.progress_interval_s)
        return contextlib.nullcontext()

    def _loop(self) -> None:
        cfg, s = self.cfg, self.state
        eval_every = cfg.train.eval_every_steps
        t_log, n_log = time.perf_counter(), 0
        with self._progress(self.total_steps, s.step) as bar:
            while s.step < self.total_steps and s.epoch < cfg.train.epochs:
                loader = build_loader(cfg.data, "train", self.env.rank, self.env.world_size, cfg.train.seed,
                                      s.epoch, start_batch=s.batch, device=self.device)
                batches = rng_neutral(loader)
                self.skips.new_epoch()
                for x, y in batches:
                    loss = self.train_step(x, y)
                    s.batch += 1
                    n_log += 1
                    if bar is not None and hasattr(bar, "update"):
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss:.3f}", macs=f"{self.current_macs() / 1e6:.1f}M")
                    if s.step % cfg.train.log_every_steps == 0:
                        dt = time.perf_counter() - t_log
                        self.tracker.log_metrics({T.TRAIN_LOSS: loss, T.TRAIN_LR: self._lr,
                                                  T.TRAIN_TOTAL_IPS: n_log * self.global_batch / max(dt, 1e-9),
                                                  T.TRAIN_CUMULATIVE_MACS: s.train_macs,
                                                  # the model's size at every interval: a step function
                                                  T.MODEL_MACS: self.current_macs(),
                                                  T.MODEL_PARAMS: self.current_params()}, step=s.step)
                        t_log, n_log = time.perf_counter(), 0
                        self._check_skips(loader)
                    if self.method.check_due(s.step):
                        self.maybe_prune(Event.STEP_END)
                    if eval_every and s.step % eval_every == 0:
                        self.evaluate()
                    s.wall_s = time.perf_counter() - self._t_start
                    if self.lock is not None:
                        self.lock.heartbeat()
                    self._after_step_checkpoint()
                    if s.step >= self.total_steps:
                        break
                    if preemption.watching() and self.comm.any_flag(preemption.stop_requested()):
                        self._stop_agreed()
                batches.close()
                self._check_skips(loader)
                if s.batch >= loader.batches_per_epoch:
                    self.maybe_prune(Event.EPOCH_END)
                    s.epoch += 1
                    s.batch = 0
                    if not eval_every:
                        self.evaluate()
                    if cfg.checkpoint.at_epoch_end:
                        self.save_checkpoint("epoch_end")

    def _check_skips(self, loader) -> None:
        """Count the unreadable samples (all ranks); over ``data.max_skip_frac``: checkpoint, then stop."""
        new, over = self.skips.check(loader)
        if new:
            self.state.samples_skipped += new
            self.tracker.log_metrics({T.DATA_SAMPLES_SKIPPED: self.state.samples_skipped}, step=self.state.step)
        if over is not None:
            path = self.save_checkpoint("skip_limit")
            raise SkipLimitExceeded(f"{over}. Checkpoint {path} is saved: check the shards (python -m "
                                    f"pipelines.verify {self.cfg.data.root}), then resume with run.resume=auto")

    def _after_step_checkpoint(self) -> None:
        step = self.state.step
        stop = self.faults.stops_after(step)
        if self.checkpointer.due(step) or stop:
            self.save_checkpoint("stop" if stop else "every_steps")
        if stop:
            log.warning("%s=%d: stopping after the checkpoint of step %d (fault injection)", ENV_STOP,
                        self.faults.stop_after_step, step)
            raise InjectedStop(step)

    def _stop_agreed(self) -> None:
        """Every rank agreed to stop (preemption): save together at this step, then raise Preempted."""
        s = self.state
        if self.checkpointer.last_step != s.step:
            self.save_checkpoint("preempted")
        path = str(self.checkpointer.root / f"step-{s.step:08d}")
        log.warning("stop requested (%s): checkpoint of step %d saved, stopping", preemption.reason() or
                    "on another rank", s.step)
        raise preemption.Preempted(s.step, path, preemption.reason())

    def finish(self) -> dict[str, Any]:
        """The final event (through decide -> agree -> apply like every other), the deployed network's
        evaluation, export, latency, summary.json and the tracker's final records (:mod:`system.report`)."""
        cfg, s = self.cfg, self.state
        self.maybe_prune(Event.FINAL)
        # the summary's top-1 is measured on exactly the network that is exported and counted
        deployed = report.deploy(self.model, self.method, cfg.run.export_gates)
        res = self.evaluate(net=deployed)
        s.wall_s = time.perf_counter() - self._t_start
        final_spec = deployed.spec()
        latency: dict[str, Any] = {}
        if self.env.rank == 0:
            save_deployed(deployed, self.run_dir / "final", classes=class_names(cfg.data),
                          preprocess=report.preprocess_of(cfg.data))
            # on the CPU, the deployed network against the dense one, in this process
            latency = measure_latency(deployed, build_model(self.dense, gates=False),
                                      (final_spec.in_channels, final_spec.input_size, final_spec.input_size),
                                      cfg.latency)
        s.width_history.append((s.step, widths_of(final_spec)))
        summary = report.summary_of(
            cfg, s, final_spec, count(final_spec), (self.dense_macs, self.dense_params), res,
            epochs=round(s.step / max(1, self.steps_per_epoch), 3), world_size=self.env.world_size,
            device=str(self.device), run_dir=str(self.run_dir), run_id=getattr(self, "run_id", None),
            method_details=self.method.summary(), mlflow_run_url=self.tracker.run_url(), **latency)
        if self.env.rank == 0:
            atomic_write_json(self.run_dir / "summary.json", summary)
            report.log_final(self.tracker, summary, deployed, self.run_dir, s.step, s.width_history,
                             cfg.tracking.register_as)
        self.engine.close()
        return summary
