"""Checkpoints of pruning runs: save on every rank, verify, list, and resume exactly.

A checkpoint is one directory ``<run_dir>/checkpoints/step-00000120/``::

    manifest.json        format, step, epoch, batch (loader position), world size, global batch,
                         resolved config, MLflow run id, loop state, pruning events, and the
                         sha256 + size of every other file (plus a digest of the manifest itself)
    spec.json            the architecture spec at that step (the model is rebuilt from it)
    engine_state.pt | …  whatever ``engine.save_state(dir)`` writes (LocalEngine: one torch file;
                         DeepSpeedEngine: DeepSpeed's save_checkpoint layout, written by all ranks)
    method_rank{r}.pt    the method's ``state_dict()`` (before_save) of rank r
    buffers_rank{r}.pt   rank r's module buffers (BatchNorm statistics are per rank between syncs)
    rng_rank{r}.pt       rank r's torch / CUDA / numpy / python RNG states, as tensors and ints

It is assembled under ``.tmp-step-…`` in the same folder, fsynced, then renamed by rank 0 after a
barrier; ``latest`` (a one-line text file) is then replaced atomically and only the last
``checkpoint.keep_last`` are kept.  A process killed mid-write leaves a ``.tmp-`` folder that is
ignored (and removed by the next save or resume).

Loading uses ``torch.load(weights_only=True)`` only (tensors, dicts, lists, numbers, strings), after
every file's sha256 matched the manifest; a missing, truncated or altered file raises
:class:`CheckpointError` naming it.  ``run.resume=auto`` takes the newest checkpoint that verifies
and logs a warning naming what was wrong with any newer one it skipped.

Example::

    ck = find_resumable("runs/demo")          # CheckpointInfo of the newest intact checkpoint
    for info in list_checkpoints("runs/demo"):
        print(info.step, info.epoch, count(info.spec))

Fault-injection hooks (used by the tests, harmless otherwise):

- ``PARSIMONY_STOP_AFTER_STEP=k``: after step ``k`` save a checkpoint and stop the process with
  :class:`InjectedStop` (exit status 75), as a preemption would, without changing any schedule.
- ``PARSIMONY_CKPT_WRITE_DELAY=s``: sleep ``s`` seconds in the middle of every checkpoint write
  (so a test can SIGKILL the process while a checkpoint is half written).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from system.config import flatten, to_dict
from system.io import atomic_write_text, replace_dir
from system.models.spec import ArchSpec, SpecError

log = logging.getLogger(__name__)

FORMAT = "parsimony-checkpoint/1"
CKPT_SUBDIR = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
SPEC = "spec.json"
TMP_PREFIX = ".tmp-"
ENV_STOP = "PARSIMONY_STOP_AFTER_STEP"
ENV_WRITE_DELAY = "PARSIMONY_CKPT_WRITE_DELAY"
_NAME = re.compile(r"^step-(\d{8,})$")
# config keys that may differ on resume without a warning
_BENIGN = ("run.resume", "run.dir", "run.root", "train.progress", "train.threads", "data.batch_size",
           "data.workers", "data.prefetch", "tracking.", "engine.kind", "engine.backend", "train.device")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, altered, or does not fit this run."""


class InjectedStop(SystemExit):
    """Raised after the ``PARSIMONY_STOP_AFTER_STEP`` checkpoint (exit status 75, EX_TEMPFAIL)."""

    def __init__(self, step: int):
        super().__init__(75)
        self.step = step


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
    def run_id(self) -> str:
        return self.manifest.get("mlflow_run_id") or ""


# ---------------------------------------------------------------------------------- files
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
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


def _files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _ckpt_root(run_dir: str | Path) -> Path:
    p = Path(run_dir)
    return p if p.name == CKPT_SUBDIR else p / CKPT_SUBDIR


def _load_pt(path: Path) -> Any:
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
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath}: not a {FORMAT} manifest")
    if manifest.get("manifest_sha256") != _manifest_digest(manifest):
        raise CheckpointError(f"{mpath}: its digest does not match its content (altered after writing)")
    return manifest


