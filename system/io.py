"""Atomic file writes: write beside the target under a temporary name, fsync, rename.

The results follow the process umask like any ``open``/``mkdir`` would (``tempfile`` alone makes them
0600/0700): a run on a shared project directory under umask 022 or 002 is readable by the team."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def umask() -> int:
    """The process umask, read without changing it (``/proc``) where Linux offers it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)  # elsewhere: the only portable read sets it, so put it straight back
    os.umask(old)
    return old


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename to ``path``; a crash leaves no partial ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~umask())
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    def write(p: Path) -> None:
        p.write_text(text)

    return atomic_write(path, write)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True))


def replace_dir(tmp: Path, final: Path, old: Path) -> None:
    """Rename the complete directory ``tmp`` to ``final``; an existing ``final`` is moved to ``old``
    first and deleted after, so ``final`` is at every moment either the old or the new one."""
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def atomic_dir(final: str | Path, fill: Callable[[Path], None]) -> Path:
    """Build a directory under a temporary name with ``fill(tmp_dir)``, then rename it to ``final``.

    An existing ``final`` is replaced only after the new one is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    mask = umask()
    tmp.chmod(0o777 & ~mask)
    try:
        fill(tmp)
        for p in tmp.rglob("*"):  # what fill's writers made (safetensors writes 0600) follows the umask too
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
        replace_dir(tmp, final, final.with_name(f".{final.name}.old"))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
