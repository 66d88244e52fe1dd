"""Convert an image-folder tree (ImageNet layout) into WebDataset tar shards with DALI indexes.

Usage::

    python -m pipelines.shards --src /data/imagenet --out /data/imagenet-wds \
        [--max-count 1000] [--max-mb 150] [--seed 0] [--workers 16] [--val-labels FILE]

Input layout: ``SRC/train/<class>/*.JPEG``; ``SRC/val`` either in class folders or flat with a labels
file (``--val-labels``; lines ``<file or stem> <class>`` or CSV such as ImageNet's
``LOC_val_solution.csv``, whose first token after the comma is the class). Class ids are the sorted
train folder names, 0..C-1.

Output: ``{split}-%06d.tar`` (members ``<key>.jpg`` / ``<key>.cls``), ``{split}-%06d.idx`` (DALI
index) and ``manifest.json``. Every image is fully decoded first; unreadable or truncated files are
skipped and listed in the manifest with the reason. Non-JPEG or CMYK inputs are re-encoded as RGB JPEG
(listed under ``reencoded``). Shards are written under ``.tmp`` names and renamed when complete; a
re-run with the same inputs and options keeps the completed shards and writes identical bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import random
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from pipelines.shardset import FORMAT, MANIFEST, TarShardWriter, atomic_write_text

log = logging.getLogger(__name__)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}
PARTS = ".parts"  # per-shard completion records, so an interrupted run resumes


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _read_labels(path: Path) -> dict[str, str]:
    """``stem -> class name`` from a whitespace- or comma-separated labels file (header lines ignored)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.replace(",", " ").split()
        if len(parts) < 2:
            raise ValueError(f"{path}: cannot parse line {line!r}")
        if parts[0].lower() in ("imageid", "filename", "file"):
            continue
        out[Path(parts[0]).stem] = parts[1]
    return out


def discover(src: Path, val_labels: Path | None = None) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """Return ``(class names, {split: [(path, label), ...]})`` for an ImageNet-layout tree."""
    train = src / "train"
    if not train.is_dir():
        raise FileNotFoundError(f"{train}: no train/ folder (expected train/<class>/*.JPEG)")
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"{train}: no class folders")
    ids = {c: i for i, c in enumerate(classes)}
    splits = {"train": [(str(p), ids[c]) for c in classes for p in _images(train / c)]}
    val = src / "val"
    if val.is_dir():
        sub = sorted(p for p in val.iterdir() if p.is_dir())
        if sub:
            unknown = [p.name for p in sub if p.name not in ids]
            if unknown:
                raise ValueError(f"{val}: class folders not in train/: {unknown[:5]}")
            splits["val"] = [(str(p), ids[d.name]) for d in sub for p in _images(d)]
        else:
            labels_file = val_labels or next(
                (p for p in (src / "val_labels.txt", src / "LOC_val_solution.csv") if p.is_file()), None
            )
            if labels_file is None:
                raise FileNotFoundError(f"{val}: flat val/ folder needs --val-labels FILE")
            labels = _read_labels(Path(labels_file))
            items = []
            for p in _images(val):
                name = labels.get(p.stem)
                if name is None:
                    raise ValueError(f"{p}: no label in {labels_file}")
                if name not in ids:
                    raise ValueError(f"{labels_file}: class {name!r} of {p.name} is not a train/ class")
                items.append((str(p), ids[name]))
            splits["val"] = items
    test = src / "test"  # optional held-out split (class folders), e.g. the official test set
    if test.is_dir():
        sub = sorted(p for p in test.iterdir() if p.is_dir())
        unknown = [p.name for p in sub if p.name not in ids]
        if unknown:
            raise ValueError(f"{test}: class folders not in train/: {unknown[:5]}")
        splits["test"] = [(str(p), ids[d.name]) for d in sub for p in _images(d)]
    for split, items in splits.items():
        if not items:
            raise FileNotFoundError(f"{src / split}: no images")
    return classes, splits


