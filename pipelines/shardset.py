"""On-disk format of a shard set, shared by the shard writer and the loaders.

A shard set is a directory::

    manifest.json           classes, per-split shard list (samples, bytes, sha256), skipped inputs
    train-000000.tar        WebDataset tar: members ``<key>.jpg`` and ``<key>.cls`` (ASCII class id)
    train-000000.idx        DALI index (``v1.2 <n>`` then ``jpg <offset> <size> <name> cls ...`` per sample)
    val-000000.tar / .idx

``ShardSet.open(root)`` validates the directory against its manifest and raises an error naming the
offending file when it does not match.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from system.io import atomic_write_text

FORMAT = "parsimony-wds/1"
MANIFEST = "manifest.json"
INDEX_VERSION = "v1.2"
EXTS = ("jpg", "cls")


class ShardSetError(ValueError):
    """A shard set on disk is missing, empty or does not match its manifest (the message names the file)."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class ShardIndex:
    """Per-sample byte ranges of one tar shard (data offsets, as in DALI's index format)."""

    keys: list[str]
    jpg: np.ndarray  # (n, 2) int64: offset, size
    cls: np.ndarray  # (n, 2) int64

    def __len__(self) -> int:
        return len(self.keys)

    def lines(self, rows) -> list[str]:
        """DALI index lines for samples ``rows`` (any order, repeats allowed)."""
        return [
            f"jpg {self.jpg[i, 0]} {self.jpg[i, 1]} {self.keys[i]}.jpg "
            f"cls {self.cls[i, 0]} {self.cls[i, 1]} {self.keys[i]}.cls"
            for i in rows
        ]


def write_index(path: Path, lines: list[str]) -> None:
    atomic_write_text(path, f"{INDEX_VERSION} {len(lines)}\n" + "".join(line + "\n" for line in lines))


def read_index(path: Path) -> ShardIndex:
    """Parse a DALI ``v1.2`` index written by ``pipelines.shards`` (or ``wds2idx``)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ShardSetError(f"{path}: cannot read index file: {exc}") from None
    head, _, body = text.partition("\n")
    if not head.startswith("v1.2 "):
        raise ShardSetError(f"{path}: not a DALI v1.2 index file")
    n = int(head.split()[1])
    rows = body.splitlines()[:n]
    if len(rows) != n:
        raise ShardSetError(f"{path}: header says {n} samples, found {len(rows)} lines")
    tok = np.array(body.split(), dtype=object)
    if n and tok.size == 8 * n:  # fast path: "jpg off size name cls off size name" on every line
        tok = tok.reshape(n, 8)
        if (tok[:, 0] == "jpg").all() and (tok[:, 4] == "cls").all():
            jpg = tok[:, 1:3].astype(np.int64)
            cls = tok[:, 5:7].astype(np.int64)
            return ShardIndex([name.rsplit(".", 1)[0] for name in tok[:, 3]], jpg, cls)
    keys: list[str] = []
    jpg = np.zeros((n, 2), np.int64)
    cls = np.zeros((n, 2), np.int64)
    for i, line in enumerate(rows):
        t = line.split()
        comps = {t[j]: t[j + 1 : j + 4] for j in range(0, len(t), 4)}
        if "jpg" not in comps or "cls" not in comps:
            raise ShardSetError(f"{path}: sample {i} lacks a .jpg or .cls component")
        jpg[i] = int(comps["jpg"][0]), int(comps["jpg"][1])
        cls[i] = int(comps["cls"][0]), int(comps["cls"][1])
        keys.append(comps["jpg"][2].rsplit(".", 1)[0])
    return ShardIndex(keys, jpg, cls)


_INDEX_CACHE: dict[tuple[str, int, int], ShardIndex] = {}


def cached_index(path: Path) -> ShardIndex:
    """``read_index`` memoised per process on (path, size, mtime); forked DataLoader workers inherit it."""
    st = Path(path).stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _INDEX_CACHE:
        _INDEX_CACHE[key] = read_index(path)
    return _INDEX_CACHE[key]


class TarShardWriter:
    """One shard through webdataset's ``TarWriter``, with fixed metadata (identical input gives
    identical bytes) and the DALI index read back from the finished tar.

    Writes to ``<final>.tmp``; ``close()`` fsyncs and renames the index, then the tar, to their
    final names, so an interrupted run never leaves a partial shard under a final name.
    """

    def __init__(self, path: Path):
        import webdataset

        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self._f = open(self.tmp, "wb")
        self._tar = webdataset.TarWriter(self._f, user="", group="", mode=0o444, mtime=0, encoder=False,
                                         format=tarfile.USTAR_FORMAT)
        self.keys: list[str] = []
        self.lines: list[str] = []
        self.count = 0

    def write(self, key: str, jpg: bytes, label: int) -> None:
        self._tar.write({"__key__": key, "jpg": jpg, "cls": str(int(label)).encode()})
        self.keys.append(key)
        self.count += 1

    def _index_lines(self) -> list[str]:
        """``jpg off size name cls off size name`` per sample, from the tar's own member headers."""
        members: dict[str, dict[str, tuple[int, int]]] = {}
        with tarfile.open(self.tmp, "r") as tar:
            for m in tar:
                stem, _, ext = m.name.rpartition(".")
                members.setdefault(stem, {})[ext] = (m.offset_data, m.size)
        return [f"jpg {members[k]['jpg'][0]} {members[k]['jpg'][1]} {k}.jpg "
                f"cls {members[k]['cls'][0]} {members[k]['cls'][1]} {k}.cls" for k in self.keys]

    @property
    def bytes(self) -> int:
        return self._f.tell()

    def close(self) -> dict:
        """Finish the shard; returns its manifest entry."""
        self._tar.close()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self.lines = self._index_lines()
        write_index(self.path.with_suffix(".idx"), self.lines)
        os.replace(self.tmp, self.path)
        return {
            "file": self.path.name,
            "index": self.path.with_suffix(".idx").name,
            "samples": self.count,
            "bytes": self.path.stat().st_size,
            "sha256": sha256_file(self.path),
        }

    def abort(self) -> None:
        self._tar.close()
        self._f.close()
        self.tmp.unlink(missing_ok=True)


