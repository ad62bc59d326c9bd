"""The prompt micro-suite: pinned prompts, greedy Harmony generation, scoring on the final channel.

The suite is a JSONL file, one item per line:
    {"id": "arith-01", "category": "arithmetic", "prompt": "...", "reference": "42",
     "score": {"type": "regex", "pattern": "(?:the answer is:?\\s*)?42\\.?", "flags": "i"}}
Scorers (applied to the text of the last `final`-channel message, stripped):
    exact  `answers`: equal to one of them after `normalize` (case-insensitive unless "case_sensitive": true)
    regex  `pattern`: `re.fullmatch` on the stripped text; `flags` is any of "i", "s", "m"
    json   `expect`: the text (optionally in a ```json fence) parses as JSON equal to `expect`; strings compare
           after `normalize` (case-insensitive)
`reference` is a known right answer; loading checks that it scores right, so a broken scorer cannot ship.
The shipped suite (`suite.jsonl`) is pinned by its sha256: editing it is a new suite version (update
SUITE_SHA256 and SUITE_VERSION together, which makes old and new reports visibly incomparable).

Generation: the prompt is rendered by openai-harmony as system (with the reasoning effort) + user message +
`<|start|>assistant`; the model decodes greedily until `<|return|>` / `<|call|>` or `max_new_tokens`; the
completion is parsed with openai-harmony (strict). A completion is `parsed` when the parse succeeds and yields
at least one message; `stopped` when its last token is `<|return|>`; `valid` when both hold and a final-channel
message exists. The final text of a parsed completion is scored even when decoding ran out of tokens.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch

from vpmoe import tokenizer as tk
from vpmoe.errors import UserError
from vpmoe.model import generate

SUITE_FILE = Path(__file__).with_name("suite.jsonl")
SUITE_VERSION = "core-v1"
SUITE_SHA256 = "525340af231dbb77e8fef21fb89a96d66ab9ae2713e6c3ab6b9a290daf0d2f96"
SCORERS = ("exact", "regex", "json")
REGEX_FLAGS = {"i": re.IGNORECASE, "s": re.DOTALL, "m": re.MULTILINE}
STOP_IDS = (tk.RETURN, tk.CALL)  # openai-harmony's stop tokens for assistant actions


@dataclass(frozen=True)
class SuiteItem:
    id: str
    category: str
    prompt: str
    score: dict
    reference: str


@dataclass(frozen=True)
class Suite:
    items: tuple[SuiteItem, ...]
    sha256: str
    version: str  # SUITE_VERSION for the shipped suite, else "custom"
    source: str  # "builtin" or the file name

    @property
    def categories(self) -> list[str]:
        return sorted({item.category for item in self.items})


def load_suite(path: str | Path | None = None) -> Suite:
    """The shipped suite (hash-checked) when `path` is None or "", else a custom suite file."""
    builtin = not path
    file = SUITE_FILE if builtin else Path(path)
    if not file.is_file():
        raise UserError(f"suite file {file} {'is not a file' if file.exists() else 'does not exist'}")
    data = file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if builtin and digest != SUITE_SHA256:
        raise UserError(f"the shipped suite {file} has sha256 {digest}, pinned {SUITE_SHA256}: it was edited; "
                        "a changed suite is a new version (update SUITE_SHA256 and SUITE_VERSION together)")
    items, seen = [], set()
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{file}:{number}"
        try:
            raw = json.loads(line)
            item = SuiteItem(**{k: raw[k] for k in ("id", "category", "prompt", "score", "reference")})
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{where}: not a suite item ({type(e).__name__}: {e})") from None
        if item.id in seen:
            raise UserError(f"{where}: duplicate item id {item.id!r}")
        seen.add(item.id)
        _check_scorer(item, where)
        if not score_answer(item, item.reference):
            raise UserError(f"{where}: the reference answer {item.reference!r} does not pass its own scorer")
        items.append(item)
    if not items:
        raise UserError(f"{file} has no suite items")
    return Suite(tuple(items), digest, SUITE_VERSION if builtin else "custom", "builtin" if builtin else file.name)


def subset(suite: Suite, n: int) -> Suite:
    """The first `n` items taken round-robin over the categories (sorted), file order within a category, so a
    small budget still covers every category; n = 0 or n >= len(suite) keeps the whole suite."""
    if n <= 0 or n >= len(suite.items):
        return suite
    queues = {c: [i for i in suite.items if i.category == c] for c in suite.categories}
    chosen: list[SuiteItem] = []
    while len(chosen) < n:
        for category in suite.categories:
            if queues[category] and len(chosen) < n:
                chosen.append(queues[category].pop(0))
    keep = {item.id for item in chosen}
    return Suite(tuple(i for i in suite.items if i.id in keep), suite.sha256, suite.version, suite.source)


def _check_scorer(item: SuiteItem, where: str) -> None:
    kind = item.score.get("type")
    needs = {"exact": "answers", "regex": "pattern", "json": "expect"}
    if kind not in needs:
        raise UserError(f"{where}: score type must be one of {list(SCORERS)}, got {kind!r}")
    if needs[kind] not in item.score:
        raise UserError(f"{where}: a {kind} scorer needs {needs[kind]!r}")
    if kind == "exact" and (not isinstance(item.score["answers"], list) or not item.score["answers"]):
        raise UserError(f"{where}: 'answers' must be a non-empty list")
    if kind == "regex":
        if any(f not in REGEX_FLAGS for f in item.score.get("flags", "")):
            raise UserError(f"{where}: regex flags must be drawn from {''.join(REGEX_FLAGS)}")
        try:
            _compiled(item.score["pattern"], item.score.get("flags", ""))
        except re.error as e:
            raise UserError(f"{where}: bad regex: {e}") from None


# ---------------------------------------------------------------------------------------------------- scoring


def normalize(text: str, case_sensitive: bool = False) -> str:
    """NFKC; strip whitespace, wrapping quotes/backticks/asterisks and a trailing period or exclamation mark;
    collapse inner whitespace; casefold unless case_sensitive."""
    text = unicodedata.normalize("NFKC", text).strip()
    previous = None
    while previous != text:
        previous = text
        text = text.strip().rstrip(".!").strip()
        for left, right in (("**", "**"), ("`", "`"), ('"', '"'), ("'", "'"), ("“", "”")):
            if len(text) >= len(left) + len(right) and text.startswith(left) and text.endswith(right):
                text = text[len(left):len(text) - len(right)]
    text = " ".join(text.split())
    return text if case_sensitive else text.casefold()


@functools.cache
def _compiled(pattern: str, flags: str) -> re.Pattern:
    value = 0
    for f in flags:
        value |= REGEX_FLAGS[f]
    return re.compile(pattern, value)


def _json_equal(got, expect) -> bool:
    if isinstance(expect, dict):
        return isinstance(got, dict) and got.keys() == expect.keys() and all(
            _json_equal(got[k], v) for k, v in expect.items())
    if isinstance(expect, list):
        return isinstance(got, list) and len(got) == len(expect) and all(map(_json_equal, got, expect))
    if isinstance(expect, str):
        return isinstance(got, str) and normalize(got) == normalize(expect)
    if isinstance(expect, bool) or expect is None:
        return got is expect
    return isinstance(got, (int, float)) and not isinstance(got, bool) and got == expect


def score_answer(item: SuiteItem, final: str | None) -> bool:
    """Whether `final` (the final-channel text; None when there is none) answers `item` correctly."""
    if final is None:
        return False
    score = item.score
    kind = score["type"]
    if kind == "exact":
        case = bool(score.get("case_sensitive", False))
        got = normalize(final, case)
        return any(got == normalize(answer, case) for answer in score["answers"])
    if kind == "regex":
        return _compiled(score["pattern"], score.get("flags", "")).fullmatch(final.strip()) is not None
    text = final.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, re.DOTALL)
    if fence:
        text = fence.group(1)
    try:
        got = json.loads(text)
    except json.JSONDecodeError:
        return False
    return _json_equal(got, score["expect"])


# ------------------------------------------------------------------------------------------------- generation


def prompt_tokens(prompt: str, reasoning_effort: str = "medium") -> list[int]:
    """system (reasoning effort) + user prompt + `<|start|>assistant`, rendered by openai-harmony."""
    from openai_harmony import Conversation, Message, ReasoningEffort, Role, SystemContent

    system = SystemContent.new().with_reasoning_effort(ReasoningEffort(reasoning_effort.capitalize()))
    conversation = Conversation.from_messages([
        Message.from_role_and_content(Role.SYSTEM, system),
        Message.from_role_and_content(Role.USER, prompt),
    ])
    return list(tk.harmony().render_conversation_for_completion(conversation, Role.ASSISTANT))


@dataclass
class Completion:
    tokens: list[int]
    parsed: bool  # openai-harmony parsed it (strict) into at least one message
    stopped: bool  # the last token is <|return|>
    final: str | None  # text of the last final-channel message
    error: str | None = None

    @property
    def valid(self) -> bool:
        return self.parsed and self.stopped and self.final is not None


def parse_completion(tokens: list[int]) -> Completion:
    """Parse the tokens generated after `<|start|>assistant` (the stop token included) as Harmony."""
    from openai_harmony import Role

    stopped = bool(tokens) and tokens[-1] == tk.RETURN
    try:
        messages = tk.harmony().parse_messages_from_completion_tokens(tokens, Role.ASSISTANT, strict=True)
    except Exception as e:  # openai_harmony.HarmonyError and decoding errors alike
        return Completion(tokens, False, stopped, None, str(e)[:200])
    final = None
    for message in messages:
        if message.channel == "final":
            final = "".join(getattr(part, "text", "") for part in message.content)
    return Completion(tokens, bool(messages), stopped, final)


def generate_completions(model, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """Greedy completions (KV-cached, `batch_size` prompts at a time), each cut after its stop token."""
    out: list[list[int]] = []
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first:first + batch_size]
        gen = generate(model, batch, max_new_tokens, temperature=0.0, stop_ids=STOP_IDS, pad_id=tk.EOD)
        for row in range(len(batch)):
            out.append(gen.tokens[row, : int(gen.lengths[row])].tolist())
    return out


def summarize(suite: Suite, completions: list[Completion]) -> dict:
    """Accuracy (overall and per category) and Harmony-validity shares of scored completions."""
    results, by_category = [], {}
    for item, completion in zip(suite.items, completions, strict=True):
        correct = score_answer(item, completion.final)
        entry = by_category.setdefault(item.category, {"correct": 0, "total": 0})
        entry["correct"] += int(correct)
        entry["total"] += 1
        results.append({
            "id": item.id, "category": item.category, "correct": correct,
            "final": None if completion.final is None else completion.final[:300],
            "parsed": completion.parsed, "stopped": completion.stopped, "tokens": len(completion.tokens),
            **({"error": completion.error} if completion.error else {}),
        })
    for entry in by_category.values():
        entry["accuracy"] = entry["correct"] / entry["total"]
    n = len(completions)
    return {
        "items": n,
        "correct": sum(r["correct"] for r in results),
        "accuracy": sum(r["correct"] for r in results) / n,
        "by_category": dict(sorted(by_category.items())),
        "parse_valid_share": sum(c.parsed for c in completions) / n,
        "stop_with_return_share": sum(c.stopped for c in completions) / n,
        "valid_harmony_share": sum(c.valid for c in completions) / n,
        "mean_tokens": sum(len(c.tokens) for c in completions) / n,
        "results": results,
    }


@torch.inference_mode()
def run_suite(model, suite: Suite | None = None, max_new_tokens: int = 256, batch_size: int = 8,
              reasoning_effort: str = "medium") -> dict:
    """Generate greedily for every suite item and score the final channels; returns a JSON-ready dict."""
    start = time.perf_counter()
    suite = suite or load_suite()
    was_training = model.training
    model.eval()
    try:
        prompts = [prompt_tokens(item.prompt, reasoning_effort) for item in suite.items]
        tokens = generate_completions(model, prompts, max_new_tokens, batch_size)
    finally:
        model.train(was_training)
    summary = summarize(suite, [parse_completion(t) for t in tokens])
    return {
        "suite": suite.source, "version": suite.version, "sha256": suite.sha256,
        "decoding": {"greedy": True, "max_new_tokens": max_new_tokens, "reasoning_effort": reasoning_effort,
                     "stop_ids": list(STOP_IDS)},
        **summary,
        "seconds": round(time.perf_counter() - start, 3),
    }
