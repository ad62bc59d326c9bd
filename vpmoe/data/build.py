"""`vpmoe data build`: source records -> dataset directory (Megatron IndexedDataset files + manifest).

Each input file is one shard, rendered by a worker process into `<out>.partial/shards/NNNNN/`; a shard is done
when its `stats.json` exists, so an interrupted build resumes where it stopped. The merge concatenates the
shards in input order, writes `manifest.json`, and renames `<out>.partial` to `<out>`: a directory at `out` is
always complete.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import multiprocessing as mp
import queue
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from vpmoe import config, provenance
from vpmoe import tokenizer as tk
from vpmoe.data.harmony import SPAN_NAMES, SPLIT_RULE, HarmonyRenderer, Reject, split_of, system_tokens
from vpmoe.data.indexed import IndexedWriter
from vpmoe.data.records import ID_FIELD, read_records
from vpmoe.errors import UserError

SCHEMA_VERSION = 1
SPLITS = ("train", "valid")
REJECT_EXAMPLES = 5


@dataclass
class DataSection:
    inputs: list[str]
    format: Literal["synth", "text"]
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


@dataclass
class BuildConfig:
    data: DataSection


def build_from_config(path: str, overrides: list[str]) -> Path:
    cfg = config.load(path, BuildConfig, overrides)
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
        matches = [m for m in matches if Path(m).is_file()]
        if not matches:
            raise UserError(f"data.inputs: {pattern!r} matches no file")
        paths.extend(Path(m) for m in matches if Path(m) not in paths)
    return paths


def build(data: DataSection) -> Path:
    out = Path(data.out)
    if out.exists():
        raise UserError(f"dataset directory {out} already exists: remove it or set data.out to a new directory")
    inputs = expand_inputs(data.inputs)
    partial = out.with_name(out.name + ".partial")
    identity = {k: v for k, v in dataclasses.asdict(data).items() if k not in ("workers", "out", "inputs")}
    plan = {
        "config": identity,
        "inputs": [{"name": provenance.portable_name(p), "sha256": provenance.file_sha256(p)} for p in inputs],
    }
    _start_or_resume(partial, plan)

    shards = partial / "shards"
    todo = [i for i in range(len(inputs)) if not (shards / f"{i:05d}" / "stats.json").exists()]
    system = system_tokens(data.reasoning_effort)
    jobs = [(i, str(inputs[i]), data, system) for i in todo]
    total_bytes = sum(inputs[i].stat().st_size for i in todo)
    _run_shards(jobs, shards, data.workers, total_bytes)

    manifest = _merge(partial, shards, inputs, plan, data)
    provenance.atomic_write_text(partial / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(shards)
    (partial / "plan.json").unlink()
    partial.rename(out)
    return out


def _start_or_resume(partial: Path, plan: dict) -> None:
    plan_file = partial / "plan.json"
    if partial.exists():
        if not plan_file.exists():
            raise UserError(f"{partial} exists but is not a build in progress: remove it")
        previous = json.loads(plan_file.read_text())
        if previous != plan:
            changed = [p["name"] for p in plan["inputs"] if p not in previous["inputs"]]
            what = f"input files changed: {changed}" if changed else "the config or the input list changed"
            raise UserError(
                f"cannot resume the build in {partial}: {what}. Remove {partial} to start over"
            )
        print(f"resuming the build in {partial}")
        return
    (partial / "shards").mkdir(parents=True)
    provenance.atomic_write_text(plan_file, json.dumps(plan, indent=2) + "\n")


def _run_shards(jobs: list, shards: Path, workers: int, total_bytes: int) -> None:
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="build", disable=None)
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            render_shard(*job, shards, bar.update)
        bar.close()
        return
    ctx = mp.get_context("spawn")
    progress = ctx.Queue()
    with ctx.Pool(min(workers, len(jobs)), initializer=_init_worker, initargs=(progress,)) as pool:
        pending = [pool.apply_async(_render_in_worker, (job, shards)) for job in jobs]
        while pending:
            _drain(progress, bar)
            for result in [r for r in pending if r.ready()]:
                result.get()  # re-raises a worker's error (a UserError keeps its message)
                pending.remove(result)
        _drain(progress, bar)
    bar.close()


_PROGRESS = None


def _init_worker(progress) -> None:
    global _PROGRESS
    _PROGRESS = progress


def _render_in_worker(job: tuple, shards: Path) -> None:
    render_shard(*job, shards, _PROGRESS.put)


def _drain(progress, bar) -> None:
    try:
        bar.update(progress.get(timeout=0.2))
        while True:
            bar.update(progress.get_nowait())
    except queue.Empty:
        pass


def render_shard(index: int, path: str, data: DataSection, system: list[int], shards: Path, progress) -> None:
    """Render one input file into `shards/NNNNN/`: per split, packed or unpacked samples ready to append."""
    renderer = HarmonyRenderer(data.reasoning_effort, system)
    docs = {split: ([], []) for split in SPLITS}  # split -> (token arrays, span arrays)
    seen: dict[str, int] = {}
    rejects: dict[str, dict] = {}
    truncated: dict[str, int] = {}
    facets: dict[str, dict[str, int]] = {"language": {}, "exercise": {}}
    id_field = ID_FIELD[data.format]
    pending_bytes = 0
    for line, record, consumed in read_records(Path(path), data.format):
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
        np.save(directory / f"{split}_tokens.npy", flat_tokens)
        np.save(directory / f"{split}_spans.npy", flat_spans)
        np.save(directory / f"{split}_lengths.npy", lengths)
        split_stats[split] = {
            "samples": len(lengths),
            "documents": len(tokens),
            "tokens": int(len(flat_tokens)),
            "span_tokens": np.bincount(flat_spans, minlength=3).tolist(),
        }
    (directory / "ids.json").write_text(json.dumps(seen))
    stats = {
        "records": len(seen), "rejects": rejects, "truncated": truncated, "splits": split_stats,
        "facets": facets if data.format == "synth" else {},
    }
    provenance.atomic_write_text(directory / "stats.json", json.dumps(stats))


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


def _merge(partial: Path, shards: Path, inputs: list[Path], plan: dict, data: DataSection) -> dict:
    first_seen: dict[str, str] = {}
    rejects: dict[str, dict] = {}
    truncated: dict[str, int] = {}
    facets: dict[str, dict[str, int]] = {}
    splits = {s: {"samples": 0, "documents": 0, "tokens": 0, "span_tokens": [0, 0, 0]} for s in SPLITS}
    records = 0
    input_records = []
    shard_dirs = [shards / f"{i:05d}" for i in range(len(inputs))]
    for path, directory in zip(inputs, shard_dirs):
        for record_id, line in json.loads((directory / "ids.json").read_text()).items():
            if record_id in first_seen:
                raise UserError(f"{path}:{line}: duplicate record id {record_id!r} (also at {first_seen[record_id]})")
            first_seen[record_id] = f"{path}:{line}"
        stats = json.loads((directory / "stats.json").read_text())
        records += stats["records"]
        input_records.append(stats["records"])
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
        (partial / split).mkdir(exist_ok=True)
        with IndexedWriter(partial / split / "tokens", np.int32) as tokens, \
                IndexedWriter(partial / split / "spans", np.uint8) as spans:
            for directory in shard_dirs:
                lengths = np.load(directory / f"{split}_lengths.npy")
                tokens.add_many(np.load(directory / f"{split}_tokens.npy"), lengths)
                spans.add_many(np.load(directory / f"{split}_spans.npy"), lengths)
        span_tokens = splits[split].pop("span_tokens")
        splits[split]["span_tokens"] = {SPAN_NAMES[i]: n for i, n in enumerate(span_tokens)}

    rejected = sum(r["count"] for r in rejects.values())
    input_list = [dict(entry, records=n) for entry, n in zip(plan["inputs"], input_records)]
    return {
        "schema_version": SCHEMA_VERSION,
        "format": data.format,
        "seq_len": data.seq_len,
        "pack": data.pack,
        "reasoning_effort": data.reasoning_effort if data.format == "synth" else None,
        "valid_fraction": data.valid_fraction,
        "split_rule": SPLIT_RULE,
        "eod_token": tk.EOD,
        "records": {"read": records, "accepted": records - rejected, "rejected": rejected},
        "rejects": rejects,
        "truncated": truncated,
        "splits": splits,
        "facets": facets,
        "inputs": input_list,
        "provenance": provenance.record("dataset", config.config_hash(BuildConfig(data)), inputs=plan["inputs"]),
    }
