"""A rank whose gates are perturbed on purpose must be caught by the plan-digest check.

    torchrun --standalone --nproc_per_node=2 -m tests.dist_scripts.mismatch OUT_PREFIX key=value ...

Rank 1 zeroes a few unit-gate thetas (or, with ``PERTURB=nu``, changes the variational
method's nu in its last digits) *after* the coordinator's all-reduce and just before the method
decides (the decision function is wrapped here, in the test's own script), so its plan (or its
decision digest) differs from rank 0's.  Every rank records what it saw in ``OUT_PREFIX.rank{r}.json``:
the error, the ranks it names, and the spec before and after (no surgery may have happened),
then exits with status 3.
"""

from __future__ import annotations

import json
import os
import sys

import torch

PERTURBED_RANK = 1
GATE = "layer1.0.gate1"


def main(argv: list[str]) -> int:
    from system.config import load_config
    from system.models.resnet import gates_of
    from system.run_config import RunConfig
    from system.runtime.coordinator import PlanMismatch
    from system.runtime.distributed import init_distributed, shutdown_distributed
    from system.trainer import Trainer

    prefix, overrides = argv[0], argv[1:]
    cfg = load_config(RunConfig, None, overrides + ["engine.kind=deepspeed"])
    env = init_distributed(cfg)
    rec: dict = {"rank": env.rank, "error": None, "ranks": None, "prune_events": None}
    try:
        tr = Trainer(cfg, env)
        rec["spec_before"] = tr.spec().to_dict()
        if env.rank == PERTURBED_RANK:
            decide = tr.method.on_step_end

            def perturbed(ctx):
                if os.environ.get("PERTURB") == "nu":  # the plan stays the same; nu, a rank's own float, drifts
                    tr.method.budget.nu *= 1.0 + 1e-9
                else:
                    with torch.no_grad():
                        gates_of(ctx.model)[GATE].theta[:3] = 0.0
                return decide(ctx)

            tr.method.on_step_end = perturbed
        try:
            tr.run()
        except PlanMismatch as exc:
            rec.update(error=str(exc), ranks=exc.ranks, step=tr.state.step, prune_events=tr.state.prune_events,
                       spec_after=tr.spec().to_dict(), coordinator_events=len(tr.coord.events))
        tr.engine.close()
    finally:
        shutdown_distributed()
    with open(f"{prefix}.rank{env.rank}.json", "w") as f:
        json.dump(rec, f)
    return 3 if rec["error"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
