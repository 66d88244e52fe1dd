"""What a run reports: its start and pruning events to the tracker, and its end: the deployed network,
its summary, and what is written and logged of it.

The end is shared by the trainer (:meth:`system.trainer.Trainer.finish`) and ``launch/export`` (a
checkpoint's network is deployed the same way as a finished run's):

- :func:`start_run`: the tracking run (resumed into the same one), its params and tags, the config;
- :func:`log_prune_event`: the counters and the model's size after a pruning event, the new spec;
- :func:`deploy`: the gate-free network, the method's gates folded as the run declares
  (``run.export_gates``, ``auto``: the method's own choice);
- :func:`preprocess_of`: what an input of the deployed network must look like (from ``data.*``);
- :func:`summary_of`: the ``summary.json`` record;
- :func:`export_final`: ``final/`` and the latency figures of the deployed network;
- :func:`log_final`: the final metrics, the MLflow Model, the artifacts and the layer-width plot.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from pipelines.loaders import class_names
from system import tracking as T
from system.config import flatten, to_dict
from system.export import deploy_model, save_deployed
from system.io import atomic_write_json
from system.latency import measure_latency
from system.models.resnet import GatedResNet, build_model
from system.models.spec import ArchSpec
from system.pruning.complexity import count
from system.pruning.methods import Method
from system.tracking.secrets import redacted

log = logging.getLogger(__name__)
#: a run with ``method.target_macs`` reached it when its final MACs fraction is this close
TARGET_TOLERANCE = 0.05


def start_run(tracker, cfg, run_dir: Path, world_size: int, device: str, run_id: str | None) -> str | None:
    """Start (``run_id``: resume) the tracking run of ``run_dir``, with the config as params (no password,
    token or URL login) and the run's tags, and the resolved ``config.json`` as an artifact; its run id."""
    params = flatten(redacted(to_dict(cfg)))
    tags = {T.TAG_METHOD: cfg.method.display, T.TAG_MODEL: cfg.model.name, T.TAG_WORLD_SIZE: world_size,
            T.TAG_DEVICE: device, T.TAG_CODE_VERSION: T.code_version(), T.TAG_HARDWARE: T.hardware(device),
            **T.standard_tags()}
    started = tracker.start(run_dir.name, params=params, tags=tags, run_id=run_id)
    tracker.log_artifact(run_dir / T.CONFIG_ARTIFACT)  # the resolved config, as written
    return started


def log_prune_event(tracker, state, spec: ArchSpec, rebuild_s: float) -> None:
    """After a pruning event (``state``: the loop state, counters updated): the counters, the model's size
    and the rebuild time as metrics, the new spec as an artifact."""
    s = state
    macs, params = count(spec)
    tracker.log_metrics({T.PRUNE_EVENTS: s.prune_events, T.PRUNE_CHANNELS_REMOVED: s.channels_removed,
                         T.PRUNE_BLOCKS_REMOVED: s.blocks_removed, T.PRUNE_REBUILD_S: rebuild_s,
                         T.MODEL_MACS: macs, T.MODEL_PARAMS: params}, step=s.step)
    tracker.log_dict(spec.to_dict(), f"specs/step{s.step:08d}.json")


def export_final(cfg, deployed: GatedResNet, dense: ArchSpec, run_dir: Path) -> dict[str, Any]:
    """Rank 0: ``final/`` (the deployed network, its classes and preprocessing), then its latency on the
    CPU against the dense network's, measured in this process (:func:`system.latency.measure_latency`)."""
    save_deployed(deployed, run_dir / "final", classes=class_names(cfg.data), preprocess=preprocess_of(cfg.data))
    spec = deployed.spec()
    return measure_latency(deployed, build_model(dense, gates=False),
                           (spec.in_channels, spec.input_size, spec.input_size), cfg.latency)


def deploy(model: GatedResNet, method: Method, export_gates: str) -> GatedResNet:
    """The gate-free network of ``model``: its gates folded under the method's evaluation gates,
    ``export_gates`` (``auto``: :meth:`Method.export_gates`) deciding mean or deterministic gates."""
    gates = method.export_gates() if export_gates == "auto" else export_gates
    with method.eval_gates(model):
        return deploy_model(model, gate_eval=gates)


def preprocess_of(data) -> dict[str, Any]:
    """What an input must look like for a network trained on ``data`` (section ``data``)."""
    size = data.synthetic_size if data.loader == "synthetic" and data.synthetic_size else data.val_crop
    return {"input_size": size, "resize": data.val_resize if data.loader != "synthetic" else size,
            "mean": list(data.mean), "std": list(data.std), "layout": "NCHW RGB, 0-1 scale"}


