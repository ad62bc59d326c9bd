"""Reading source records (JSONL or Parquet) with strict schema checks.

A schema error (bad UTF-8, bad JSON, a missing field, a wrong type) stops the build: it is raised as a
UserError naming the file, the line (or Parquet row) and the record id.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from vpmoe.artifacts.files import hash_file
from vpmoe.errors import UserError

SYNTH_FIELDS = {
    "synth_id": str, "query": str, "synthetic_reasoning": str, "synthetic_answer": str,
    "language": (str, type(None)), "exercise": (str, type(None)),
}
TEXT_FIELDS = {"id": str, "text": str}
PROMPT_FIELDS = {"synth_id": str, "query": str}  # SYNTH records whose reasoning and answer are ignored
FIELDS = {"synth": SYNTH_FIELDS, "text": TEXT_FIELDS, "prompts": PROMPT_FIELDS}
ID_FIELD = {"synth": "synth_id", "text": "id", "prompts": "synth_id"}

# A reader yields (line number, record, bytes consumed since the previous record).
Reader = Iterator[tuple[int, dict, int]]


def read_records(path: Path, fmt: str, digest=None) -> Reader:
    """`digest` (a hashlib object), when given, is fed every byte of the file by the time the reader is exhausted."""
    fields, id_field = FIELDS[fmt], ID_FIELD[fmt]
    reader = _read_parquet if path.suffix == ".parquet" else _read_jsonl
    for line, record, consumed in reader(path, digest):
        check_record(record, fields, id_field, f"{path}:{line}")
        yield line, record, consumed


def check_record(record: dict, fields: dict, id_field: str, where: str) -> None:
    record_id = record.get(id_field)
    who = f"record {record_id!r}" if isinstance(record_id, str) else "record"
    for name, kind in fields.items():
        if name not in record:
            raise UserError(f"{where}: {who}: missing required field '{name}'")
        if not isinstance(record[name], kind):
            raise UserError(
                f"{where}: {who}: field '{name}' must be {_kind_name(kind)}, got {type(record[name]).__name__}"
            )
    if not record_id:
        raise UserError(f"{where}: {who}: field '{id_field}' is empty")


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)


def _read_jsonl(path: Path, digest) -> Reader:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if digest is not None:
                digest.update(raw)
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{number}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                # json's messages for some errors end in "at" ("Unterminated string starting at").
                raise UserError(f"{path}:{number}: not valid JSON ({e.msg.removesuffix(' at')} at column "
                                f"{e.colno})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{number}: a record must be a JSON object, got {type(record).__name__}")
            yield number, record, len(raw)


def _read_parquet(path: Path, digest) -> Reader:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if digest is not None:  # pyarrow reads the footer first, so the file is hashed in a pass of its own
        hash_file(path, digest)

    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise UserError(f"{path}: not a readable Parquet file ({e})") from None
    rows = max(table.metadata.num_rows, 1)
    per_row = path.stat().st_size / rows
    number = 0
    for group in range(table.num_row_groups):
        first, size = number + 1, table.metadata.row_group(group).num_rows
        batches = table.iter_batches(batch_size=4096, row_groups=[group])
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowException, OSError) as e:  # a damaged page: decompression, decoding, a bad header
                why = " ".join(str(e).split())  # pyarrow's messages span several lines
                raise UserError(f"{path}: row group {group} (rows {first}-{first + size - 1}) cannot be read ({why}): "
                                f"the file is damaged; restore or remove it") from None
            if batch is None:
                break
            for record in batch.to_pylist():
                number += 1
                yield number, record, int(per_row)

