"""Checkpoints of pruning runs: the on-disk format and its verification (:mod:`.files`), the parts
that carry state (:mod:`.parts`), and the checkpointer that moves their states (:mod:`.manager`)."""

from system.runtime.checkpoint.files import (
                                             CKPT_SUBDIR,
                                             FORMAT,
                                             LATEST,
                                             MANIFEST,
                                             SPEC,
                                             TMP_PREFIX,
                                             CheckpointError,
                                             CheckpointInfo,
                                             checkpoint_dir,
                                             find_resumable,
                                             list_checkpoints,
                                             manifest_digest,
                                             read_manifest,
                                             read_rank_state,
                                             sha256_of,
                                             verify,
)
from system.runtime.checkpoint.manager import Checkpointer
from system.runtime.checkpoint.parts import ModelBuffers, RngState, Stateful, Value, rng_state, set_rng_state
from system.runtime.faults import ENV_STOP, ENV_WRITE_DELAY, Faults, InjectedStop

__all__ = [
                                             "CKPT_SUBDIR",
                                             "ENV_STOP",
                                             "ENV_WRITE_DELAY",
                                             "FORMAT",
                                             "LATEST",
                                             "MANIFEST",
                                             "SPEC",
                                             "TMP_PREFIX",
                                             "CheckpointError",
                                             "CheckpointInfo",
                                             "Checkpointer",
                                             "Faults",
                                             "InjectedStop",
                                             "ModelBuffers",
                                             "RngState",
                                             "Stateful",
                                             "Value",
                                             "checkpoint_dir",
                                             "find_resumable",
                                             "list_checkpoints",
                                             "manifest_digest",
                                             "read_manifest",
                                             "read_rank_state",
                                             "rng_state",
                                             "set_rng_state",
                                             "sha256_of",
                                             "verify",
]
