"""The GPU suite's report for ``bench/gpu_suite.py``: the markdown table, one line per row in
:data:`~gpu_suite_rows.ROWS` order, from :func:`gpu_suite_rows.run_rows`' results.

Example::

    print(table(run_rows(s, set(ROWS))))   # | row | what | step ms (event ms) | img/s | ... | notes |
"""

from __future__ import annotations

from gpu_suite_rows import ROWS

#: what each row measures, the table's second column
LABELS = {
    "dense": "dense, synthetic tensors",
    "dense_dali": "dense, DALI mixed decode (JPEG shards)",
    "dense_deepspeed": "dense, DeepSpeed engine",
    "pruned_r1": "pruned ~50% MACs, round_to=1",
    "pruned_r8": "pruned ~50% MACs, round_to=8",
    "prune_event": "one pruning event (bench_prune_event)",
    "compile": "torch.compile, pruned round_to=8",
    "step_dense": "Trainer step, dense (method none)",
    "step_variational": "Trainer step, variational (active phase)",
    "step_compiled": "Trainer step, variational, train.compile",
}


def _f(v, fmt: str) -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else "–"


def _notes(name: str, r: dict) -> str:
    if r["status"] != "ok":
        return f"skipped: {r['reason']}"
    if name in ("dense_dali", "dense_deepspeed") and "of_dense_synthetic" in r:
        return f"{100 * r['of_dense_synthetic']:.0f}% of the synthetic-tensor img/s"
    if name.startswith("pruned_"):
        return (f"keep {r['keep']:.3f} of every inner width; dense reference {1e3 * r['dense_ref_step_s']:.1f} ms "
                f"in the same interleaved run; ideal x{r['ideal_speedup']:.2f}")
    if name == "prune_event":
        p = r["parts_s"]
        return (f"{r['channels_per_event']} channels, about {r['cost_steps']:.1f} steps in all: event "
                f"{r['event_steps']:.2f} steps (surgery "
                f"{1e3 * p['surgery']:.0f}, transplant {1e3 * p['transplant']:.0f}, rebuild {1e3 * p['rebuild']:.0f}, "
                f"decide {1e3 * (p['reduce'] + p['decide'] + p['agree']):.0f} ms); first step after "
                f"{1e3 * r['first_step_after_s']:.0f} ms = {r['first_step_after_steps']:.2f} steps; "
                f"training step {1e3 * r['step_s']:.1f} ms at micro-batch {r['micro_batch']}")
    if name in ("step_dense", "step_variational"):
        note = f"{r['ops_per_step']} aten ops, {r['syncs_per_step']} host syncs per step"
        if r.get("kernels_per_step") is not None:
            note += f", {r['kernels_per_step']} GPU kernels"
        if name == "step_variational":
            note += (f"; x{r['vs_dense_step']:.2f} the dense step ({1e3 * r['dense_step_s']:.1f} ms), "
                     f"x{r['vs_dense_ops']:.2f} its ops")
        return note
    if name == "step_compiled":
        eager = (f"; eager {1e3 * r['eager_step_s']:.1f} ms, compiled x{r['speedup_vs_eager']:.2f} vs eager"
                 if "eager_step_s" in r else "")
        kernels = f"; {r['kernels_per_step']} GPU kernels per step" if r.get("kernels_per_step") is not None else ""
        return f"compile + first step {r['compile_s']:.1f} s" + eager + kernels
    if name == "compile":
        return (f"compile + first step {r['compile_s']:.1f} s; eager {1e3 * r['eager_step_s']:.1f} ms, "
                f"compiled x{r['speedup_vs_eager']:.2f} vs eager")
    return ""


def table(results: dict[str, dict]) -> str:
    """The markdown table of :func:`gpu_suite_rows.run_rows`' results: one line per row, "–" where a row
    has no number, its reason in the notes where it was skipped."""
    head = ["row", "what", "step ms (event ms)", "img/s", "MACs vs dense", "speed-up vs dense", "speed-up / ideal",
            "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for name in ROWS:
        r = results[name]
        ok = r["status"] == "ok"
        ms = r.get("event_s" if name == "prune_event" else "step_s") if ok else None
        speedup = r.get("speedup") if ok else None
        if ok and name == "prune_event":
            speedup = None
        cells = [name, LABELS[name], _f(1e3 * ms if ms is not None else None, ".1f"),
                 _f(r.get("img_s") if ok else None, ".0f"), _f(r.get("macs_ratio") if ok else None, ".3f"),
                 "x" + _f(speedup, ".2f") if speedup is not None else "–",
                 _f(r.get("speedup_over_ideal") if ok else None, ".2f"), _notes(name, r)]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)