REMOTE_PREFIXES = ("http://", "https://", "pipe:")
#: reaching a remote manifest: this many tries, the waits between them growing from 1 s
REMOTE_TRIES = 3


def parse_label(cls_bytes: bytes, num_classes: int) -> int:
    """A sample's ``.cls`` as a class id; ValueError saying what is wrong with it."""
    try:
        label = int(cls_bytes)
    except ValueError:
        raise ValueError(f"non-integer .cls {cls_bytes!r}") from None
    if not 0 <= label < num_classes:
        raise ValueError(f"class id {label}, outside 0..{num_classes - 1}")
    return label


def is_remote(root: str | Path) -> bool:
    """Whether ``data.root`` is a URL (``http(s)://...``, ``pipe:...``) rather than a folder."""
    return str(root).startswith(REMOTE_PREFIXES)


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if not root.startswith("pipe:") else root.replace("{}", name)


def fetch_text(url: str, tries: int = REMOTE_TRIES) -> str:
    """``url``'s content through webdataset's ``gopen`` (http(s) and pipe: alike), with a bounded retry.

    Raises:
        ShardSetError: naming the URL, when it does not answer after ``tries``.
    """
    import time

    from webdataset import gopen

    last = ""
    for attempt in range(tries):
        try:
            with gopen(url, "rb") as f:
                data = f.read()
            if data:
                return data.decode()
            last = "empty answer"
        except Exception as exc:
            last = f"{type(exc).__name__}: {exc}"
        if attempt + 1 < tries:
            time.sleep(2 ** attempt)
    raise ShardSetError(f"{url}: no answer after {tries} tries ({last[:300]})")


_SIZES_CHECKED: set[str] = set()


def _check_remote_sizes(root: str, manifest: dict) -> None:
    """HEAD every shard of ``root``: it must answer with the manifest's size (ShardSetError naming it)."""
    import urllib.error
    import urllib.request

    for meta in manifest.get("splits", {}).values():
        for e in meta.get("shards", []):
            url = _join(root, e["file"])
            try:
                with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=30) as r:
                    size = r.headers.get("Content-Length")
            except (urllib.error.URLError, OSError) as exc:
                raise ShardSetError(f"{url}: listed in {_join(root, MANIFEST)} but not available ({exc})") from None
            if size is not None and int(size) != int(e["bytes"]):
                raise ShardSetError(f"{url}: {size} bytes, {_join(root, MANIFEST)} says {e['bytes']}")


@dataclass
class Shard:
    path: Path | str  # a local file, or the shard's URL (remote roots)
    index_path: Path | str
    samples: int
    _index: ShardIndex | None = field(default=None, repr=False)

    @property
    def index(self) -> ShardIndex:
        if self._index is None:
            self._index = cached_index(Path(self.index_path))
        return self._index


