"""Attach the checkpointer to a trainer when checkpoints are configured (see system.checkpoint)."""

from __future__ import annotations


def attach_checkpointer(trainer) -> None:
    try:
        from system.checkpoint import Checkpointer
    except ImportError:
        return
    trainer.checkpointer = Checkpointer(trainer)
