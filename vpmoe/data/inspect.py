"""`vpmoe data inspect DIR`: what a built dataset holds, and one sample with its spans marked."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from vpmoe import tokenizer as tk
from vpmoe.data.loader import SplitReader, read_manifest
from vpmoe.errors import UserError
from vpmoe.spans import NAMES as SPAN_NAMES

COLORS = {1: "\033[33m", 2: "\033[32m"}  # reasoning yellow, final green
RESET = "\033[0m"
BAR = 40


def inspect(directory: str, split: str = "train", sample: int = 0, out=None) -> None:
    out = out or sys.stdout
    manifest = read_manifest(directory)
    say = lambda line="": print(line, file=out)  # noqa: E731
    say(f"dataset {Path(directory)}  (format {manifest['format']}, seq_len {manifest['seq_len']}, "
        f"pack {manifest['pack']}, reasoning effort {manifest['reasoning_effort']})")
    records = manifest["records"]
    say(f"records: {records['read']} read, {records['accepted']} accepted, {records['rejected']} rejected")
    for reason, entry in sorted(manifest["rejects"].items()):
        say(f"  reject {reason}: {entry['count']} (e.g. {', '.join(entry['examples'])})")
    for kind, n in sorted(manifest["truncated"].items()):
        say(f"  truncated ({kind}): {n}")
    for name, s in manifest["splits"].items():
        total = max(s["tokens"], 1)
        shares = ", ".join(f"{span} {100 * n / total:.1f}%" for span, n in s["span_tokens"].items())
        say(f"{name}: {s['samples']} samples, {s['documents']} documents, {s['tokens']} tokens ({shares})")
    if manifest.get("teacher"):
        _teacher(manifest["teacher"], manifest["splits"], say)

    reader = SplitReader(directory, split)
    if len(reader) == 0:
        say(f"split {split!r} is empty")
        return
    say(f"\nsample lengths ({split}):")
    _histogram(np.asarray(reader.tokens.lengths), manifest["seq_len"], say)
    if not 0 <= sample < len(reader):
        raise UserError(f"--sample {sample} is out of range: split {split!r} has {len(reader)} samples")
    tokens, spans = reader.sample(sample)
    color = getattr(out, "isatty", lambda: False)()
    legend = "yellow = reasoning, green = final" if color else "[reasoning ...] and [final ...] mark the spans"
    say(f"\nsample {sample} of {split} ({len(tokens)} tokens; {legend}):")
    say(render_spans(tokens, spans, color))


def _teacher(section: dict, splits: dict, say) -> None:
    """The teacher sidecar: coverage, bytes, mean top-K mass and mean entropy per span."""
    teacher = section["teacher"]
    say(f"teacher sidecar: {teacher['name']} ({teacher['dtype']}), K {section['k']}, reasoning effort in the "
        f"prompts {section['reasoning_effort']}")
    for name in splits:
        s = section["splits"].get(name)
        if s is None:
            say(f"  {name}: not scored")
            continue
        say(f"  {name}: coverage {100 * s['coverage']:.1f}% of {s['dataset_supervised']} supervised positions, "
            f"{s['bytes'] / 2**20:.1f} MiB ({s['bytes_per_position']:.0f} B per position)")
        for span, e in s["spans"].items():
            say(f"    {span:<9} {e['positions']:>9} positions: mean top-K mass {e['mean_topk_mass']:.3f}, "
                f"mean entropy {e['mean_entropy']:.3f} nats, mean target log-prob {e['mean_target_logprob']:.3f}")


def _histogram(lengths: np.ndarray, seq_len: int, say) -> None:
    edges = np.linspace(0, seq_len, 9).astype(int)
    counts, _ = np.histogram(lengths, bins=edges)
    peak = max(counts.max(), 1)
    for lo, hi, n in zip(edges[:-1], edges[1:], counts):
        say(f"  {lo:>6}-{hi:<6} {'#' * int(BAR * n / peak):<{BAR}} {n}")
    say(f"  mean {lengths.mean():.1f}, max {lengths.max()}")


def render_spans(tokens: np.ndarray, spans: np.ndarray, color: bool) -> str:
    """Decode a sample, marking each run of supervised tokens with its span."""
    pieces = []
    bounds = np.flatnonzero(np.diff(spans.astype(np.int16))) + 1
    for run in np.split(np.arange(len(tokens)), bounds):
        if not len(run):
            continue
        text = tk.decode(tokens[run].tolist())
        span = int(spans[run[0]])
        if span == 0:
            pieces.append(text)
        elif color:
            pieces.append(f"{COLORS[span]}{text}{RESET}")
        else:
            pieces.append(f"[{SPAN_NAMES[span]} {text}]")
    return "".join(pieces)