def _info(path: Path, manifest: dict) -> CheckpointInfo:
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
        if _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{f}: sha256 does not match the manifest (altered or corrupt)")
    return _info(path, manifest)


def list_checkpoints(run_dir: str | Path) -> list[CheckpointInfo]:
    """Complete checkpoints of a run (those with a readable manifest and spec), oldest first.

    Only manifests are read; use :func:`verify` to check the files.
    """
    root = _ckpt_root(run_dir)
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        if not (d.is_dir() and _NAME.match(d.name)):
            continue
        try:
            out.append(_info(d, read_manifest(d)))
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
    if (target / MANIFEST).exists() or _NAME.match(target.name):
        return verify(target)
    root = _ckpt_root(target)
    cands = sorted((d for d in root.iterdir() if d.is_dir() and _NAME.match(d.name)),
                   key=lambda d: int(_NAME.match(d.name).group(1)), reverse=True) if root.is_dir() else []
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


# ---------------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors / numbers (loadable with ``weights_only``)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    st: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = st["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))
    if "cuda" in st and torch.cuda.is_available():
        states = st["cuda"]
        for i in range(min(len(states), torch.cuda.device_count())):
            torch.cuda.set_rng_state(states[i], i)


def derived_rng(seed: int, step: int, rank: int) -> None:
    """Seed a rank that has no saved RNG state (elastic resume onto more ranks), deterministically."""
    s = int(np.random.SeedSequence([seed & 0xFFFFFFFF, step, rank, 0xC4]).generate_state(1)[0])
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


