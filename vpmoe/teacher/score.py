"""`vpmoe teacher score CONFIG`: run a teacher causal LM over a built dataset and write its top-K sidecar.

The work is cut into shards of `score.shard_samples` consecutive samples per split. Under `torchrun`, rank r takes
every r-th unfinished shard; each shard is scored document by document (length-bucketed, right-padded batches)
and written to `<dataset>/teacher.partial/shards/<split>/NNNNNN/` through a temporary directory and a rename, so
a shard directory is always complete and an interrupted run resumes at shard granularity. After a barrier, rank
0 merges the shards in order into `<dataset>/<split>/teacher/` (staged beside it, then renamed), records the
`teacher` section of the dataset manifest (atomically, with each sidecar file's size and sha256 for
`vpmoe data verify`), and removes the partial directory. Shard contents are a function of the shard and the config
alone, so a resumed run writes the same bytes as an uninterrupted one. Rank 0 holds `teacher.partial` locked for
the whole run: a second scoring run of the same dataset is refused.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vpmoe import config, distributed, provenance
from vpmoe.artifacts.files import remove_dir, write_failed, write_json
from vpmoe.artifacts.lock import lock_dir
from vpmoe.data.build import file_records
from vpmoe.data.indexed import IndexedReader, IndexedWriter
from vpmoe.data.loader import SplitReader, read_manifest
from vpmoe.errors import UserError
from vpmoe.spans import NAMES as SPAN_NAMES
from vpmoe.teacher import load
from vpmoe.teacher.config import ScoreConfig, value_identity
from vpmoe.teacher.documents import Batch, Documents, make_batches, split_documents
from vpmoe.teacher.sidecar import (
    DIRNAME,
    FILES,
    SCHEMA_VERSION,
    provenance_sha256,
    sidecar_dir,
    supervised_counts,
)
from vpmoe.teacher.topk import score_positions

PARTIAL = "teacher.partial"
# Ranks only meet at barriers (each scores its own shards and writes its own files), possibly hours apart: the
# process group is gloo on the CPU even on GPU nodes, with a long timeout.
BARRIER_TIMEOUT = datetime.timedelta(hours=48)


@dataclass(frozen=True)
class Shard:
    split: str
    index: int
    first: int  # first sample
    count: int  # samples

    def directory(self, partial: Path) -> Path:
        return partial / "shards" / self.split / f"{self.index:06d}"

    def done(self, partial: Path) -> bool:
        return (self.directory(partial) / "stats.json").is_file()


@dataclass
class ShardResult:
    topk_ids: np.ndarray  # [M, K] int32
    topk_logprobs: np.ndarray  # [M, K] uint16 (float16 bits)
    target_logprob: np.ndarray  # [M] uint16 (float16 bits)
    entropy: np.ndarray  # [M] float32
    topk_mass: np.ndarray  # [M] float32
    target_fp32: np.ndarray  # [M] float32


def score_from_config(path: str, overrides: list[str]) -> Path:
    cfg = config.load(path, ScoreConfig, overrides, kind="teacher")
    start = time.perf_counter()
    section = score(cfg, config.config_hash(cfg))
    dataset = Path(cfg.teacher.dataset)
    if section is not None:
        seconds = time.perf_counter() - start
        parts = [f"{split} {s['supervised']} positions ({s['bytes'] / 2**20:.1f} MiB)"
                 for split, s in section["splits"].items()]
        print(f"wrote {dataset}/{{{','.join(section['splits'])}}}/{DIRNAME}: teacher {section['teacher']['name']}, "
              f"K {section['k']}, {'; '.join(parts)} in {seconds:.1f}s")
    return dataset


def score(cfg: ScoreConfig, config_hash: str) -> dict | None:
    """Score the configured splits; returns the manifest's teacher section on rank 0 (None on other ranks)."""
    ranks = distributed.init("cpu", backend="gloo", timeout=BARRIER_TIMEOUT)
    try:
        return _score(cfg, config_hash, ranks)
    finally:
        distributed.finish(ranks)


