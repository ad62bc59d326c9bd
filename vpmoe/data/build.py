"""`vpmoe data build`: source records -> dataset directory (Megatron IndexedDataset files + manifest).

Each input file is one shard, rendered by a worker process into `<out>.partial/shards/NNNNN/`; the worker
hashes the file in the same pass. A shard is done when its `stats.json` (which holds that sha256) exists, so an
interrupted build resumes where it stopped; a shard whose input had a schema error leaves a `NNNNN.failed` mark,
so that the fixed file is accepted on resume. The merge concatenates the shards in input order into
`<out>.partial/dataset/`, records each file's size and sha256 in its `manifest.json` (for `vpmoe data verify`),
renames that directory to `<out>` and removes the partial directory: a directory at `out` is always complete.

Two builds of one output would share the partial directory: the build holds it locked (vpmoe.artifacts.lock) from
start to end, and a second one is refused with the first one's pid and host.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import glob
import hashlib
import json
import multiprocessing as mp
import queue
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from vpmoe import config, provenance
from vpmoe import tokenizer as tk
from vpmoe.artifacts.files import file_sha256, remove_dir, write_failed, write_json
from vpmoe.artifacts.lock import lock_dir
from vpmoe.data.harmony import SPLIT_RULE, HarmonyRenderer, Reject, split_of, system_tokens
from vpmoe.data.indexed import IndexedWriter
from vpmoe.data.records import ID_FIELD, read_records
from vpmoe.errors import UserError
from vpmoe.spans import NAMES as SPAN_NAMES

SCHEMA_VERSION = 1
PLAN_VERSION = 2  # 2: inputs are identified by (size, mtime_ns) up front, by sha256 once rendered
SPLITS = ("train", "valid")
REJECT_EXAMPLES = 5
DATASET_FILES = [f"{split}/{name}.{ext}" for split in SPLITS for name in ("tokens", "spans") for ext in ("bin", "idx")]

@dataclass
class DataSection:
    inputs: list[str]
    # synth: SYNTH records as training conversations; text: plain text; prompts: the user queries of SYNTH records
    # as Harmony prompts for on-policy distillation (no system message: the effort is set per sample later)
    format: Literal["synth", "text", "prompts"]
    out: str
    seq_len: int = 2048
    pack: bool = False
    valid_fraction: float = 0.01
    reasoning_effort: Literal["low", "medium", "high"] = "medium"
    workers: int = 1

    def validate(self) -> None:
        if not self.inputs:
            raise ValueError("'data.inputs' is empty")
        if self.seq_len < 128:
            raise ValueError(f"'data.seq_len' must be at least 128, got {self.seq_len}")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"'data.valid_fraction' must be in [0, 1), got {self.valid_fraction}")
        if self.workers < 1:
            raise ValueError(f"'data.workers' must be at least 1, got {self.workers}")
        if self.format == "prompts" and self.pack:
            raise ValueError("'data.pack' must be false for format \"prompts\" (each prompt is sampled alone)")


@dataclass
class BuildConfig:
    data: DataSection


def build_from_config(path: str, overrides: list[str]) -> Path:
    cfg = config.load(path, BuildConfig, overrides, kind="data")
    start = time.perf_counter()
    out = build(cfg.data)
    manifest = json.loads((out / "manifest.json").read_text())
    seconds = time.perf_counter() - start
    tokens = sum(manifest["splits"][s]["tokens"] for s in SPLITS)
    print(
        f"wrote {out}: {manifest['records']['accepted']} records accepted, {manifest['records']['rejected']} "
        f"rejected, {manifest['splits']['train']['samples']} train / {manifest['splits']['valid']['samples']} "
        f"valid samples, {tokens} tokens in {seconds:.1f}s"
    )
    return out


def expand_inputs(patterns: list[str]) -> list[Path]:
    paths: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not glob.has_magic(pattern) and Path(pattern).is_dir():
            raise UserError(f"data.inputs: {pattern!r} is a directory; name its files (e.g. '{pattern}/*.jsonl')")
        matches = [m for m in matches if Path(m).is_file()]
        if not matches:
            raise UserError(f"data.inputs: {pattern!r} matches no file")
        paths.extend(Path(m) for m in matches if Path(m) not in paths)
    return paths


def build(data: DataSection) -> Path:
    out = Path(data.out)
    _check_out(out)
    inputs = expand_inputs(data.inputs)
    partial = out.with_name(out.name + ".partial")
    created = _make_partial(partial)
    try:
        with lock_dir(partial, "the data build"):
            return _build(data, out, partial, inputs)
    except OSError as e:
        raise write_failed(e, "the build", partial,
                           f"run the same command to resume, or remove {partial} to start over") from None
    finally:
        if created:
            with contextlib.suppress(OSError):
                partial.rmdir()  # only when the build stopped before writing anything


def _check_out(out: Path) -> None:
    if out.is_dir():
        raise UserError(f"dataset directory {out} already exists: remove it or set data.out to a new directory")
    if out.exists():
        raise UserError(f"data.out {out} is a file: set data.out to a new directory")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"data.out {out}: {parent} is a file, not a directory")


def _make_partial(partial: Path) -> bool:
    """Create the build's working directory if it is missing; True when this call created it."""
    if partial.is_dir():
        return False
    try:
        partial.mkdir(parents=True)
    except FileExistsError:
        if partial.is_dir():
            return False  # another build created it first (the lock sorts out which one goes on)
        raise UserError(f"{partial} is a file: remove it or set data.out to another directory") from None
    except OSError as e:
        raise UserError(f"cannot create {partial} ({e.strerror}): set data.out to a directory you can write "
                        f"to") from None
    return True


