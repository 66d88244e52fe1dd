"""``parsimony-export RUN_DIR [--checkpoint step-N] --format {safetensors,torchscript,exported,onnx}``.

Writes the run's pruned, gate-free network in a deployable format, with what it takes to use it
(``spec.json``, ``preprocess.json``, ``classes.json``), to ``RUN_DIR/export/<format>/`` (or ``--out``):

- ``safetensors``: ``model.safetensors`` (load with :func:`system.export.load_bundle`);
- ``torchscript``: ``model.ts`` (``torch.jit.load``; traced at the network's input size);
- ``exported``: ``model.pt2`` (``torch.export.load``; a fixed-shape ``torch.export`` program, batch 1);
- ``onnx``: ``model.onnx`` (dynamic batch), checked against PyTorch with ONNX Runtime before it is kept.

The network is the run's ``final/`` export; ``--checkpoint step-N`` deploys that checkpoint instead
(its gates folded as the run would have at that step).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from system.models.resnet import GatedResNet

# torch and the project's modules are imported once the arguments are read: --help answers at once
# (bench/cli_start.py times it)
log = logging.getLogger("launch.export")

FORMATS = ("safetensors", "torchscript", "exported", "onnx")
#: the file each format writes (safetensors: system.export.WEIGHTS)
FILES = {"safetensors": "model.safetensors", "torchscript": "model.ts", "exported": "model.pt2", "onnx": "model.onnx"}
#: ONNX Runtime must agree with PyTorch to this (max abs difference of the logits)
ONNX_ATOL = 1e-3


def deploy_checkpoint(path: Path) -> tuple[GatedResNet, dict, list[str]]:
    """The gate-free network of checkpoint ``path`` (verified first), with the run's preprocessing
    and class names taken from the run's ``final/`` when it has one."""
    from system.build import load_checkpoint_network
    from system.export import CLASSES, PREPROCESS
    from system.report import deploy

    model, method, cfg, info = load_checkpoint_network(path)
    deployed = deploy(model.eval(), method, cfg.run.export_gates)  # as the run deploys its final network
    final = info.path.parent.parent / "final"
    pre = json.loads((final / PREPROCESS).read_text()) if (final / PREPROCESS).is_file() else \
        {"input_size": info.spec.input_size}
    classes = json.loads((final / CLASSES).read_text()) if (final / CLASSES).is_file() else \
        [str(i) for i in range(info.spec.num_classes)]
    return deployed, pre, classes


def export(model: GatedResNet, pre: dict, classes: list[str], fmt: str, out: Path) -> dict:
    """Write ``model`` as ``fmt`` into ``out`` (with spec, preprocessing and classes); returns a record."""
    import torch

    from system.export import WEIGHTS, save_deployed

    model = model.eval()
    size = int(pre.get("input_size") or model.spec().input_size)
    example = torch.randn(2, model.conv1.in_channels, size, size)
    out.mkdir(parents=True, exist_ok=True)
    save_deployed(model, out, preprocess=pre, classes=classes)  # spec + metadata (+ safetensors weights)
    target = out / FILES[fmt]
    rec: dict = {"format": fmt, "path": str(target)}
    with torch.no_grad():
        ref = model(example)
        if fmt == "torchscript":
            traced = torch.jit.trace(model, example)
            traced.save(str(target))
            rec["max_abs_diff"] = float((torch.jit.load(str(target))(example) - ref).abs().max())
        elif fmt == "exported":
            program = torch.export.export(model, (example[:1],))
            torch.export.save(program, str(target))
            back = torch.export.load(str(target)).module()
            rec["max_abs_diff"] = float((back(example[:1]) - ref[:1]).abs().max())
        elif fmt == "onnx":
            rec["max_abs_diff"] = _export_onnx(model, example, ref, target)
    if fmt != "safetensors":
        (out / WEIGHTS).unlink(missing_ok=True)  # the format's own file carries the weights
    return rec


def _export_onnx(model: GatedResNet, example: torch.Tensor, ref: torch.Tensor, target: Path) -> float:
    import torch

    try:
        import onnxruntime as ort
    except ImportError as exc:  # a project dependency; say what is missing rather than fail obscurely
        raise RuntimeError(f"ONNX export needs onnxruntime to check the result ({exc})") from None
    batch = torch.export.Dim("batch", min=1, max=1024)
    tmp = target.with_suffix(".onnx.tmp")
    torch.onnx.export(model, (example,), str(tmp), input_names=["images"], output_names=["logits"],
                      dynamic_shapes={"x": {0: batch}}, dynamo=True, external_data=False)
    sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"images": example.numpy()})[0]
    diff = float(abs(torch.from_numpy(got) - ref).max())
    if not diff <= ONNX_ATOL:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"ONNX Runtime disagrees with PyTorch (max abs difference {diff:.2e} > {ONNX_ATOL})")
    tmp.replace(target)
    return diff


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="parsimony-export", description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", help="a run directory (its final/ export, or --checkpoint)")
    ap.add_argument("--checkpoint", default=None,
                    help="step-N (or N, or latest): export that checkpoint instead of final/")
    ap.add_argument("--format", choices=FORMATS, default="onnx")
    ap.add_argument("--out", default=None, help="default: RUN_DIR/export/<format>")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # one line per folded initializer otherwise
    from system.export import SPEC, load_bundle
    from system.models.spec import SpecError
    from system.runtime.checkpoint import CheckpointError, checkpoint_dir

    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir / "export" / args.format
    try:
        if args.checkpoint:
            model, pre, classes = deploy_checkpoint(checkpoint_dir(run_dir, args.checkpoint))
        else:
            if not (run_dir / "final" / SPEC).is_file():
                raise SpecError(f"{run_dir / 'final'}: no export of a finished run (pass --checkpoint step-N)")
            model, pre, classes = load_bundle(run_dir / "final")
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        rec = export(model, pre, classes, args.format, tmp)
        shutil.rmtree(out, ignore_errors=True)
        tmp.replace(out)
        rec["path"] = str(out / FILES[args.format])
    except (SpecError, CheckpointError, RuntimeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
