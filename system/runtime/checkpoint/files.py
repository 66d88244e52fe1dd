"""Checkpoints of pruning runs: save on every rank, verify, list, and resume exactly.

A checkpoint is one directory ``<run_dir>/checkpoints/step-00000120/``::

    manifest.json        format, step, epoch, batch (loader position), world size, global batch,
                         resolved config, MLflow run id, loop state, pruning events, and the
                         sha256 + size of every other file (plus a digest of the manifest itself)
    spec.json            the architecture spec at that step (the model is rebuilt from it)
    engine_state.pt | …  whatever ``engine.save_state(dir)`` writes (LocalEngine: one torch file;
                         DeepSpeedEngine: DeepSpeed's save_checkpoint layout, written by all ranks)
    method_rank{r}.pt    the method's ``state_dict()`` of rank r
    buffers_rank{r}.pt   rank r's module buffers (BatchNorm statistics are per rank between syncs)
    rng_rank{r}.pt       rank r's torch / CUDA / numpy / python RNG states, as tensors and ints

It is assembled under ``.tmp-step-…`` in the same folder, fsynced, then renamed by rank 0 after a
barrier; ``latest`` (a one-line text file) is then replaced atomically and only the last
``checkpoint.keep_last`` are kept.  A process killed mid-write leaves a ``.tmp-`` folder that is
ignored (and removed by the next save or resume).

Loading uses ``torch.load(weights_only=True)`` (tensors, dicts, lists, numbers, strings); the DeepSpeed engine's
own files are read by DeepSpeed's loader, after ``Checkpointer.check_fits`` proved every torch file in them loadable
that way. All of it after
every file's sha256 matched the manifest; a missing, truncated or altered file raises
:class:`CheckpointError` naming it.  ``run.resume=auto`` takes the newest checkpoint that verifies
and logs a warning naming what was wrong with any newer one it skipped.

Example::

    ck = find_resumable("runs/demo")          # CheckpointInfo of the newest intact checkpoint
    for info in list_checkpoints("runs/demo"):
        print(info.step, info.epoch, count(info.spec))

Fault injection (a stop after a step, a slow write) reaches the writer only through
:mod:`system.runtime.faults`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from system.models.spec import ArchSpec, SpecError

log = logging.getLogger(__name__)

FORMAT = "parsimony-checkpoint/2"
_FORMAT_V1 = "parsimony-checkpoint/1"  # read too: its run-wide parts under their old keys
CKPT_SUBDIR = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
SPEC = "spec.json"
TMP_PREFIX = ".tmp-"
STEP_DIR_NAME = re.compile(r"^step-(\d{8,})$")
# config keys that may differ on resume without a warning
BENIGN_KEYS = ("run.resume", "run.dir", "run.root", "train.progress", "train.threads", "data.batch_size",
           "data.workers", "data.prefetch", "tracking.", "engine.kind", "engine.backend", "train.device")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, altered, or does not fit this run."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`list_checkpoints` / :func:`find_resumable` know of one checkpoint."""

    path: Path
    step: int
    epoch: int
    batch: int
    world_size: int
    spec: ArchSpec
    manifest: dict

    @property
    def parts(self) -> dict[str, Any]:
        """The run-wide parts' states saved in the manifest (loop, coordinator, tracking)."""
        return self.manifest.get("parts") or {}

    @property
    def run_id(self) -> str:
        return (self.parts.get("tracking") or {}).get("run_id") or ""


# ---------------------------------------------------------------------------------- files
def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def step_of(d: Path) -> int:
    """The step of a ``step-NNNNNNNN`` checkpoint directory."""
    m = STEP_DIR_NAME.match(d.name)
    if m is None:
        raise CheckpointError(f"{d}: not a checkpoint directory name (step-NNNNNNNN)")
    return int(m.group(1))


def ckpt_root(run_dir: str | Path) -> Path:
    p = Path(run_dir)
    return p if p.name == CKPT_SUBDIR else p / CKPT_SUBDIR


def step_dirs(root: Path) -> list[Path]:
    """The ``step-NNNNNNNN`` directories under the checkpoint folder ``root``, oldest first (none: [])."""
    if not root.is_dir():
        return []
    return sorted((d for d in root.iterdir() if d.is_dir() and STEP_DIR_NAME.match(d.name)), key=step_of)