def _score(cfg: ScoreConfig, config_hash: str, ranks: distributed.Ranks) -> dict | None:
    dataset = Path(cfg.teacher.dataset)
    manifest = read_manifest(dataset)
    for split in cfg.teacher.splits:
        if split not in manifest.get("splits", {}):
            raise UserError(f"teacher.splits: {dataset} has no split {split!r} (it has {sorted(manifest['splits'])})")
        SplitReader(dataset, split)  # checks the split's files against their indexes and the manifest
    load.check_vocabulary(cfg.teacher.path)
    plan = json.loads(json.dumps({
        "schema_version": SCHEMA_VERSION,
        "config": value_identity(cfg),
        "teacher": load.identity(cfg.teacher.path),
        "dataset": {"provenance_sha256": provenance_sha256(manifest)},
    }))
    partial = dataset / PARTIAL
    with contextlib.ExitStack() as held:  # rank 0's lock on the partial directory, until the run is over
        try:
            distributed.agree(ranks, lambda: _start_or_resume(partial, plan, dataset, cfg.score.overwrite, held))
            if _read_plan(partial) != plan:
                raise UserError(f"rank {ranks.rank}: its config or teacher differs from rank 0's plan in {partial}")
            shards = _shards(dataset, cfg.teacher.splits, cfg.score.shard_samples)
            todo = [s for s in shards if not s.done(partial)]
            mine = todo[ranks.rank :: ranks.world_size]
            distributed.barrier(ranks)  # every rank has listed the unfinished shards before any is written
            if mine:
                _score_shards(cfg, ranks, dataset, partial, mine)
            distributed.barrier(ranks)
            section = _merge(cfg, config_hash, dataset, partial, shards) if ranks.is_main else None
            distributed.barrier(ranks)
        except OSError as e:
            raise write_failed(e, "the teacher scoring run", partial) from None
    return section


def _read_plan(partial: Path):
    plan_file = partial / "plan.json"
    try:
        return json.loads(plan_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"cannot resume the scoring run in {partial}: {plan_file} is damaged. Remove {partial} to "
                        f"start over") from None


def _start_or_resume(partial: Path, plan: dict, dataset: Path, overwrite: bool, held: contextlib.ExitStack) -> None:
    held.enter_context(lock_dir(partial, "the teacher scoring run"))
    plan_file = partial / "plan.json"
    if plan_file.is_file():
        previous = _read_plan(partial)
        if not isinstance(previous, dict):
            raise UserError(f"cannot resume the scoring run in {partial}: {plan_file} is damaged. Remove {partial} "
                            f"to start over")
        if previous != plan:
            changed = [key for key in plan if previous.get(key) != plan[key]]
            raise UserError(
                f"cannot resume the scoring run in {partial}: the {', '.join(changed)} changed since it started. "
                f"Remove {partial} to start over"
            )
        print(f"resuming the teacher scoring run in {partial}")
        return
    if any(not p.name.startswith(".") for p in partial.iterdir()):
        raise UserError(f"{partial} exists but is not a teacher scoring run in progress: remove it")
    manifest = read_manifest(dataset)  # again, under the lock: another run may have finished meanwhile
    existing = [split for split in manifest.get("splits", {}) if sidecar_dir(dataset, split).exists()]
    if (manifest.get("teacher") or existing) and not overwrite:
        name = (manifest.get("teacher") or {}).get("teacher", {}).get("name", "unknown")
        raise UserError(
            f"{dataset} already has a teacher sidecar (teacher {name}); set score.overwrite = true "
            f"(--set score.overwrite=true) to replace it"
        )
    write_json(plan_file, plan)
    (partial / "shards").mkdir(exist_ok=True)


def _shards(dataset: Path, splits: list[str], shard_samples: int) -> list[Shard]:
    shards = []
    for split in splits:
        n = len(IndexedReader(dataset / split / "tokens").lengths)
        for index, first in enumerate(range(0, n, shard_samples)):
            shards.append(Shard(split, index, first, min(shard_samples, n - first)))
    return shards