def target_reached(target: float | None, macs: int, dense_macs: int) -> bool | None:
    """Whether the final MACs are within :data:`TARGET_TOLERANCE` of ``method.target_macs`` (None: no target);
    a miss is logged, naming the key."""
    if target is None:
        return None
    reached = abs(macs / dense_macs - target) <= TARGET_TOLERANCE
    if not reached:
        log.warning("target not reached: method.target_macs=%.3f but the final network has %.3f of the "
                    "dense MACs (tolerance %.2f)", target, macs / dense_macs, TARGET_TOLERANCE)
    return reached


def time_split(wall_s: float, parts: dict[str, float]) -> dict[str, float]:
    """Where ``wall_s`` went: ``steps`` (the training steps, the loop's bookkeeping and data loading: the rest)
    and the parts timed apart (``eval``, ``prune``, ``checkpoint``), each in seconds."""
    split = {k: round(parts.get(k, 0.0), 3) for k in ("eval", "prune", "checkpoint")}
    return {"steps": round(max(0.0, wall_s - sum(split.values())), 3), **split}


def summary_of(cfg, state, final: ArchSpec, counts: tuple[int, int], dense: tuple[int, int], res: dict[str, Any],
               **extra: Any) -> dict[str, Any]:
    """The ``summary.json`` record of a finished run: ``cfg`` its config, ``state`` its loop state,
    ``final`` the deployed spec with its ``counts`` (MACs, params) against ``dense``'s, ``res`` the
    evaluation of the deployed network; ``extra`` adds the run's own fields (device, run dir, latency...)."""
    (macs, params), (dense_macs, dense_params), s = counts, dense, state
    target = cfg.method.target_macs
    return {
        "method": cfg.method.display, "model": cfg.model.name, "top1": res["top1"], "top5": res["top5"],
        "val_loss": res["loss"], "val_images": res["n"], "best_top1": s.best_top1,
        "macs": macs, "params": params, "macs_dense": dense_macs, "params_dense": dense_params,
        "macs_pct": 100.0 * macs / dense_macs, "params_pct": 100.0 * params / dense_params,
        "blocks_total": final.blocks_total, "blocks_removed": final.blocks_total - final.blocks_kept,
        "channels_removed": s.channels_removed, "prune_events": s.prune_events,
        "train_macs": s.train_macs, "train_macs_dense": s.train_macs_dense,
        "train_macs_pct": 100.0 * s.train_macs / max(1.0, s.train_macs_dense),
        "wall_s": s.wall_s, "time_s": time_split(s.wall_s, s.time_s), "steps": s.step,
        "epochs_configured": cfg.train.epochs,
        "target_macs": target, "target_reached": target_reached(target, macs, dense_macs),
        "eval_split": cfg.data.eval_split, "samples_skipped": s.samples_skipped, **extra,
    }


def log_final(tracker, summary: dict[str, Any], deployed: GatedResNet, run_dir: Path, step: int,
              width_history: list, register_as: str = "") -> None:
    """Rank 0: the final metrics, the deployed network as an MLflow Model (``summary.json`` gets its
    URI), ``summary.json`` and ``final/`` as artifacts, the layer-width plot (drawn only for a tracker that
    records); then the run ends
    FINISHED.  Items the server did not take are counted in ``summary.json`` (``tracking_unsent``)."""
    tracker.log_metrics(T.final_metrics(summary), step=step)
    tracker.log_metrics({T.MODEL_MACS: summary["macs"], T.MODEL_PARAMS: summary["params"]}, step=step)
    spec = deployed.spec()
    example = torch.zeros(1, spec.in_channels, spec.input_size, spec.input_size)
    uri = tracker.log_model(deployed.cpu().eval(), example, {"spec": spec.to_dict()}, register_as)
    if uri is not None:
        summary["mlflow_model_uri"] = uri
        atomic_write_json(run_dir / "summary.json", summary)
    tracker.log_artifact(run_dir / "summary.json")
    for f in sorted((run_dir / "final").iterdir()):
        tracker.log_artifact(f, subdir="final")
    if tracker.records:  # an artifact only: a run that records nothing skips matplotlib (about 0.8 s a process)
        try:
            png = T.plot_layer_widths(width_history, run_dir / T.LAYER_WIDTHS_ARTIFACT)
            tracker.log_artifact(png)
        except Exception as exc:  # a plot must never fail a finished run
            log.warning("layer-width plot failed: %s", exc)
    tracker.end("FINISHED")
    if tracker.dropped:
        summary["tracking_unsent"] = tracker.dropped
        atomic_write_json(run_dir / "summary.json", summary)  # the file on disk says so too
