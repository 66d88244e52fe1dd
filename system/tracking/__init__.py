"""Experiment tracking: one narrow ``Tracker`` interface, MLflow on rank 0, a no-op elsewhere.

The training loop calls ``make_tracker`` once and talks only to the returned object::

    tracker = make_tracker(cfg.tracking, rank, runs_root="runs", run_dir=run_dir)
    run_id = tracker.start("r50-gate", params=flatten(to_dict(cfg)), tags={TAG_METHOD: "gate"},
                           run_id=tracking_run["run_id"] or None)   # a resumed run continues its MLflow run
    tracker.log_metrics({TRAIN_LOSS: 2.3, TRAIN_LR: 0.1}, step=100)
    ...
    tracker.end("FINISHED")
    summary["tracking_unsent"] = tracker.dropped

Failure policy:

* at ``start`` an unreachable server is an error naming the URI (checked with a short timeout,
  before anything trains), unless ``fallback_local`` is set: then a warning announces that the
  embedded sqlite store ``<runs_root>/mlflow.db`` is used instead;
* after ``start`` nothing raises.  Whatever fails to reach the server (metrics, params, tags,
  artifacts) is appended to ``<run_dir>/mlflow_unsent.jsonl`` (artifacts are copied next to it),
  sending pauses for ``retry_after_s``, and is re-tried later; when the server answers again the
  backlog is replayed.  ``end()`` warns how many items were never sent and where they are;
  ``tracker.dropped`` gives the count for the training summary.
"""

from system.tracking.backlog import sync_backlog
from system.tracking.config import (
                                    ENV_EXPERIMENT_NAME,
                                    ENV_TRACKING_URI,
                                    TrackingConfig,
                                    TrackingUnavailable,
                                    experiment_name,
                                    local_store_uri,
                                    resolve_uri,
)
from system.tracking.connection import http_reachable
from system.tracking.mlflow_tracker import MLflowTracker, make_tracker
from system.tracking.names import *  # noqa: F403  (the metric and tag vocabulary)
from system.tracking.names import final_metrics
from system.tracking.plots import plot_layer_widths
from system.tracking.protocol import NullTracker, Tracker
from system.tracking.run_tags import code_version, hardware, standard_tags

__all__ = [
                                    "ENV_EXPERIMENT_NAME",
                                    "ENV_TRACKING_URI",
                                    "MLflowTracker",
                                    "NullTracker",
                                    "Tracker",
                                    "TrackingConfig",
                                    "TrackingUnavailable",
                                    "code_version",
                                    "experiment_name",
                                    "final_metrics",
                                    "hardware",
                                    "http_reachable",
                                    "local_store_uri",
                                    "make_tracker",
                                    "plot_layer_widths",
                                    "resolve_uri",
                                    "standard_tags",
                                    "sync_backlog",
]