def shard_documents(reader: SplitReader, shard: Shard) -> Documents:
    lengths = reader.tokens.lengths[shard.first : shard.first + shard.count].astype(np.int64)
    start = int(reader.tokens.pointers[shard.first]) // reader.tokens.dtype.itemsize if shard.count else 0
    span_start = int(reader.spans.pointers[shard.first]) // reader.spans.dtype.itemsize if shard.count else 0
    total = int(lengths.sum())
    tokens = np.asarray(reader.tokens.data[start : start + total])
    spans = np.asarray(reader.spans.data[span_start : span_start + total])
    return split_documents(tokens, spans, lengths, first_sample=shard.first)


def _score_shards(cfg: ScoreConfig, ranks: distributed.Ranks, dataset: Path, partial: Path, mine: list[Shard]) -> None:
    teacher = load.load_teacher(cfg.teacher, cfg.score, ranks.local_rank)
    readers = {split: SplitReader(dataset, split) for split in {s.split for s in mine}}
    total = sum(int(readers[s.split].tokens.lengths[s.first : s.first + s.count].sum()) for s in mine)
    where = f" rank {ranks.rank}/{ranks.world_size}" if ranks.world_size > 1 else ""
    print(f"scoring {len(mine)} shard(s){where} with teacher {Path(cfg.teacher.path).name} on {teacher.placement}")
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=f"teacher score{where}",
               disable=True if (not cfg.score.progress or not ranks.is_main) else None)
    for shard in mine:
        docs = shard_documents(readers[shard.split], shard)
        fed = []
        result = run_documents(teacher, docs, cfg.teacher.k, cfg.score.batch_tokens, cfg.score.head_chunk,
                               on_tokens=lambda n: (fed.append(n), bar.update(n)))
        write_shard(partial, shard, docs, result)
        bar.update(int(docs.sample_lengths.sum()) - sum(fed))  # tokens not fed (unsupervised tails, EODs)
    bar.close()


@dataclass
class _Launched:
    batch: Batch
    host: list[torch.Tensor]
    event: torch.cuda.Event | None


def run_documents(teacher: load.Teacher, docs: Documents, k: int, batch_tokens: int, head_chunk: int,
                  on_tokens=lambda n: None) -> ShardResult:
    """Score every supervised position of `docs`; results in the documents' supervised (sidecar) order."""
    m = len(docs.supervised)
    out = ShardResult(
        topk_ids=np.empty((m, k), np.int32), topk_logprobs=np.empty((m, k), np.uint16),
        target_logprob=np.empty(m, np.uint16), entropy=np.empty(m, np.float32), topk_mass=np.empty(m, np.float32),
        target_fp32=np.empty(m, np.float32),
    )
    written = np.zeros(m, dtype=bool)
    pending: _Launched | None = None
    for batch in make_batches(docs, batch_tokens):
        launched = _launch(teacher, batch, k, head_chunk)  # queued on the GPU before the previous batch is collected
        if pending is not None:
            _collect(pending, out, written)
            on_tokens(pending.batch.tokens)
        pending = launched
    if pending is not None:
        _collect(pending, out, written)
        on_tokens(pending.batch.tokens)
    if not written.all():
        raise RuntimeError(f"internal error: {int((~written).sum())} supervised positions were not scored")
    return out


