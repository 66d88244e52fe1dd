"""The checkpointer: moves the states of a run's parts to and from disk, on every rank.

It knows nothing of the trainer.  The run hands it its parts:

- ``rank_parts`` (saved by every rank to ``<name>_rank{r}.pt``): the method, the model's buffers,
  the RNG streams;
- ``run_parts`` (saved once, by rank 0, in the manifest as JSON): the loop state, the
  coordinator's pruning events, the tracking run;
- the engine, which writes and reads its own files (``engine.save_state(dir)`` / ``load_state``).

Resuming is two calls around building the run, so the run is built once, already shrunk::

    info = ckpt.find(cfg.run.resume)                  # rank 0 chooses, every rank agrees
    ckpt.check_fits(info, config=..., global_batch=..., per_rank_batch=..., total_steps=...)
    model = build_model(info.spec)                    # the pruned architecture, read first
    method.load_state_dict(ckpt.rank_state(info, "method"))
    ...  build the optimizer and the engine once ...
    # engine files, buffers, loop, events; RNG last
    ckpt.restore(info, engine, rank_parts, run_parts, seed=cfg.train.seed)
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from system.config import check, flatten
from system.io import atomic_write_text, replace_dir
from system.models.spec import ArchSpec
from system.runtime.checkpoint.files import (
    BENIGN_KEYS,
    CKPT_SUBDIR,
    FORMAT,
    LATEST,
    MANIFEST,
    SPEC,
    STEP_DIR_NAME,
    TMP_PREFIX,
    CheckpointError,
    CheckpointInfo,
    ckpt_root,
    files_under,
    find_resumable,
    fsync_dir,
    fsync_file,
    info_of,
    load_pt,
    manifest_digest,
    read_manifest,
    read_rank_state,
    sha256_of,
    step_dirs,
)
from system.runtime.checkpoint.parts import Stateful, derived_rng
from system.runtime.faults import Faults

log = logging.getLogger(__name__)

RNG = "rng"  # the rank part restored last, so that nothing else draws from the restored generators


@dataclass(frozen=True)
class CheckpointConfig:
    """Section ``checkpoint``."""

    every_steps: int = 0  # 0 = no step-interval checkpoints (the epoch-end ones follow at_epoch_end)
    at_epoch_end: bool = True  # also a checkpoint at the end of every epoch
    keep_last: int = 3  # complete checkpoints kept (older ones deleted)

    def __post_init__(self) -> None:
        check(self.every_steps >= 0, "every_steps", "must be >= 0")
        check(self.keep_last >= 1, "keep_last", "must be >= 1")


class Checkpointer:
    """Saves and restores checkpoints under ``<run_dir>/checkpoints``; every rank calls every method.

    ``collectives`` provides ``sum_scalars`` (a barrier and rank 0's choice sent to every rank).
    """

    def __init__(self, cfg: CheckpointConfig, run_dir: Path, rank: int, world_size: int, collectives,
                 faults: Faults | None = None):
        self.cfg = cfg
        self.root = Path(run_dir) / CKPT_SUBDIR
        self.run_dir = Path(run_dir)
        self.rank, self.world_size = rank, world_size
        self.collectives = collectives
        self.faults = faults or Faults()
        self.last_step = -1
        self.resumed_from: CheckpointInfo | None = None

    def due(self, step: int) -> bool:
        every = self.cfg.every_steps
        return bool(every) and step % every == 0

    # -- save -------------------------------------------------------------------------------
    def _barrier(self) -> None:
        self.collectives.sum_scalars([0.0])

    def _pause(self) -> None:
        if self.faults.write_delay_s > 0:
            time.sleep(self.faults.write_delay_s)

    def save(self, engine, spec: ArchSpec, meta: Mapping[str, Any], rank_parts: Mapping[str, Stateful],
             run_parts: Mapping[str, Stateful], reason: str = "manual") -> Path:
        """Write a checkpoint of step ``meta["step"]`` (every rank calls this).

        ``meta``: step, epoch, batch and the run's facts (global batch, total steps, config, engine,
        method) that go into the manifest beside the parts.
        """
        step = int(meta["step"])
        name = f"step-{step:08d}"
        final, tmp = self.root / name, self.root / f"{TMP_PREFIX}{name}"
        t0 = time.perf_counter()
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        self._barrier()
        engine.save_state(tmp)
        self._pause()
        for pname, part in rank_parts.items():
            fname = tmp / f"{pname}_rank{self.rank}.pt"
            torch.save(part.state_dict(), fname)
            fsync_file(fname)
        self._barrier()
        if self.rank == 0:
            (tmp / SPEC).write_text(spec.to_json())
            files = {}
            for f in files_under(tmp):
                fsync_file(f)
                files[f.relative_to(tmp).as_posix()] = {"sha256": sha256_of(f), "bytes": f.stat().st_size}
            manifest = {"format": FORMAT, **meta, "reason": reason, "world_size": self.world_size,
                        "time": time.time(), "parts": {k: p.state_dict() for k, p in run_parts.items()},
                        "files": files}
            manifest["manifest_sha256"] = manifest_digest(manifest)
            self._pause()
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
            fsync_file(tmp / MANIFEST)
            fsync_dir(tmp)
            # the epoch-end checkpoint supersedes a step one at the same step
            replace_dir(tmp, final, self.root / f"{TMP_PREFIX}old-{name}")
            fsync_dir(self.root)
            atomic_write_text(self.root / LATEST, name + "\n")
            self._prune()
            log.info("checkpoint %s (%s) written in %.2fs", final, reason, time.perf_counter() - t0)
        self._barrier()
        self.last_step = step
        return final

    def _prune(self) -> None:
        for d in step_dirs(self.root)[:-self.cfg.keep_last]:
            shutil.rmtree(d, ignore_errors=True)
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        for d in self.root.iterdir() if self.root.is_dir() else []:  # leftovers of killed writers
            if d.name.startswith(TMP_PREFIX) and d.is_dir():
                shutil.rmtree(d, ignore_errors=True)

    # -- resume -----------------------------------------------------------------------------
    def find(self, resume: str) -> CheckpointInfo | None:
        """The checkpoint ``run.resume`` names (``auto``: the newest intact one of this run, if any);
        rank 0 picks and verifies it, every rank gets the same one."""
        if not resume:
            return None
        target = self.run_dir if resume == "auto" else Path(resume)
        info, error = None, None
        if self.rank == 0:
            try:
                info = find_resumable(target)
            except CheckpointError as exc:
                error = exc
            code = -2.0 if error else (-1.0 if info is None else float(info.step))
        else:
            code = 0.0
        code = int(self.collectives.sum_scalars([code])[0]) if self.world_size > 1 else code
        if error is not None:
            raise error
        if code == -2:
            raise CheckpointError(f"rank 0 refused the checkpoint under {target} (see its log)")
        if code == -1:
            if resume != "auto":  # an explicit path is never replaced, least of all by a fresh start
                raise CheckpointError(
                    f"config key 'run.resume': {target} does not exist" if not target.exists() else
                    f"config key 'run.resume': {target} holds no complete checkpoint (only run.resume=auto "
                    f"starts fresh when there is none)")
            log.info("run.resume=auto: no checkpoint under %s, starting from scratch", self.root)
            return None
        if info is None:  # ranks > 0: same directory, already verified by rank 0
            path = target if (target / MANIFEST).exists() or STEP_DIR_NAME.match(target.name) else \
                ckpt_root(target) / f"step-{code:08d}"
            info = info_of(path, read_manifest(path))
        return info

    def check_fits(self, info: CheckpointInfo, *, config: dict, global_batch: int, per_rank_batch: int,
                   total_steps: int) -> None:
        """Refuse a checkpoint this run cannot continue (another global batch, or a torch file that does not load
        with ``weights_only=True``), raising :class:`CheckpointError`; warn about what changes."""
        m, path = info.manifest, info.path
        if m["global_batch"] != global_batch:
            raise CheckpointError(
                f"{path}: written with a global batch of {m['global_batch']} ({m['world_size']} ranks x "
                f"{m['per_rank_batch']}), this run has {global_batch} ({self.world_size} x "
                f"{per_rank_batch}); set data.batch_size={m['global_batch'] // self.world_size} "
                f"so the data position and the schedules carry over")
        if m["total_steps"] != total_steps:
            log.warning("resuming %s: total steps %d -> %d, schedules (LR, pruning) change from here", path,
                        m["total_steps"], total_steps)
        old, new = flatten(m["config"]), flatten(json.loads(json.dumps(config)))
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)
                         and not any(k == b or (b.endswith(".") and k.startswith(b)) for b in BENIGN_KEYS))
        if changed:
            log.warning("resuming %s with changed config keys: %s", path,
                        ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed))
        # The engine may load its files with a full unpickler (DeepSpeed does): first prove that every
        # torch file of the checkpoint holds only tensors and plain containers.
        for rel in sorted(m["files"]):
            if rel.endswith((".pt", ".pth", ".bin")):
                load_pt(path / rel)

    def _saved_by(self, info: CheckpointInfo) -> int | None:
        """The rank whose files this rank restores (None: a rank the checkpoint did not have)."""
        return self.rank if self.rank < info.world_size else None

    def rank_state(self, info: CheckpointInfo, name: str) -> dict[str, Any]:
        """Part ``name``'s state as this rank saved it (rank 0's on a rank the checkpoint did not have)."""
        saved = self._saved_by(info)
        return read_rank_state(info, name, 0 if saved is None else saved)

    def restore(self, info: CheckpointInfo, engine, rank_parts: Mapping[str, Stateful],
                run_parts: Mapping[str, Stateful], seed: int) -> None:
        """Load the engine's files, then every part; the RNG part last.  A rank the checkpoint did not
        have keeps its fresh buffers and derives its RNG from (seed, step, rank)."""
        path = info.path
        kind = getattr(engine, "kind", type(engine).__name__)
        if info.manifest.get("engine") != kind:
            raise CheckpointError(f"{path}: written by the {info.manifest.get('engine')!r} engine, this run uses "
                                  f"{kind!r}; set engine.kind={info.manifest.get('engine')} to resume it")
        try:
            engine.load_state(path)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{path}: the engine could not load its state ({type(exc).__name__}: {exc})") \
                from exc
        saved = self._saved_by(info)
        for name, part in rank_parts.items():
            if name == RNG or saved is None:
                continue
            fname = f"{name}_rank{saved}.pt"
            try:
                part.load_state_dict(load_pt(path / fname))
            except (ValueError, KeyError, RuntimeError) as exc:
                raise CheckpointError(f"{path}: {fname} {exc}") from None
        for name, part in run_parts.items():
            part.load_state_dict(info.parts.get(name) or {})
        self.resumed_from = info
        self.last_step = info.step
        if RNG in rank_parts:  # last, so that nothing above draws from the restored generators
            if saved is not None:
                rank_parts[RNG].load_state_dict(load_pt(path / f"{RNG}_rank{saved}.pt"))
            else:
                derived_rng(seed, info.step, self.rank)
                log.warning("rank %d: %s was written by %d ranks; RNG derived from (seed, step, rank)", self.rank,
                            path, info.world_size)
        if self.rank == 0:
            self._remove_leftovers()
        log.info("resumed from %s: step %d, epoch %d, batch %d (global sample %d of the epoch), %d ranks -> %d",
                 path, info.step, info.epoch, info.batch, info.batch * int(info.manifest["global_batch"]),
                 info.world_size, self.world_size)
