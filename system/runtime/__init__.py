"""Runtime: process group, collectives and the pruning coordinator, engines, checkpoints, preemption."""
