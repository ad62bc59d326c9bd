"""`vpmoe export PATH --out DIR`: any vpmoe checkpoint (run directory, training checkpoint, checkpoint object) as
`config.json` + (sharded) `model.safetensors` + tokenizer files + `provenance.json`. Loading it back is bit-exact.

The files are written into `<out>.partial/model/` and renamed to `<out>` when complete, as the data build does: the
export holds `<out>.partial` locked (a second export to the same `--out` is refused with the first one's pid and
host), and a `<out>.partial` that holds anything but an earlier export's leftovers is refused, never deleted.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path

from vpmoe import provenance
from vpmoe import tokenizer as tk
from vpmoe.artifacts import weights
from vpmoe.artifacts.files import remove_dir, write_failed, write_json
from vpmoe.artifacts.lock import LOCK_FILE, lock_dir
from vpmoe.artifacts.models import load_model, read_provenance, resolve, save_model
from vpmoe.errors import UserError


MARK = "export.json"  # in <out>.partial: an export wrote this directory

# What an export writes in `<out>.partial`: the lock, the mark (and write_json's temporary file of it) and, once
# marked, the model directory (and remove_dir's renamed-aside copy of it, left by a removal that was killed).
_ALWAYS = re.compile(rf"^({re.escape(LOCK_FILE)}|\.{re.escape(MARK)}\.tmp\d+)$")
_ONCE_MARKED = re.compile(rf"^({re.escape(MARK)}|model|\.model\.old\d+)$")


def export(path: str | Path, out: str | Path, shard_bytes: int = weights.DEFAULT_SHARD_BYTES) -> Path:
    """Write the model of `path` into the new directory `out` (staged in `<out>.partial`, renamed when complete)."""
    out = Path(out)
    _check_out(out)
    source = resolve(path)
    model = load_model(source.directory)
    partial = out.with_name(out.name + ".partial")
    try:
        with lock_dir(partial, "the export"):
            _check_out(out)  # again, now that this process holds the partial directory
            stage = _start(partial, source.directory)
            try:
                _write(model, stage, source.directory, shard_bytes)
                stage.rename(out)
            except OSError:
                with contextlib.suppress(OSError):
                    remove_dir(partial)  # what this export wrote: it frees the space a full disk needs
                raise
            remove_dir(partial)
    except OSError as e:
        raise write_failed(e, "the export", partial, "run the same command again") from None
    return out


def _write(model, stage: Path, source: Path, shard_bytes: int) -> None:
    save_model(model, stage, shard_bytes)
    _write_tokenizer(stage)
    parent = read_provenance(source)
    record = provenance.record("export", "", parents=[parent] if parent else [],
                               source=provenance.portable_name(source), shards=_count_shards(stage))
    write_json(stage / "provenance.json", record)


def _check_out(out: Path) -> None:
    if out.exists():
        raise UserError(f"{out} already exists: choose a new --out directory")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"--out {out}: {parent} is a file, not a directory")


def _start(partial: Path, source: Path) -> Path:
    """A fresh `<out>.partial/model/`. Only what an export writes may be there: its lock file, and after an
    earlier export stopped, its mark and its leftovers (removed here); anything else is refused, never deleted."""
    marked = (partial / MARK).is_file()
    foreign = sorted(entry.name for entry in partial.iterdir() if not _written_by_export(entry.name, marked))
    if foreign:
        raise UserError(f"{partial} exists but is not an export in progress: remove it, or choose another --out "
                        f"(it holds {foreign[0]!r}, which vpmoe export does not write)")
    leftovers = [entry for entry in partial.iterdir() if entry.name != LOCK_FILE]
    if marked:
        print(f"note: removing the unfinished export in {partial}")
    for entry in leftovers:
        if entry.is_dir():
            remove_dir(entry)
        elif entry.name != MARK:
            entry.unlink()
    write_json(partial / MARK, {"source": provenance.portable_name(source)})
    stage = partial / "model"
    stage.mkdir()
    return stage


def _written_by_export(name: str, marked: bool) -> bool:
    return bool(_ALWAYS.match(name) or (marked and _ONCE_MARKED.match(name)))


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
