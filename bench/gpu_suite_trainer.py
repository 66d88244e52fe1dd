"""The GPU suite's training-step rows (issue 24): the project's own ``Trainer.train_step``, gates, method
and engine included, not a plain model. On the suite's model, batch, precision and memory format:

``step_dense``        the dense run's step (``method.name=none``);
``step_variational``  the variational method's step in its active phase (thetas trained, expected MACs
                      under ``method.target_macs=0.5``): its time against ``step_dense`` (the target is at
                      most 1.05x on a GPU), and both rows' aten ops and host syncs per step
                      (``aten._local_scalar_dense``, counted with ``bench/step_budget.py``'s dispatch mode);
``step_compiled``     the same variational step with ``train.compile=true`` (inductor): compile time, and
                      the step against the eager one (on by default on a GPU, ``--compile`` on CPU).

On a GPU each row also counts the device kernels one step launches (``kernels_per_step``, from
``torch.profiler``): the launches as the GPU sees them, fused kernels included, where the aten count
cannot see inside a compiled graph.

Each trainer is built the way a run builds it (``system.trainer.Trainer`` from a ``RunConfig``), with
synthetic tensors already on the device, tracking and the latency timing off.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch
from gpu_suite_base import Settings, Skip, sibling, sync

from system.config import apply_overrides, from_dict
from system.run_config import RunConfig

METHODS = {
    "none": ["method.name=none"],
    "variational": ["method.name=variational", "method.variational.warmup_frac=0.0",
                    "method.variational.check_every=1000000", "method.target_macs=0.5"],
}


def _trainer(s: Settings, method: str, tmp: str, compiled: bool = False):
    from system.trainer import Trainer

    over = ["data.loader=synthetic", "data.synthetic_classes=1000" if s.cuda else "data.synthetic_classes=10",
            "data.synthetic_samples=1000000", f"data.batch_size={s.batch}", f"data.train_size={s.size}",
            f"data.val_resize={s.size}", f"data.val_crop={s.size}", "data.workers=0", f"model.name={s.model}",
            "train.epochs=1", "train.progress=false", "tracking.enabled=false", "latency.enabled=false",
            f"train.device={s.device.type}", f"train.precision={s.precision}",
            f"train.channels_last={str(s.channels_last).lower()}", f"train.compile={str(compiled).lower()}",
            "engine.kind=local", f"run.root={tmp}", f"run.dir={tmp}/run-{method}-{int(compiled)}",
            *METHODS[method]]
    if s.threads:
        over.append(f"train.threads={s.threads}")
    return Trainer(from_dict(RunConfig, apply_overrides({}, over)))


def _batch(s: Settings, trainer) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(s.batch, 3, s.size, s.size, device=s.device)
    if s.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, trainer.model.spec().num_classes, (s.batch,), device=s.device)


def _step_s(s: Settings, trainer, x, y) -> float:
    sync(s.device)
    t = time.perf_counter()
    trainer.train_step(x, y)
    sync(s.device)
    return time.perf_counter() - t


def _kernels(s: Settings, trainer, x, y) -> int | None:
    """Device kernels launched by one step (a GPU only; None elsewhere)."""
    if not s.cuda:
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        trainer.train_step(x, y)
        sync(s.device)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _measure(s: Settings, method: str, tmp: str) -> dict:
    trainer = _trainer(s, method, tmp)
    try:
        x, y = _batch(s, trainer)
        for _ in range(max(1, s.warmup)):
            trainer.train_step(x, y)
        counter = sibling("step_budget").Counter()
        with counter:
            trainer.train_step(x, y)
        sync(s.device)
        step = statistics.median(_step_s(s, trainer, x, y) for _ in range(s.iters))
        kernels = _kernels(s, trainer, x, y)
    finally:
        trainer.engine.close()
    return {"step_s": step, "img_s": s.batch / step, "ops_per_step": sum(counter.ops.values()),
            "syncs_per_step": counter.ops.get("aten._local_scalar_dense", 0), "kernels_per_step": kernels}


def row_trainer_steps(s: Settings, wanted: tuple[str, ...], shared: dict) -> dict:
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-suite-steps-") as tmp:
        dense = _measure(s, "none", tmp)
        if "step_dense" in wanted:
            out["step_dense"] = {**dense, "macs_ratio": 1.0}
        if "step_variational" in wanted:
            var = _measure(s, "variational", tmp)
            out["step_variational"] = {**var, "vs_dense_step": var["step_s"] / dense["step_s"],
                                       "vs_dense_ops": var["ops_per_step"] / dense["ops_per_step"],
                                       "dense_step_s": dense["step_s"]}
            shared["variational_step_s"] = var["step_s"]
    return out


def row_trainer_compiled(s: Settings, wanted: tuple[str, ...], shared: dict) -> dict:
    if not s.compile:
        raise Skip("off without a GPU (--compile runs it)" if not s.cuda else "off (--compile runs it)")
    with tempfile.TemporaryDirectory(prefix="gpu-suite-compiled-") as tmp:
        trainer = _trainer(s, "variational", tmp, compiled=True)
        try:
            x, y = _batch(s, trainer)
            compile_s = _step_s(s, trainer, x, y)  # traces and compiles forward and backward
            for _ in range(max(1, s.warmup)):
                trainer.train_step(x, y)
            step = statistics.median(_step_s(s, trainer, x, y) for _ in range(s.iters))
            kernels = _kernels(s, trainer, x, y)
        finally:
            trainer.engine.close()
    row = {"step_s": step, "img_s": s.batch / step, "compile_s": compile_s, "kernels_per_step": kernels}
    if "variational_step_s" in shared:
        row["eager_step_s"] = shared["variational_step_s"]
        row["speedup_vs_eager"] = shared["variational_step_s"] / step
    return {"step_compiled": row}
