"""The training loop that drives a pruning method, on one process or under an engine.

``Trainer(cfg).run()`` trains, lets the method prune through the coordinator, evaluates,
exports ``final/`` and writes ``summary.json``.  The loop holds no method-specific logic:
it raises :class:`~system.pruning.methods.Event` s and applies the plans the coordinator agrees on.
Its parts are built once, by :class:`system.run.Run` (resumed ones from their checkpoint).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from pipelines.loaders import build_loader
from system import report
from system import tracking as T
from system.config import to_dict
from system.evaluation import accuracy, plain_forward
from system.io import atomic_write_json
from system.models.resnet import GatedResNet
from system.optim import set_lrs
from system.pruning.complexity import count
from system.pruning.methods import Batch, Event, StepContext
from system.run import Run
from system.runtime import preemption
from system.runtime.faults import ENV_STOP, InjectedStop
from system.skips import SkipLimitExceeded
from system.state import rng_neutral, widths_of
from system.tracking.secrets import redacted

log = logging.getLogger(__name__)


class Trainer(Run):
    """Runs the loop on the parts :class:`Run` built."""

    # ------------------------------------------------------------------ one step
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step on (x, y); the batch's mean loss, a 0-d tensor left on the device."""
        cfg, model, step = self.cfg, self.model, self.state.step
        model.train()
        self._lr = set_lrs(self.engine.optimizer, self.schedule, step, self.total_steps, self.steps_per_epoch,
                           self.method.theta_active(step))
        self.method.before_step(model, step)
        logits = self.engine.forward(x)

        def per_example(lg: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(lg.float(), t, label_smoothing=cfg.optim.label_smoothing, reduction="none")

        losses = per_example(logits, y)
        loss = losses.mean()
        batch = Batch(x=x, y=y, forward=self.engine.forward, loss_fn=per_example, per_example_loss=losses)
        self.engine.backward(sum(self.method.loss_terms(model, step, batch), loss))
        self.method.after_backward(model, step, grad_scale=self.engine.grad_scale())
        self.engine.step()
        self.method.after_step(model, step)
        # forward + backward ~ 3 forwards; an estimator's extra forwards (no backward) count once each
        self.state.train_macs += (3.0 + self.method.extra_forwards()) * self.current_size()[0] * self.global_batch
        self.state.train_macs_dense += 3.0 * self.dense_macs * self.global_batch
        self.state.step += 1
        return loss.detach()

    @contextlib.contextmanager
    def timed(self, part: str) -> Iterator[None]:
        """Add the wall-clock of the block to ``state.time_s[part]`` (summary.json's ``time_s``)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.state.time_s[part] = self.state.time_s.get(part, 0.0) + time.perf_counter() - t

    def maybe_prune(self, event: Event) -> None:
        """The decision of ``event`` (sync -> decide -> agree -> apply), for the events the method
        declares: for any other, no collective runs."""
        if event not in self.method.events:
            return
        with self.timed("prune"):
            self._prune(event)

    def _prune(self, event: Event) -> None:
        s = self.state
        ctx = StepContext(step=s.step, epoch=s.epoch, total_steps=self.total_steps, model=self.model)
        plan = self.coord.decide(self.method, self.model, lambda: self.method.decide(event, ctx))
        if plan is None:
            return
        ev = self.coord.apply(plan, self.engine, self.method, s.step)
        s.prune_events, s.channels_removed, s.blocks_removed = (s.prune_events + 1, s.channels_removed + ev.channels,
                                                                 s.blocks_removed + ev.blocks)
        s.width_history.append((s.step, widths_of(self.spec())))
        report.log_prune_event(self.tracker, s, self.spec(), ev.rebuild_s)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, net: GatedResNet | None = None) -> dict[str, float]:
        """Top-1/top-5/loss on ``data.eval_split``: of the training model under the method's eval
        gates, or of ``net`` (the deployed network) when given."""
        with self.timed("eval"):
            return self._evaluate(net)

    def _evaluate(self, net: GatedResNet | None) -> dict[str, float]:
        cfg, s = self.cfg, self.state
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
        s.last_eval, s.best_top1 = res, max(s.best_top1, res["top1"])
        self.tracker.log_metrics({T.VAL_TOP1: res["top1"], T.VAL_TOP5: res["top5"], T.VAL_LOSS: res["loss"]},
                                 step=s.step)
        log.info("step %d: val top1 %.4f top5 %.4f loss %.4f (%d images)", s.step, res["top1"], res["top5"],
                 res["loss"], res["n"])
        return res

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        cfg, s = self.cfg, self.state
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.env.rank == 0:
            atomic_write_json(self.run_dir / "config.json", redacted(to_dict(cfg)))  # secrets masked
        run_id = self.tracking_run["run_id"] or None
        self.run_id = report.start_run(self.tracker, cfg, self.run_dir, self.env.world_size, str(self.device), run_id)
        self.tracking_run["run_id"] = self.run_id or run_id or ""
        if not s.width_history:  # a fresh run: the model.macs curve starts at the dense network
            s.width_history.append((0, widths_of(self.spec())))
            macs, params = self.current_size()
            self.tracker.log_metrics({T.MODEL_MACS: macs, T.MODEL_PARAMS: params}, step=s.step)
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

    def _loop(self) -> None:
        cfg, s = self.cfg, self.state
        eval_every = cfg.train.eval_every_steps
        show = cfg.train.progress and self.env.rank == 0
        with self.steps.progress(show, s.step, cfg.train.progress_interval_s):
            while s.step < self.total_steps and s.epoch < cfg.train.epochs:
                loader = build_loader(cfg.data, "train", self.env.rank, self.env.world_size, cfg.train.seed,
                                      s.epoch, start_batch=s.batch, device=self.device)
                batches = rng_neutral(loader)
                self.skips.new_epoch()
                for x, y in batches:
                    self.steps.add(self.train_step(x, y))
                    s.batch += 1
                    if self.steps.due(s.step):  # the one host read of the interval's losses
                        self.steps.flush(s.step, self._lr, s.train_macs, *self.current_size(),
                                         extra=self.method.log_values(s.step))
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
                    s.epoch, s.batch = s.epoch + 1, 0
                    if not eval_every:
                        self.evaluate()
                    if cfg.checkpoint.at_epoch_end:
                        with self.timed("checkpoint"):
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
            with self.timed("checkpoint"):
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
        latency = report.export_final(cfg, deployed, self.dense, self.run_dir) if self.env.rank == 0 else {}
        compiler = getattr(self.engine, "compiler", None)  # train.compile: graphs compiled per network
        if compiler is not None:
            latency["compile"] = compiler.summary()
        s.width_history.append((s.step, widths_of(final_spec)))
        summary = report.summary_of(
            cfg, s, final_spec, count(final_spec), (self.dense_macs, self.dense_params), res,
            epochs=round(s.step / max(1, self.steps_per_epoch), 3), world_size=self.env.world_size,
            lr_restart_at=self.schedule.restart_at,  # the resolved optim.restart_at (0: no restart)
            device=str(self.device), run_dir=str(self.run_dir), run_id=getattr(self, "run_id", None),
            method_details=self.method.summary(), mlflow_run_url=self.tracker.run_url(), **latency)
        if self.env.rank == 0:
            atomic_write_json(self.run_dir / "summary.json", summary)
            report.log_final(self.tracker, summary, deployed, self.run_dir, s.step, s.width_history,
                             cfg.tracking.register_as)
        self.engine.close()
        return summary
