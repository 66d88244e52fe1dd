"""The package's import graph: no cycle, and no import from a lower layer back up.

Layers, lowest first (a package may import itself and what its row allows)::

    system.config, system.io, system.mounts       the config machinery, atomic files, the mount table
    system.models                                 specs, the gated ResNet, block anatomy
    system.pruning                                complexity, surgery, transplant, methods
    system.tracking                               names, protocol, MLflow backend, plots
    system.runtime                                process group, collectives, coordinator, engines,
                                                  checkpoints, preemption, faults
    system.optim, system.export, system.state,    what the loop uses around the model
    system.progress, system.latency, system.step_log
    system.run_config                             the root config tree (composes every section)
    system.build, system.report                   the one way to build a run's parts; what a run reports
    system.run                                    a run's parts, built once (resumed from a checkpoint)
    system.trainer                                the loop
    launch                                        entry points

Every import counts, including the ones inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("system", "pipelines", "launch")

BASE = {"system.config", "system.io", "system.mounts"}
ALLOWED: dict[str, set[str]] = {
    "system.config": set(),
    "system.io": set(),
    "system.mounts": set(),
    "system.models": BASE,
    "system.pruning": BASE | {"system.models"},
    "system.tracking": BASE,
    "system.runtime": BASE | {"system.models", "system.pruning"},
    "system.optim": BASE | {"system.models"},
    "system.export": BASE | {"system.models", "system.pruning"},
    "system.state": BASE | {"system.models"},
    "system.progress": set(),
    "system.skips": set(),
    "system.evaluation": set(),
    "system.latency": BASE,
    "system.step_log": {"system.tracking", "system.progress"},
    "pipelines": BASE,
    "system.run_config": BASE | {"system.models", "system.pruning", "system.tracking", "system.runtime",
                                 "system.optim", "system.latency", "pipelines"},
    "system.build": BASE | {"system.models", "system.pruning", "system.runtime", "system.optim",
                            "system.run_config", "system.export", "pipelines"},
    "system.report": BASE | {"system.models", "system.pruning", "system.tracking", "system.export",
                             "system.latency", "system.state", "pipelines"},
    "system.run": BASE | {"system.models", "system.pruning", "system.tracking", "system.runtime", "system.state",
                          "system.skips", "system.step_log", "system.run_config", "system.build"},
    "system.trainer": BASE | {"system.models", "system.pruning", "system.tracking", "system.runtime",
                              "system.optim", "system.state", "system.skips", "system.evaluation",
                              "system.run", "system.report", "pipelines"},
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)  # "from system import tracking"
    return {m for m in out if m.split(".")[0] in PACKAGES}


def graph() -> dict[str, set[str]]:
    mods = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    return {m: {i for i in _imports(p) if i in mods} for m, p in mods.items()}


def layer_of(module: str) -> str | None:
    """The row of ALLOWED a module belongs to (the longest matching prefix); None for launch."""
    best = None
    for key in ALLOWED:
        if (module == key or module.startswith(key + ".")) and (best is None or len(key) > len(best)):
            best = key
    return best


def test_every_package_module_has_a_layer():
    missing = sorted(m for m in graph() if not m.startswith("launch") and m != "system" and layer_of(m) is None)
    assert not missing, f"modules outside every layer (add them to the table): {missing}"


def violations(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in g.items():
        own = layer_of(mod)
        if own is None:
            continue  # launch: the top
        for dep in deps:
            target = layer_of(dep)
            if dep.startswith("launch") or (target is not None and target != own and target not in ALLOWED[own]):
                bad.append(f"{mod} -> {dep}")
    return sorted(bad)


def test_no_import_reaches_up_a_layer():
    bad = violations(graph())
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_import_cycle():
    g = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            # a package importing its own submodules (__init__ re-exports) is not a cycle of layers
            if len(comp) > 1 and not all(c == min(comp, key=len) or c.startswith(min(comp, key=len) + ".")
                                         for c in comp):
                cycles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_a_violation():
    """The rules bite: the checkpointer importing the trainer (what it used to do) is refused."""
    g = graph()
    g["system.runtime.checkpoint.manager"] = g["system.runtime.checkpoint.manager"] | {"system.trainer"}
    assert violations(g) == ["system.runtime.checkpoint.manager -> system.trainer"]


def test_every_project_import_resolves():
    """Imports of project modules (also inside functions, in tests and bench scripts) name modules
    and attributes that exist: a moved module cannot leave a stale import behind."""
    import importlib
    import importlib.util

    bad = []
    files = [p for d in (*PACKAGES, "tests", "bench") for p in (ROOT / d).rglob("*.py")]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                    and node.module.split(".")[0] in (*PACKAGES, "tests"):
                try:
                    mod = importlib.import_module(node.module)
                except ImportError as exc:
                    bad.append(f"{path.relative_to(ROOT)}: {node.module} ({exc})")
                    continue
                for alias in node.names:
                    if alias.name != "*" and not hasattr(mod, alias.name) and \
                            importlib.util.find_spec(f"{node.module}.{alias.name}") is None:
                        bad.append(f"{path.relative_to(ROOT)}: {node.module}.{alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    ours = alias.name.split(".")[0] in (*PACKAGES, "tests")
                    if ours and importlib.util.find_spec(alias.name) is None:
                        bad.append(f"{path.relative_to(ROOT)}: {alias.name}")
    assert not bad, "imports that do not resolve:\n" + "\n".join(bad)
