"""One run of the 2-ranks-equal-1-rank check (tests/distributed/test_distributed.py).

    torchrun --standalone --nproc_per_node=2 -m tests.dist_scripts.equivalence OUT.pt MICRO key=value ...
    python -m tests.dist_scripts.equivalence OUT.pt MICRO --ghost key=value ...

Runs the trainer under the real DeepSpeed engine with ``data.batch_size`` = MICRO per rank
(2 ranks) or 2 x MICRO on one rank with ``--ghost``: there the engine's forward runs the
batch as two MICRO-sized halves, so BatchNorm normalises over the same groups of samples as
the two ranks do (ghost batch norm).  Rank 0 saves the final parameters, the pruning plans'
digests and the final spec to OUT.pt.
"""

from __future__ import annotations

import sys

import torch

from system.runtime.engine_ds import DeepSpeedEngine


class GhostBatchEngine(DeepSpeedEngine):
    """The single-rank reference: one 2b batch, BatchNorm over two b-sized groups."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([super(GhostBatchEngine, self).forward(c) for c in x.chunk(2)])


def main(argv: list[str]) -> None:
    from system.config import load_config
    from system.run_config import RunConfig
    from system.runtime.distributed import init_distributed, shutdown_distributed
    from system.trainer import Trainer

    out, micro, rest = argv[0], int(argv[1]), argv[2:]
    ghost = "--ghost" in rest
    overrides = [a for a in rest if a != "--ghost"]
    batch = 2 * micro if ghost else micro
    cfg = load_config(RunConfig, None, overrides + [f"data.batch_size={batch}", "engine.kind=deepspeed"])
    env = init_distributed(cfg)
    try:
        tr = Trainer(cfg, env, engine_factory=(
            (lambda m, o: GhostBatchEngine(m, o, cfg, env, torch.device("cpu"))) if ghost else None))
        summary = tr.run()
        if env.rank == 0:
            torch.save({"params": {n: p.detach().clone() for n, p in tr.model.named_parameters()},
                        "digests": [e.digest for e in tr.coord.events], "steps": [e.step for e in tr.coord.events],
                        "spec": tr.spec().to_dict(), "world_size": env.world_size,
                        "prune_events": summary["prune_events"]}, out)
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
