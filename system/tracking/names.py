"""Metric, tag and artifact names: one vocabulary for the loop, the backends and launch.compare."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

# --- metric names: "<section>/<name>", so the MLflow UI groups the charts in sections --------
TRAIN_LOSS = "train/loss"
TRAIN_TOTAL_IPS = "train/total_ips"
TRAIN_LR = "train/lr"
TRAIN_CUMULATIVE_MACS = "train/cumulative_macs"
VAL_TOP1 = "val/top1"
VAL_TOP5 = "val/top5"
VAL_LOSS = "val/loss"
MODEL_MACS = "model/macs"  # logged at every log interval and at every pruning event: a step function
MODEL_PARAMS = "model/params"
PRUNE_EVENTS = "prune/events"
PRUNE_CHANNELS_REMOVED = "prune/channels_removed"
PRUNE_BLOCKS_REMOVED = "prune/blocks_removed"
PRUNE_REBUILD_S = "prune/rebuild_s"
DATA_SAMPLES_SKIPPED = "data/samples_skipped"  # unreadable training samples skipped so far (all ranks)

# End-of-run summary: metrics ``summary/<key>`` (see ``final_metrics``): one value each, the runs
# table's columns.  The UI sorts chart sections by name and opens the first, "model" (the MACs step
# function), with "summary" collapsed among the others.
FINAL_PREFIX = "summary/"
LEGACY_FINAL_PREFIX = "final."  # what runs logged before the sections (launch.compare reads both)
FINAL_KEYS: tuple[str, ...] = (
    "top1", "macs", "params", "macs_dense", "params_dense", "blocks_removed",
    "channels_removed", "train_macs", "train_macs_dense", "wall_s", "macs_pct",
)
FINAL_TOP1, FINAL_MACS, FINAL_PARAMS, FINAL_MACS_DENSE, FINAL_PARAMS_DENSE, \
    FINAL_BLOCKS_REMOVED, FINAL_CHANNELS_REMOVED, FINAL_TRAIN_MACS, FINAL_TRAIN_MACS_DENSE, \
    FINAL_WALL_S, FINAL_MACS_PCT = (FINAL_PREFIX + k for k in FINAL_KEYS)

# Run tags (plus MLflow's standard ``mlflow.*`` tags and the Slurm ones, see ``standard_tags``).
TAG_METHOD = "method"
TAG_MODEL = "model"
TAG_WORLD_SIZE = "world_size"
TAG_DEVICE = "device"
TAG_CODE_VERSION = "code_version"
TAG_HARDWARE = "parsimony.hardware"                # the processor and torch build (run_tags.hardware)
TAG_FALLBACK = "parsimony.tracking_fallback_from"   # set when the local store stood in for a server
TAG_RESUMED_FROM = "parsimony.resumed_from"         # set when the fallback local store lacks the run being resumed

# The experiment kind (a model-training experiment, not a GenAI one).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
# The MLflow UI opens on its GenAI overview unless the link says which workflow (it then remembers).
UI_WORKFLOW_QUERY = "?workflowType=machine_learning"
CONFIG_ARTIFACT = "config.json"

# The runs table's columns.  MLflow (3.17) cannot give an experiment default columns: each browser
# keeps its own choice in local storage, and a new one shows none of the metrics.  It can load a
# shared view, an experiment tag ``mlflow.sharedViewState.<key>`` that the link
# ``...?viewStateShareKey=<key>`` opens; every experiment a run uses gets this one, and the links a
# run prints open it (docs/tracking.md, "The runs table").
RUNS_VIEW_KEY = "parsimony"
RUNS_VIEW_TAG = "mlflow.sharedViewState." + RUNS_VIEW_KEY
RUNS_VIEW_COLUMNS: tuple[str, ...] = (
    f"metrics.`{FINAL_TOP1}`", f"metrics.`{FINAL_MACS_PCT}`", f"metrics.`{FINAL_PREFIX}latency_ratio_b1`",
    f"metrics.`{FINAL_PREFIX}steps`", f"metrics.`{FINAL_WALL_S}`",
    f"tags.`{TAG_METHOD}`",
)


def runs_view_state() -> str:
    """The shared view's value: the columns above, best top-1 first."""
    return json.dumps({"selectedColumns": list(RUNS_VIEW_COLUMNS), "orderByKey": RUNS_VIEW_COLUMNS[0],
                       "orderByAsc": False}, sort_keys=True)

SUMMARY_ARTIFACT = "summary.json"
LAYER_WIDTHS_ARTIFACT = "layer_widths.png"
UNSENT_FILE = "mlflow_unsent.jsonl"
#: the run directory's record of its tracking run (store and run id), written when the run starts: a
#: job restarted before its first checkpoint continues that run instead of opening a second one
RUN_RECORD_FILE = "mlflow_run.json"

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")


def final_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """``{"top1": 76.1, ...} -> {"summary/top1": 76.1, ...}`` for the keys in ``FINAL_KEYS``."""
    out = {FINAL_PREFIX + k: float(summary[k]) for k in FINAL_KEYS if k in summary and summary[k] is not None}
    # the measured latency (system.latency): every number it reported, e.g. summary/latency_ratio_b1
    out.update({FINAL_PREFIX + k: float(v) for k, v in summary.items()
                if k.startswith("latency_") and isinstance(v, (int, float)) and not isinstance(v, bool)})
    if isinstance(summary.get("steps"), int):  # how long the run trained: runs of other lengths compare apart
        out[FINAL_PREFIX + "steps"] = float(summary["steps"])
    # where wall_s went (summary.json's time_s): summary/time_steps_s, summary/time_eval_s, ...
    split = summary.get("time_s")
    if isinstance(split, Mapping):
        out.update({f"{FINAL_PREFIX}time_{k}_s": float(v) for k, v in split.items() if isinstance(v, (int, float))})
    return out