def check_image(path: str) -> tuple[bytes | None, str, bool]:
    """Decode ``path`` fully. Returns ``(jpeg bytes or None, reason if skipped, re-encoded?)``."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return None, f"unreadable: {exc}", False
    if not data:
        return None, "empty file", False
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, mode = im.format, im.mode
            im.load()
            if im.width < 1 or im.height < 1:
                return None, "zero-sized image", False
            if fmt == "JPEG" and b"\xff\xd9" not in data[-64:]:
                return None, "truncated: no JPEG end-of-image marker", False
            if fmt == "JPEG" and mode in ("RGB", "L"):
                return data, "", False
            buf = io.BytesIO()
            im.convert("RGB").save(buf, "JPEG", quality=95)
            return buf.getvalue(), "", True
    except UnidentifiedImageError:
        return None, "corrupt: not a decodable image", False
    except Exception as exc:  # PIL raises many types for bad input
        reason = f"{type(exc).__name__}: {exc}"
        return None, ("truncated: " if "truncat" in reason.lower() else "corrupt: ") + reason, False


def _checked(paths: list[str], workers: int) -> Iterator[tuple[bytes | None, str, bool]]:
    if workers <= 1 or len(paths) < 64:
        yield from map(check_image, paths)
        return
    with mp.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(check_image, paths, chunksize=16)


def _settings_hash(split: str, items: list[tuple[str, int]], options: dict) -> str:
    h = hashlib.sha256(json.dumps([split, options], sort_keys=True).encode())
    for path, label in items:
        st = os.stat(path)
        h.update(f"{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def write_split(
    split: str,
    items: list[tuple[str, int]],
    out: Path,
    max_count: int,
    max_bytes: int,
    seed: int,
    workers: int,
    progress: bool = True,
) -> dict:
    """Shuffle ``items`` with ``seed``, verify each image, write shards; returns the split's manifest part."""
    items = sorted(items)
    random.Random(f"{seed}:{split}").shuffle(items)
    options = {"max_count": max_count, "max_bytes": max_bytes, "seed": seed, "format": FORMAT}
    settings = _settings_hash(split, items, options)
    parts_dir = out / PARTS
    parts_dir.mkdir(parents=True, exist_ok=True)

    shards, skipped, reencoded = [], [], []
    cursor, shard_no = 0, 0
    # Keep shards completed by an earlier run with the same inputs and options.
    while True:
        rec_path = parts_dir / f"{split}-{shard_no:06d}.json"
        if not rec_path.is_file():
            break
        rec = json.loads(rec_path.read_text())
        tar = out / rec["shard"]["file"]
        if rec.get("settings") != settings or not tar.is_file() or tar.stat().st_size != rec["shard"]["bytes"]:
            break
        shards.append(rec["shard"])
        skipped += rec["skipped"]
        reencoded += rec["reencoded"]
        cursor += rec["consumed"]
        shard_no += 1
    if shard_no:
        log.info("%s: keeping %d shards from an earlier run (%d inputs)", split, shard_no, cursor)

    todo = items[cursor:]
    bar = tqdm(total=len(items), initial=cursor, unit="img", desc=split, disable=not progress, smoothing=0.1)
    writer: TarShardWriter | None = None
    consumed = 0
    rec_skipped: list[dict] = []
    rec_reenc: list[str] = []

    def finish() -> None:
        nonlocal writer, consumed, rec_skipped, rec_reenc, shard_no
        assert writer is not None
        entry = writer.close()
        rec = {"settings": settings, "shard": entry, "consumed": consumed,
               "skipped": rec_skipped, "reencoded": rec_reenc}
        atomic_write_text(parts_dir / f"{split}-{shard_no:06d}.json", json.dumps(rec))
        shards.append(entry)
        skipped.extend(rec_skipped)
        reencoded.extend(rec_reenc)
        writer, consumed, rec_skipped, rec_reenc = None, 0, [], []
        shard_no += 1

    try:
        for (path, label), (data, reason, reenc) in zip(todo, _checked([p for p, _ in todo], workers)):
            consumed += 1
            bar.update(1)
            if data is None:
                log.warning("skipping %s: %s", path, reason)
                rec_skipped.append({"split": split, "path": path, "reason": reason})
                continue
            if reenc:
                rec_reenc.append(path)
            if writer is not None and writer.count and writer.bytes + len(data) + 2048 > max_bytes:
                consumed -= 1  # this input belongs to the next shard
                finish()
                consumed = 1
            if writer is None:
                writer = TarShardWriter(out / f"{split}-{shard_no:06d}.tar")
            writer.write(f"{shard_no:06d}_{writer.count:06d}", data, label)
            if writer.count >= max_count:
                finish()
        if writer is not None:
            finish()
        elif consumed:  # trailing inputs were all skipped: attach them to the last shard's record
            skipped.extend(rec_skipped)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()
    if not shards:
        raise ValueError(f"split {split!r}: every input was skipped")
    return {
        "split": {"num_samples": sum(s["samples"] for s in shards), "shards": shards},
        "skipped": skipped,
        "reencoded": reencoded,
    }


