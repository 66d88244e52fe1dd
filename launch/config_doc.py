"""The config reference: every key of the run config and of the ``launch`` section, with its default and
its meaning, read from the code that defines it (one source of truth).

A field's meaning is its trailing ``#`` comment, or the comment lines right above it (``#:`` or ``#``), or its
entry in the class docstring's ``Attributes:`` section (``name:``, ``a, b:`` or ``a / b:``).  ``parsimony-train
--print-config`` prints the resolved tree with each meaning as a YAML comment; ``docs/config.md`` is
:func:`reference` (``python -m launch.config_doc > docs/config.md``; ``tests/unit/test_config_doc.py``
checks that it is current and that no key lacks a meaning).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import re
import sys
import textwrap
import tokenize
import typing
from pathlib import Path
from typing import Any

import yaml

from launch.config import SECTION, LaunchConfig
from system.run_config import RunConfig

_ATTR = re.compile(r"^ {4}([A-Za-z_][\w]*(?:\s*[,/]\s*[A-Za-z_][\w]*)*):\s*(.*)$")


def _class_notes(klass: type) -> dict[str, str]:
    """The meanings one dataclass's own source gives its fields."""
    try:
        src = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):
        return {}
    lines = src.splitlines()
    comments = {t.start[0]: t.string for t in tokenize.generate_tokens(io.StringIO(src).readline)
                if t.type == tokenize.COMMENT}
    cdef = ast.parse(src).body[0]
    assert isinstance(cdef, ast.ClassDef)
    notes: dict[str, str] = {}
    doc = ast.get_docstring(cdef) or ""
    block = re.search(r"Attributes:\n(.*?)(?:\n\s*\n|\Z)", doc, re.S)
    if block:
        current: list[str] = []
        for line in block.group(1).splitlines():
            m = _ATTR.match(line)
            if m:
                current = [n.strip() for n in re.split(r"[,/]", m.group(1))]
                for n in current:
                    notes[n] = m.group(2).strip()
            elif current and line.strip():
                for n in current:
                    notes[n] = f"{notes[n]} {line.strip()}".strip()
    for node in cdef.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above: list[str] = []
        ln = node.lineno - 1
        while ln >= 1 and lines[ln - 1].strip().startswith("#"):
            above.insert(0, comments[ln].lstrip("#:").strip())
            ln -= 1
        end = node.end_lineno or node.lineno
        trailing = comments.get(end, "") if not lines[end - 1].strip().startswith("#") else ""
        text = trailing.lstrip("#").strip() or " ".join(above)  # a block above may head a group of fields
        if text:
            notes[node.target.id] = text
    return notes


def field_notes(cls: type) -> dict[str, str]:
    """Field name -> meaning for dataclass ``cls``, its bases' meanings included (a subclass's win)."""
    notes: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            notes.update(_class_notes(klass))
    return notes


def entries(cls: type = RunConfig, prefix: str = "") -> dict[str, tuple[Any, str]]:
    """Dotted key -> (default, meaning) for every leaf of ``cls``'s tree."""
    out: dict[str, tuple[Any, str]] = {}
    notes, hints = field_notes(cls), typing.get_type_hints(cls)
    default = cls()
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            out.update(entries(kind, f"{prefix}{f.name}."))  # type: ignore[arg-type]
        else:
            value = getattr(default, f.name)
            out[f"{prefix}{f.name}"] = (list(value) if isinstance(value, tuple) else value, notes.get(f.name, ""))
    return out


def all_entries() -> dict[str, tuple[Any, str]]:
    """The run config's keys, then the ``launch`` section's."""
    return {**entries(RunConfig), **entries(LaunchConfig, f"{SECTION}.")}


def annotated_yaml(tree: dict[str, Any]) -> str:
    """``tree`` (a resolved run config) as YAML, every leaf followed by its meaning as a comment."""
    notes = {k: m for k, (_, m) in entries(RunConfig).items()}
    out: list[str] = []

    def emit(node: dict[str, Any], path: str, depth: int) -> None:
        for key, value in node.items():
            dotted = f"{path}{key}"
            pad = "  " * depth
            if isinstance(value, dict) and value and f"{dotted}" not in notes:
                out.append(f"{pad}{key}:")
                emit(value, f"{dotted}.", depth + 1)
                continue
            text = yaml.safe_dump({key: value}, default_flow_style=True, width=10**6).strip()[1:-1]
            note = notes.get(dotted, "")
            out.append(f"{pad}{text}" + (f"  # {note}" if note else ""))

    emit(tree, "", 0)
    return "\n".join(out) + "\n"


REPO = Path(__file__).resolve().parents[1]


def _cell(value: Any) -> str:
    if isinstance(value, str) and value.startswith(f"{REPO}/"):
        value = value[len(f"{REPO}/"):]  # a default inside the checkout (the demo shards): the same in every clone
    text = json.dumps(value) if not isinstance(value, str) else (f"`{value}`" if value else '`""`')
    return text.replace("|", "\\|") if text.startswith("`") else f"`{text}`"


def reference() -> str:
    """``docs/config.md``: one table per section."""
    rows = all_entries()
    out = ["# Config reference", "",
           "Every key of a recipe (the run config, and the `launch` section that `parsimony-submit` reads), with its",
           "default and meaning, generated from the code that defines them by `python -m launch.config_doc >",
           "docs/config.md` (`tests/unit/test_config_doc.py` keeps it current). `parsimony-train --print-config`",
           "prints a run's resolved values with the same meanings as comments. Set a key in a recipe",
           "(`section:` / `key: value`) or on the command line (`section.key=value`)."]
    section = None
    for key, (default, meaning) in rows.items():
        head = key.rsplit(".", 1)[0] if "." in key else ""
        if head != section:
            section = head
            out += ["", f"## `{head}`", "", "| key | default | meaning |", "|---|---|---|"]
        out.append(f"| `{key}` | {_cell(default)} | {meaning.replace('|', '/')} |")
    return "\n".join(out) + "\n"


def main() -> int:
    sys.stdout.write(reference())
    return 0


if __name__ == "__main__":
    sys.exit(main())
