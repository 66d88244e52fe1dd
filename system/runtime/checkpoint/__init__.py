"""Checkpoints of pruning runs: the on-disk format and its verification (:mod:`.files`), the parts
that carry state (:mod:`.parts`), and the checkpointer that moves their states (:mod:`.manager`)."""

from system.runtime.checkpoint.files import (CKPT_SUBDIR, FORMAT, LATEST, MANIFEST, SPEC, TMP_PREFIX,
                                             CheckpointError, CheckpointInfo, _manifest_digest, _sha256,
                                             find_resumable, list_checkpoints, read_manifest, verify)
from system.runtime.checkpoint.manager import Checkpointer
from system.runtime.checkpoint.parts import ModelBuffers, RngState, Stateful, Value, rng_state, set_rng_state
from system.runtime.faults import ENV_STOP, ENV_WRITE_DELAY, Faults, InjectedStop

__all__ = ["CKPT_SUBDIR", "FORMAT", "LATEST", "MANIFEST", "SPEC", "TMP_PREFIX", "CheckpointError", "CheckpointInfo",
           "find_resumable", "list_checkpoints", "read_manifest", "verify", "Checkpointer", "ModelBuffers",
           "RngState", "Stateful", "Value", "rng_state", "set_rng_state", "ENV_STOP", "ENV_WRITE_DELAY", "Faults",
           "InjectedStop", "_manifest_digest", "_sha256"]
