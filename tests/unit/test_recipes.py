"""Every shipped recipe passes the submit-time checks with its own ``launch`` section, and the CUDA
recipe refuses an allocation without GPUs, saying which key requests them (no cluster needed: these
are the checks ``parsimony-submit`` runs before anything reaches Slurm)."""

from __future__ import annotations

from pathlib import Path

import pytest

from launch.config import load_jobs
from launch.preflight import check_job
from system.config import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
IMAGENET = CONFIGS / "imagenet_resnet50_variational.yaml"


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_recipe_passes_the_submit_checks(recipe):
    launch, jobs = load_jobs([CONFIGS / recipe], [])
    for job in jobs:
        warnings = check_job(launch, job)
        assert all(w.startswith("data.root:") for w in warnings), warnings  # the data may live elsewhere


def test_the_imagenet_recipe_requests_its_gpus():
    launch, _ = load_jobs([IMAGENET], [])
    assert launch.gpus_per_node >= launch.tasks_per_node >= 1 and launch.nodes >= 1
    assert launch.signal_delay_s >= 120  # time for the agreed checkpoint of a ResNet-50 before the limit


@pytest.mark.parametrize("overrides", [
    ["launch.gpus_per_node=0", "launch.tasks_per_node=1"],
    ["launch.gpus_per_node=0", "launch.tasks_per_node=1", "train.precision=fp32"],  # still train.device=cuda
])
def test_a_cuda_recipe_without_gpus_is_refused_naming_the_key(overrides):
    launch, [job] = load_jobs([IMAGENET], overrides)
    with pytest.raises(ConfigError) as err:
        check_job(launch, job)
    assert err.value.key == "launch.gpus_per_node"
    assert "request GPUs with launch.gpus_per_node" in str(err.value) and "train.device=cuda" in str(err.value)


def test_bf16_on_cpu_is_refused_naming_the_gpu_key():
    launch, [job] = load_jobs([CONFIGS / "demo.yaml"], ["train.precision=bf16", "train.device=auto"])
    with pytest.raises(ConfigError) as err:
        check_job(launch, job)
    assert err.value.key == "launch.gpus_per_node" and "train.precision=bf16" in str(err.value)
