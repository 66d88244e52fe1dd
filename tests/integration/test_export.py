"""A usable result: a self-contained final/, the README's snippet, and launch.export in every format
(ONNX checked with ONNX Runtime), from final/ and from a checkpoint."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from launch.export import FORMATS
from launch.export import main as export_main
from system.export import load_bundle
from system.trainer import Trainer
from tests.methods_util import STRONG, tiny_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    old = os.umask(0o022)  # a shared project directory's usual umask (the test below checks it is followed)
    try:
        # with the embedded MLflow store under the run root: its artifact copies are results too
        Trainer(tiny_config(tmp, *STRONG["taylor"], "train.max_steps=12", "checkpoint.every_steps=6",
                            "tracking.enabled=true")).run()
    finally:
        os.umask(old)
    return tmp / "run"


def test_results_follow_the_umask(run_dir, tmp_path, capsys):
    """Under umask 022 a teammate can read every result: the run's files, its checkpoints, final/ and
    an export (tempfile alone would leave them 0600 and 0700)."""
    old = os.umask(0o022)
    try:
        assert export_main([str(run_dir), "--format", "safetensors", "--out", str(tmp_path / "st")]) == 0
    finally:
        os.umask(old)
    # the run root's whole content (the run, and the tracking store and artifacts when it keeps them there)
    paths = [*run_dir.parent.rglob("*"), tmp_path / "st", *(tmp_path / "st").rglob("*")]
    assert run_dir / "final" / "model.safetensors" in paths and run_dir / "summary.json" in paths
    assert [p for p in paths if p.name == "model.safetensors" and "artifacts" in p.parts]  # MLflow's copy
    closed = [f"{p} {stat.filemode(p.stat().st_mode)}" for p in paths
              if (p.stat().st_mode & (0o055 if p.is_dir() else 0o044)) != (0o055 if p.is_dir() else 0o044)]
    assert not closed, closed


def test_final_is_self_contained(run_dir):
    final = run_dir / "final"
    pre = json.loads((final / "preprocess.json").read_text())
    assert pre["input_size"] == 16 and len(pre["mean"]) == 3 and len(pre["std"]) == 3
    assert json.loads((final / "classes.json").read_text()) == ["class0", "class1", "class2", "class3"]
    model, pre2, classes = load_bundle(final)
    assert pre2 == pre and len(classes) == model.fc.out_features


def test_a_private_umask_keeps_everything_private(tmp_path, capsys):
    """Under umask 077 nothing a run or an export writes is open to the group or others."""
    old = os.umask(0o077)
    try:
        Trainer(tiny_config(tmp_path, *STRONG["taylor"], "train.max_steps=6", "checkpoint.every_steps=3",
                            "tracking.enabled=true")).run()
        assert export_main([str(tmp_path / "run"), "--format", "safetensors", "--out", str(tmp_path / "st")]) == 0
    finally:
        os.umask(old)
    paths = [p for p in tmp_path.rglob("*") if not p.is_symlink()]
    assert tmp_path / "run" / "final" / "model.safetensors" in paths and tmp_path / "st" / "model.safetensors" in paths
    opened = [f"{p} {stat.filemode(p.stat().st_mode)}" for p in paths if p.stat().st_mode & 0o077]
    assert not opened, opened


def test_the_readme_snippet_runs(run_dir, tmp_path):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Use your pruned model.*?```python\n(.*?)```", text, re.S)
    assert block, "README lost its 'Use your pruned model' snippet"
    rng = np.random.default_rng(0)
    photos = {"photo.jpg": Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)),  # RGB
              "photo.png": Image.fromarray(rng.integers(0, 255, (40, 30, 4), dtype=np.uint8), "RGBA"),
              "grey.jpg": Image.fromarray(rng.integers(0, 255, (40, 30), dtype=np.uint8), "L")}
    snippet = block.group(1).replace("runs/demo/final", str(run_dir / "final"))
    code = "\n".join(snippet.replace("photo.jpg", str(tmp_path / name)) for name in photos)  # one process
    for name, im in photos.items():
        im.save(tmp_path / name)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    classes = json.loads((run_dir / "final" / "classes.json").read_text())
    printed = out.stdout.strip().splitlines()
    assert len(printed) == len(photos) and all(c in classes for c in printed)


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_every_format_matches_pytorch(run_dir, tmp_path, fmt, capsys):
    out = tmp_path / fmt
    assert export_main([str(run_dir), "--format", fmt, "--out", str(out)]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {p.name for p in out.iterdir()} >= {"spec.json", "preprocess.json", "classes.json", Path(rec["path"]).name}
    model, pre, _ = load_bundle(run_dir / "final")
    x = torch.randn(3, 3, pre["input_size"], pre["input_size"])
    with torch.no_grad():
        ref = model(x)
    path = Path(rec["path"])
    if fmt == "onnx":
        import onnxruntime as ort
        got = torch.from_numpy(ort.InferenceSession(str(path)).run(None, {"images": x.numpy()})[0])
    elif fmt == "torchscript":
        got = torch.jit.load(str(path))(x)
    elif fmt == "exported":
        got = torch.cat([torch.export.load(str(path)).module()(x[i:i + 1]) for i in range(3)])
    else:
        got = load_bundle(out)[0](x)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)


def test_export_a_checkpoint(run_dir, tmp_path, capsys):
    # step-N as the README writes it: the directory is step-00000006
    assert export_main([str(run_dir), "--checkpoint", "step-6", "--format", "torchscript",
                        "--out", str(tmp_path / "ck")]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    spec = json.loads((tmp_path / "ck" / "spec.json").read_text())
    manifest = json.loads((run_dir / "checkpoints" / "step-00000006" / "manifest.json").read_text())
    assert spec == json.loads((run_dir / "checkpoints" / "step-00000006" / "spec.json").read_text())
    assert manifest["step"] == 6 and rec["max_abs_diff"] == 0.0
    # the weights are step 6's, read back from the checkpoint's own file, not the final network's: the classifier
    # (which the export leaves as it is) equals the checkpoint's and differs from the run's end
    from safetensors.torch import load_file

    from system.build import saved_weights
    from system.runtime.checkpoint import verify

    fc = torch.jit.load(str(rec["path"])).state_dict()["fc.weight"]
    torch.testing.assert_close(fc, saved_weights(verify(run_dir / "checkpoints" / "step-00000006"))["fc.weight"],
                               rtol=0, atol=0)
    assert not torch.equal(fc, load_file(str(run_dir / "final" / "model.safetensors"))["fc.weight"])


def test_export_errors_name_the_problem(run_dir, tmp_path, capsys):
    assert export_main([str(tmp_path), "--format", "onnx"]) == 2
    assert "no export of a finished run" in capsys.readouterr().err
    # a checkpoint the run does not have: the error lists the ones it has, and nothing is written
    assert export_main([str(run_dir), "--checkpoint", "step-7", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint 'step-7'" in err and "step-00000006" in err and "step-00000012" in err
    assert export_main([str(run_dir), "--checkpoint", "best", "--out", str(tmp_path / "x")]) == 2
    assert "not a checkpoint name (step-N, N or latest)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.tmp").exists()