def _build(data: DataSection, out: Path, partial: Path, inputs: list[Path]) -> Path:
    _check_out(out)  # again, now that this process holds the partial directory: another build may have finished
    identity = {k: v for k, v in dataclasses.asdict(data).items() if k not in ("workers", "out", "inputs")}
    plan = {"version": PLAN_VERSION, "config": identity, "inputs": [_file_identity(p) for p in inputs]}
    shards = partial / "shards"
    _start_or_resume(partial, plan, inputs)

    todo = [i for i in range(len(inputs)) if not (shards / f"{i:05d}" / "stats.json").exists()]
    try:
        _run_shards(todo, inputs, data, shards, sum(plan["inputs"][i]["size"] for i in todo))
    except UserError as e:
        done = sum((shards / f"{i:05d}" / "stats.json").exists() for i in range(len(inputs)))
        raise UserError(f"{e}. The build stopped; {partial} keeps the {done} of {len(inputs)} input files rendered "
                        f"so far: fix the input and run the same command to resume, or remove {partial}") from None

    summary = _gather(shards, inputs, data, partial)
    if not any(summary["splits"][split]["samples"] for split in SPLITS):
        remove_dir(partial)
        records = summary["records"]
        raise UserError(f"nothing to build: the {len(inputs)} input file(s) hold {records['read']} records, "
                        f"{records['accepted']} accepted: check data.inputs and data.format (nothing was written)")
    stage = partial / "dataset"  # the dataset takes shape here, away from files that are not part of it
    if stage.exists():
        shutil.rmtree(stage)  # a merge that was interrupted
    stage.mkdir()
    _write_splits(stage, shards, len(inputs))
    manifest = _manifest(summary, data, file_records(stage, DATASET_FILES))
    write_json(stage / "manifest.json", manifest)
    stage.rename(out)
    remove_dir(partial)
    return out


