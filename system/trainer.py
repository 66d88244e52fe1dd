"""The training loop that drives a pruning method, on one process or under an engine.

``Trainer(cfg).run()`` trains, lets the method prune through the coordinator, evaluates,
exports ``final/`` and writes ``summary.json``.  The loop holds no method-specific logic:
it raises events and applies the plans the coordinator agrees on.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.loaders import build_loader
from system.complexity import count
from system.config import ConfigError, flatten, to_dict
from system.coordinator import Coordinator
from system.engine import DistEnv, LocalEngine, pick_device
from system.export import deploy_model, save_deployed
from system.io import atomic_write_json
from system.methods import StepContext, build_method
from system.models.resnet import GatedResNet, build_model
from system.models.spec import ArchSpec, dense_spec
from system.optim import build_optimizer, set_lrs
from system import preemption
from system import tracking as T
from system.run_config import RunConfig

log = logging.getLogger(__name__)

#: a run with ``method.target_macs`` reached it when its final MACs fraction is this close
TARGET_TOLERANCE = 0.05


@dataclass
class LoopState:
    """Everything about progress that a checkpoint must restore."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches of ``epoch`` already consumed
    train_macs: float = 0.0
    train_macs_dense: float = 0.0
    prune_events: int = 0
    channels_removed: int = 0
    blocks_removed: int = 0
    wall_s: float = 0.0
    best_top1: float = 0.0
    last_eval: dict = field(default_factory=dict)
    width_history: list = field(default_factory=list)  # [(step, {gate: width})]


def seed_everything(seed: int) -> None:
    """The same stream on every rank: the weights are initialised identically everywhere."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))


def seed_rank_stream(seed: int, rank: int) -> None:
    """After the weights exist: each rank's own torch stream, so gate samples differ across ranks."""
    torch.manual_seed((seed * 1_000_003 + rank * 7_919 + 1) % (2**63))


def widths_of(spec: ArchSpec) -> dict[str, int]:
    out = {}
    for name, _, _, blk in spec.iter_blocks():
        for i, w in enumerate(blk.inner):
            out[f"{name}.conv{i + 1}"] = 0 if blk.removed else w
    return out


def rng_neutral(loader):
    """Iterate ``loader`` without advancing the global torch RNG.

    Starting a DataLoader iterator draws its worker seeds from the global generator, which the
    gates sample from; isolating it makes gate samples depend on the steps taken only, so a run
    resumed mid-epoch samples exactly like the uninterrupted one (augmentation is seeded per sample).
    """
    it = iter(loader)
    try:
        while True:
            with torch.random.fork_rng(devices=[]):
                try:
                    item = next(it)
                except StopIteration:
                    return
            yield item
    finally:
        # shut the loader's workers (and pin-memory thread) down now, not at interpreter exit:
        # a DataLoader left half-iterated with pinned memory can hang the process at exit
        close = getattr(it, "close", None)
        if close is not None:
            close()


