"""A small deterministic SYNTH-schema corpus: arithmetic word problems with worked reasoning.

Used by the demo, the tests and the build benchmark. Same seed, same records, byte for byte.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ("Ava", "Ben", "Chloe", "Dev", "Elif", "Farah", "Goro", "Hana", "Ivan", "Jun", "Kofi", "Lena")
ITEMS = ("apples", "books", "coins", "marbles", "pencils", "stamps", "shells", "cards", "beads", "cookies")
LANGUAGES = ("en", "en", "en", "fr", "de")


def _problem(rng: random.Random) -> tuple[str, str, str, str]:
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    kind = rng.choice(("add", "sub", "mul", "two_step"))
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    if kind == "add":
        query = f"{name} has {a} {item}. {other} gives {name} {b} more. How many {item} does {name} have now?"
        steps = [f"{name} starts with {a} {item}.", f"{name} receives {b} more.", f"{a} + {b} = {a + b}."]
        answer = a + b
    elif kind == "sub":
        a = a + b
        query = f"{name} has {a} {item} and gives {b} of them to {other}. How many {item} are left?"
        steps = [f"{name} starts with {a} {item}.", f"{b} are given away.", f"{a} - {b} = {a - b}."]
        answer = a - b
    elif kind == "mul":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        query = f"{name} buys {a} bags with {b} {item} in each bag. How many {item} does {name} buy?"
        steps = [f"There are {a} bags.", f"Each bag holds {b} {item}.", f"{a} * {b} = {a * b}."]
        answer = a * b
    else:
        c = rng.randint(2, 9)
        query = (
            f"{name} has {a} {item}, finds {b} more, then shares them equally with {other} and {c - 1} "
            f"other friends, keeping none. How many {item} does each friend get if any remainder is kept aside?"
        )
        total = a + b
        steps = [f"First {a} + {b} = {total}.", f"There are {c} friends.", f"{total} // {c} = {total // c}."]
        answer = total // c
    reasoning = " ".join(["We need to compute the result step by step."] + steps + ["So the answer is clear."])
    final = f"The answer is {answer}."
    return kind, query, reasoning, final


def records(n: int, seed: int = 0, prefix: str = "synth") -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind, query, reasoning, final = _problem(rng)
        out.append({
            "synth_id": f"{prefix}-{seed}-{i:08d}",
            "language": rng.choice(LANGUAGES),
            "exercise": f"arithmetic_{kind}",
            "query": query,
            "synthetic_reasoning": reasoning,
            "synthetic_answer": final,
            "model": "vpmoe-synthetic",
        })
    return out


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write_corpus(directory: str | Path, n: int, shards: int = 1, seed: int = 0) -> list[Path]:
    """Write `n` records split over `shards` JSONL files; returns their paths."""
    rows = records(n, seed)
    size = -(-n // shards)
    return [
        write_jsonl(Path(directory) / f"synth_{k:03d}.jsonl", rows[k * size : (k + 1) * size]) for k in range(shards)
    ]
