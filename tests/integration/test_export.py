"""A usable result: a self-contained final/, the README's snippet, and launch.export in every format
(ONNX checked with ONNX Runtime), from final/ and from a checkpoint."""

from __future__ import annotations

import json
import re
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
    Trainer(tiny_config(tmp, *STRONG["taylor"], "train.max_steps=12", "checkpoint.every_steps=6")).run()
    return tmp / "run"


def test_final_is_self_contained(run_dir):
    final = run_dir / "final"
    pre = json.loads((final / "preprocess.json").read_text())
    assert pre["input_size"] == 16 and len(pre["mean"]) == 3 and len(pre["std"]) == 3
    assert json.loads((final / "classes.json").read_text()) == ["class0", "class1", "class2", "class3"]
    model, pre2, classes = load_bundle(final)
    assert pre2 == pre and len(classes) == model.fc.out_features


def test_the_readme_snippet_runs(run_dir, tmp_path):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Use your pruned model.*?```python\n(.*?)```", text, re.S)
    assert block, "README lost its 'Use your pruned model' snippet"
    photo = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(photo)
    code = block.group(1).replace("runs/demo/final", str(run_dir / "final")).replace("photo.jpg", str(photo))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() in json.loads((run_dir / "final" / "classes.json").read_text())


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
        assert rec["max_abs_diff"] <= 1e-3
    elif fmt == "torchscript":
        got = torch.jit.load(str(path))(x)
    elif fmt == "exported":
        got = torch.cat([torch.export.load(str(path)).module()(x[i:i + 1]) for i in range(3)])
    else:
        got = load_bundle(out)[0](x)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)


def test_export_a_checkpoint(run_dir, tmp_path, capsys):
    assert export_main([str(run_dir), "--checkpoint", "step-00000006", "--format", "torchscript",
                        "--out", str(tmp_path / "ck")]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    spec = json.loads((tmp_path / "ck" / "spec.json").read_text())
    manifest = json.loads((run_dir / "checkpoints" / "step-00000006" / "manifest.json").read_text())
    assert spec == json.loads((run_dir / "checkpoints" / "step-00000006" / "spec.json").read_text())
    assert manifest["step"] == 6 and rec["max_abs_diff"] == 0.0


def test_export_errors_name_the_problem(tmp_path, capsys):
    assert export_main([str(tmp_path), "--format", "onnx"]) == 2
    assert "no export of a finished run" in capsys.readouterr().err
