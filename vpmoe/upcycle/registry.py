"""The registry of checkpoint objects, `configs/upcycle/objects.toml` (architecture.md section 4).

One table per object:

    [objects."vpDense0-5_28.compat"]
    kind = "vpmoe"                       # "hf": a Hugging Face directory; "vpmoe": model.safetensors + config.json
    parent = "qwen3-0_6B-o200k"          # the object it is made from ("" for a root such as the donor)
    step = "surgery"                     # the conversion that makes it from its parent ("" for a root)
    model_config = "../model/vpDense0-5_28.compat.toml"   # vpmoe objects: relative to this file
    overrides = []                       # optional --set style overrides of that model config
    sha256 = ""                          # optional pin of the weights hash (see objects.weights_sha256)

    [objects."qwen3-0_6B".hf]            # hf objects: the facts their config.json and weights must show
    architecture = "Qwen3ForCausalLM"
    layers = 28 ...

A step refuses an input that does not match its source's entry, see `vpmoe.upcycle.objects.check_input`.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vpmoe import config as config_io
from vpmoe.errors import UserError
from vpmoe.model.config import ModelConfig, load_model_config
from vpmoe.artifacts.files import file_sha256
from vpmoe.upcycle.config import STEPS

# The kinds of object each step reads and writes.
STEP_KINDS = {
    "transplant": ("hf", "hf"),
    "surgery": ("hf", "vpmoe"),
    "morph": ("vpmoe", "vpmoe"),
    "expand": ("vpmoe", "vpmoe"),
    "granular": ("vpmoe", "vpmoe"),
}
ENTRY_KEYS = {"kind", "parent", "step", "description", "model_config", "overrides", "sha256", "hf"}


@dataclass
class HFFacts:
    """What a Hugging Face causal LM directory of this object must show (config.json and weight shapes)."""

    architecture: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int  # rows of the input embedding (and of the output head)
    tie_word_embeddings: bool | None = None
    rope_theta: float | None = None
    special_tokens: Any = None  # {token string: id}, checked against the directory's tokenizer

    def validate(self) -> None:
        for key in ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab"):
            if getattr(self, key) <= 0:
                raise ValueError(f"hf.{key} must be positive")
        if self.special_tokens is not None:
            ok = isinstance(self.special_tokens, dict) and all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                for k, v in self.special_tokens.items())
            if not ok:
                raise ValueError("hf.special_tokens must be a table of token string = id")


@dataclass
class ObjectEntry:
    name: str
    kind: str
    parent: str
    step: str
    description: str = ""
    model_config_path: Path | None = None
    overrides: list[str] = field(default_factory=list)
    sha256: str = ""
    hf: HFFacts | None = None

    def model_config(self) -> ModelConfig:
        if self.model_config_path is None:
            raise UserError(f"registry object {self.name!r} is a Hugging Face object and has no model config")
        return load_model_config(self.model_config_path, list(self.overrides))


@dataclass
class Registry:
    path: Path
    sha256: str
    objects: dict[str, ObjectEntry]

    def get(self, name: str) -> ObjectEntry:
        if name not in self.objects:
            raise UserError(f"{self.path}: no object named {name!r} (known: {', '.join(self.objects)})")
        return self.objects[name]

    def chain(self, name: str) -> list[str]:
        """The object's ancestry, root first."""
        names = [name]
        while self.get(names[-1]).parent:
            names.append(self.get(names[-1]).parent)
        return names[::-1]


def load_registry(path: str | Path) -> Registry:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"registry not found: {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid TOML: {e}") from None
    if set(raw) != {"objects"} or not isinstance(raw["objects"], dict) or not raw["objects"]:
        raise UserError(f"{path}: expected one table [objects.NAME] per checkpoint object and nothing else")
    objects = {name: _entry(name, value, path) for name, value in raw["objects"].items()}
    registry = Registry(path, file_sha256(path), objects)
    _check_links(registry)
    return registry


def _entry(name: str, raw: Any, path: Path) -> ObjectEntry:
    where = f"{path}: objects.{name!r}"
    if not isinstance(raw, dict):
        raise UserError(f"{where} must be a table")
    unknown = sorted(set(raw) - ENTRY_KEYS)
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}")
    for key in ("kind", "parent", "step"):
        if not isinstance(raw.get(key), str):
            raise UserError(f"{where}: '{key}' must be a string (\"\" where it does not apply)")
    kind, step = raw["kind"], raw["step"]
    if kind not in ("hf", "vpmoe"):
        raise UserError(f"{where}: kind must be \"hf\" or \"vpmoe\", got {kind!r}")
    if step not in ("", *STEPS):
        raise UserError(f"{where}: step must be one of {list(STEPS)} (or \"\" for a root), got {step!r}")
    if bool(step) != bool(raw["parent"]):
        raise UserError(f"{where}: an object has both a parent and a step, or neither (a root)")
    overrides = raw.get("overrides", [])
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise UserError(f"{where}: overrides must be a list of strings")
    sha = raw.get("sha256", "")
    if not isinstance(sha, str) or (sha and len(sha) != 64):
        raise UserError(f"{where}: sha256 must be a 64-digit hex string or empty")
    entry = ObjectEntry(name=name, kind=kind, parent=raw["parent"], step=step,
                        description=str(raw.get("description", "")), overrides=overrides, sha256=sha.lower())
    if kind == "hf":
        if "hf" not in raw or "model_config" in raw:
            raise UserError(f"{where}: a Hugging Face object has an [hf] table of facts and no model_config")
        if not isinstance(raw["hf"], dict):
            raise UserError(f"{where}: 'hf' must be a table")
        entry.hf = config_io.from_dict(raw["hf"], HFFacts, source=str(path), prefix=f"objects.{name}.hf.")
    else:
        if "model_config" not in raw or "hf" in raw:
            raise UserError(f"{where}: a vpmoe object names its model_config and has no [hf] table")
        entry.model_config_path = (path.parent / raw["model_config"]).resolve()
        if not entry.model_config_path.is_file():
            raise UserError(f"{where}: model_config {raw['model_config']!r} not found")
    return entry


def _check_links(registry: Registry) -> None:
    for entry in registry.objects.values():
        if not entry.parent:
            continue
        if entry.parent not in registry.objects:
            raise UserError(f"{registry.path}: object {entry.name!r} names an unknown parent {entry.parent!r}")
        parent = registry.objects[entry.parent]
        want = STEP_KINDS[entry.step]
        if (parent.kind, entry.kind) != want:
            raise UserError(f"{registry.path}: step {entry.step!r} turns a {want[0]} object into a {want[1]} "
                            f"object, but {entry.parent!r} -> {entry.name!r} is {parent.kind} -> {entry.kind}")
    for name in registry.objects:  # no cycles
        seen = set()
        while name:
            if name in seen:
                raise UserError(f"{registry.path}: the parents of {name!r} form a cycle")
            seen.add(name)
            name = registry.objects[name].parent
