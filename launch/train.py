"""``python -m launch.train --config FILE [dotted.key=value ...]``: train (and prune) one run.

Works as a plain process (CPU or one GPU), under ``torchrun`` and under the ``deepspeed``
launcher (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR from the environment).  Prints the
summary as JSON on rank 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from system.config import ConfigError, load_config
from system.run_config import RunConfig
from system.tracking import TrackingUnavailable


def parse(argv: list[str] | None = None) -> RunConfig:
    ap = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="recipe YAML (overrides the typed defaults)")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.max_steps=20")
    # the ``deepspeed`` launcher appends --local_rank=N; LOCAL_RANK in the environment says the same
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    return load_config(RunConfig, args.config, args.overrides)


def setup_logging() -> None:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s", stream=sys.stderr)


def run(cfg: RunConfig) -> dict:
    """Train one run from a resolved config (also the entry point of submitted jobs)."""
    from system.runtime.distributed import init_distributed, shutdown_distributed
    from system.trainer import Trainer

    env = init_distributed(cfg)
    try:
        return Trainer(cfg, env).run()
    finally:
        shutdown_distributed()


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        cfg = parse(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = run(cfg)
    except (ValueError, FileNotFoundError, TrackingUnavailable) as exc:
        logging.getLogger("launch.train").error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