@torch.inference_mode()
def _launch(teacher: load.Teacher, batch: Batch, k: int, head_chunk: int) -> _Launched:
    cuda = teacher.input_device.type == "cuda"
    ids = torch.from_numpy(batch.input_ids)
    ids = ids.pin_memory().to(teacher.input_device, non_blocking=True) if cuda else ids.to(teacher.input_device)
    hidden = teacher.body(input_ids=ids, use_cache=False).last_hidden_state
    rows = torch.from_numpy(batch.rows).to(hidden.device, non_blocking=cuda)
    head_device = teacher.head_weight.device
    selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows).to(head_device)
    targets = torch.from_numpy(batch.targets).to(head_device, non_blocking=cuda)
    s = score_positions(selected, targets, teacher.head_weight, teacher.head_bias, k, head_chunk)
    results = [
        s.topk_ids, s.topk_logprobs.to(torch.float16).view(torch.int16),
        s.target_logprob.to(torch.float16).view(torch.int16), s.entropy, s.topk_mass, s.target_logprob,
    ]
    if head_device.type != "cuda":
        return _Launched(batch, [r.cpu() for r in results], None)
    host = [torch.empty(r.shape, dtype=r.dtype, pin_memory=True) for r in results]
    for h, r in zip(host, results):
        h.copy_(r, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return _Launched(batch, host, event)


def _collect(launched: _Launched, out: ShardResult, written: np.ndarray) -> None:
    if launched.event is not None:
        launched.event.synchronize()
    dest = launched.batch.dest
    ids, logprobs, target, entropy, mass, target_fp32 = (h.numpy() for h in launched.host)
    out.topk_ids[dest] = ids
    out.topk_logprobs[dest] = logprobs.view(np.uint16)
    out.target_logprob[dest] = target.view(np.uint16)
    out.entropy[dest] = entropy
    out.topk_mass[dest] = mass
    out.target_fp32[dest] = target_fp32
    written[dest] = True


def _span_sums(docs: Documents, result: ShardResult) -> dict:
    spans = docs.supervised_spans.astype(np.int64)
    sums = {}
    for span in sorted(set(spans.tolist())):
        mask = spans == span
        sums[SPAN_NAMES.get(span, str(span))] = {
            "positions": int(mask.sum()),
            "sum_entropy": float(result.entropy[mask].sum(dtype=np.float64)),
            "sum_topk_mass": float(result.topk_mass[mask].sum(dtype=np.float64)),
            "sum_target_logprob": float(result.target_fp32[mask].sum(dtype=np.float64)),
        }
    return sums


def write_shard(partial: Path, shard: Shard, docs: Documents, result: ShardResult) -> None:
    """Write one finished shard: files into a temporary directory, `stats.json` last, then one rename."""
    final = shard.directory(partial)
    tmp = final.with_name(f"{final.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    np.save(tmp / "topk_ids.npy", result.topk_ids)
    np.save(tmp / "topk_logprobs.npy", result.topk_logprobs)
    np.save(tmp / "target_logprob.npy", result.target_logprob)
    np.save(tmp / "counts.npy", docs.counts)
    stats = {
        "samples": shard.count, "documents": len(docs.doc_start), "supervised": len(docs.supervised),
        "tokens_fed": int(docs.doc_length.sum()), "spans": _span_sums(docs, result),
    }
    (tmp / "stats.json").write_text(json.dumps(stats))
    if final.exists():  # another rank wrote the same shard (the same bytes) first
        shutil.rmtree(tmp)
        return
    os.rename(tmp, final)


def _merge(cfg: ScoreConfig, config_hash: str, dataset: Path, partial: Path, shards: list[Shard]) -> dict:
    missing = [f"{s.split}/{s.index}" for s in shards if not s.done(partial)]
    if missing:
        raise UserError(f"shards {missing[:5]} are not finished (a rank failed?); run the same command to resume")
    k = cfg.teacher.k
    manifest = read_manifest(dataset)
    staged: dict[str, Path] = {}
    splits: dict[str, dict] = {}
    for split in cfg.teacher.splits:
        stage = dataset / split / f".{DIRNAME}.partial"
        if stage.exists():
            shutil.rmtree(stage)
        stage.mkdir()
        counts, stats = [], []
        writers = {name: IndexedWriter(stage / name, dtype) for name, dtype in FILES.items()}
        for shard in (s for s in shards if s.split == split):
            directory = shard.directory(partial)
            n = np.load(directory / "counts.npy")
            counts.append(n)
            stats.append(json.loads((directory / "stats.json").read_text()))
            for name in FILES:
                values = np.load(directory / f"{name}.npy", mmap_mode="r").reshape(-1)
                writers[name].add_many(values, n if name == "target_logprob" else n * k)
        for writer in writers.values():
            writer.close()
        reader = SplitReader(dataset, split)
        counts_all = np.concatenate(counts) if counts else np.zeros(0, np.int64)
        expected = supervised_counts(reader.spans)
        if not np.array_equal(counts_all, expected):
            raise RuntimeError(f"internal error: the {split} shards' supervised counts do not match the dataset")
        splits[split] = _split_section(dataset, split, stage, stats, int(expected.sum()), reader, k)
        staged[split] = stage

    teacher_path = Path(cfg.teacher.path)
    identity = load.identity(teacher_path)
    teacher = {
        "name": identity["name"], "model_type": identity["model_type"], "architectures": identity["architectures"],
        "dtype": cfg.teacher.dtype, "files": load.hash_files(teacher_path),
        "vocabulary": load.check_vocabulary(teacher_path),
    }
    section = {
        "schema_version": SCHEMA_VERSION,
        "k": k,
        "temperature": 1.0,
        "layout": ("one sequence per dataset sample; entries are the sample's supervised positions (spans[j] > 0) "
                   "in token order; the entry for token j is the teacher's output at position j - 1"),
        "files": {"topk_ids": "int32, K per position", "topk_logprobs": "float16 as uint16 bits, K per position",
                  "target_logprob": "float16 as uint16 bits, 1 per position"},
        "teacher": teacher,
        "reasoning_effort": manifest.get("reasoning_effort"),
        "dataset": {"provenance_sha256": provenance_sha256(manifest)},
        "splits": splits,
        "provenance": provenance.record(
            "teacher_sidecar", config_hash, parents=[manifest.get("provenance", {})], teacher=teacher["name"],
            teacher_files=teacher["files"], dataset=provenance.portable_name(dataset),
        ),
    }
    # Swap in the new sidecars: first drop the manifest's old section (a crash then leaves "not scored", never a
    # manifest describing other files), then replace the directories, then record the new section.
    if "teacher" in manifest:
        manifest.pop("teacher")
        write_json(dataset / "manifest.json", manifest)
    for split in manifest.get("splits", {}):
        if sidecar_dir(dataset, split).exists():
            remove_dir(sidecar_dir(dataset, split))
    for split, stage in staged.items():
        stage.rename(sidecar_dir(dataset, split))
    manifest["teacher"] = section
    write_json(dataset / "manifest.json", manifest)
    remove_dir(partial)
    return section


def _split_section(dataset: Path, split: str, stage: Path, stats: list[dict], dataset_supervised: int,
                   reader: SplitReader, k: int) -> dict:
    supervised = sum(s["supervised"] for s in stats)
    spans: dict[str, dict] = {}
    for s in stats:
        for name, entry in s["spans"].items():
            total = spans.setdefault(name, {"positions": 0, "sum_entropy": 0.0, "sum_topk_mass": 0.0,
                                            "sum_target_logprob": 0.0})
            for key, value in entry.items():
                total[key] += value
    span_means = {
        name: {
            "positions": t["positions"],
            "mean_entropy": t["sum_entropy"] / t["positions"],
            "mean_topk_mass": t["sum_topk_mass"] / t["positions"],
            "mean_target_logprob": t["sum_target_logprob"] / t["positions"],
        }
        for name, t in sorted(spans.items()) if t["positions"]
    }
    sidecar_files = sorted(p for p in stage.iterdir() if p.suffix in (".bin", ".idx"))
    size = sum(p.stat().st_size for p in sidecar_files)
    tokens = reader.tokens.total
    return {
        "samples": sum(s["samples"] for s in stats),
        "documents": sum(s["documents"] for s in stats),
        "supervised": supervised,
        "dataset_supervised": dataset_supervised,
        "coverage": supervised / dataset_supervised if dataset_supervised else 1.0,
        "supervised_share_of_tokens": supervised / tokens if tokens else 0.0,
        "tokens_fed": sum(s["tokens_fed"] for s in stats),
        "bytes": size,
        "bytes_per_position": size / supervised if supervised else 0.0,
        "mean_topk_mass": (sum(t["sum_topk_mass"] for t in spans.values()) / supervised) if supervised else None,
        "mean_entropy": (sum(t["sum_entropy"] for t in spans.values()) / supervised) if supervised else None,
        "spans": span_means,
        "files": file_records(stage, [p.name for p in sidecar_files]),
        "dataset_files": {name: record["sha256"]
                          for name, record in file_records(dataset / split, ["tokens.bin", "spans.bin"]).items()},
    }
