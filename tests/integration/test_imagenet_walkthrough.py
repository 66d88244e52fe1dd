"""docs/imagenet.md, run: every command block of the walkthrough, in order, on an ImageNet-shaped tree this
test generates (10 classes of 300-500 px JPEGs, a flat val folder with its LOC_val_solution.csv), with the
real recipe and only its sizes, device, precision, GPUs and steps overridden: ResNet-50 at 64 px, DALI on
CPU, DeepSpeed on 2 ranks over the 2 namespaced nodes of the local Slurm cluster.

Each block runs in bash with the variables the earlier blocks set; ``parsimony-submit`` gets the
overrides appended (:data:`OVERRIDES`).  The first job writes its checkpoints slowly
(``PARSIMONY_CKPT_WRITE_DELAY``) so that it is still running when the walkthrough cancels it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.slurm_cluster import multi_partition

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "imagenet.md"
CLASSES = [f"n0{1440764 + 17 * i}" for i in range(10)]  # wnid-like folder names
STEPS = 12


def _tree(root: Path) -> None:
    """ImageNet's layout: train/<wnid>/*.JPEG, a flat val/ and LOC_val_solution.csv."""
    rng = np.random.default_rng(0)
    lines = ["ImageId,PredictionString"]
    for c, wnid in enumerate(CLASSES):
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(6):
            h, w = (int(v) for v in rng.integers(300, 501, 2))
            base = rng.integers(0, 255, 3)
            img = np.clip(base + rng.normal(0, 40, (h, w, 3)) + 8 * c, 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / "train" / wnid / f"{wnid}_{i}.JPEG", quality=85)
        for i in range(2):
            name = f"ILSVRC2012_val_{c * 2 + i + 1:08d}"
            img = np.clip(rng.normal(128 + 8 * c, 40, (360, 420, 3)), 0, 255).astype(np.uint8)
            (root / "val").mkdir(exist_ok=True)
            Image.fromarray(img).save(root / "val" / f"{name}.JPEG", quality=85)
            lines.append(f"{name},{wnid} 10 10 100 100")
    (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")


def _blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)


def test_the_walkthrough_runs_end_to_end(tmp_path, slurm_cluster):
    partition = multi_partition()
    src, shards, work = tmp_path / "imagenet", tmp_path / "imagenet-wds", tmp_path / "project"
    _tree(src)
    work.mkdir()
    (work / "configs").symlink_to(REPO / "configs")  # the commands name the recipe from the repository root
    overrides = ["data.train_size=64", "data.val_resize=73", "data.val_crop=64", "data.batch_size=4",
                 "data.workers=1", "train.device=cpu", "train.precision=fp32", "train.channels_last=false",
                 f"train.max_steps={STEPS}", "train.eval_batches=1", "train.log_every_steps=2", "train.progress=false",
                 "checkpoint.every_steps=3", "latency.repeats=3", "launch.gpus_per_node=0", "launch.nodes=2",
                 "launch.tasks_per_node=1", "launch.cpus_per_task=1", f"launch.partition={partition}",
                 "launch.time_min=30"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}"}
    prelude = ("set -euo pipefail\n"
               f"parsimony-submit() {{ command parsimony-submit \"$@\" {shlex.join(overrides)}; }}\n"
               "[ -f vars.sh ] && source vars.sh\n")
    blocks = [b.replace("/data/imagenet-wds", str(shards)).replace("/data/imagenet", str(src)) for b in _blocks()]
    assert len(blocks) == 6, "docs/imagenet.md: the test runs its six command blocks in order"
    outputs = []
    for i, block in enumerate(blocks):
        extra = {"PARSIMONY_CKPT_WRITE_DELAY": "2"} if i == 1 else {}  # the first job: still running when cancelled
        script = prelude + block + "\n( set +u; declare -p JOB RUN_DIR 2>/dev/null || true ) > vars.sh\n"
        out = subprocess.run(["bash", "-c", script], cwd=work, env={**env, **extra}, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, f"block {i + 1}:\n{block}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        outputs.append(out.stdout + out.stderr)
        if i == 1:  # the job runs: wait for its first checkpoint before the walkthrough cancels it
            run_dir = Path(re.search(r"run dir +(\S+)", out.stdout).group(1))
            deadline = time.monotonic() + 400
            while not list((run_dir / "checkpoints").glob("step-*")):
                assert time.monotonic() < deadline, "no checkpoint within 400 s"
                time.sleep(1)

    manifest = json.loads((shards / "manifest.json").read_text())
    assert [c["name"] for c in manifest["classes"]] == CLASSES
    assert {k: v["num_samples"] for k, v in manifest["splits"].items()} == {"train": 60, "val": 20}
    assert "ok: 1 run(s) on slurm" in outputs[1]  # the dry run, then the job
    # the cancelled job was continued by a new one, in the same directory and MLflow run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["world_size"] == 2 and summary["model"] == "resnet50"
    continued_log = Path(re.search(r"\(stderr (\S+)\)", outputs[3]).group(1)).read_text()
    assert re.search(r"resumed from \S+: step [1-9]\d*", continued_log), continued_log[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("imagenet-resnet50")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert runs[run_dir.name].info.status == "FINISHED" and runs[run_dir.name].info.run_id == summary["run_id"]
    (dense,) = [r for name, r in runs.items() if name.startswith("imagenet-resnet50-dense-")]  # <name>-<job id>
    assert dense.info.status == "FINISHED" and len(runs) == 2
    assert summary["macs"] < summary["macs_dense"]  # pruned: the recipe's rounding step at 60% of the run
    assert [v.name for v in client.search_model_versions("name='resnet50-pruned'")] == ["resnet50-pruned"]
    assert run_dir.name in outputs[4] and dense.info.run_name in outputs[4]  # compare lists both
    assert (work / "runs" / "imagenet-pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert (run_dir / "export" / "onnx" / "model.onnx").is_file()
    assert "loaded: 10 classes, 64 px" in outputs[5]
