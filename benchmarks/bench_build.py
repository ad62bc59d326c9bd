"""Dataset build throughput next to openai-harmony's bare render, measured in one run.

Writes a synthetic SYNTH-schema corpus (default 50M tokens, several problems joined per record so records
are a few hundred tokens long), then prints:
  - openai-harmony's `render_conversation_for_training` on prebuilt conversations (one core),
  - `vpmoe data build` end to end (read JSONL, validate, render, split, pack, write) with 1 and 2 workers,
as tokens/s per core. Usage: python benchmarks/bench_build.py [--tokens 50e6] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from vpmoe import tokenizer as tk
from vpmoe.data import synthetic
from vpmoe.data.build import DataSection, build
from vpmoe.data.harmony import harmony_conversation

JOIN = 5  # problems per record


def corpus(directory: Path, target_tokens: float, shards: int) -> tuple[list[Path], list[dict]]:
    probe = synthetic.records(200 * JOIN, seed=1)
    per_record = sum(len(tk.encode(r["query"] + r["synthetic_reasoning"] + r["synthetic_answer"])) for r in probe)
    per_record = per_record / 200 + 60  # + system and headers
    n = int(target_tokens / per_record) + 1
    base = synthetic.records(n * JOIN, seed=0)
    rows = []
    for i in range(n):
        group = base[i * JOIN : (i + 1) * JOIN]
        rows.append({
            "synth_id": f"bench-{i:09d}", "language": group[0]["language"], "exercise": group[0]["exercise"],
            "query": " ".join(g["query"] for g in group),
            "synthetic_reasoning": "\n\n".join(g["synthetic_reasoning"] for g in group),
            "synthetic_answer": " ".join(g["synthetic_answer"] for g in group),
        })
    size = -(-n // shards)
    paths = [synthetic.write_jsonl(directory / f"part_{k:03d}.jsonl", rows[k * size : (k + 1) * size])
             for k in range(shards)]
    return paths, rows


def bare_render(rows: list[dict], seconds: float = 20.0) -> float:
    # Imported here: the build's spawned workers import this script again and should start as light as the CLI's.
    from openai_harmony import RenderConversationConfig

    harmony = tk.harmony()
    config = RenderConversationConfig(auto_drop_analysis=False)
    conversations = [harmony_conversation(r["query"], r["synthetic_reasoning"], r["synthetic_answer"], "medium")
                     for r in rows[:20000]]
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for conversation in conversations[:2000]:
            tokens += len(harmony.render_conversation_for_training(conversation, config))
        conversations = conversations[2000:] + conversations[:2000]
    return tokens / (time.perf_counter() - start)


def timed_build(inputs: list[Path], out: Path, workers: int) -> tuple[float, int]:
    start = time.perf_counter()
    build(DataSection(inputs=[str(p) for p in inputs], format="synth", out=str(out), seq_len=2048, pack=True,
                      valid_fraction=0.01, workers=workers))
    seconds = time.perf_counter() - start
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = sum(s["tokens"] for s in manifest["splits"].values())
    shutil.rmtree(out)
    return seconds, tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=float, default=50e6)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="vpmoe-bench-"))
    start = time.perf_counter()
    inputs, rows = corpus(root / "src", args.tokens, args.shards)
    print(f"corpus: {len(rows)} records, {sum(p.stat().st_size for p in inputs) / 2**20:.0f} MiB in "
          f"{len(inputs)} files ({time.perf_counter() - start:.0f}s to generate)")
    bare = bare_render(rows)
    print(f"openai-harmony render_conversation_for_training: {bare / 1e6:.3f} M tokens/s (1 core)")
    results = {}
    for workers in (1, 2):
        seconds, tokens = timed_build(inputs, root / f"ds{workers}", workers)
        results[workers] = tokens / seconds
        print(f"vpmoe data build, {workers} worker(s): {tokens / 1e6:.1f} M tokens in {seconds:.1f}s = "
              f"{results[workers] / 1e6:.3f} M tokens/s total, {results[workers] / workers / 1e6:.3f} M tokens/s "
              f"per core ({100 * results[workers] / workers / bare:.0f}% of the bare render)")
    print(f"2 workers / 1 worker: {results[2] / results[1]:.2f}x")
    if not args.dir:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
