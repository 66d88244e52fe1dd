"""Metric, tag and artifact names: one vocabulary for the loop, the backends and launch.compare."""

from __future__ import annotations

from typing import Any, Mapping

# --- metric names (DeepLearningExamples style) ----------------------------------------------
TRAIN_LOSS = "train.loss"
TRAIN_TOTAL_IPS = "train.total_ips"
TRAIN_LR = "train.lr"
TRAIN_CUMULATIVE_MACS = "train.cumulative_macs"
VAL_TOP1 = "val.top1"
VAL_TOP5 = "val.top5"
VAL_LOSS = "val.loss"
MODEL_MACS = "model.macs"
MODEL_PARAMS = "model.params"
PRUNE_EVENTS = "prune.events"
PRUNE_CHANNELS_REMOVED = "prune.channels_removed"
PRUNE_BLOCKS_REMOVED = "prune.blocks_removed"
PRUNE_REBUILD_S = "prune.rebuild_s"

# End-of-run summary: logged as metrics ``final.<key>`` (see ``final_metrics``).
FINAL_PREFIX = "final."
FINAL_KEYS: tuple[str, ...] = (
    "top1", "macs", "params", "macs_dense", "params_dense", "blocks_removed",
    "channels_removed", "train_macs", "train_macs_dense", "wall_s",
)
FINAL_TOP1, FINAL_MACS, FINAL_PARAMS, FINAL_MACS_DENSE, FINAL_PARAMS_DENSE, \
    FINAL_BLOCKS_REMOVED, FINAL_CHANNELS_REMOVED, FINAL_TRAIN_MACS, FINAL_TRAIN_MACS_DENSE, \
    FINAL_WALL_S = (FINAL_PREFIX + k for k in FINAL_KEYS)

# Run tags.
TAG_METHOD = "method"
TAG_MODEL = "model"
TAG_WORLD_SIZE = "world_size"
TAG_DEVICE = "device"
TAG_CODE_VERSION = "code_version"
TAG_FALLBACK = "parsimony.tracking_fallback_from"   # set when the local store stood in for a server
TAG_RESUMED_FROM = "parsimony.resumed_from"         # set when a requeued job could not find its run

# Makes the MLflow UI open the experiment on its runs table rather than the GenAI overview.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"

SUMMARY_ARTIFACT = "summary.json"
LAYER_WIDTHS_ARTIFACT = "layer_widths.png"
UNSENT_FILE = "mlflow_unsent.jsonl"

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")


def final_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """``{"top1": 76.1, ...} -> {"final.top1": 76.1, ...}`` for the keys in ``FINAL_KEYS``."""
    return {FINAL_PREFIX + k: float(summary[k]) for k in FINAL_KEYS
            if k in summary and summary[k] is not None}
