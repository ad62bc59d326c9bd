"""`vpmoe export PATH --out DIR`: any vpmoe checkpoint (run directory, training checkpoint, checkpoint object) as
`config.json` + (sharded) `model.safetensors` + tokenizer files + `provenance.json`. Loading it back is bit-exact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from vpmoe import provenance
from vpmoe import tokenizer as tk
from vpmoe.artifacts import weights
from vpmoe.artifacts.files import staged_dir, write_json
from vpmoe.artifacts.models import load_model, read_provenance, resolve, save_model
from vpmoe.errors import UserError


def export(path: str | Path, out: str | Path, shard_bytes: int = weights.DEFAULT_SHARD_BYTES) -> Path:
    """Write the model of `path` into the new directory `out` (staged beside it, renamed when complete)."""
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} already exists: choose a new --out directory")
    source = resolve(path)
    model = load_model(source.directory)
    with staged_dir(out) as tmp:
        save_model(model, tmp, shard_bytes)
        _write_tokenizer(tmp)
        parent = read_provenance(source.directory)
        record = provenance.record("export", "", parents=[parent] if parent else [],
                                   source=provenance.portable_name(source.directory), shards=_count_shards(tmp))
        write_json(tmp / "provenance.json", record)
    return out


def _count_shards(directory: Path) -> int:
    return len(set(weights.tensor_files(directory).values()))


def _write_tokenizer(directory: Path) -> None:
    """The o200k ranks (hash-checked), the special-token table, and a Hugging Face `tokenizer.json`."""
    shutil.copyfile(tk.ranks_path(), directory / tk.RANKS_FILE)
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer": "o200k_harmony", "vocab_size": tk.VOCAB_SIZE, "ranks_file": tk.RANKS_FILE,
        "ranks_sha256": tk.O200K_SHA256, "pattern": tk.O200K_PATTERN, "special_tokens": tk.special_tokens(),
        "eos_token_id": tk.RETURN, "pad_token_id": tk.EOD,
    }, indent=1) + "\n")
    tk.write_hf_tokenizer(directory)
