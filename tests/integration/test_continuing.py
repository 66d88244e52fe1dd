"""What a new job continues (launch/continuing.py), on a real run with checkpoints: ``run.resume=RUN_DIR``
or its newest checkpoint becomes that run's directory and name; an older checkpoint, a path that holds
nothing and a sweep are refused naming the key; ``--resume`` reads the run's own config.json, masked
logins dropped.  The jobs themselves run on the local cluster in test_submit.py."""

from __future__ import annotations

import json

import pytest

from launch.config import load_job
from launch.continuing import continue_job, load_resumed
from launch.submitting import prepare
from system.config import ConfigError
from system.tracking.secrets import redact_text
from system.trainer import Trainer
from tests.methods_util import STRONG, tiny_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cont")
    Trainer(tiny_config(tmp, *STRONG["taylor"], "train.max_steps=12", "checkpoint.every_steps=6",
                        "checkpoint.keep_last=5")).run()
    return tmp / "run"


def _job(*overrides: str):
    return load_job(None, ["model.name=resnet20", "data.loader=synthetic", *overrides])[1]


def test_a_run_or_its_newest_checkpoint_is_continued_where_it_is(run_dir):
    for target in (run_dir, run_dir / "checkpoints" / "step-00000012"):
        (job,) = prepare(_job(f"run.resume={target}"))
        run = job.cfg.run
        assert (run.dir, run.name, run.resume) == (str(run_dir.resolve()), run_dir.name, "auto")


@pytest.mark.parametrize("target, needle", [
    ("checkpoints/step-00000006", "step-00000012 is"),  # not the newest: a requeue would abandon it
    ("nowhere", "does not exist"),
    ("final", "holds no checkpoint"),
])
def test_what_cannot_be_continued_is_refused_naming_the_key(run_dir, target, needle):
    with pytest.raises(ConfigError) as err:
        continue_job(_job(f"run.resume={run_dir / target}")[0])
    assert err.value.key == "run.resume" and needle in str(err.value)


def test_a_sweep_cannot_continue_one_run(run_dir):
    jobs = load_job(None, ["model.name=resnet20", f"run.resume={run_dir}"], ["optim.lr=0.1,0.2"])[1]
    with pytest.raises(ConfigError) as err:
        prepare(jobs)
    assert err.value.key == "run.resume"


def test_resume_reads_the_runs_own_config(run_dir, tmp_path):
    cfg = json.loads((run_dir / "config.json").read_text())
    recipe = tmp_path / "r.yaml"
    recipe.write_text("launch:\n  nodes: 1\n  time_min: 33\noptim:\n  lr: 9.0\n")  # only its launch section counts
    launch, (job,) = load_resumed(run_dir, [str(recipe)], ["train.max_steps=20", "launch.cpus_per_task=2"])
    assert (launch.time_min, launch.cpus_per_task) == (33, 2)
    assert job.cfg.train.max_steps == 20 and job.cfg.optim.lr == cfg["optim"]["lr"]
    assert job.cfg.run.dir == str(run_dir.resolve()) and job.cfg.run.resume == "auto"
    with pytest.raises(ConfigError) as err:
        load_resumed(run_dir, [], ["run.dir=/elsewhere"])
    assert err.value.key == "run.dir"
    with pytest.raises(ConfigError) as err:
        load_resumed(tmp_path, [], [])
    assert err.value.key == "--resume" and "config.json" in str(err.value)


def test_resume_drops_a_masked_login_and_asks_for_a_masked_secret(run_dir, tmp_path):
    moved = tmp_path / "moved"
    moved.mkdir()
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["tracking"]["uri"] = redact_text("http://alice:pw@127.0.0.1:5999")  # as config.json holds it
    (moved / "config.json").write_text(json.dumps(cfg))
    (moved / "checkpoints").symlink_to(run_dir / "checkpoints")
    _, (job,) = load_resumed(moved, [], [])
    assert job.cfg.tracking.uri == "http://127.0.0.1:5999"  # the login comes from MLflow's sources again
    cfg["data"]["root"] = "***"  # a masked value that is no URL login cannot be guessed
    (moved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as err:
        load_resumed(moved, [], [])
    assert err.value.key == "data.root" and "pass it again" in str(err.value)
    _, (job,) = load_resumed(moved, [], ["data.root=/shards"])
    assert job.cfg.data.root == "/shards"
