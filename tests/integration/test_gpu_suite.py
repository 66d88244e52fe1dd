"""The GPU benchmark suite's CPU path (bench/gpu_suite.py): run as CI runs it, without a CUDA device, on
ResNet-20 at 32 px, it names every row, gives numbers for the rows it measured and "skipped: <reason>" for
the GPU-only ones; its pruned specs and its JPEG shards are checked directly."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines.config import DataConfig
from pipelines.loaders import build_loader
from pipelines.shardset import ShardSet
from system.models.spec import dense_spec
from system.pruning.complexity import count
from system.pruning.surgery import plan_spec
from tests.procs import build_ds_ops

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


def _suite():
    name = "_gpu_suite_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "gpu_suite.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up while the file runs
        spec.loader.exec_module(mod)
    return sys.modules[name]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


@pytest.fixture(scope="module")
def ds_ops():
    """Build (or find cached) DeepSpeed's CPU comm op once, outside the timed run (as test_distributed does)."""
    build_ds_ops(_env(), ROOT)


def _table(stdout: str) -> dict[str, list[str]]:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("|")]
    assert len(lines) == 2 + len(_suite().ROWS), stdout
    return {cells[0]: cells for cells in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:])}


def _number(cell: str) -> float:
    assert re.fullmatch(r"x?\d+(\.\d+)?", cell), cell
    return float(cell.lstrip("x"))


