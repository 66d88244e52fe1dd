"""pipelines.verify on real shards: intact ones pass; one flipped byte is named with its shard."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from pipelines.shardset import read_index
from pipelines.verify import verify

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "pipelines" / "demo_data"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.verify", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def _damaged_copy(tmp_path: Path, split: str, component: str, row: int, at: int, mask: int):
    """The demo shards copied, one byte of sample ``row``'s ``component`` in ``split``'s first shard
    XORed with ``mask`` (``at`` bytes into it); returns (directory, manifest entry, index)."""
    data = tmp_path / "shards"
    shutil.copytree(DEMO, data)
    entry = json.loads((data / "manifest.json").read_text())["splits"][split]["shards"][0]
    shard, index = data / entry["file"], read_index(data / entry["index"])
    raw = bytearray(shard.read_bytes())
    raw[int(getattr(index, component)[row, 0]) + at] ^= mask
    shard.write_bytes(bytes(raw))
    return data, entry, index


def test_intact_shards_pass():
    out = _run(str(DEMO))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok:") and "samples decoded" in out.stdout


def test_a_flipped_byte_is_named_with_its_shard(tmp_path):
    data, entry, index = _damaged_copy(tmp_path, "train", "cls", 3, 0, 0x40)  # a label: '3' -> 's' or similar
    out = _run(str(data))
    assert out.returncode == 1
    damaged = [line for line in out.stderr.splitlines() if line.startswith("damaged:")]
    assert len(damaged) == 1 and entry["file"] in damaged[0]
    assert "sha256 differs" in damaged[0] and f"sample {index.keys[3]}" in damaged[0]
    # the same through the function, with a sample of the decodes
    problems, decoded = verify(data, decode_fraction=0.5)
    assert list(problems) == [entry["file"]] and 0 < decoded < 5000


def test_a_missing_manifest_is_an_error_naming_it(tmp_path):
    out = _run(str(tmp_path))
    assert out.returncode == 2 and "manifest" in out.stderr and str(tmp_path) in out.stderr


def test_a_shard_set_behind_a_url_is_verified(tmp_path):
    """Served over HTTP from 127.0.0.1: the same checks, each shard downloaded through gopen."""
    from tests.http_server import serve

    data, entry, _ = _damaged_copy(tmp_path, "val", "jpg", 5, 100, 0xFF)  # inside one JPEG
    with serve(data) as url:
        out = _run(url)
    assert out.returncode == 1
    damaged = [line for line in out.stderr.splitlines() if line.startswith("damaged:")]
    assert len(damaged) == 1 and f"{url}/{entry['file']}" in damaged[0] and "sha256 differs" in damaged[0]
