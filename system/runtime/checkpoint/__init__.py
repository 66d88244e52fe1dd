"""Checkpoints of pruning runs: the on-disk format and its verification (:mod:`.files`), the parts
that carry state (:mod:`.parts`), and the checkpointer that moves their states (:mod:`.manager`)."""

from system.runtime.checkpoint.files import (CKPT_SUBDIR, FORMAT, LATEST, MANIFEST, SPEC, TMP_PREFIX,
                                             CheckpointError, CheckpointInfo, manifest_digest, sha256_of,
                                             find_resumable, list_checkpoints, read_manifest, read_rank_state,
                                             verify)
from system.runtime.checkpoint.manager import Checkpointer
from system.runtime.checkpoint.parts import ModelBuffers, RngState, Stateful, Value, rng_state, set_rng_state
from system.runtime.faults import ENV_STOP, ENV_WRITE_DELAY, Faults, InjectedStop

__all__ = ["CKPT_SUBDIR", "FORMAT", "LATEST", "MANIFEST", "SPEC", "TMP_PREFIX", "CheckpointError", "CheckpointInfo",
           "find_resumable", "list_checkpoints", "read_manifest", "read_rank_state", "verify", "Checkpointer",
           "ModelBuffers", "RngState", "Stateful", "Value", "rng_state", "set_rng_state", "ENV_STOP",
           "ENV_WRITE_DELAY", "Faults", "InjectedStop", "manifest_digest", "sha256_of"]
