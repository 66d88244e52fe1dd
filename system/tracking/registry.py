"""The run's final network as an MLflow Model (with its input signature and spec), optionally
registered in the model registry."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

from system.tracking.connection import error_line, fluent_store

log = logging.getLogger(__name__)


class _PickleWarning(logging.Filter):
    """Drops MLflow's caution about pickled models: pickle is this module's choice (a pt2 program pins the
    batch size), and the safe copy of the weights is the run's ``final/model.safetensors``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "by Pickle or CloudPickle" not in record.getMessage()


@contextlib.contextmanager
def _quiet_pickle_warning() -> Iterator[None]:
    logger, quiet = logging.getLogger("mlflow.pytorch"), _PickleWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def log_model(uri: str, run_id: str, model: Any, example: Any, metadata: Mapping[str, Any],
              register_as: str = "") -> str | None:
    """Log ``model`` (the exported, gate-free network) as an MLflow Model of run ``run_id`` in the
    store ``uri``, with the input signature of ``example`` and ``metadata`` (the spec), registered as
    ``register_as`` when given; its URI, or None (with a warning) when the store refuses.  Never raises.

    Example::

        log_model(tracker.uri, tracker.run_id, net, torch.zeros(1, 3, 224, 224), {"spec": spec.to_dict()})
    """
    try:
        import mlflow
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        with torch.no_grad():
            out = model(example)
        signature = infer_signature(example.numpy(), out.numpy())
        with fluent_store(uri), mlflow.start_run(run_id=run_id), _quiet_pickle_warning():
            info = mlflow.pytorch.log_model(
                # pickled (loads any batch size; needs this package importable, as pip_requirements say)
                model, name="model", signature=signature, metadata=dict(metadata), serialization_format="pickle",
                registered_model_name=register_as or None,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "parsimony"])
        log.info("logged the final network as MLflow Model %s%s", info.model_uri,
                 f", registered as {register_as!r}" if register_as else "")
        return str(info.model_uri)
    except Exception as exc:
        log.warning("could not log the final network as an MLflow Model in %s: %s", uri, error_line(exc))
        return None
