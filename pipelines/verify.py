"""``python -m pipelines.verify DIR_OR_URL [--decode-fraction F]``: check a shard set before a long job.

Every shard listed in ``manifest.json`` must exist with the listed size and sha256, its index must
match its sample count, and every sample (or a seeded fraction of them) must have an integer class
in range and a JPEG that decodes.  Exits 0 with a one-line summary, or 1 naming each damaged shard
and what is wrong with it (all of them, not only the first), or 2 when the manifest cannot be read or
the arguments are invalid.  A URL root (``http(s)://``, ``pipe:``)
is checked shard by shard, each downloaded to a temporary file through webdataset's ``gopen``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from pipelines.shardset import (
    FORMAT,
    MANIFEST,
    ShardSetError,
    _join,
    fetch_text,
    is_remote,
    parse_label,
    read_index,
    sha256_file,
)


@contextlib.contextmanager
def _local(root: str, name: str) -> Iterator[Path]:
    """``root/name`` as a local path (a remote file downloaded to a temporary one)."""
    if not is_remote(root):
        yield Path(root) / name
        return
    from webdataset import gopen

    with tempfile.TemporaryDirectory(prefix="parsimony-verify-") as tmp:
        dest = Path(tmp) / name
        try:
            with gopen(_join(root, name), "rb") as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
        except Exception:
            dest.unlink(missing_ok=True)
        yield dest


def verify(root: str | Path, decode_fraction: float = 1.0, seed: int = 0) -> tuple[dict[str, list[str]], int]:
    """Problems per damaged shard (file name -> what is wrong) and the number of samples decoded.

    Raises:
        ShardSetError: the directory or its manifest cannot be read at all.
    """
    root = str(root)
    mpath = _join(root, MANIFEST) if is_remote(root) else str(Path(root) / MANIFEST)
    if is_remote(root):
        text = fetch_text(mpath)
    elif not Path(mpath).is_file():
        raise ShardSetError(f"{mpath}: no manifest")
    else:
        text = Path(mpath).read_text()
    try:
        manifest = json.loads(text)
    except (OSError, json.JSONDecodeError) as exc:
        raise ShardSetError(f"{mpath}: unreadable manifest: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise ShardSetError(f"{mpath}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    num_classes = len(manifest.get("classes", []))
    rng = random.Random(seed)
    damaged: dict[str, list[str]] = {}
    decoded = 0
    for _split, meta in sorted(manifest.get("splits", {}).items()):
        for entry in meta.get("shards", []):
            with _local(root, entry["file"]) as path, _local(root, entry["index"]) as ipath:
                decoded += _check_shard(entry, path, ipath, num_classes, decode_fraction, rng,
                                        damaged.setdefault(entry["file"], []))
    return {k: v for k, v in damaged.items() if v}, decoded


def _check_shard(entry: dict, path: Path, ipath: Path, num_classes: int, decode_fraction: float, rng,
                 problems: list[str]) -> int:
    """Append what is wrong with one shard to ``problems``; return the samples decoded."""
    if not path.is_file():
        problems.append("missing")
        return 0
    if path.stat().st_size != entry["bytes"]:
        problems.append(f"{path.stat().st_size} bytes, the manifest says {entry['bytes']}")
    elif sha256_file(path) != entry["sha256"]:
        problems.append("sha256 differs from the manifest")
    try:
        index = read_index(ipath)
    except (ShardSetError, OSError, ValueError) as exc:
        problems.append(f"index: {exc}")
        return 0
    if len(index) != entry["samples"]:
        problems.append(f"index has {len(index)} samples, the manifest says {entry['samples']}")
    decoded = 0
    with open(path, "rb") as f:
        for i in range(len(index)):
            if decode_fraction < 1.0 and rng.random() >= decode_fraction:
                continue
            f.seek(int(index.cls[i, 0]))
            cls_bytes = f.read(int(index.cls[i, 1]))
            f.seek(int(index.jpg[i, 0]))
            jpg = f.read(int(index.jpg[i, 1]))
            try:
                parse_label(cls_bytes, num_classes)
                with Image.open(io.BytesIO(jpg)) as im:
                    im.load()
            except Exception as exc:
                problems.append(f"sample {index.keys[i]}: {type(exc).__name__}: {exc}")
            decoded += 1
    return decoded


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.verify", description=__doc__.splitlines()[0])
    ap.add_argument("root", help="a shard directory written by pipelines.shards")
    ap.add_argument("--decode-fraction", type=float, default=1.0,
                    help="decode this fraction of the samples (seeded; 1 = all)")
    args = ap.parse_args(argv)
    if not 0.0 <= args.decode_fraction <= 1.0:
        print(f"error: --decode-fraction must be in [0, 1], got {args.decode_fraction}", file=sys.stderr)
        return 2
    try:
        damaged, decoded = verify(args.root, args.decode_fraction)
    except ShardSetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if damaged:
        for name, problems in sorted(damaged.items()):
            print(f"damaged: {args.root.rstrip('/')}/{name}: " + "; ".join(problems[:5])
                  + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""), file=sys.stderr)
        return 1
    print(f"ok: {args.root}: every shard matches the manifest; {decoded} samples decoded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
