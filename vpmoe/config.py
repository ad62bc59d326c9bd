"""Typed configs loaded from TOML.

A config schema is a dataclass whose fields are section dataclasses; a section's fields are plain values.
Unknown keys, missing keys and wrong types are errors that name the key and the file. `--set section.key=value`
overrides are applied to the raw TOML before validation, so they are checked the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from vpmoe.errors import UserError

T = TypeVar("T")


def load(path: str | Path, schema: type[T], overrides: list[str] | None = None) -> T:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid TOML: {e}") from None
    for item in overrides or []:
        apply_override(raw, item)
    return from_dict(raw, schema, source=str(path))


def apply_override(raw: dict, item: str) -> None:
    """Apply one `section.key=value` override; the value is parsed as a TOML value, else taken as a string."""
    key, sep, text = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise UserError(f"--set {item!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {item!r}: {part!r} is not a table")
    node[parts[-1]] = value


def from_dict(raw: dict, schema: type[T], source: str, prefix: str = "") -> T:
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in raw:
        if key not in fields:
            raise UserError(f"{source}: unknown key '{prefix}{key}'")
    values = {}
    for name, field in fields.items():
        where = f"{prefix}{name}"
        kind = hints[name]
        if name not in raw:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                if dataclasses.is_dataclass(kind) and _all_defaults(kind):
                    values[name] = kind()
                    continue
                raise UserError(f"{source}: missing key '{where}'")
            continue
        value = raw[name]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise UserError(f"{source}: '{where}' must be a table")
            values[name] = from_dict(value, kind, source, prefix=f"{where}.")
        else:
            values[name] = _check_value(value, kind, source, where)
    obj = schema(**values)
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as e:
            raise UserError(f"{source}: {e}") from None
    return obj


def _all_defaults(kind: type) -> bool:
    return all(
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        for f in dataclasses.fields(kind)
    )


def _check_value(value: Any, kind: Any, source: str, where: str) -> Any:
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for candidate in inner:
            try:
                return _check_value(value, candidate, source, where)
            except UserError:
                pass
        raise UserError(f"{source}: '{where}' has the wrong type (got {type(value).__name__})")
    if origin is typing.Literal:
        if value not in args:
            raise UserError(f"{source}: '{where}' must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise UserError(f"{source}: '{where}' must be a list, got {type(value).__name__}")
        item = args[0] if args else Any
        items = [_check_value(v, item, source, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if kind is Any:
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool):
        raise UserError(f"{source}: '{where}' must be int, got bool")
    if not isinstance(value, kind):
        raise UserError(f"{source}: '{where}' must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def config_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of a resolved config."""
    canonical = json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def dumps_toml(obj: Any) -> str:
    """Write a resolved config (sections of plain values) back as TOML."""
    lines: list[str] = []
    _dump_table(to_dict(obj), [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _dump_table(table: dict, path: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and v is not None}
    tables = {k: v for k, v in table.items() if isinstance(v, dict)}
    if path and scalars:
        lines.append(f"\n[{'.'.join(path)}]")
    for key, value in scalars.items():
        lines.append(f"{key} = {_toml_value(value)}")
    for key, value in tables.items():
        _dump_table(value, path + [key], lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