def test_cpu_path_prints_every_row(ds_ops, tmp_path):
    out = tmp_path / "suite.json"
    r = subprocess.run([PY, "bench/gpu_suite.py", "--iters", "2", "--warmup", "1", "--threads", "1",
                        "--out", str(out)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("no CUDA device: running the CPU rows on a tiny model"), r.stdout
    assert len(lines) == 1 + 2 + len(_suite().ROWS) + 1, r.stdout  # caption, table, JSON: nothing else on stdout
    rows = _table(r.stdout)
    assert list(rows) == list(_suite().ROWS)

    measured = ("dense", "dense_deepspeed", "pruned_r1", "pruned_r8", "prune_event", "step_dense", "step_variational")
    for name in measured:
        step_ms, notes = _number(rows[name][2]), rows[name][-1]
        assert step_ms > 0 and not notes.startswith("skipped"), rows[name]
    for name in ("dense", "dense_deepspeed", "pruned_r1", "pruned_r8"):
        assert _number(rows[name][3]) > 0  # img/s
    for name in ("pruned_r1", "pruned_r8"):
        assert abs(_number(rows[name][4]) - 0.5) < 0.1  # MACs vs dense
        assert _number(rows[name][5]) > 0 and _number(rows[name][6]) > 0  # speed-up, speed-up / ideal
    assert "steps" in rows["prune_event"][-1] and "surgery" in rows["prune_event"][-1]
    assert re.fullmatch(r"skipped: .*CUDA.*", rows["dense_dali"][-1]), rows["dense_dali"]
    assert rows["dense_dali"][2] == "–"
    assert rows["compile"][-1].startswith("skipped: "), rows["compile"]
    assert rows["step_compiled"][-1].startswith("skipped: "), rows["step_compiled"]

    res = json.loads(lines[-1])
    assert res == json.loads(out.read_text())
    assert res["cuda"] is False and res["model"] == "resnet20"
    assert {k for k, v in res["rows"].items() if v["status"] == "ok"} == set(measured)
    assert all(v["reason"] for v in res["rows"].values() if v["status"] == "skipped")
    assert all(w % 8 == 0 for blk in res["rows"]["pruned_r8"]["inner_widths"] for w in blk)
    ev = res["rows"]["prune_event"]
    assert ev["event_s"] > 0 and ev["first_step_after_s"] > 0 and ev["parts_s"]["rebuild"] > 0
    # the Trainer's own steps: no host sync in either; the variational step does more than the dense one
    dense, var = res["rows"]["step_dense"], res["rows"]["step_variational"]
    assert dense["syncs_per_step"] == 0 and var["syncs_per_step"] == 0
    assert var["ops_per_step"] > dense["ops_per_step"] > 100
    assert var["vs_dense_ops"] == pytest.approx(var["ops_per_step"] / dense["ops_per_step"])


def test_rows_subset_and_bad_row(tmp_path):
    r = subprocess.run([PY, "bench/gpu_suite.py", "--rows", "pruned_r8,dali", "--iters", "1", "--warmup", "0",
                        "--threads", "1"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _table(r.stdout)
    assert rows["dense"][-1] == "skipped: not selected (--rows)"
    assert _number(rows["pruned_r8"][2]) > 0
    assert "CUDA" in rows["dense_dali"][-1]
    bad = subprocess.run([PY, "bench/gpu_suite.py", "--rows", "densest"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "densest" in bad.stderr


@pytest.mark.parametrize("name", ["resnet50", "resnet20"])
@pytest.mark.parametrize("round_to", [1, 8])
def test_uniform_plan_reaches_half_the_macs(name, round_to):
    spec = dense_spec(name)
    plan, ratio, keep = _suite().plan_for_macs(spec, 0.5, round_to)
    new, _ = plan_spec(spec, plan)
    assert ratio == count(new)[0] / count(spec)[0]
    assert abs(ratio - 0.5) < (0.03 if name == "resnet50" else 0.06)
    for *_, blk in new.iter_blocks():
        assert all(w % round_to == 0 and w >= round_to for w in blk.inner)
    if round_to == 1:  # one keep fraction for every block: the widths follow the dense ones
        widths = {(d, w) for (*_, a), (*_, b) in zip(spec.iter_blocks(), new.iter_blocks())
                  for d, w in zip(a.inner, b.inner)}
        assert all(w == max(1, round(keep * d)) for d, w in widths)


def test_jpeg_shards_feed_the_project_loaders(tmp_path):
    root = _suite().make_jpeg_shards(tmp_path, 24, distinct=8, workers=1)
    assert ShardSet.open(root, verify_checksums=True).num_samples("train") == 24
    cfg = DataConfig(loader="wds", root=str(root), batch_size=8, train_size=32, workers=0)
    batches = list(build_loader(cfg, "train", 0, 1, seed=0, epoch=0))
    assert len(batches) == 3
    x, y = batches[0]
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.min() >= 0 and y.max() < 4


#: what a GPU machine with "torch preinstalled" has: torch, torchvision and their own requirements
TORCH_ALONE = ("torch", "torchvision", "triton", "numpy", "pillow", "sympy", "mpmath", "networkx", "jinja2",
               "markupsafe", "filelock", "fsspec", "typing-extensions", "setuptools", "cuda-bindings",
               "cuda-pathfinder", "cuda-toolkit", "nvidia-cublas", "nvidia-cuda-nvrtc", "nvidia-cudnn-cu13",
               "nvidia-cusparselt-cu13", "nvidia-nccl-cu13", "nvidia-nvshmem-cu13")


def _torch_alone(site: Path) -> None:
    """A site dir holding only :data:`TORCH_ALONE` (links to this venv's installed copies: nothing is
    downloaded), for a fresh venv to see as the machine's preinstalled packages."""
    import importlib.metadata as md
    site.mkdir(parents=True)
    for name in TORCH_ALONE:
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        base = Path(dist.locate_file(""))
        for top in {f.parts[0] for f in dist.files or []}:
            src, dst = base / top, site / top
            if top != "__pycache__" and not top.endswith(".pth") and src.exists() and not dst.exists():
                dst.symlink_to(src)


@pytest.mark.timeout(900)
def test_the_suite_runs_from_its_wheelhouse_on_a_machine_with_torch_alone(ds_ops, tmp_path):
    """Issue 24 point 5: bench/wheelhouse.sh builds the wheelhouse here (one Python, to keep it short);
    on a fresh venv that has only torch and torchvision, bench/gpu_suite.sh installs the rest from it with
    no index and its CPU path runs: the DeepSpeed row and the Trainer step measure (DeepSpeed, PyYAML and
    safetensors came from the wheelhouse), DALI reads skipped with its reason."""
    house, venv = tmp_path / "house", tmp_path / "machine"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    built = subprocess.run(["bash", "bench/wheelhouse.sh", str(house)], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "WHEELHOUSE_PYTHONS": py, "PYTHON": PY}, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    wheels = sorted(p.name for p in house.iterdir())
    assert any(w.startswith("deepspeed-") for w in wheels) and any(w.startswith("parsimony-") for w in wheels)
    assert not any(w.startswith(("torch-", "torchvision-", "nvidia_dali", "mlflow-")) for w in wheels), wheels
    assert sum(p.stat().st_size for p in house.iterdir()) < 60e6

    subprocess.run([getattr(sys, "_base_executable", PY), "-m", "venv", str(venv)], check=True, timeout=300)
    site = next((venv / "lib").glob("python3*/site-packages"))
    _torch_alone(tmp_path / "preinstalled")
    (site / "preinstalled.pth").write_text(str(tmp_path / "preinstalled") + "\n")
    machine_py = venv / "bin" / "python"
    before = subprocess.run([str(machine_py), "-c", "import torch, torchvision\ntry:\n import deepspeed\nexcept "
                             "ImportError:\n print('no deepspeed')"], capture_output=True, text=True, timeout=120)
    assert before.stdout.strip() == "no deepspeed", before.stderr[-2000:]

    env = {**_env(), "PYTHON": str(machine_py), "PARSIMONY_WHEELHOUSE": str(house),
           "GPU_SUITE_SITE": str(tmp_path / "suite-site"), "PIP_INDEX_URL": "http://127.0.0.1:9/nothing"}
    env.pop("PYTHONPATH")
    env.pop("TORCH_EXTENSIONS_DIR", None)  # that machine's venv builds DeepSpeed's op into its own folder
    r = subprocess.run(["bash", "bench/gpu_suite.sh", "--iters", "2", "--warmup", "1", "--threads", "1",
                        "--rows", "dense_dali,dense_deepspeed,step_variational"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = _table(r.stdout)
    for name in ("dense_deepspeed", "step_variational"):  # DeepSpeed; the project's Trainer with its readers
        assert _number(rows[name][2]) > 0 and not rows[name][-1].startswith("skipped"), rows[name]
    assert rows["dense_dali"][-1].startswith("skipped: "), rows["dense_dali"]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["torch"] == torch.__version__
    installed = {p.name.split("-")[0].lower() for p in (tmp_path / "suite-site").glob("*.dist-info")}
    assert {"deepspeed", "parsimony", "pyyaml"} <= installed and not installed & {"torch", "mlflow", "torchvision"}


def test_compiled_trainer_step_row_on_cpu(tmp_path):
    """--compile runs the step_compiled row on CPU too (inductor): the variational Trainer step compiled,
    its compile time and its step against the eager one of step_variational."""
    r = subprocess.run([PY, "bench/gpu_suite.py", "--rows", "step_variational,step_compiled", "--compile",
                        "--iters", "1", "--warmup", "1", "--threads", "1"], cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads(r.stdout.strip().splitlines()[-1])["rows"]["step_compiled"]
    assert row["status"] == "ok", row
    assert row["compile_s"] > row["step_s"] > 0 and row["speedup_vs_eager"] > 0
