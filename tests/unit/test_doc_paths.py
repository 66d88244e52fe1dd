"""Every file path the docs and the code's docstrings and comments name exists in the repository.

A path is a repository-relative name under one of the project's folders (``system/``, ``launch/``,
``pipelines/``, ``tests/``, ``bench/``, ``configs/``, ``slurm/``, ``docs/``, ``deps/``) ending in a
file extension; the docs are README.md and docs/*.md, the code every .py, .sh, .yaml and .toml file.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("system", "launch", "pipelines", "tests", "bench", "configs", "slurm", "docs", "deps")
PATH = re.compile(r"(?<![\w./-])(?:" + "|".join(FOLDERS) + r")/[\w./-]*\w\.(?:py|md|yaml|yml|sh|txt|toml|json|png)\b")
SOURCES = ("*.py", "*.sh", "*.yaml", "*.toml")


def _texts() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "pyproject.toml", ROOT / "Makefile", *sorted((ROOT / "docs").glob("*.md"))]
    for folder in FOLDERS:
        for pattern in SOURCES:
            files += sorted((ROOT / folder).rglob(pattern))
    return [f for f in files if f.is_file() and ".venv" not in f.parts]


def named_paths(text: str) -> set[str]:
    return {m.group(0) for m in PATH.finditer(text)}


def test_the_pattern_finds_paths_and_only_paths():
    text = "see `docs/method.md` section 7, system/trainer.py:12 and (tests/unit/test_doc_paths.py); not mysystem/a.py"
    assert named_paths(text) == {"docs/method.md", "system/trainer.py", "tests/unit/test_doc_paths.py"}


def test_every_named_path_exists():
    missing = []
    for f in _texts():
        for p in sorted(named_paths(f.read_text(errors="replace"))):
            if "*" in p or "<" in p:
                continue
            if not (ROOT / p).exists():
                missing.append(f"{f.relative_to(ROOT)}: {p}")
    assert not missing, "paths named but not in the repository:\n" + "\n".join(missing)
