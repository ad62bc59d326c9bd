"""Sanity invariants: tokenizer round trip, special tokens, prompt rendering, the model's vocabulary.

Each check is a (name, ok, detail) entry; the Harmony validity of greedy generations comes from the suite
(`parse_valid_share` / `stop_with_return_share` / `valid_harmony_share` of the suite) and is copied in by the runner.
"""

from __future__ import annotations

from vpmoe import tokenizer as tk
from vpmoe.data.harmony import HarmonyRenderer
from vpmoe.eval.suite import prompt_tokens

ROUNDTRIP_TEXTS = (
    "Hello, world!",
    "  leading and trailing spaces  ",
    "naïve café — 東京 🚀 Ünïcödé",
    "def f(x):\n\treturn x ** 2\n",
    "1234567890 3.14159 -42 1e-9",
    "<|return|> and <|start|> are ordinary text here",
    "",
)


def _check(name: str, ok: bool, detail: str = "") -> dict:
    return {"name": name, "ok": bool(ok), **({"detail": detail} if detail and not ok else {})}


def tokenizer_checks(reasoning_effort: str = "medium") -> list[dict]:
    checks = []
    bad = [t for t in ROUNDTRIP_TEXTS if tk.decode(tk.encode(t)) != t]
    checks.append(_check("tokenizer_roundtrip", not bad, f"{len(bad)} texts differ, first {bad[:1]!r}"))

    enc, harmony = tk.encoding(), tk.harmony()
    wrong = []
    for name, token_id in tk.NAMED_SPECIALS.items():
        ours = enc.encode(name, allowed_special="all")
        theirs = harmony.encode(name, allowed_special="all")
        as_text = tk.encode(name)
        if ours != [token_id] or theirs != [token_id] or any(t >= tk.FIRST_SPECIAL for t in as_text):
            wrong.append(name)
    checks.append(_check("special_token_ids", not wrong, f"mismatched: {wrong}"))
    checks.append(_check("vocab_size", enc.n_vocab == tk.VOCAB_SIZE, f"n_vocab {enc.n_vocab} != {tk.VOCAB_SIZE}"))
    stops = sorted(harmony.stop_tokens_for_assistant_actions())
    checks.append(_check("harmony_stop_tokens", stops == sorted((tk.RETURN, tk.CALL)), f"got {stops}"))
    checks.append(_check("prompt_matches_training_render", _prompt_matches_training(reasoning_effort),
                         "eval prompts and training renders disagree on the system/user/assistant header tokens"))
    return checks


def _prompt_matches_training(reasoning_effort: str) -> bool:
    """The suite's openai-harmony prompt equals the training renderer's head + `<|start|>assistant`."""
    renderer = HarmonyRenderer(reasoning_effort)
    text = "What is 2 + 2?"
    ours = renderer.system + renderer.user_head + tk.encode(text) + [tk.END, tk.START, *tk.encode("assistant")]
    return ours == prompt_tokens(text, reasoning_effort)


def model_checks(vocab_size: int) -> list[dict]:
    return [_check("model_vocab_covers_tokenizer", vocab_size >= tk.VOCAB_SIZE,
                   f"model vocab {vocab_size} < tokenizer {tk.VOCAB_SIZE}")]


def run_sanity(model=None, suite_result: dict | None = None, reasoning_effort: str = "medium") -> dict:
    checks = tokenizer_checks(reasoning_effort)
    if model is not None:
        checks += model_checks(model.cfg.model.vocab_size)
    result = {"ok": all(c["ok"] for c in checks), "checks": checks}
    if suite_result is not None:
        result["generations"] = {k: suite_result[k] for k in ("items", "parse_valid_share", "stop_with_return_share",
                                                               "valid_harmony_share")}
    return result
