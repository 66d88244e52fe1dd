"""``python -m launch.train --config FILE [dotted.key=value ...]``: train (and prune) one run.

Works as a plain process (CPU or one GPU), under ``torchrun`` and under the ``deepspeed``
launcher (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR from the environment).  Prints the
summary as JSON on rank 0.

Ctrl-C: the first SIGINT stops the run at the next step with a checkpoint (the preemption path),
prints one line with the step and the command that resumes it, and exits with status 130; a
second SIGINT stops at once (status 130, no checkpoint).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from system.config import ConfigError, apply_overrides, from_dict, read_yaml, to_dict

if TYPE_CHECKING:
    from system.run_config import RunConfig

# torch, DeepSpeed and MLflow are imported when a run is loaded, not at start: --help answers at once
# (bench/cli_start.py times it)


def redact_text(text: str) -> str:
    from system.tracking.secrets import redact_text as redact  # (the tracking package imports MLflow)

    return redact(text)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="parsimony-train", description=__doc__.splitlines()[0],
                                 epilog="Every key of the config tree, with its default: --print-config. "
                                        "(python -m launch.train is the same command.)")
    ap.add_argument("--config", help="recipe YAML (overrides the typed defaults); its launch: section, for "
                                     "launch.submit, is ignored here")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.max_steps=20")
    ap.add_argument("--print-config", action="store_true",
                    help="print the resolved config tree (defaults <- recipe <- overrides) as YAML, each key with "
                         "its meaning as a comment (docs/config.md), and exit")
    # the ``deepspeed`` launcher appends --local_rank=N; LOCAL_RANK in the environment says the same
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap


def load(path: str | None, overrides: list[str]) -> RunConfig:
    """Defaults <- recipe <- overrides; a recipe's ``launch:`` section (launch.submit's) is set aside."""
    from system.run_config import RunConfig

    data = read_yaml(path) if path else {}
    if isinstance(data, dict) and "launch" in data:
        data = {k: v for k, v in data.items() if k != "launch"}
        logging.getLogger("launch.train").info(
            "%s: ignoring its launch: section (where a job runs: read by launch.submit only)", path)
    return from_dict(RunConfig, apply_overrides(data, list(overrides)))


def parse(argv: list[str] | None = None) -> RunConfig:
    args = parser().parse_intermixed_args(argv)
    return load(args.config, args.overrides)


def setup_logging() -> None:
    """INFO on rank 0, WARNING elsewhere; plus, on the first rank of every node, the per-node records
    (interface choice, rank table, pruning plan digests: logger ``parsimony.node``)."""
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s", stream=sys.stderr)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        logging.getLogger("parsimony.node").setLevel(logging.INFO)


def run(cfg: RunConfig) -> dict:
    """Train one run from a resolved config (also the entry point of submitted jobs)."""
    from system.runtime.distributed import init_distributed, lost_peers, shutdown_distributed
    from system.tracking.secrets import install_log_redaction
    from system.trainer import Trainer

    # no URL login, password or token of the config in a log line (MLflow's own login only where the run tracks:
    # importing MLflow to read it is about 2 s of a process that does not)
    install_log_redaction(to_dict(cfg), mlflow_login=cfg.tracking.enabled)
    _warn_network_store(cfg)
    env = init_distributed(cfg)
    try:
        return Trainer(cfg, env).run()
    except Exception as exc:
        lost = lost_peers(exc)  # a failed collective: which ranks (hosts) went away
        if lost is not None:
            logging.getLogger("launch.train").error("%s", lost)
            raise lost from exc
        raise
    finally:
        shutdown_distributed()


def _warn_network_store(cfg: RunConfig) -> None:
    """One run on its own may use the embedded SQLite store on a network filesystem (one writer), with a
    warning; launch.submit refuses it (the jobs of an array write at once)."""
    from system.tracking import resolve_uri
    from system.tracking.config import sqlite_file
    from system.tracking.login import check_store_filesystem

    if not cfg.tracking.enabled or int(os.environ.get("RANK", 0)) != 0:
        return
    uri = resolve_uri(cfg.tracking, cfg.run.root)
    fstype = check_store_filesystem(uri)
    if fstype is not None:
        logging.getLogger("launch.train").warning(
            "the embedded SQLite tracking store %s is on a network filesystem (%s): safe for this one run, "
            "not for several at once; for a team or a sweep use a server (parsimony-tracking serve) and "
            "tracking.uri", sqlite_file(uri), fstype)


def _on_interrupt() -> None:
    """First SIGINT: ask the loop to stop at the next step (it saves a checkpoint); the second one
    raises KeyboardInterrupt at once."""
    from system.runtime import preemption

    def second(signum, frame):
        raise KeyboardInterrupt

    def first(signum, frame):
        preemption.request_stop("interrupted (Ctrl-C)")
        signal.signal(signal.SIGINT, second)

    preemption.watch()
    signal.signal(signal.SIGINT, first)


def _resume_command(argv: list[str], run_dir: Path) -> str:
    keep = [a for a in argv if not a.startswith(("run.resume=", "run.dir="))]
    return shlex.join([sys.executable, "-m", "launch.train", *keep, f"run.dir={run_dir}", "run.resume=auto"])


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_intermixed_args(argv)  # overrides may follow the flags
    try:
        cfg = load(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        from launch.config_doc import annotated_yaml  # every key with its meaning (docs/config.md)

        print(annotated_yaml(to_dict(cfg)), end="")
        return 0
    from system.runtime import preemption
    from system.runtime.rendezvous import PeerLost, RendezvousError
    from system.tracking import TrackingUnavailable

    _on_interrupt()
    try:
        summary = run(cfg)
    except preemption.Preempted as stop:
        if int(os.environ.get("RANK", 0)) == 0:
            run_dir = Path(stop.checkpoint).parent.parent if stop.checkpoint else Path(cfg.run.dir or ".")
            print(redact_text(f"interrupted: stopped after step {stop.step}, checkpoint {stop.checkpoint}; "
                              f"resume with: {_resume_command(argv, run_dir)}"), file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted again: stopped at once, without a checkpoint of this step (the run resumes from "
              "its newest checkpoint with run.resume=auto)", file=sys.stderr)
        return 130
    except (RendezvousError, PeerLost) as exc:  # a host that cannot join, a rank (node) lost mid-run
        print(redact_text(f"error: {exc}"), file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, TrackingUnavailable) as exc:
        logging.getLogger("launch.train").error("%s", exc)
        print(redact_text(f"error: {exc}"), file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
