"""Data pipelines on CPU with real JPEG files: shard tool, DALI (CPU-only) and WebDataset loaders."""

from __future__ import annotations

import io
import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import shards
from pipelines.config import DEMO_ROOT, DataConfig
from pipelines.loaders import build_loader
from pipelines.plan import PAD, epoch_plan
from pipelines.shardset import MANIFEST, ShardSet, ShardSetError, read_index, sha256_file
from system.config import ConfigError, from_dict

N = 42  # one image per class, so a label identifies its sample
SMALL = dict(train_size=24, val_resize=28, val_crop=24, workers=0, batch_size=4)


def _photo(i: int, grey: bool = False) -> Image.Image:
    """A small structured picture (gradients + a block), different per index."""
    h, w = 30 + (i % 5) * 4, 40 + (i % 3) * 6
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([(x * 255 // w + i * 7) % 256, (y * 255 // h + i * 13) % 256, (x + y + i * 29) % 256], -1)
    rgb[h // 4 : h // 2, w // 3 : w // 2] = (i * 37) % 256
    img = Image.fromarray(rgb.astype(np.uint8), "RGB")
    return img.convert("L") if grey else img


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """ImageNet layout: train/<class>/*.JPEG (one per class, + a corrupt and a truncated file), flat val/ + labels."""
    root = tmp_path_factory.mktemp("imagefolder")
    labels = []
    for c in range(N):
        d = root / "train" / f"n{c:08d}"
        d.mkdir(parents=True)
        (d / f"t{c}.JPEG").write_bytes(_jpeg(_photo(c, grey=c % 4 == 0)))
        if c == 0:
            (d / "corrupt.JPEG").write_bytes(b"this is not a jpeg" * 50)
        if c == 1:
            data = _jpeg(_photo(100))
            (d / "truncated.JPEG").write_bytes(data[: len(data) // 2])
        (root / "val").mkdir(exist_ok=True)
        if c == 2:  # a PNG and a CMYK JPEG, as ImageNet has: re-encoded to RGB JPEG
            _photo(200 + c).save(root / "val" / f"v{c}.JPEG", "PNG")
        elif c == 3:
            _photo(200 + c).convert("CMYK").save(root / "val" / f"v{c}.JPEG", "JPEG")
        else:
            (root / "val" / f"v{c}.JPEG").write_bytes(_jpeg(_photo(200 + c, grey=c % 5 == 0)))
        labels.append(f"v{c}.JPEG n{c:08d}")
    (root / "val_labels.txt").write_text("\n".join(labels) + "\n")
    return root


@pytest.fixture(scope="module")
def shard_dir(tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    shards.build(tree, out, max_count=10, seed=3, workers=1, progress=False)
    return out


def _epoch(cfg: DataConfig, split: str, rank=0, world=1, seed=0, epoch=0, start=0):
    loader = build_loader(cfg, split, rank, world, seed, epoch, start_batch=start)
    batches = list(loader)
    assert len(batches) == len(loader)
    return loader, batches


def _labels(batches) -> list[int]:
    return [int(v) for _, y in batches for v in y]


# ------------------------------------------------------------------------------------------ shard tool
def test_shard_tool_skips_corrupt_and_truncated(shard_dir, tree):
    m = json.loads((shard_dir / MANIFEST).read_text())
    reasons = {Path(s["path"]).name: s["reason"] for s in m["skipped"]}
    assert set(reasons) == {"corrupt.JPEG", "truncated.JPEG"}
    assert reasons["truncated.JPEG"].startswith("truncated")
    assert reasons["corrupt.JPEG"].startswith("corrupt")
    assert sorted(Path(p).name for p in m["reencoded"]) == ["v2.JPEG", "v3.JPEG"]
    assert m["num_classes"] == N and [c["name"] for c in m["classes"]] == [f"n{c:08d}" for c in range(N)]
    for split in ("train", "val"):
        entries = m["splits"][split]["shards"]
        assert [e["file"] for e in entries] == [f"{split}-{i:06d}.tar" for i in range(5)]
        assert [e["samples"] for e in entries] == [10, 10, 10, 10, 2]
        for e in entries:
            assert sha256_file(shard_dir / e["file"]) == e["sha256"]
            assert len(read_index(shard_dir / e["index"])) == e["samples"]
    assert not list(shard_dir.glob("*.tmp")) and not (shard_dir / ".parts").exists()


def test_shards_are_webdataset_and_dali_readable(shard_dir):
    import webdataset as wds

    urls = [str(p) for p in sorted(shard_dir.glob("train-*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node, empty_check=False))
    assert len(samples) == N and all(set(s) >= {"__key__", "jpg", "cls"} for s in samples)
    assert sorted(int(s["cls"]) for s in samples) == list(range(N))
    # The shuffle is global: the first shard is not the first classes.
    assert [int(s["cls"]) for s in samples[:10]] != list(range(10))
    for s in samples:  # every stored image decodes as an RGB or greyscale JPEG
        assert Image.open(io.BytesIO(s["jpg"])).format == "JPEG"


def test_shard_tool_is_idempotent_and_interrupt_safe(tree, shard_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    calls = {"n": 0}
    real = shards.check_image

    def flaky(path):
        calls["n"] += 1
        if calls["n"] == 25:
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(shards, "check_image", flaky)
    with pytest.raises(KeyboardInterrupt):
        shards.build(tree, out, max_count=10, seed=3, workers=1, progress=False)
    assert not list(out.glob("*.tmp")) and not (out / MANIFEST).exists()
    done = sorted(p.name for p in out.glob("*.tar"))
    assert done == ["train-000000.tar", "train-000001.tar"]  # complete shards only
    kept = {n: (out / n).stat().st_mtime_ns for n in done}
    monkeypatch.setattr(shards, "check_image", real)
    shards.build(tree, out, max_count=10, seed=3, workers=1, progress=False)
    assert {n: (out / n).stat().st_mtime_ns for n in done} == kept  # not rewritten
    ref, new = json.loads((shard_dir / MANIFEST).read_text()), json.loads((out / MANIFEST).read_text())
    for key in ("classes", "splits", "skipped", "reencoded"):
        assert new[key] == ref[key], key  # identical bytes (checksums) to an uninterrupted run
    shards.build(tree, out, max_count=10, seed=3, workers=1, progress=False)
    assert json.loads((out / MANIFEST).read_text())["splits"] == ref["splits"]


def test_shard_tool_flat_val_needs_labels(tree, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tree / "train", src / "train")
    shutil.copytree(tree / "val", src / "val")
    with pytest.raises(FileNotFoundError, match="val-labels"):
        shards.build(src, tmp_path / "o", workers=1, progress=False)
    assert shards.main(["--src", str(src), "--out", str(tmp_path / "o"), "--workers", "1", "--no-progress",
                        "--val-labels", str(tree / "val_labels.txt"), "--max-count", "100"]) == 0
    assert ShardSet.open(tmp_path / "o").num_samples("val") == N
    for c in range(3):  # val in class folders, the other ImageNet layout
        (src / "valdirs" / f"n{c:08d}").mkdir(parents=True)
        shutil.copy(tree / "val" / f"v{c + 4}.JPEG", src / "valdirs" / f"n{c:08d}" / "x.JPEG")
    shutil.rmtree(src / "val")
    (src / "valdirs").rename(src / "val")
    shards.build(src, tmp_path / "o2", workers=1, progress=False)
    _, batches = _epoch(DataConfig(loader="wds", root=str(tmp_path / "o2"), **SMALL), "val")
    assert sorted(v for v in _labels(batches) if v != PAD) == [0, 1, 2]


# ------------------------------------------------------------------------------------------------ plan
def test_plan_split_is_disjoint_complete_and_matches_one_rank_with_global_batch():
    counts = [10, 10, 7, 10]
    for train in (True, False):
        plans = [epoch_plan(counts, 4, r, 3, seed=1, epoch=2, train=train) for r in range(3)]
        assert len({p.num_batches for p in plans}) == 1
        ids = [(int(s), int(r)) for p in plans for s, r in zip(p.shard.ravel(), p.row.ravel()) if s != PAD]
        assert len(ids) == len(set(ids))
        assert len(ids) == (37 if not train else 36)  # train drops the remainder of 37 % 12
        one = epoch_plan(counts, 12, 0, 1, seed=1, epoch=2, train=train)
        stacked = np.concatenate([p.position for p in plans], axis=1)
        assert np.array_equal(np.sort(stacked, axis=1), one.position)
    a = epoch_plan(counts, 4, 0, 1, seed=1, epoch=2, train=True)
    b = epoch_plan(counts, 4, 0, 1, seed=1, epoch=2, train=True)
    c = epoch_plan(counts, 4, 0, 1, seed=1, epoch=3, train=True)
    assert np.array_equal(a.shard, b.shard) and np.array_equal(a.row, b.row)
    assert not (np.array_equal(a.shard, c.shard) and np.array_equal(a.row, c.row))


# --------------------------------------------------------------------------------------------- loaders
@pytest.mark.parametrize("split", ["train", "val"])
def test_dali_cpu_and_wds_deliver_same_labels(shard_dir, split):
    for world in (1, 2):
        for rank in range(world):
            for epoch in (0, 1):
                runs = {}
                for kind in ("dali", "wds"):
                    cfg = DataConfig(loader=kind, root=str(shard_dir), **SMALL)
                    _loader, batches = _epoch(cfg, split, rank, world, seed=5, epoch=epoch)
                    for x, y in batches:
                        assert x.dtype == torch.float32 and x.shape == (4, 3, 24, 24) and y.dtype == torch.int64
                    runs[kind] = _labels(batches)
                assert Counter(runs["dali"]) == Counter(runs["wds"])
                assert runs["dali"] == runs["wds"]  # same plan, same order


@pytest.mark.parametrize("kind", ["dali", "wds"])
def test_two_rank_split_is_disjoint_and_complete(shard_dir, kind):
    cfg = DataConfig(loader=kind, root=str(shard_dir), **SMALL)
    for split in ("train", "val"):
        per_rank = [_epoch(cfg, split, r, 2, seed=0, epoch=1) for r in range(2)]
        assert len(per_rank[0][0]) == len(per_rank[1][0])
        labels = [[v for v in _labels(b) if v != PAD] for _, b in per_rank]
        assert not set(labels[0]) & set(labels[1])
        seen = labels[0] + labels[1]
        if split == "val":  # every sample exactly once, padding makes the counts equal
            assert sorted(seen) == list(range(N)) and len(per_rank[0][0]) == 6
        else:  # floor(42 / 8) = 5 batches per rank, 2 samples dropped
            assert len(seen) == len(set(seen)) == 40 and len(per_rank[0][0]) == 5


def test_wds_resume_is_exact_and_worker_independent(shard_dir):
    cfg = DataConfig(loader="wds", root=str(shard_dir), **SMALL)
    _, full = _epoch(cfg, "train", 1, 2, seed=7, epoch=3)
    _, resumed = _epoch(cfg, "train", 1, 2, seed=7, epoch=3, start=2)
    assert len(resumed) == len(full) - 2
    for (xa, ya), (xb, yb) in zip(full[2:], resumed):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)  # same samples and same random crops
    workers = DataConfig(loader="wds", root=str(shard_dir), **{**SMALL, "workers": 2})
    _, with_workers = _epoch(workers, "train", 1, 2, seed=7, epoch=3)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full, with_workers))
    _, other_epoch = _epoch(cfg, "train", 1, 2, seed=7, epoch=4)
    assert _labels(other_epoch) != _labels(full)


def test_dali_resume_is_exact(shard_dir):
    cfg = DataConfig(loader="dali", root=str(shard_dir), **SMALL)
    _, full = _epoch(cfg, "val", 0, 1)
    _, resumed = _epoch(cfg, "val", 0, 1, start=4)
    assert len(resumed) == len(full) - 4
    for (xa, ya), (xb, yb) in zip(full[4:], resumed):
        assert torch.equal(ya, yb) and torch.allclose(xa, xb)
    _, full = _epoch(cfg, "train", 0, 2, seed=2, epoch=5)
    _, resumed = _epoch(cfg, "train", 0, 2, seed=2, epoch=5, start=3)
    assert _labels(full[3:]) == _labels(resumed)


def test_val_images_agree_between_dali_and_wds(shard_dir):
    """Deterministic val transform: both loaders see the same pictures (resampling filters differ a little)."""
    out = {}
    for kind in ("dali", "wds"):
        _, b = _epoch(DataConfig(loader=kind, root=str(shard_dir), **SMALL), "val")
        out[kind] = torch.cat([x for x, _ in b])
    per_image = (out["dali"] - out["wds"]).abs().flatten(1).mean(1)
    assert per_image.mean() < 0.25 and per_image.median() < 0.1, per_image  # a channel swap gives ~1
    assert (out["dali"][:, 0] - out["dali"][:, 1]).abs().max() > 0.1  # colour images stay colour


def _corrupt_copy(shard_dir: Path, dst: Path, split: str, which: str, payload_fn) -> tuple[Path, str]:
    """Copy the shard set and overwrite one sample's ``which`` component in place (same size)."""
    shutil.copytree(shard_dir, dst)
    tar = dst / f"{split}-000000.tar"
    idx = read_index(dst / f"{split}-000000.idx")
    arr = idx.jpg if which == "jpg" else idx.cls
    row = next(i for i in range(len(idx)) if which == "jpg" or arr[i, 1] == 2)
    off, size = arr[row]
    data = bytearray(tar.read_bytes())
    data[off : off + size] = payload_fn(bytes(data[off : off + size]))
    tar.write_bytes(bytes(data))
    return tar, idx.keys[row]


@pytest.mark.parametrize("kind", ["wds", "dali"])
def test_corrupt_sample_at_read_time_is_skipped_and_counted(shard_dir, tmp_path, kind):
    _corrupt_copy(shard_dir, tmp_path / "bad", "train", "jpg", lambda b: b[:2] + bytes(len(b) - 2))
    _corrupt_copy(shard_dir, tmp_path / "badval", "val", "jpg", lambda b: b[:2] + bytes(len(b) - 2))
    cfg = DataConfig(loader=kind, root=str(tmp_path / "bad"), **SMALL)
    loader, batches = _epoch(cfg, "train", 0, 1)
    assert loader.skipped == 1 and len(batches) == 10
    assert sorted(len(y) for _, y in batches) == [3] + [4] * 9
    loader, batches = _epoch(DataConfig(loader=kind, root=str(tmp_path / "badval"), **SMALL), "val", 0, 1)
    labels = _labels(batches)
    assert loader.skipped == 1 and len(labels) == 44 and labels.count(PAD) == 3  # 2 padding + the bad one


@pytest.mark.parametrize("payload", [b"99", b"x1"])
@pytest.mark.parametrize("kind", ["wds", "dali"])
def test_a_bad_label_is_skipped_and_named_with_its_shard(shard_dir, tmp_path, kind, payload, caplog):
    """A class id out of range or a label that is not a number: the sample is skipped (padding in
    val), counted against its shard and logged with it; the epoch goes on."""
    tar, _key = _corrupt_copy(shard_dir, tmp_path / "cls", "val", "cls", lambda b: payload)
    cfg = DataConfig(loader=kind, root=str(tmp_path / "cls"), **SMALL)
    with caplog.at_level(logging.WARNING):
        loader, batches = _epoch(cfg, "val", 0, 1)
    labels = _labels(batches)
    assert loader.skipped == 1 and loader.skipped_by_shard == {str(tar): 1}
    assert len(labels) == 44 and labels.count(PAD) == 3
    assert any(str(tar) in r.getMessage() for r in caplog.records)


def _train_on(root: Path, tmp_path: Path, *over: str) -> dict:
    from system.trainer import Trainer
    from tests.methods_util import tiny_config
    cfg = tiny_config(tmp_path, "data.loader=" + over[0], f"data.root={root}", "data.train_size=24",
                      "data.val_resize=28", "data.val_crop=24", "data.batch_size=4", "data.workers=0",
                      "train.epochs=1", *over[1:])
    return Trainer(cfg).run()


@pytest.mark.parametrize("kind", ["wds", "dali"])
def test_a_run_over_a_damaged_sample_finishes_and_reports_it(shard_dir, tmp_path, kind):
    _tar, _ = _corrupt_copy(shard_dir, tmp_path / "bad", "train", "cls", lambda b: b"x1")
    summary = _train_on(tmp_path / "bad", tmp_path, kind, "data.max_skip_frac=0.1", "tracking.enabled=true")
    assert summary["samples_skipped"] == 1 and summary["steps"] == 10
    from mlflow.tracking import MlflowClient

    from system.tracking import DATA_SAMPLES_SKIPPED, local_store_uri
    client = MlflowClient(local_store_uri(tmp_path))
    assert [m.value for m in client.get_metric_history(summary["run_id"], DATA_SAMPLES_SKIPPED)] == [1.0]


@pytest.mark.parametrize("kind", ["wds", "dali"])
def test_too_many_bad_samples_stop_with_a_checkpoint_naming_the_shard(shard_dir, tmp_path, kind):
    from system.skips import SkipLimitExceeded
    tar, _ = _corrupt_copy(shard_dir, tmp_path / "bad", "train", "jpg", lambda b: b[:2] + bytes(len(b) - 2))
    with pytest.raises(SkipLimitExceeded) as err:
        _train_on(tmp_path / "bad", tmp_path, kind, "data.max_skip_frac=0", "train.log_every_steps=1")
    msg = str(err.value)
    assert "data.max_skip_frac" in msg and f"{tar} (1)" in msg and "pipelines.verify" in msg
    step = int(msg.split("step-")[1][:8])
    assert (tmp_path / "run" / "checkpoints" / f"step-{step:08d}" / "manifest.json").is_file()


def test_a_skip_limit_outside_0_1_is_refused():
    with pytest.raises(ConfigError) as err:
        from_dict(DataConfig, {"max_skip_frac": 1.5})
    assert err.value.key == "max_skip_frac" and "[0, 1]" in str(err.value)


def test_bad_shard_directories_are_clear_errors(shard_dir, tmp_path):
    cfg = lambda root: DataConfig(loader="wds", root=str(root), **SMALL)  # noqa: E731
    with pytest.raises(ShardSetError, match=f"{tmp_path / 'nope'}.*does not exist"):
        build_loader(cfg(tmp_path / "nope"), "train", 0, 1, 0, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardSetError, match="manifest.*empty"):
        build_loader(cfg(tmp_path / "empty"), "train", 0, 1, 0, 0)
    shutil.copytree(shard_dir, tmp_path / "short")
    victim = tmp_path / "short" / "train-000002.tar"
    victim.write_bytes(victim.read_bytes()[:-1024])
    with pytest.raises(ShardSetError, match=f"{victim}: .* bytes on disk"):
        build_loader(cfg(tmp_path / "short"), "train", 0, 1, 0, 0)
    shutil.copytree(shard_dir, tmp_path / "missing")
    (tmp_path / "missing" / "val-000001.tar").unlink()
    with pytest.raises(ShardSetError, match="val-000001.tar.*missing"):
        build_loader(cfg(tmp_path / "missing"), "val", 0, 1, 0, 0)
    shutil.copytree(shard_dir, tmp_path / "flipped")
    victim = tmp_path / "flipped" / "val-000000.tar"
    data = bytearray(victim.read_bytes())
    data[600] ^= 0xFF
    victim.write_bytes(bytes(data))
    ok = DataConfig(loader="wds", root=str(tmp_path / "flipped"), **SMALL)
    assert len(build_loader(ok, "val", 0, 1, 0, 0)) == 11  # sizes match; checksums are opt-in
    with pytest.raises(ShardSetError, match=f"{victim}: sha256"):
        build_loader(DataConfig(**{**ok.__dict__, "verify_checksums": True}), "val", 0, 1, 0, 0)


def test_synthetic_loader():
    cfg = DataConfig(loader="synthetic", synthetic_classes=7, synthetic_samples=50, **SMALL)
    loaders = [build_loader(cfg, "val", r, 3, 0, 0) for r in range(3)]
    assert {len(ld) for ld in loaders} == {1}  # ceil(5 / 12)
    labels = [v for ld in loaders for _, y in ld for v in y.tolist()]
    assert labels.count(PAD) == 7 and all(0 <= v < 7 for v in labels if v != PAD)
    train = build_loader(cfg, "train", 1, 3, 0, 0, start_batch=1)
    assert len(train) == 3 and train.batches_per_epoch == 4  # floor(50 / 12), resumed at 1
    x, y = next(iter(build_loader(cfg, "train", 0, 3, 0, 0)))
    assert x.shape == (4, 3, 24, 24) and y.dtype == torch.int64


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="'data.loader'"):
        from_dict(DataConfig, {"loader": "tfrecord"}, prefix="data")
    with pytest.raises(ConfigError, match="'batch_size'"):
        from_dict(DataConfig, {"batch_size": 0})
    with pytest.raises(ConfigError, match="'val_resize'"):
        from_dict(DataConfig, {"val_resize": 100, "val_crop": 224})
    with pytest.raises(ConfigError, match="'mean'"):
        from_dict(DataConfig, {"mean": [0.5, 0.5]})
    with pytest.raises(ConfigError, match="'shufle'"):
        from_dict(DataConfig, {"shufle": False})
    assert from_dict(DataConfig, {"mean": [0.5, 0.5, 0.5]}).mean == (0.5, 0.5, 0.5)


def test_embedded_demo_data_is_real_fashion_mnist():
    cfg = DataConfig(train_size=28, val_resize=32, val_crop=28, batch_size=100, workers=0)
    assert Path(cfg.root) == Path(DEMO_ROOT) and Path(DEMO_ROOT).is_absolute()
    s = ShardSet.open(cfg.root, verify_checksums=True)
    assert (s.num_samples("train"), s.num_samples("val"), s.num_classes) == (4000, 1000, 10)
    loader = build_loader(cfg, "val", 0, 1, 0, 0)
    x, y = next(iter(loader))
    pixels = x * torch.tensor(cfg.std).view(1, 3, 1, 1) + torch.tensor(cfg.mean).view(1, 3, 1, 1)
    assert x.shape == (100, 3, 28, 28) and torch.allclose(pixels[:, 0], pixels[:, 1], atol=1e-5)  # grey as RGB
    assert Counter(y.tolist()).most_common(1)[0][1] < 30  # shuffled across classes


def test_fmnist_reader_matches_debian_package():
    from pipelines import fmnist

    if not (fmnist.SRC / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    images, labels = fmnist.load("val")
    assert images.shape == (10000, 28, 28) and np.bincount(labels).tolist() == [1000] * 10
    from pipelines import tree

    sub = tree.balanced_subset(labels, 95, seed=0)
    assert len(sub) == len(set(sub)) == 95 and sorted(np.bincount(labels[sub])) == [9] * 5 + [10] * 5


def test_mnist_from_the_wheel_builds_disjoint_train_val_test(tmp_path):
    from pipelines import mnist

    (x, y), (xt, yt) = mnist.load()
    assert x.shape == (60000, 28, 28) and xt.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert sorted(set(y.tolist())) == list(range(10)) and np.bincount(yt).min() > 800
    man = mnist.build(tmp_path / "mnist", train=60, val=20, test=30, progress=False, workers=1)
    assert {k: v["num_samples"] for k, v in man["splits"].items()} == {"train": 60, "val": 20, "test": 30}
    ShardSet.open(tmp_path / "mnist", verify_checksums=True)
    from pipelines import tree

    val = tree.balanced_subset(y, 5000, seed=1)  # what build() carves out for val ...
    train = tree.balanced_subset(y, 4000, seed=0, exclude=val)  # ... and the training subset beside it
    assert len(val) == 5000 and len(train) == 4000 and not set(val.tolist()) & set(train.tolist())
    assert np.bincount(y[train]).tolist() == [400] * 10
    cfg = DataConfig(root=str(tmp_path / "mnist"), batch_size=10, train_size=28, val_resize=28, val_crop=28,
                     workers=0, eval_split="test")
    xb, yb = next(iter(build_loader(cfg, cfg.eval_split, 0, 1, 0, 0)))
    assert xb.shape == (10, 3, 28, 28) and yb.min() >= 0