def build(
    src: str | Path,
    out: str | Path,
    max_count: int = 1000,
    max_mb: float = 150.0,
    seed: int = 0,
    workers: int | None = None,
    val_labels: str | Path | None = None,
    progress: bool = True,
    source: str | None = None,
) -> dict:
    """Write the shard set for ``src`` into ``out``; returns the manifest (also written to ``out``)."""
    src, out = Path(src), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob("*.tmp"):  # left by an interrupted run
        tmp.unlink()
    classes, splits = discover(src, Path(val_labels) if val_labels else None)
    workers = (os.cpu_count() or 1) if workers is None else workers
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "source": source or str(src.resolve()),
        "options": {"max_count": max_count, "max_mb": max_mb, "seed": seed},
        "num_classes": len(classes),
        "classes": [{"id": i, "name": c} for i, c in enumerate(classes)],
        "splits": {},
        "skipped": [],
        "reencoded": [],
    }
    for split, items in splits.items():
        part = write_split(split, items, out, max_count, int(max_mb * 2**20), seed, workers, progress)
        manifest["splits"][split] = part["split"]
        manifest["skipped"] += part["skipped"]
        manifest["reencoded"] += part["reencoded"]
    keep = {s[k] for sp in manifest["splits"].values() for s in sp["shards"] for k in ("file", "index")}
    for p in sorted(out.iterdir()):
        stale = p.suffix in (".tar", ".idx") and p.name not in keep
        if stale and p.name.split("-")[0] in ("train", "val", "test"):
            log.info("removing stale %s", p)
            p.unlink()
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    shutil.rmtree(out / PARTS, ignore_errors=True)  # only needed to resume an interrupted run
    n = {k: v["num_samples"] for k, v in manifest["splits"].items()}
    log.info("wrote %s: %s samples, %d skipped, %d re-encoded", out, n, len(manifest["skipped"]),
             len(manifest["reencoded"]))
    return manifest


def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.shards", description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", required=True, help="image-folder tree: train/<class>/*, val/<class>/* or flat val/")
    ap.add_argument("--out", required=True, help="output shard directory")
    ap.add_argument("--max-count", type=int, default=1000, help="samples per shard (default 1000)")
    ap.add_argument("--max-mb", type=float, default=150.0, help="MiB per shard (default 150)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the global shuffle")
    ap.add_argument("--workers", type=int, default=None, help="decode-check processes (default: all cores)")
    ap.add_argument("--val-labels", default=None, help="labels file for a flat val/ folder")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        m = build(args.src, args.out, args.max_count, args.max_mb, args.seed, args.workers, args.val_labels,
                  progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    for s in m["skipped"]:
        log.warning("skipped %s (%s)", s["path"], s["reason"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
