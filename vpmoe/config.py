"""Typed configs loaded from TOML.

A config schema is a dataclass whose fields are section dataclasses; a section's fields are plain values. A section
typed `Section | None = None` is optional: None when the file has no such table, checked like any other when it has.
Unknown keys, missing keys and wrong types are errors that name the key and the file. `--set section.key=value`
overrides are applied to the raw TOML before validation, so they are checked the same way (an error in a value an
override set names the override, not the file); `replace` changes a
loaded config from Python with the same checks (typed overrides: no strings to compose and parse back).

A config is named by the path of its TOML file or, for the configs shipped inside the package (`vpmoe/configs/`,
also `configs/` in a checkout), by its bare name: `tiny_moe` is the model config `configs/model/tiny_moe.toml`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from vpmoe.errors import UserError

T = TypeVar("T")


KINDS = ("model", "train", "data", "teacher", "upcycle", "eval")


def shipped_dir(kind: str) -> Path:
    """The folder of the shipped configs of one kind (package data)."""
    if kind not in KINDS:
        raise ValueError(f"unknown config kind {kind!r}")
    return Path(str(importlib.resources.files("vpmoe") / "configs" / kind))


def shipped_names(kind: str) -> list[str]:
    return sorted(p.stem for p in shipped_dir(kind).glob("*.toml"))


def locate(ref: str | Path, kind: str) -> Path:
    """The TOML file a config reference names: a path (anything with a '/' or ending in .toml), else the bare name
    of a shipped config of `kind`."""
    text = str(ref)
    if "/" in text or text.endswith(".toml"):
        path = Path(text)
        if not path.is_file():
            hint = f" (a shipped {kind} config is named without a path, e.g. {shipped_names(kind)[0]!r})" \
                if shipped_names(kind) else ""
            what = "is not a file" if path.exists() else "does not exist"
            raise UserError(f"{kind} config {path} {what}{hint}")
        return path
    path = shipped_dir(kind) / f"{text}.toml"
    if not path.is_file():
        raise UserError(f"no shipped {kind} config named {text!r}; shipped: {', '.join(shipped_names(kind))} "
                        f"(or give the path of a TOML file)")
    return path


def load(path: str | Path, schema: type[T], overrides: list[str] | None = None, kind: str | None = None,
         changes: dict[str, Any] | None = None) -> T:
    """Load and validate a config; with `kind`, `path` may also be a shipped config's bare name (see `locate`).
    `overrides` are the user's `section.key=value` strings; `changes` typed values set from Python (after them)."""
    path = locate(path, kind) if kind is not None else Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid TOML: {e}") from None
    set_by = {apply_override(raw, item): item for item in overrides or []}
    _apply_changes(raw, changes or {}, str(path))
    return from_dict(raw, schema, source=str(path), overrides=set_by)


def from_overrides(schema: type[T], overrides: list[str], changes: dict[str, Any] | None = None,
                   source: str = "command line") -> T:
    """A config with no file: the schema's defaults, the user's overrides, then typed changes."""
    raw: dict = {}
    set_by = {apply_override(raw, item): item for item in overrides}
    _apply_changes(raw, changes or {}, source)
    return from_dict(raw, schema, source=source, overrides=set_by)


def _apply_changes(raw: dict, changes: dict[str, Any], source: str) -> None:
    for dotted, value in changes.items():
        *path, leaf = dotted.split(".")
        node = raw
        for part in path:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"{source}: '{part}' in {dotted!r} is not a table")
        node[leaf] = _plain(value)


def replace(obj: T, changes: dict[str, Any], source: str = "") -> T:
    """A copy of a loaded config with typed changes applied (`{"data.path": Path(...), "train.steps": 10}`),
    checked exactly as a TOML file's values are (types, Literal choices, each section's validate())."""
    source = source or f"{type(obj).__name__} with {', '.join(changes)} replaced"
    raw = _plain(to_dict(obj))
    _apply_changes(raw, changes, source)
    return from_dict(raw, type(obj), source=source)


def _plain(value: Any) -> Any:
    """Config values as TOML holds them: lists for tuples, strings for paths, nested dicts for sections."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def apply_override(raw: dict, item: str) -> str:
    """Apply one `section.key=value` override (the value is parsed as a TOML value, else taken as a string);
    returns the dotted key it set."""
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
    return ".".join(parts)


def from_dict(raw: dict, schema: type[T], source: str, prefix: str = "",
              overrides: dict[str, str] | None = None) -> T:
    """`overrides` maps each dotted key a `--set` changed to that override, which errors in that key then name."""
    overrides = overrides or {}
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in raw:
        if key not in fields:
            raise UserError(f"{_blame(source, overrides, prefix + key)}: unknown key '{prefix}{key}'")
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
        kind = _optional_section(kind)
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise UserError(f"{_blame(source, overrides, where)}: '{where}' must be a table")
            values[name] = from_dict(value, kind, source, prefix=f"{where}.", overrides=overrides)
        else:
            values[name] = _check_value(value, kind, _blame(source, overrides, where), where)
    obj = schema(**values)
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as e:
            inside = [item for key, item in overrides.items() if key.startswith(prefix)]
            raise UserError(f"{source}{' with --set ' + ', '.join(inside) if inside else ''}: {e}") from None
    return obj


def _optional_section(kind: Any) -> Any:
    """`Section | None` (an optional section, None when the file has no such table) -> Section; else `kind`."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        if dataclasses.is_dataclass(inner):
            return inner
    return kind


def _blame(source: str, overrides: dict[str, str], where: str) -> str:
    """Who set the key `where`: the `--set` that set it (or a key inside it), else the config file."""
    for key, item in overrides.items():
        if key == where or key.startswith(f"{where}.") or where.startswith((f"{key}.", f"{key}[")):
            return f"--set {item!r}"
    return source


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
