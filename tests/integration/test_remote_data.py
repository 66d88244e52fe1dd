"""Training streams its shards from a real HTTP server on 127.0.0.1 (wids, a node-local cache): the
same samples in the same order as from the local folder, bit for bit, and a resume is exact too."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
import torch

from pipelines.config import DEMO_ROOT, DataConfig
from pipelines.shardset import ShardSetError
from system.config import ConfigError, from_dict
from system.runtime.faults import Faults, InjectedStop
from system.trainer import Trainer
from tests.http_server import serve
from tests.methods_util import tiny_config


@pytest.fixture(scope="module")
def server():
    with serve(DEMO_ROOT) as url:
        yield url


def _cfg(tmp_path: Path, root: str, *over: str):
    return tiny_config(tmp_path, "data.loader=wds", f"data.root={root}", "data.train_size=28", "data.val_resize=28",
                       "data.val_crop=28", "data.batch_size=16", "data.workers=0", "train.max_steps=6",
                       "train.eval_batches=1", f"data.cache_dir={tmp_path / 'cache'}", "method.name=taylor",
                       "method.taylor.check_every=2", "method.taylor.start_frac=0.0", "method.taylor.per_step=8",
                       *over)


def _weights(trainer: Trainer) -> str:
    h = hashlib.sha256()
    for k, v in sorted(trainer.model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def test_training_streams_from_http_like_from_the_folder(server, tmp_path):
    remote = Trainer(_cfg(tmp_path / "r", server))
    rs = remote.run()
    local = Trainer(_cfg(tmp_path / "l", DEMO_ROOT))
    ls = local.run()
    assert rs["steps"] == ls["steps"] == 6 and rs["prune_events"] == ls["prune_events"] > 0
    assert _weights(remote) == _weights(local) and rs["top1"] == ls["top1"]
    assert any((tmp_path / "r" / "cache").rglob("*.tar"))  # the shards went through the node cache
    assert rs["samples_skipped"] == 0


def test_a_streamed_run_resumes_exactly(server, tmp_path):
    whole = Trainer(_cfg(tmp_path / "whole", server, "checkpoint.every_steps=3"))
    whole.run()
    first = Trainer(_cfg(tmp_path / "part", server, "checkpoint.every_steps=3"), faults=Faults(stop_after_step=3))
    with pytest.raises(InjectedStop):
        first.run()
    again = Trainer(_cfg(tmp_path / "part", server, "checkpoint.every_steps=3", "run.resume=auto"))
    assert again.state.step == 3
    again.run()
    assert _weights(again) == _weights(whole)


def test_a_url_that_does_not_answer_fails_at_start_naming_it(tmp_path):
    url = "http://127.0.0.1:9/shards"  # the discard port: nothing listens
    t0 = time.monotonic()
    with pytest.raises(ShardSetError) as err:
        Trainer(_cfg(tmp_path, url))
    assert f"{url}/manifest.json" in str(err.value) and "no answer after 3 tries" in str(err.value)
    assert time.monotonic() - t0 < 60
    assert not (tmp_path / "run").exists()


def test_dali_with_a_url_root_is_refused_naming_the_key():
    with pytest.raises(ConfigError) as err:
        from_dict(DataConfig, {"loader": "dali", "root": "http://127.0.0.1:1/shards"})
    assert err.value.key == "loader" and "data.loader=wds" in str(err.value)


def test_streamed_batches_equal_the_local_ones(server, tmp_path):
    from pipelines.loaders import build_loader

    def batches(root: str) -> list:
        cfg = DataConfig(loader="wds", root=root, train_size=28, val_resize=28, val_crop=28, batch_size=32,
                         workers=1, cache_dir=str(tmp_path / "c"))
        return [(x.clone(), y.clone()) for x, y in build_loader(cfg, "val", 0, 1, 0, 0)]

    remote, local = batches(server), batches(DEMO_ROOT)
    assert len(remote) == len(local) > 0
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(remote, local))


def test_a_remote_manifest_that_does_not_match_its_shards_is_refused_before_training(tmp_path):
    import shutil

    from tests.http_server import serve

    data = tmp_path / "shards"
    shutil.copytree(DEMO_ROOT, data)
    victim = data / "train-000001.tar"
    victim.write_bytes(victim.read_bytes()[:-1024])  # truncated on the server
    with serve(data) as url, pytest.raises(ShardSetError) as err:
        Trainer(_cfg(tmp_path, url))
    assert f"{url}/train-000001.tar" in str(err.value) and "bytes" in str(err.value)
    assert not (tmp_path / "run").exists()