def _file_identity(path: Path) -> dict:
    stat = path.stat()
    return {"name": provenance.portable_name(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _failed_mark(shards: Path, index: int) -> Path:
    return shards / f"{index:05d}.failed"


def _start_or_resume(partial: Path, plan: dict, inputs: list[Path]) -> None:
    plan_file = partial / "plan.json"
    if not plan_file.exists():
        if any(not p.name.startswith(".") for p in partial.iterdir()):
            raise UserError(f"{partial} exists but is not a build in progress: remove it")
        write_json(plan_file, plan)
        (partial / "shards").mkdir(exist_ok=True)
        return
    previous = _read_json(plan_file, partial)
    if not isinstance(previous, dict) or not isinstance(previous.get("config"), dict) \
            or not isinstance(previous.get("inputs"), list) \
            or not all(isinstance(entry, dict) and "name" in entry for entry in previous["inputs"]):
        raise _cannot_resume(partial, f"{plan_file} is damaged")
    if previous.get("version") != PLAN_VERSION:
        raise _cannot_resume(partial, "another vpmoe version started it")
    names = lambda p: [entry["name"] for entry in p["inputs"]]
    if previous["config"] != plan["config"] or names(previous) != names(plan):
        raise _cannot_resume(partial, "the config or the input list changed")
    # A rendered shard is reused only if its file still has the sha256 it was rendered from; a file not rendered
    # yet must still have the size and mtime it had when the build started, unless its schema error stopped the
    # build (then the file is expected to change: it was fixed).
    changed, fixed = [], []
    for i, (path, before, now) in enumerate(zip(inputs, previous["inputs"], plan["inputs"])):
        stats = partial / "shards" / f"{i:05d}" / "stats.json"
        if stats.exists():
            if file_sha256(path) != _read_json(stats, partial).get("sha256"):
                changed.append(now["name"])
        elif before != now:
            if _failed_mark(partial / "shards", i).exists():
                fixed.append(i)
            else:
                changed.append(now["name"])
    if changed:
        raise _cannot_resume(partial, f"input files changed: {changed}")
    if fixed:
        for i in fixed:
            previous["inputs"][i] = plan["inputs"][i]
        write_json(plan_file, previous)
    (partial / "shards").mkdir(exist_ok=True)
    print(f"resuming the build in {partial}")


def _cannot_resume(partial: Path, why: str) -> UserError:
    return UserError(f"cannot resume the build in {partial}: {why}. Remove {partial} to start over")


def _read_json(path: Path, partial: Path):
    """A JSON file of the build in progress; a damaged one means the build cannot be resumed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _cannot_resume(partial, f"{path} is damaged") from None


def _run_shards(todo: list[int], inputs: list[Path], data: DataSection, shards: Path, total_bytes: int) -> None:
    # Imported here, so that the spawned workers (which import this module) skip it.
    from tqdm import tqdm

    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="build", disable=None)
    workers = min(data.workers, len(todo))
    if workers <= 1:
        system = system_tokens(data.reasoning_effort)
        for i in todo:
            render_shard(i, str(inputs[i]), data, system, shards, bar.update)
        bar.close()
        return
    ctx = mp.get_context("spawn")
    progress = ctx.Queue()
    outcomes = queue.Queue()  # None for each shard done, or the exception a worker raised
    with ctx.Pool(workers, initializer=_init_worker, initargs=(progress,)) as pool:
        system = system_tokens(data.reasoning_effort)  # loads openai-harmony here while the workers start
        for i in todo:
            job = (i, str(inputs[i]), data, system)
            pool.apply_async(_render_in_worker, (job, shards), callback=outcomes.put, error_callback=outcomes.put)
        done = 0
        while done < len(todo):
            _drain(progress, bar)
            try:
                outcome = outcomes.get(timeout=0.1)
            except queue.Empty:
                continue
            if outcome is not None:
                raise outcome  # a worker's error (a UserError keeps its message)
            done += 1
        _drain(progress, bar)
    bar.close()


_PROGRESS = None


def _init_worker(progress) -> None:
    global _PROGRESS
    _PROGRESS = progress
    tk.encoding()  # load the tokenizer while the main process prepares the jobs


def _render_in_worker(job: tuple, shards: Path) -> None:
    render_shard(*job, shards, _PROGRESS.put)


def _drain(progress, bar) -> None:
    try:
        while True:
            bar.update(progress.get_nowait())
    except queue.Empty:
        pass


def render_shard(index: int, path: str, data: DataSection, system: list[int], shards: Path, progress) -> None:
    """Render one input file into `shards/NNNNN/`: per split, packed or unpacked samples ready to append. A schema
    error in the file leaves the mark `NNNNN.failed`, so that a resumed build accepts the fixed file."""
    try:
        _render_shard(index, path, data, system, shards, progress)
    except UserError:
        _failed_mark(shards, index).touch()
        raise
    _failed_mark(shards, index).unlink(missing_ok=True)


def _render_shard(index: int, path: str, data: DataSection, system: list[int], shards: Path, progress) -> None:
    renderer = HarmonyRenderer(data.reasoning_effort, system)
    docs = {split: ([], []) for split in SPLITS}  # split -> (token arrays, span arrays)
    seen: dict[str, int] = {}
    rejects: dict[str, dict] = {}
    truncated: dict[str, int] = {}
    facets: dict[str, dict[str, int]] = {"language": {}, "exercise": {}}
    id_field = ID_FIELD[data.format]
    digest = hashlib.sha256()
    pending_bytes = 0
    for line, record, consumed in read_records(Path(path), data.format, digest):
        record_id = record[id_field]
        if record_id in seen:
            raise UserError(f"{path}:{line}: duplicate record id {record_id!r} (first seen on line {seen[record_id]})")
        seen[record_id] = line
        try:
            if data.format == "synth":
                parts = [renderer.render(
                    record["query"], record["synthetic_reasoning"], record["synthetic_answer"], data.seq_len
                )]
                for facet in facets:
                    key = str(record[facet])
                    facets[facet][key] = facets[facet].get(key, 0) + 1
            elif data.format == "prompts":
                parts = [renderer.render_prompt(record["query"], data.seq_len)]
            else:
                parts = renderer.render_text(record["text"], data.seq_len)
        except Reject as r:
            entry = rejects.setdefault(r.reason, {"count": 0, "examples": []})
            entry["count"] += 1
            if len(entry["examples"]) < REJECT_EXAMPLES:
                entry["examples"].append(record_id)
            continue
        if parts[0].truncated:
            truncated[parts[0].truncated] = truncated.get(parts[0].truncated, 0) + 1
        tokens, spans = docs[split_of(record_id, data.valid_fraction)]
        for part in parts:
            tokens.append(part.tokens)
            spans.append(part.spans)
        pending_bytes += consumed
        if pending_bytes >= 1 << 20:
            progress(pending_bytes)
            pending_bytes = 0
    progress(pending_bytes)

    directory = shards / f"{index:05d}"
    directory.mkdir(parents=True, exist_ok=True)
    split_stats = {}
    for split, (tokens, spans) in docs.items():
        lengths = np.array([len(t) for t in tokens], dtype=np.int64)
        flat_tokens = np.concatenate(tokens) if tokens else np.zeros(0, np.int32)
        flat_spans = np.concatenate(spans) if spans else np.zeros(0, np.uint8)
        if data.pack:
            flat_tokens, flat_spans, lengths = pack(flat_tokens, flat_spans, lengths, data.seq_len)
        # Raw values, which the merge copies into the dataset files as they are.
        flat_tokens.astype(np.int32, copy=False).tofile(directory / f"{split}_tokens.bin")
        flat_spans.astype(np.uint8, copy=False).tofile(directory / f"{split}_spans.bin")
        np.save(directory / f"{split}_lengths.npy", lengths)
        split_stats[split] = {
            "samples": len(lengths),
            "documents": len(tokens),
            "tokens": int(len(flat_tokens)),
            "span_tokens": np.bincount(flat_spans, minlength=3).tolist(),
        }
    (directory / "ids.json").write_text(json.dumps(seen))
    stats = {
        "sha256": digest.hexdigest(), "records": len(seen), "rejects": rejects, "truncated": truncated,
        "splits": split_stats, "facets": facets if data.format == "synth" else {},
    }
    write_json(directory / "stats.json", stats)


def pack(tokens: np.ndarray, spans: np.ndarray, lengths: np.ndarray, seq_len: int):
    """Greedy in-order packing of whole documents into samples of at most `seq_len`, joined by one EOD each."""
    group = np.empty(len(lengths), dtype=np.int64)
    current, used = -1, seq_len + 1
    for i, length in enumerate(lengths.tolist()):
        if used + 1 + length > seq_len:
            current, used = current + 1, length
        else:
            used += 1 + length
        group[i] = current
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) else lengths
    joins = starts[1:][group[1:] == group[:-1]]
    packed_tokens = np.insert(tokens, joins, tk.EOD).astype(np.int32)
    packed_spans = np.insert(spans, joins, 0).astype(np.uint8)
    docs_per_sample = np.bincount(group) if len(group) else np.zeros(0, np.int64)
    sample_lengths = np.bincount(group, weights=lengths).astype(np.int64) + docs_per_sample - 1
    return packed_tokens, packed_spans, sample_lengths


def _gather(shards: Path, inputs: list[Path], data: DataSection, partial: Path) -> dict:
    """Add up the shards' stats (and check record ids across them) before anything is merged."""
    first_seen: dict[str, int] = {}  # record id -> index of the first input that has it
    rejects: dict[str, dict] = {}
    truncated: dict[str, int] = {}
    facets: dict[str, dict[str, int]] = {}
    splits = {s: {"samples": 0, "documents": 0, "tokens": 0, "span_tokens": [0, 0, 0]} for s in SPLITS}
    records = 0
    input_list = []
    shard_dirs = [shards / f"{i:05d}" for i in range(len(inputs))]
    for i, (path, directory) in enumerate(zip(inputs, shard_dirs)):
        ids = _read_json(directory / "ids.json", partial)
        if not first_seen.keys().isdisjoint(ids):
            record_id = min(first_seen.keys() & ids.keys(), key=ids.get)
            j = first_seen[record_id]
            line = _read_json(shard_dirs[j] / "ids.json", partial)[record_id]
            raise UserError(f"{path}:{ids[record_id]}: duplicate record id {record_id!r} (also at {inputs[j]}:{line}). "
                            f"Fix the inputs, then remove {partial} and build again")
        first_seen.update(dict.fromkeys(ids, i))
        stats = _read_json(directory / "stats.json", partial)
        records += stats["records"]
        if stats["records"] == 0:
            print(f"warning: {path} holds no records", file=sys.stderr)
        name = provenance.portable_name(path)
        input_list.append({"name": name, "sha256": stats["sha256"], "records": stats["records"]})
        for reason, entry in stats["rejects"].items():
            total = rejects.setdefault(reason, {"count": 0, "examples": []})
            total["count"] += entry["count"]
            total["examples"] = (total["examples"] + entry["examples"])[:REJECT_EXAMPLES]
        for kind, n in stats["truncated"].items():
            truncated[kind] = truncated.get(kind, 0) + n
        for facet, counts in stats["facets"].items():
            for key, n in counts.items():
                facets.setdefault(facet, {})[key] = facets.setdefault(facet, {}).get(key, 0) + n
        for split, s in stats["splits"].items():
            for key in ("samples", "documents", "tokens"):
                splits[split][key] += s[key]
            splits[split]["span_tokens"] = [a + b for a, b in zip(splits[split]["span_tokens"], s["span_tokens"])]
    for split in SPLITS:
        span_tokens = splits[split].pop("span_tokens")
        splits[split]["span_tokens"] = {SPAN_NAMES[i]: n for i, n in enumerate(span_tokens)}
    rejected = sum(r["count"] for r in rejects.values())
    return {
        "records": {"read": records, "accepted": records - rejected, "rejected": rejected},
        "rejects": rejects, "truncated": truncated, "splits": splits, "facets": facets, "inputs": input_list,
    }


def _write_splits(stage: Path, shards: Path, n_inputs: int) -> None:
    """Concatenate the shards' samples, in input order, into each split's IndexedDataset files."""
    for split in SPLITS:
        (stage / split).mkdir()
        with IndexedWriter(stage / split / "tokens", np.int32) as tokens, \
                IndexedWriter(stage / split / "spans", np.uint8) as spans:
            for i in range(n_inputs):
                directory = shards / f"{i:05d}"
                lengths = np.load(directory / f"{split}_lengths.npy")
                tokens.add_file(directory / f"{split}_tokens.bin", lengths)
                spans.add_file(directory / f"{split}_spans.bin", lengths)


def file_records(root: Path, names: list[str]) -> dict[str, dict]:
    """{name: {"bytes", "sha256"}} of files under `root` (as manifests record them), hashed in parallel threads."""
    paths = [root / name for name in names]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(8, len(paths)))) as pool:
        digests = list(pool.map(file_sha256, paths))
    return {name: {"bytes": path.stat().st_size, "sha256": digest} for name, path, digest in zip(names, paths, digests)}


def _manifest(summary: dict, data: DataSection, files: dict) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "format": data.format,
        "seq_len": data.seq_len,
        "pack": data.pack,
        "reasoning_effort": data.reasoning_effort if data.format == "synth" else None,
        "valid_fraction": data.valid_fraction,
        "split_rule": SPLIT_RULE,
        "eod_token": tk.EOD,
        "records": summary["records"],
        "rejects": summary["rejects"],
        "truncated": summary["truncated"],
        "splits": summary["splits"],
        "facets": summary["facets"],
        "inputs": summary["inputs"],
        "files": files,
        "provenance": provenance.record(
            "dataset", config.config_hash(BuildConfig(data)),
            inputs=[{"name": e["name"], "sha256": e["sha256"]} for e in summary["inputs"]],
        ),
    }
