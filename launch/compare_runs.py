"""Reading runs for ``launch.compare``: one :class:`RunRow` per finished MLflow run.

Reads the ``summary/*`` metrics (``final.*`` of older runs), the ``method``/``model`` tags that
the training loop logs at the end of a run and its ``code_version`` and ``parsimony.hardware`` tags (names in
``system.tracking``), and the run's ``method.target_macs``, ``train.seed`` and ``data.root`` parameters.

Example::

    rows = load_rows(T.local_store_uri("runs"), "parsimony")   # FINISHED runs, oldest first
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from system import tracking as T


@dataclass(frozen=True)
class RunRow:
    """One finished run as the comparison shows it; missing values are None."""

    run_id: str
    run_name: str
    method: str | None
    model: str | None
    top1: float | None
    macs: float | None
    params: float | None
    macs_removed_pct: float | None      # 100 * (1 - macs / macs_dense)
    blocks_removed: float | None
    train_macs_pct: float | None        # 100 * train_macs / train_macs_dense
    wall_s: float | None
    target_macs: float | None = None    # the run's method.target_macs
    seed: int | None = None
    dataset: str | None = None          # the last folder of data.root
    setting: str | None = None          # what else sets the operating point (EGP: its iterations)
    latency_ratio_b1: float | None = None   # the final network's CPU latency / the dense one's (batch 1)
    latency_ratio_b64: float | None = None  # (batch 64)
    steps: float | None = None              # the steps the run trained
    code_version: str | None = None         # the ``code_version`` tag (git describe of the code)
    hardware: str | None = None             # the ``parsimony.hardware`` tag (processor and torch build)



def _pct(num: float | None, den: float | None) -> float | None:
    return 100.0 * num / den if num is not None and den else None


def _int_or_none(v: float | None) -> int | None:
    return None if v is None else int(v)


def _num(text: str | None) -> float | None:
    try:
        return None if text in (None, "", "None") else float(text)
    except ValueError:
        return None


def row_from_run(run: Any) -> RunRow:
    """Build a row from an ``mlflow.entities.Run``."""
    m, tags, params = run.data.metrics, run.data.tags, getattr(run.data, "params", {}) or {}
    f = {k: m.get(T.FINAL_PREFIX + k, m.get(T.LEGACY_FINAL_PREFIX + k)) for k in T.FINAL_KEYS}
    removed = _pct(f["macs"], f["macs_dense"])
    return RunRow(
        run_id=run.info.run_id,
        run_name=run.info.run_name or tags.get("mlflow.runName", run.info.run_id),
        method=tags.get(T.TAG_METHOD),
        model=tags.get(T.TAG_MODEL),
        top1=f["top1"],
        macs=f["macs"],
        params=f["params"],
        macs_removed_pct=None if removed is None else 100.0 - removed,
        blocks_removed=f["blocks_removed"],
        train_macs_pct=_pct(f["train_macs"], f["train_macs_dense"]),
        wall_s=f["wall_s"],
        target_macs=_num(params.get("method.target_macs")),
        seed=_int_or_none(_num(params.get("train.seed"))),
        dataset=Path(params["data.root"]).name if params.get("data.root") else None,
        setting=(f"iterations={params.get('method.egp.iterations')}" if params.get("method.name") == "egp" else None),
        latency_ratio_b1=m.get(T.FINAL_PREFIX + "latency_ratio_b1"),
        latency_ratio_b64=m.get(T.FINAL_PREFIX + "latency_ratio_b64"),
        steps=m.get(T.FINAL_PREFIX + "steps"),
        code_version=tags.get(T.TAG_CODE_VERSION),
        hardware=tags.get(T.TAG_HARDWARE),
    )


def load_rows(uri: str, experiment: str) -> list[RunRow]:
    """Rows of the FINISHED runs of ``experiment`` at ``uri``, oldest first.

    Raises:
        SystemExit: the store is unreachable or holds no such experiment (message names it).
    """
    if uri.startswith(("http://", "https://")):
        reason = T.http_reachable(uri, timeout=5.0)
        if reason is not None:
            raise SystemExit(f"compare: MLflow tracking server {uri} is unreachable ({reason})")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"compare: no experiment {experiment!r} in {uri}")
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time ASC"], max_results=50000)
    return [row_from_run(r) for r in runs]
