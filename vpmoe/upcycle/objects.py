"""Checkpoint objects on disk: identity (weights hash), provenance, and the checks a step makes on its input.

A vpmoe object is `model.safetensors` (or shards + their index) + `config.json` + `provenance.json` + `drift.json`;
a Hugging Face object is its directory (config, weights, tokenizer) plus, when made by a step, the same two records.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from vpmoe.artifacts.files import file_sha256, read_json
from vpmoe.errors import UserError
from vpmoe.model.config import model_config_to_dict
from vpmoe.artifacts.models import model_config as load_config
from vpmoe.artifacts.weights import INDEX_FILE, WEIGHTS_FILE, has_weights
from vpmoe.upcycle import hf
from vpmoe.upcycle.registry import ObjectEntry

PROVENANCE_FILE = "provenance.json"
DRIFT_FILE = "drift.json"


def weights_sha256(directory: str | Path) -> str:
    """The identity of an object's weights: sha256 over `name:sha256(file)` lines of its *.safetensors files,
    sorted by name (one definition for single-file and sharded checkpoints)."""
    lines = [f"{p.name}:{file_sha256(p)}\n" for p in hf.weight_files(directory)]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def read_provenance(directory: str | Path) -> dict | None:
    path = Path(directory) / PROVENANCE_FILE
    return read_json(path, "provenance") if path.is_file() else None


def check_input(directory: str | Path, entry: ObjectEntry) -> dict:
    """Refuse `directory` unless it is the registry object `entry`: shapes and config, pinned hash, provenance.

    Returns {"weights_sha256", "provenance"} of the input."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"input {directory} is not a directory")
    if entry.kind == "hf":
        hf.check_facts(directory, entry.hf, entry.name)
    else:
        if not has_weights(directory):
            raise UserError(f"{directory}: no {WEIGHTS_FILE} or {INDEX_FILE} (not a vpmoe checkpoint object)")
        got, want = model_config_to_dict(load_config(directory)), model_config_to_dict(entry.model_config())
        if got != want:
            key = _first_difference(got, want)
            raise UserError(f"{directory}: config.json differs from the registry's {entry.name!r} at {key}")
    digest = weights_sha256(directory)
    if entry.sha256 and digest != entry.sha256:
        raise UserError(f"{directory}: weights sha256 {digest} but the registry pins {entry.name!r} to {entry.sha256}")
    prov = read_provenance(directory)
    if prov is None and entry.step:
        raise UserError(f"{directory}: no {PROVENANCE_FILE}; {entry.name!r} is made by step {entry.step!r} and must "
                        f"carry the provenance that step writes")
    if prov is not None:
        if prov.get("object") not in (None, entry.name):
            raise UserError(f"{directory}: its provenance says it is {prov.get('object')!r}, not {entry.name!r}")
        if entry.step and prov.get("object") != entry.name:
            raise UserError(f"{directory}: its provenance names no object; expected {entry.name!r}")
        recorded = prov.get("weights_sha256")
        if recorded is not None and recorded != digest:
            raise UserError(f"{directory}: the weights changed since they were written (sha256 {digest}, provenance "
                            f"records {recorded})")
    return {"weights_sha256": digest, "provenance": prov}


def _first_difference(got, want, prefix: str = "") -> str:
    if isinstance(got, dict) and isinstance(want, dict):
        for key in sorted(set(got) | set(want)):
            if got.get(key) != want.get(key):
                return _first_difference(got.get(key), want.get(key), f"{prefix}{key}.")
    return f"{prefix.rstrip('.')} (got {got!r}, expected {want!r})"


def may_replace(directory: Path, overwrite: bool) -> bool:
    """Whether an existing output directory may be replaced (`files.staged_dir`): only with upcycle.overwrite and
    only an object that `vpmoe upcycle` wrote."""
    if not overwrite:
        raise UserError(f"output {directory} exists; choose another or set upcycle.overwrite = true")
    if not (directory / PROVENANCE_FILE).is_file():
        raise UserError(f"output {directory} exists and was not written by `vpmoe upcycle`; not replacing it")
    return True