@dataclass
class ShardSet:
    """A validated shard directory: classes and the shards of each split."""

    root: Path | str  # a folder, or a URL (remote roots)
    classes: list[str]
    splits: dict[str, list[Shard]]
    manifest: dict

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def shards(self, split: str) -> list[Shard]:
        if split not in self.splits:
            raise ShardSetError(f"{self.root}/{MANIFEST}: no split {split!r} (has {sorted(self.splits)})")
        return self.splits[split]

    def num_samples(self, split: str) -> int:
        return sum(s.samples for s in self.shards(split))

    @property
    def remote(self) -> bool:
        return is_remote(str(self.root))

    @classmethod
    def open_remote(cls, root: str) -> ShardSet:
        """The shard set behind a URL: its manifest fetched (bounded retry), the shards as URLs.
        For ``http(s)`` roots every shard's size is checked against the manifest with a HEAD
        request (once per process and root), so a manifest that does not match its shards is refused
        before training; checksums and samples are checked by ``python -m pipelines.verify URL``."""
        murl = _join(root, MANIFEST)
        try:
            manifest = json.loads(fetch_text(murl))
        except json.JSONDecodeError as exc:
            raise ShardSetError(f"{murl}: not a manifest ({exc})") from None
        if manifest.get("format") != FORMAT:
            raise ShardSetError(f"{murl}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
        classes = [c["name"] for c in manifest.get("classes", [])]
        if not classes:
            raise ShardSetError(f"{murl}: no classes")
        splits: dict[str, list[Shard]] = {}
        for split, meta in manifest.get("splits", {}).items():
            shards = [Shard(_join(root, e["file"]), _join(root, e["index"]), int(e["samples"]))
                      for e in meta.get("shards", [])]
            if not shards or sum(s.samples for s in shards) != meta.get("num_samples"):
                raise ShardSetError(f"{murl}: split {split!r} has no shards or miscounts its samples")
            splits[split] = shards
        if root.startswith(("http://", "https://")) and root not in _SIZES_CHECKED:
            _check_remote_sizes(root, manifest)
            _SIZES_CHECKED.add(root)
        return cls(root, classes, splits, manifest)

    @classmethod
    def open(cls, root: str | Path, verify_checksums: bool = False) -> ShardSet:
        """Read and check ``root/manifest.json`` against the files beside it.

        Raises:
            ShardSetError: missing or empty directory, missing manifest, a shard or index missing,
                a size / sample count / checksum that differs from the manifest. The message names the file.
        """
        if is_remote(root):
            return cls.open_remote(str(root))
        root = Path(root)
        if not root.is_dir():
            raise ShardSetError(f"{root}: shard directory does not exist")
        mpath = root / MANIFEST
        if not mpath.is_file():
            empty = not any(root.iterdir())
            raise ShardSetError(f"{mpath}: no manifest" + (" (the directory is empty)" if empty else ""))
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ShardSetError(f"{mpath}: unreadable manifest: {exc}") from None
        if manifest.get("format") != FORMAT:
            raise ShardSetError(f"{mpath}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
        classes_meta = manifest.get("classes", [])
        if [c.get("id") for c in classes_meta] != list(range(len(classes_meta))) or not classes_meta:
            raise ShardSetError(f"{mpath}: class ids must be 0..C-1 in order")
        classes = [c["name"] for c in classes_meta]
        splits: dict[str, list[Shard]] = {}
        for split, meta in manifest.get("splits", {}).items():
            shards = []
            if not meta.get("shards"):
                raise ShardSetError(f"{mpath}: split {split!r} has no shards")
            for entry in meta["shards"]:
                path, ipath = root / entry["file"], root / entry["index"]
                for p in (path, ipath):
                    if not p.is_file():
                        raise ShardSetError(f"{p}: listed in {mpath} but missing")
                size = path.stat().st_size
                if size != entry["bytes"]:
                    raise ShardSetError(f"{path}: {size} bytes on disk, manifest says {entry['bytes']}")
                with open(ipath) as f:
                    head = f.readline().split()
                if len(head) != 2 or head[0] != INDEX_VERSION or int(head[1]) != entry["samples"]:
                    raise ShardSetError(f"{ipath}: index header {head} does not match {entry['samples']} samples")
                if verify_checksums and sha256_file(path) != entry["sha256"]:
                    raise ShardSetError(f"{path}: sha256 differs from {mpath}")
                shards.append(Shard(path, ipath, int(entry["samples"])))
            if sum(s.samples for s in shards) != meta.get("num_samples"):
                raise ShardSetError(f"{mpath}: split {split!r} num_samples does not match its shards")
            splits[split] = shards
        if not splits:
            raise ShardSetError(f"{mpath}: no splits")
        return cls(root, classes, splits, manifest)
