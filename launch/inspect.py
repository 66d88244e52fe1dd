"""``python -m launch.inspect NAME|SPEC.json|RUN_DIR [--json]``: MACs, params, widths, blocks kept.

``python -m launch.inspect runs [--root DIR]`` lists the runs under ``DIR`` (default ``runs``): status
(finished, running, stopped at a checkpoint, empty), top-1, MACs, steps.

A bare model name is the dense network at its usual input size; a spec file is read as it is;
a run directory is read from its exported ``final/spec.json`` (else a ``spec.json`` in it, else its
newest checkpoint's spec) and its checkpoints are listed.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path

from system.models.spec import MODEL_NAMES, ArchSpec, SpecError, dense_spec
from system.runtime.rundir import LOCK, _pid_alive, holds_run

# what imports torch (the MACs count, the checkpoint and export readers) is imported where it is used:
# --help answers at once (bench/cli_start.py times it)


def describe(spec: ArchSpec) -> dict:
    """The inspect record of one spec (a run's final network or a checkpoint's)."""
    from system.pruning.complexity import count, width_table

    macs, params = count(spec)
    dense = dense_spec(spec.name, num_classes=spec.num_classes, input_size=spec.input_size,
                       shortcut=spec.shortcut, in_channels=spec.in_channels)
    dmacs, dparams = count(dense)
    return {
        "name": spec.name, "macs": macs, "params": params, "macs_dense": dmacs, "params_dense": dparams,
        "macs_pct": 100.0 * macs / dmacs, "params_pct": 100.0 * params / dparams,
        "blocks_total": spec.blocks_total, "blocks_kept": spec.blocks_kept,
        "input_size": spec.input_size, "num_classes": spec.num_classes, "stages": width_table(spec),
    }


def _checkpoints(run_dir: Path) -> list[dict]:
    """The run's complete checkpoints (manifests only), oldest first."""
    from system.runtime.checkpoint import list_checkpoints

    rows = []
    for ck in list_checkpoints(run_dir):
        d = describe(ck.spec)
        rows.append({"path": str(ck.path), "step": ck.step, "epoch": ck.epoch, "macs": d["macs"],
                     "params": d["params"]})
    return rows


def resolve(target: str) -> tuple[ArchSpec, list[dict]]:
    from system.export import load_spec

    p = Path(target)
    if target in MODEL_NAMES and not p.exists():
        return dense_spec(target), []
    if p.is_file():
        return load_spec(p), []
    if p.is_dir():
        cks = _checkpoints(p)
        for cand in (p / "final" / "spec.json", p / "spec.json"):
            if cand.is_file():
                return load_spec(cand), cks
        if cks:
            return load_spec(Path(cks[-1]["path"]) / "spec.json"), cks
        raise SpecError(f"{p} holds no spec.json, final/spec.json or checkpoint")
    raise SpecError(f"{target!r} is neither a model name ({', '.join(MODEL_NAMES)}), a spec file nor a run dir")


def format_table(rec: dict, checkpoints: list[dict]) -> str:
    lines = [
        f"{rec['name']}  input {rec['input_size']}x{rec['input_size']}  classes {rec['num_classes']}",
        f"MACs   {rec['macs']:>15,}  ({rec['macs_pct']:.1f}% of dense {rec['macs_dense']:,})",
        f"params {rec['params']:>15,}  ({rec['params_pct']:.1f}% of dense {rec['params_dense']:,})",
        f"blocks kept {rec['blocks_kept']}/{rec['blocks_total']}",
        "stage  stream  blocks  inner widths",
    ]
    for st in rec["stages"]:
        widths = " ".join("-" if w is None else "/".join(map(str, w)) for w in st["inner_widths"])
        lines.append(f"{st['stage']:>5}  {st['stream_width']:>6}  "
                     f"{st['blocks_kept']:>2}/{st['blocks_total']:<3}  {widths}")
    if checkpoints:
        lines.append("checkpoints:")
        for c in checkpoints:
            lines.append(f"  step {c['step']:>8}  epoch {c['epoch']:>3}  MACs {c['macs']:>14,}  "
                         f"params {c['params']:>11,}  {c['path']}")
    return "\n".join(lines)


def run_status(d: Path) -> dict:
    """One run directory's row for ``launch.inspect runs``."""
    row: dict = {"run": d.name, "path": str(d), "status": "empty", "top1": None, "macs_pct": None, "steps": None}
    summary = d / "summary.json"
    if summary.is_file():
        try:
            s = json.loads(summary.read_text())
            row.update(status="finished", top1=s.get("top1"), macs_pct=s.get("macs_pct"), steps=s.get("steps"),
                       method=s.get("method"))
            return row
        except ValueError:
            row["status"] = "damaged summary.json"
    from system.runtime.checkpoint import list_checkpoints

    cks = list_checkpoints(d)
    if cks:
        row.update(status=f"stopped at step {cks[-1].step}", steps=cks[-1].step,
                   macs_pct=describe(cks[-1].spec)["macs_pct"])
    lock = d / LOCK
    if lock.is_file():
        try:
            holder = json.loads(lock.read_text())
            dead = holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1)))
            if not dead:
                row["status"] = f"running (host {holder.get('host')}, pid {holder.get('pid')})"
        except ValueError:
            pass
    return row


def list_runs(root: Path) -> list[dict]:
    """Every run directory under ``root`` (a directory with a config, summary or checkpoints), by name."""
    if not root.is_dir():
        raise SpecError(f"{root}: no such runs directory (pass --root)")
    return [run_status(d) for d in sorted(root.iterdir()) if holds_run(d)]


def format_runs(rows: list[dict]) -> str:
    if not rows:
        return "no runs"
    lines = [f"{'run':<32} {'status':<34} {'top-1':>7} {'MACs':>7} {'steps':>7}"]
    for r in rows:
        top1 = f"{100 * r['top1']:.2f}" if r["top1"] is not None else "-"
        macs = f"{r['macs_pct']:.1f}%" if r["macs_pct"] is not None else "-"
        lines.append(f"{r['run']:<32} {r['status']:<34} {top1:>7} {macs:>7} {r['steps'] or '-':>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="parsimony-inspect", description=__doc__.splitlines()[0])
    ap.add_argument("target", help="model name, spec JSON file, run directory, or 'runs' (list the runs)")
    ap.add_argument("--root", default="runs", help="with 'runs': the folder holding the run directories")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    if args.target == "runs" and not (Path("runs") / "final").exists():
        try:
            rows = list_runs(Path(args.root))
        except SpecError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(json.dumps(rows, indent=1) if args.json else format_runs(rows))
        return 0
    try:
        spec, cks = resolve(args.target)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rec = describe(spec)
    if cks:
        rec["checkpoints"] = cks
    print(json.dumps(rec, indent=1) if args.json else format_table(rec, cks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