# ---------------------------------------------------------------------------------- the hook
class Checkpointer:
    """Saves checkpoints from the trainer's hooks and resumes a run from one.

    The trainer calls :meth:`maybe_resume` before tracking starts, :meth:`after_step` after every
    step and :meth:`after_epoch` after every epoch; every rank calls them.
    """

    def __init__(self, trainer):
        self.cfg = trainer.cfg.checkpoint
        self.root = trainer.run_dir / CKPT_SUBDIR
        self.rank, self.world_size = trainer.env.rank, trainer.env.world_size
        self.stop_after = int(os.environ.get(ENV_STOP, "0") or 0)
        self.write_delay = float(os.environ.get(ENV_WRITE_DELAY, "0") or 0)
        self.last_step = -1
        self.resumed_from: CheckpointInfo | None = None

    # -- hooks ------------------------------------------------------------------------------
    def after_step(self, tr) -> None:
        step = tr.state.step
        every = self.cfg.every_steps
        stop = self.stop_after > 0 and step == self.stop_after
        if (every and step % every == 0) or stop:
            self.save(tr, "stop" if stop else "every_steps")
        if stop:
            log.warning("%s=%d: stopping after the checkpoint of step %d (fault injection)", ENV_STOP,
                        self.stop_after, step)
            raise InjectedStop(step)

    def after_epoch(self, tr) -> None:
        if self.cfg.at_epoch_end:
            self.save(tr, "epoch_end")

    # -- save -------------------------------------------------------------------------------
    def _barrier(self, tr) -> None:
        tr.coord.sum_scalars([0.0])

    def _pause(self) -> None:
        if self.write_delay > 0:
            time.sleep(self.write_delay)

    def save(self, tr, reason: str = "manual") -> Path:
        """Write a checkpoint of the trainer's current state (every rank calls this)."""
        s = tr.state
        name = f"step-{s.step:08d}"
        final, tmp = self.root / name, self.root / f"{TMP_PREFIX}{name}"
        t0 = time.perf_counter()
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        self._barrier(tr)
        tr.engine.save_state(tmp)
        self._pause()
        own = {f"rng_rank{self.rank}.pt": rng_state(),
               f"method_rank{self.rank}.pt": tr.method.state_dict(),
               f"buffers_rank{self.rank}.pt": {k: v.detach().cpu() for k, v in tr.model.named_buffers()}}
        for fname, obj in own.items():
            torch.save(obj, tmp / fname)
            _fsync_file(tmp / fname)
        self._barrier(tr)
        if self.rank == 0:
            spec = tr.spec()
            (tmp / SPEC).write_text(spec.to_json())
            files = {}
            for f in _files_under(tmp):
                _fsync_file(f)
                files[f.relative_to(tmp).as_posix()] = {"sha256": _sha256(f), "bytes": f.stat().st_size}
            manifest = {
                "format": FORMAT, "step": s.step, "epoch": s.epoch, "batch": s.batch, "reason": reason,
                "world_size": self.world_size, "global_batch": tr.global_batch,
                "per_rank_batch": tr.cfg.data.batch_size, "steps_per_epoch": tr.steps_per_epoch,
                "total_steps": tr.total_steps, "samples_in_epoch": s.batch * tr.global_batch,
                "engine": getattr(tr.engine, "kind", type(tr.engine).__name__), "method": tr.cfg.method.name,
                "mlflow_run_id": getattr(tr, "run_id", None) or getattr(tr, "_resume_run_id", None) or "",
                "time": time.time(), "config": to_dict(tr.cfg),
                "loop_state": dataclasses.asdict(s),
                "prune_events": [dataclasses.asdict(ev) for ev in tr.coord.events],
                "files": files,
            }
            manifest["manifest_sha256"] = _manifest_digest(manifest)
            self._pause()
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
            _fsync_file(tmp / MANIFEST)
            _fsync_dir(tmp)
            # the epoch-end checkpoint supersedes a step one at the same step
            replace_dir(tmp, final, self.root / f"{TMP_PREFIX}old-{name}")
            _fsync_dir(self.root)
            atomic_write_text(self.root / LATEST, name + "\n")
            self._prune()
            log.info("checkpoint %s (%s) written in %.2fs", final, reason, time.perf_counter() - t0)
        self._barrier(tr)
        self.last_step = s.step
        return final

    def _prune(self) -> None:
        done = sorted((d for d in self.root.iterdir() if d.is_dir() and _NAME.match(d.name)),
                      key=lambda d: int(_NAME.match(d.name).group(1)))
        for d in done[:-self.cfg.keep_last]:
            shutil.rmtree(d, ignore_errors=True)
        for d in self.root.iterdir():  # leftovers of killed writers
            if d.name.startswith(TMP_PREFIX) and d.is_dir():
                shutil.rmtree(d, ignore_errors=True)

    # -- resume -----------------------------------------------------------------------------
    def maybe_resume(self, tr) -> CheckpointInfo | None:
        """Resume from ``run.resume`` (``auto``: the newest intact checkpoint of this run, if any)."""
        target = tr.cfg.run.resume
        if not target:
            return None
        info = self._choose(tr, tr.run_dir if target == "auto" else Path(target))
        if info is None:
            log.info("run.resume=%s: no checkpoint under %s, starting from scratch", target, self.root)
            return None
        self.load(tr, info)
        return info

    def _choose(self, tr, target: Path) -> CheckpointInfo | None:
        """Rank 0 picks (and verifies) the checkpoint; every rank gets the same one."""
        info, error = None, None
        if self.rank == 0:
            try:
                info = find_resumable(target)
            except CheckpointError as exc:
                error = exc
            code = -2.0 if error else (-1.0 if info is None else float(info.step))
        else:
            code = 0.0
        code = int(tr.coord.sum_scalars([code])[0]) if self.world_size > 1 else code
        if error is not None:
            raise error
        if code == -2:
            raise CheckpointError(f"rank 0 refused the checkpoint under {target} (see its log)")
        if code == -1:
            return None
        if info is None:  # ranks > 0: same directory, already verified by rank 0
            path = target if (target / MANIFEST).exists() or _NAME.match(target.name) else \
                _ckpt_root(target) / f"step-{code:08d}"
            info = _info(path, read_manifest(path))
        return info

    def load(self, tr, info: CheckpointInfo) -> None:
        """Rebuild the (pruned) model from the spec and restore everything into ``tr``."""
        from system.methods import build_method
        from system.coordinator import PruneEvent
        from system.models.resnet import build_model
        from system.optim import build_optimizer
        from system.trainer import LoopState

        m, path, cfg = info.manifest, info.path, tr.cfg
        if m["global_batch"] != tr.global_batch:
            raise CheckpointError(
                f"{path}: written with a global batch of {m['global_batch']} ({m['world_size']} ranks x "
                f"{m['per_rank_batch']}), this run has {tr.global_batch} ({self.world_size} x "
                f"{cfg.data.batch_size}); set data.batch_size={m['global_batch'] // self.world_size} "
                f"so the data position and the schedules carry over")
        kind = getattr(tr.engine, "kind", type(tr.engine).__name__)
        if m.get("engine") != kind:
            raise CheckpointError(f"{path}: written by the {m.get('engine')!r} engine, this run uses {kind!r}; "
                                  f"set engine.kind={m.get('engine')} to resume it")
        if m["total_steps"] != tr.total_steps:
            log.warning("resuming %s: total steps %d -> %d, schedules (LR, pruning) change from here", path,
                        m["total_steps"], tr.total_steps)
        old, new = flatten(m["config"]), flatten(json.loads(json.dumps(to_dict(cfg))))
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)
                         and not any(k == b or (b.endswith(".") and k.startswith(b)) for b in _BENIGN))
        if changed:
            log.warning("resuming %s with changed config keys: %s", path,
                        ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed))

        # The engine may load its files with a full unpickler (DeepSpeed does): first prove that every
        # torch file of the checkpoint holds only tensors and plain containers.
        for rel in sorted(m["files"]):
            if rel.endswith((".pt", ".pth", ".bin")):
                _load_pt(path / rel)

        model = build_model(info.spec)
        method = build_method(cfg.method, tr.total_steps)
        method.check_model(model)
        saved_rank = self.rank if self.rank < info.world_size else 0
        method.load_state_dict(_load_pt(path / f"method_rank{saved_rank}.pt"))
        method.attach(model)
        opt = build_optimizer(model, cfg.optim, method.theta_lrs(), tr.global_batch, tr.gated_decay)
        tr.method = method
        tr.engine.rebuild(model, opt)
        try:
            tr.engine.load_state(path)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{path}: the engine could not load its state ({type(exc).__name__}: {exc})") \
                from exc
        if self.rank < info.world_size:
            bufs = _load_pt(path / f"buffers_rank{self.rank}.pt")
            own = dict(tr.model.named_buffers())
            if set(bufs) != set(own):
                raise CheckpointError(f"{path}: buffers_rank{self.rank}.pt does not match the spec's model")
            with torch.no_grad():
                for k, v in bufs.items():
                    own[k].copy_(v)

        ls = dict(m["loop_state"])
        ls["width_history"] = [(int(st), dict(w)) for st, w in ls.get("width_history", [])]
        tr.state = LoopState(**ls)
        tr.coord.events[:] = [PruneEvent(**ev) for ev in m.get("prune_events", [])]
        tr._resume_run_id = m.get("mlflow_run_id") or None
        self.resumed_from = info
        self.last_step = info.step

        # last, so that nothing above draws from the restored generators
        if self.rank < info.world_size:
            set_rng_state(_load_pt(path / f"rng_rank{self.rank}.pt"))
        else:
            derived_rng(cfg.train.seed, info.step, self.rank)
            log.warning("rank %d: %s was written by %d ranks; RNG derived from (seed, step, rank)", self.rank,
                        path, info.world_size)
        if self.rank == 0:
            for d in self.root.iterdir() if self.root.is_dir() else []:
                if d.name.startswith(TMP_PREFIX) and d.is_dir():
                    shutil.rmtree(d, ignore_errors=True)
        log.info("resumed from %s: step %d, epoch %d, batch %d (global sample %d of the epoch), %d ranks -> %d",
                 path, info.step, info.epoch, info.batch, info.batch * tr.global_batch, info.world_size,
                 self.world_size)
