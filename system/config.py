"""Typed config tree machinery: frozen dataclasses, YAML recipes, dotted overrides.

Every component defines a frozen dataclass next to the code that uses it; a root
config composes them.  This module turns plain dicts (from YAML and from
``key=value`` overrides) into those dataclasses and back, rejecting unknown keys
and wrong types with the dotted name of the offending key.

Example::

    @dataclass(frozen=True)
    class Optim:
        lr: float = 0.1
        def __post_init__(self):
            check(self.lr > 0, "lr", "must be > 0")

    cfg = from_dict(Optim, {"lr": 0.05})
    cfg = load_config(Optim, None, ["lr=0.2"])
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is unknown, mistyped or out of range; ``key`` is its dotted name."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config key '{key}': {message}")


class _FieldError(Exception):
    """Raised by ``check`` inside ``__post_init__``; re-raised with the full dotted key."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


def check(condition: bool, field: str, message: str) -> None:
    """Validation helper for ``__post_init__``: fail naming ``field`` unless ``condition``."""
    if not condition:
        raise _FieldError(field, message)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Convert ``value`` to annotation ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(key, f"{value!r} matches none of {[_type_name(a) for a in args]}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(key, f"{value!r} is not one of {list(args)}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping for section {_type_name(tp)}, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(key, f"expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and bad values raise ConfigError."""
    if data is None:
        data = {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]  # T is a dataclass
    for name in data:
        if name not in fields:
            key = f"{prefix}.{name}" if prefix else name
            raise ConfigError(key, f"unknown key (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(hints[name], value, key)
    try:
        return cls(**kwargs)
    except _FieldError as exc:
        key = f"{prefix}.{exc.field}" if prefix else exc.field
        raise ConfigError(key, exc.message) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain JSON-serialisable dict of a config tree (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``; used for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=0.1"`` -> ``(["optim", "lr"], 0.1)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(text, "an override must look like dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(key or text, "empty key in override")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with every ``dotted.key=value`` applied."""
    out = json.loads(json.dumps(data))
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(".".join(path), f"'{part}' is not a section")
            node = nxt
        node[path[-1]] = value
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a recipe; a missing file or a non-mapping document is a clear error.

    A recipe may start from another with ``base: other.yaml`` (relative to its own folder);
    its keys override the base's, section by section.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError("--config", f"file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("--config", f"{p} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError("--config", f"{p} must hold a mapping at top level")
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError("base", f"{p}: 'base' must name a recipe file")
        data = _merge(read_yaml(p.parent / base), data)
    return data


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Defaults of ``cls`` <- recipe at ``path`` <- ``overrides``; validated once, up front."""
    data = read_yaml(path) if path else {}
    data = apply_overrides(data, list(overrides or []))
    return from_dict(cls, data)