def checkpoint_dir(run_dir: str | Path, name: str) -> Path:
    """The directory of the checkpoint that ``name`` names in run ``run_dir``: ``step-N`` or ``N`` (any
    zero padding: ``step-50`` is ``step-00000050``) or ``latest``; a name that is none of these, or a
    checkpoint the run does not have, raises :class:`CheckpointError` listing the ones it has."""
    root = ckpt_root(run_dir)
    have = [d.name for d in step_dirs(root)]
    m = re.fullmatch(r"(?:step-)?(\d+)", name.strip())
    if name.strip() == LATEST:
        if not have:
            raise CheckpointError(f"{root}: the run has no checkpoint")
        return root / have[-1]
    if m is None:
        raise CheckpointError(f"{name!r} is not a checkpoint name (step-N, N or latest)")
    path = root / f"step-{int(m.group(1)):08d}"
    if not path.is_dir():
        raise CheckpointError(f"{root}: no checkpoint {name!r}; the run has "
                              + (", ".join(have) if have else "none"))
    return path


def load_pt(path: Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers (never arbitrary objects)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be loaded as plain tensors ({type(exc).__name__}: {exc})") from None


# ---------------------------------------------------------------------------------- reading
def read_manifest(path: str | Path) -> dict:
    """Parse ``manifest.json`` of checkpoint ``path`` and check its own digest (not the files)."""
    mpath = Path(path) / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (incomplete checkpoint)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{mpath}: not valid JSON, truncated or altered ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in (FORMAT, _FORMAT_V1):
        raise CheckpointError(f"{mpath}: not a {FORMAT} manifest")
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise CheckpointError(f"{mpath}: its digest does not match its content (altered after writing)")
    if manifest["format"] == _FORMAT_V1:
        manifest["parts"] = {"loop": manifest.get("loop_state") or {},
                             "coordinator": {"events": manifest.get("prune_events") or []},
                             "tracking": {"run_id": manifest.get("mlflow_run_id") or ""}}
    return manifest


def info_of(path: Path, manifest: dict) -> CheckpointInfo:
    try:
        spec = ArchSpec.from_json((path / SPEC).read_text())
    except (OSError, json.JSONDecodeError, SpecError, TypeError) as exc:
        raise CheckpointError(f"{path / SPEC}: unreadable architecture spec ({exc})") from None
    return CheckpointInfo(path=path, step=int(manifest["step"]), epoch=int(manifest["epoch"]),
                          batch=int(manifest["batch"]), world_size=int(manifest["world_size"]), spec=spec,
                          manifest=manifest)


def verify(path: str | Path) -> CheckpointInfo:
    """Check the manifest and the sha256 and size of every file it lists.

    Raises:
        CheckpointError: naming the first missing, truncated or altered file.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    manifest = read_manifest(path)
    files = manifest.get("files") or {}
    if SPEC not in files:
        raise CheckpointError(f"{path / MANIFEST}: lists no {SPEC}")
    for rel, meta in sorted(files.items()):
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in the manifest but missing")
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(f"{f}: {size} bytes, the manifest says {meta['bytes']} (truncated or altered)")
        if sha256_of(f) != meta["sha256"]:
            raise CheckpointError(f"{f}: sha256 does not match the manifest (altered or corrupt)")
    return info_of(path, manifest)


def read_rank_state(info: CheckpointInfo, name: str, rank: int = 0) -> dict[str, Any]:
    """Part ``name``'s state as rank ``rank`` saved it in checkpoint ``info`` (tensors and plain
    containers only)."""
    return load_pt(info.path / f"{name}_rank{rank}.pt")


def list_checkpoints(run_dir: str | Path) -> list[CheckpointInfo]:
    """Complete checkpoints of a run (those with a readable manifest and spec), oldest first.

    Only manifests are read; use :func:`verify` to check the files.
    """
    out = []
    for d in step_dirs(ckpt_root(run_dir)):
        try:
            out.append(info_of(d, read_manifest(d)))
        except CheckpointError as exc:
            log.warning("skipping checkpoint %s: %s", d, exc)
    return sorted(out, key=lambda c: c.step)


def find_resumable(target: str | Path) -> CheckpointInfo | None:
    """The checkpoint to resume from.

    ``target`` is a checkpoint directory (verified; any problem raises :class:`CheckpointError`)
    or a run directory: then the newest checkpoint that verifies is returned, each newer one that
    does not is skipped with a warning naming what was wrong; None when the run has none at all.
    """
    target = Path(target)
    if (target / MANIFEST).exists() or STEP_DIR_NAME.match(target.name):
        return verify(target)
    root = ckpt_root(target)
    cands = step_dirs(root)[::-1]  # newest first
    latest = root / LATEST
    if latest.is_file():
        name = latest.read_text().strip()
        if cands and name != cands[0].name:
            log.warning("%s names %s but %s is newer; trying the newest first", latest, name, cands[0].name)
    problems = []
    for d in cands:
        try:
            info = verify(d)
        except CheckpointError as exc:
            log.warning("checkpoint %s is not usable, falling back to the previous one: %s", d.name, exc)
            problems.append(str(exc))
            continue
        return info
    if problems:
        raise CheckpointError(f"{root}: no usable checkpoint: " + "; ".join(problems))
    return None


