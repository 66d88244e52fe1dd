"""Export a (pruned) gated model without gates: ``model.safetensors`` + ``spec.json``, and what it
takes to use it: ``preprocess.json`` (input size, resize, mean / std) and ``classes.json``.

Structures whose deterministic gate is off are cut first, then the remaining gate values are
folded into BatchNorm (see :func:`system.pruning.surgery.fold_gates`).  Safetensors cannot carry code,
so loading never unpickles anything.

Example::

    export_model(model, "runs/x/final")            # gates evaluated as the model's modes say
    plain = load_exported("runs/x/final")          # a gate-free GatedResNet in eval mode
    model, pre, classes = load_bundle("runs/x/final")  # with its preprocessing and class names
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from system.io import atomic_dir
from system.models.resnet import GatedResNet, build_model, gates_of, set_gate_mode
from system.models.spec import ArchSpec, SpecError
from system.pruning.surgery import apply_plan, fold_gates, plan_from_gates

log = logging.getLogger(__name__)

WEIGHTS, SPEC = "model.safetensors", "spec.json"
PREPROCESS, CLASSES = "preprocess.json", "classes.json"


def deploy_model(model: GatedResNet, gate_eval: str = "deterministic", threshold: float = 0.5) -> GatedResNet:
    """The gate-free eval-mode network: cut what ``1[theta <= threshold]`` turns off, fold the rest.

    ``gate_eval``: ``deterministic`` (0/1 gates) or ``mean`` (gate = theta, folded into BN).
    """
    if not model.has_gates:
        return copy.deepcopy(model).eval()
    m = model
    if gates_of(model):
        m, _, _ = apply_plan(model, plan_from_gates(model, threshold))
        set_gate_mode(m, unit=gate_eval, layer=gate_eval)
        for g in gates_of(m).values():
            g.threshold = threshold
    return fold_gates(m.eval())


def export_model(model: GatedResNet, out_dir: str | Path, gate_eval: str = "deterministic",
                 threshold: float = 0.5) -> ArchSpec:
    """Write the deployed network to ``out_dir`` atomically; return its spec."""
    return save_deployed(deploy_model(model, gate_eval, threshold), out_dir)


def save_deployed(plain: GatedResNet, out_dir: str | Path, preprocess: dict | None = None,
                  classes: list[str] | None = None) -> ArchSpec:
    """Write a gate-free network (from :func:`deploy_model`) to ``out_dir`` atomically; return its spec.

    ``preprocess``: what an input must look like (``input_size``, ``resize``, ``mean``, ``std`` on the
    0-1 scale, ``layout``); ``classes``: the class names by output index.
    """
    spec = plain.spec()
    state = {k: v.detach().cpu().contiguous() for k, v in plain.state_dict().items()}

    def fill(tmp: Path) -> None:
        save_file(state, str(tmp / WEIGHTS), metadata={"arch": spec.name})
        (tmp / SPEC).write_text(spec.to_json())
        if preprocess is not None:
            (tmp / PREPROCESS).write_text(json.dumps(preprocess, indent=1) + "\n")
        if classes is not None:
            (tmp / CLASSES).write_text(json.dumps(list(classes), indent=1) + "\n")

    atomic_dir(out_dir, fill)
    log.info("exported %s to %s", spec.name, out_dir)
    return spec


def load_spec(path: str | Path) -> ArchSpec:
    p = Path(path)
    if p.is_dir():
        p = p / SPEC
    if not p.is_file():
        raise SpecError(f"no spec file at {p}")
    try:
        return ArchSpec.from_dict(json.loads(p.read_text()))
    except json.JSONDecodeError as exc:
        raise SpecError(f"{p} is not valid JSON: {exc}") from None


def load_exported(out_dir: str | Path, device: str | torch.device = "cpu") -> GatedResNet:
    """Rebuild an exported model from its spec and load its weights (strict)."""
    out_dir = Path(out_dir)
    spec = load_spec(out_dir)
    model = build_model(spec, gates=False)
    wpath = out_dir / WEIGHTS
    if not wpath.is_file():
        raise SpecError(f"no weights file at {wpath}")
    state = load_file(str(wpath), device=str(device))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise SpecError(f"{wpath} does not match {out_dir / SPEC}: {str(exc).splitlines()[1:3]}") from None
    if missing or unexpected:
        raise SpecError(f"{wpath} does not match {out_dir / SPEC}: missing {list(missing)[:5]}, "
                        f"unexpected {list(unexpected)[:5]}")
    return model.to(device).eval()


def load_bundle(out_dir: str | Path, device: str | torch.device = "cpu") -> tuple[GatedResNet, dict, list[str]]:
    """The exported model with its preprocessing and class names (an export without them -- from an
    older version -- gets the network's input size and numbered classes)."""
    out_dir = Path(out_dir)
    model = load_exported(out_dir, device)
    spec = model.spec()
    pre = json.loads((out_dir / PREPROCESS).read_text()) if (out_dir / PREPROCESS).is_file() else \
        {"input_size": spec.input_size}
    classes = json.loads((out_dir / CLASSES).read_text()) if (out_dir / CLASSES).is_file() else \
        [str(i) for i in range(spec.num_classes)]
    if len(classes) != spec.num_classes:
        raise SpecError(f"{out_dir / CLASSES}: {len(classes)} names for {spec.num_classes} outputs")
    return model, pre, classes


def preprocess_tensor(images: torch.Tensor, pre: dict) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> the network's input: resize the shorter side, centre-crop,
    scale to 0-1 and normalise, as the run evaluated."""
    from torchvision.transforms import v2

    size = int(pre.get("input_size") or images.shape[-1])
    ops = [v2.Resize(int(pre.get("resize") or size), antialias=True), v2.CenterCrop(size),
           v2.ToDtype(torch.float32, scale=True)]
    if pre.get("mean") and pre.get("std"):
        ops.append(v2.Normalize(mean=list(pre["mean"]), std=list(pre["std"])))
    return v2.Compose(ops)(images)