class Trainer:
    """Builds everything from a :class:`RunConfig` and runs it."""

    def __init__(self, cfg: RunConfig, env: DistEnv | None = None, engine_factory=None):
        self.cfg = cfg
        self.env = env or DistEnv.from_environ()
        self.device = pick_device(cfg.train.device, self.env.local_rank)
        if cfg.train.threads and self.device.type == "cpu":
            torch.set_num_threads(cfg.train.threads)
        self.coord = Coordinator(self.env.rank, self.env.world_size, self.device)
        self.run_dir = self._run_dir()
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

        size = cfg.model.input_size or cfg.data.train_size
        self.dense = dense_spec(cfg.model.name, num_classes=self.num_classes, input_size=size,
                                shortcut=cfg.model.shortcut or None)
        self.dense_macs, self.dense_params = count(self.dense)
        model = build_model(self.dense).to(self.device)  # method state is created on the model's device
        if cfg.model.zero_init_residual:
            for _, blk in model.named_blocks():
                last = getattr(blk, "bn3", None) or getattr(blk, "bn2", None)
                if last is not None:
                    torch.nn.init.zeros_(last.weight)
        self.method = build_method(cfg.method, self.total_steps)
        try:
            self.method.check_model(model)
        except ConfigError:
            raise
        except ValueError as exc:
            raise ValueError(f"config key 'method.name': {exc}") from None
        self.method.attach(model)
        seed_rank_stream(cfg.train.seed, self.env.rank)  # gate samples: per rank (ALGORITHM.md section 1)
        gated_decay = bool(getattr(self.method.cfg, "gated_decay", False))
        self.gated_decay = gated_decay and cfg.optim.weight_decay > 0
        opt = build_optimizer(model, cfg.optim, self.method.theta_lrs(), self.global_batch, self.gated_decay)
        self.engine = (engine_factory or self._default_engine)(model, opt)
        self.state = LoopState()
        self.tracker = T.make_tracker(cfg.tracking, self.env.rank, cfg.run.root, self.run_dir) \
            if cfg.tracking.enabled else T.NullTracker()
        self.checkpointer = None  # set by system.checkpoint when checkpoints are configured
        self._t_start = 0.0

    # ------------------------------------------------------------------ set-up helpers
    def _run_dir(self) -> Path:
        c = self.cfg.run
        if c.dir:
            return Path(c.dir)
        name = c.name or f"{self.cfg.method.display}-{self.cfg.model.name}"
        return Path(c.root) / name

    def _default_engine(self, model, opt):
        kind = self.cfg.engine.kind
        if kind == "deepspeed" or (kind == "auto" and self.env.world_size > 1):
            from system.engine_ds import DeepSpeedEngine  # imported only when used

            return DeepSpeedEngine(model, opt, self.cfg, self.env, self.device)
        return LocalEngine(model, opt, self.device, self.cfg.train.precision, self.cfg.train.channels_last)

    @property
    def model(self) -> GatedResNet:
        return self.engine.model

    def spec(self) -> ArchSpec:
        return self.model.spec()

    def current_macs(self) -> int:
        """MACs of the network as it is now (cached per spec; the spec changes at every pruning event)."""
        spec = self.spec()
        if getattr(self, "_macs_spec", None) is not spec:
            self._macs_spec, self._macs = spec, count(spec)[0]
        return self._macs

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
        sur = self.method.surrogate_loss(model, self.engine.forward, x, y, per_example, self.state.step,
                                         per_example_loss=losses)
        if sur is not None:
            total = total + sur
        reg = self.method.regularizer(model, self.state.step)
        if reg is not None:
            total = total + reg
        if self.gated_decay:
            dec = self.method.gated_decay(model, cfg.optim.weight_decay)
            if dec is not None:
                total = total + dec
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

    def maybe_prune(self, event: str) -> None:
        ctx = StepContext(step=self.state.step, epoch=self.state.epoch, total_steps=self.total_steps, model=self.model)
        fn = self.method.on_step_end if event == "step_end" else self.method.on_epoch_end
        plan = self.coord.decide(self.method, self.model, lambda: fn(ctx))
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
    def _plain_forward(self, net: torch.nn.Module):
        """A forward for a gate-free network outside the engine, with the run's precision."""
        p = self.cfg.train.precision
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(p)

        def fwd(x: torch.Tensor) -> torch.Tensor:
            if self.cfg.train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                return net(x)
        return fwd

    @torch.no_grad()
    def evaluate(self, net: torch.nn.Module | None = None) -> dict[str, float]:
        """Top-1/top-5/loss on ``data.eval_split``: of the training model under the method's eval
        gates, or of ``net`` (the deployed network) when given."""
        cfg = self.cfg
        loader = build_loader(cfg.data, cfg.data.eval_split, self.env.rank, self.env.world_size, cfg.train.seed, 0,
                              device=self.device)
        model = self.model if net is None else net
        forward = self.engine.forward if net is None else self._plain_forward(net)
        was_training = model.training
        model.eval()
        n = correct1 = correct5 = loss_sum = 0.0
        with self.method.eval_gates(model):
            batches = iter(loader)
            try:
                for i, (x, y) in enumerate(batches):
                    if cfg.train.eval_batches and i >= cfg.train.eval_batches:
                        break
                    logits = forward(x).float()
                    keep = y >= 0
                    logits, y = logits[keep], y[keep]
                    if y.numel() == 0:
                        continue
                    loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
                    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
                    correct1 += float((top[:, 0] == y).sum())
                    correct5 += float((top == y[:, None]).any(dim=1).sum())
                    n += y.numel()
            finally:
                close = getattr(batches, "close", None)
                if close is not None:
                    close()

        n, correct1, correct5, loss_sum = self.coord.sum_scalars([n, correct1, correct5, loss_sum])
        model.train(was_training)
        res = {"top1": correct1 / max(1.0, n), "top5": correct5 / max(1.0, n), "loss": loss_sum / max(1.0, n),
               "n": int(n)}
        self.state.last_eval = res
        self.state.best_top1 = max(self.state.best_top1, res["top1"])
        self.tracker.log_metrics({T.VAL_TOP1: res["top1"], T.VAL_TOP5: res["top5"], T.VAL_LOSS: res["loss"]},
                                 step=self.state.step)
        log.info("step %d: val top1 %.4f top5 %.4f loss %.4f (%d images)", self.state.step, res["top1"],
                 res["top5"], res["loss"], int(n))
        return res

    # ------------------------------------------------------------------ the run
    def _start_tracking(self) -> None:
        cfg = self.cfg
        run_id = getattr(self, "_resume_run_id", None)
        params = flatten(to_dict(cfg))
        tags = {T.TAG_METHOD: cfg.method.display, T.TAG_MODEL: cfg.model.name,
                T.TAG_WORLD_SIZE: self.env.world_size, T.TAG_DEVICE: str(self.device),
                T.TAG_CODE_VERSION: T.code_version()}
        self.run_id = self.tracker.start(self.run_dir.name, params=params, tags=tags, run_id=run_id)

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.env.rank == 0:
            atomic_write_json(self.run_dir / "config.json", to_dict(cfg))
        if self.checkpointer is not None:
            self.checkpointer.maybe_resume(self)
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
            self._loop()
            status = "FINISHED"
        except (preemption.Preempted, SystemExit, KeyboardInterrupt):  # incl. checkpoint.InjectedStop
            status = "KILLED"  # resumed later into the same MLflow run
            raise
        finally:
            if status != "FINISHED":
                self.tracker.end("FAILED" if status == "FAILED" else status)
        summary = self.finish()
        return summary

    def _progress(self, total: int, initial: int):
        if self.cfg.train.progress and self.env.rank == 0:
            from tqdm import tqdm

            return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
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
                                                  T.TRAIN_CUMULATIVE_MACS: s.train_macs}, step=s.step)
                        t_log, n_log = time.perf_counter(), 0
                    if self.method.check_due(s.step):
                        self.maybe_prune("step_end")
                    if eval_every and s.step % eval_every == 0:
                        self.evaluate()
                    s.wall_s = time.perf_counter() - self._t_start
                    if self.checkpointer is not None:
                        self.checkpointer.after_step(self)
                    if s.step >= self.total_steps:
                        break
                    if preemption.watching() and self.coord.any_flag(preemption.stop_requested()):
                        self._stop_agreed()
                batches.close()
                if s.batch >= loader.batches_per_epoch:
                    self.maybe_prune("epoch_end")
                    s.epoch += 1
                    s.batch = 0
                    if not eval_every:
                        self.evaluate()
                    if self.checkpointer is not None:
                        self.checkpointer.after_epoch(self)

    def _stop_agreed(self) -> None:
        """Every rank agreed to stop (preemption): save together at this step, then raise Preempted."""
        s = self.state
        path = ""
        if self.checkpointer is not None:
            if self.checkpointer.last_step != s.step:
                self.checkpointer.save(self, "preempted")
            path = str(self.checkpointer.root / f"step-{s.step:08d}")
        log.warning("stop requested (%s): checkpoint of step %d saved, stopping", preemption.reason() or
                    "on another rank", s.step)
        raise preemption.Preempted(s.step, path, preemption.reason())

    def finish(self) -> dict[str, Any]:
        """Final plan, evaluation, export, summary.json and the tracker's final metrics."""
        cfg, s = self.cfg, self.state
        final = self.method.final_plan(self.model)
        if final is not None:
            final = self.coord.decide(self.method, self.model, lambda: final)
            if final is not None:
                ev = self.coord.apply(final, self.engine, self.method, s.step)
                s.channels_removed += ev.channels
                s.blocks_removed += ev.blocks
                s.prune_events += 1
                self.tracker.log_metrics({T.PRUNE_EVENTS: s.prune_events,
                                          T.PRUNE_CHANNELS_REMOVED: s.channels_removed,
                                          T.PRUNE_BLOCKS_REMOVED: s.blocks_removed, T.PRUNE_REBUILD_S: ev.rebuild_s},
                                         step=s.step)
                self.tracker.log_dict(self.spec().to_dict(), f"specs/step{s.step:08d}-final.json")
        gates = cfg.run.export_gates
        if gates == "auto":
            gates = "deterministic" if getattr(self.method, "hardened", False) else "mean"
            if cfg.method.name in ("none", "taylor", "egp"):
                gates = "mean"
        # the summary's top-1 is measured on exactly the network that is exported and counted
        with self.method.eval_gates(self.model):
            deployed = deploy_model(self.model, gate_eval=gates)
        res = self.evaluate(net=deployed)
        s.wall_s = time.perf_counter() - self._t_start
        final_spec = deployed.spec()
        if self.env.rank == 0:
            save_deployed(deployed, self.run_dir / "final")
        macs, params = count(final_spec)
        target = cfg.method.target_macs
        reached = None
        if target is not None:
            reached = abs(macs / self.dense_macs - target) <= TARGET_TOLERANCE
            if not reached:
                log.warning("target not reached: method.target_macs=%.3f but the final network has %.3f of the "
                            "dense MACs (tolerance %.2f)", target, macs / self.dense_macs, TARGET_TOLERANCE)
        s.width_history.append((s.step, widths_of(final_spec)))
        summary = {
            "method": cfg.method.display, "model": cfg.model.name, "top1": res["top1"], "top5": res["top5"],
            "val_loss": res["loss"], "val_images": res["n"], "best_top1": s.best_top1,
            "macs": macs, "params": params, "macs_dense": self.dense_macs, "params_dense": self.dense_params,
            "macs_pct": 100.0 * macs / self.dense_macs, "params_pct": 100.0 * params / self.dense_params,
            "blocks_total": final_spec.blocks_total, "blocks_removed": final_spec.blocks_total - final_spec.blocks_kept,
            "channels_removed": s.channels_removed, "prune_events": s.prune_events,
            "train_macs": s.train_macs, "train_macs_dense": s.train_macs_dense,
            "train_macs_pct": 100.0 * s.train_macs / max(1.0, s.train_macs_dense),
            "wall_s": s.wall_s, "steps": s.step, "epochs": cfg.train.epochs, "world_size": self.env.world_size,
            "device": str(self.device), "run_dir": str(self.run_dir), "run_id": getattr(self, "run_id", None),
            "method_details": self.method.summary(),
            "target_macs": target, "target_reached": reached, "eval_split": cfg.data.eval_split,
        }
        if self.env.rank == 0:
            atomic_write_json(self.run_dir / "summary.json", summary)
            self._log_final(summary)
        self.engine.close()
        return summary

    def _log_final(self, summary: dict[str, Any]) -> None:
        tr = self.tracker
        tr.log_metrics(T.final_metrics(summary), step=self.state.step)
        tr.log_metrics({T.MODEL_MACS: summary["macs"], T.MODEL_PARAMS: summary["params"]}, step=self.state.step)
        tr.log_artifact(self.run_dir / "summary.json")
        for f in sorted((self.run_dir / "final").iterdir()):
            tr.log_artifact(f, subdir="final")
        try:
            png = T.plot_layer_widths(self.state.width_history, self.run_dir / T.LAYER_WIDTHS_ARTIFACT)
            tr.log_artifact(png)
        except Exception as exc:  # a plot must never fail a finished run
            log.warning("layer-width plot failed: %s", exc)
        tr.end("FINISHED")
        if tr.dropped:
            summary["tracking_unsent"] = tr.dropped
            atomic_write_json(self.run_dir / "summary.json", summary)  # the file on disk says so too
