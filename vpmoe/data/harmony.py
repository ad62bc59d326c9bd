"""Harmony rendering with per-token span labels, and structured truncation.

A SYNTH record renders as: system message (with the reasoning effort), user = query, assistant analysis =
reasoning, assistant final = answer, closed by `<|return|>`. The token ids equal openai-harmony's
`render_conversation_for_training(..., auto_drop_analysis=False)`: harmony renders every message as
`<|start|>role[<|channel|>channel]<|message|>content<|end|>` with each piece encoded on its own, so the pieces
are encoded here directly (the system message is rendered once by openai-harmony itself).

Span labels: the tokens of an assistant message, from its `<|start|>` through its closing token, carry the
message's span (analysis 1, final 2); all other tokens carry 0.

A prompt (format `prompts`, for on-policy distillation) is the user message followed by `<|start|>assistant`, with
no system message: the reasoning effort is left open, and the stage prepends `system_tokens(effort)` per sample.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np

from vpmoe import spans
from vpmoe import tokenizer as tk

EFFORTS = ("low", "medium", "high")


class Reject(Exception):
    """A record whose content cannot be used; `reason` is counted in the dataset manifest."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Rendered:
    tokens: np.ndarray  # int32
    spans: np.ndarray  # uint8
    truncated: str | None  # None, "analysis" or "query": the deepest part that was cut


def system_tokens(reasoning_effort: str) -> list[int]:
    from openai_harmony import Conversation, Message, ReasoningEffort, Role, SystemContent

    if reasoning_effort not in EFFORTS:
        raise ValueError(f"reasoning_effort must be one of {EFFORTS}, got {reasoning_effort!r}")
    effort = ReasoningEffort(reasoning_effort.capitalize())
    system = Message.from_role_and_content(Role.SYSTEM, SystemContent.new().with_reasoning_effort(effort))
    return list(tk.harmony().render_conversation(Conversation.from_messages([system])))


@functools.cache
def longest_system() -> int:
    """Tokens of the longest system message over the efforts (a prompt's budget reserves them)."""
    return max(len(system_tokens(e)) for e in EFFORTS)


def _encode_checked(text: str, what: str) -> list[int]:
    try:
        ids = tk.encode(text)
    except (UnicodeEncodeError, ValueError):
        raise Reject(f"{what}_not_roundtrip") from None
    if tk.decode(ids) != text:
        raise Reject(f"{what}_not_roundtrip")
    return ids


def _suffix(ids: list[int], budget: int) -> list[int]:
    """The longest token suffix of the text that re-encodes to at most `budget` tokens.

    The cut text is re-encoded so that the result is exactly what harmony renders for the shortened content.
    """
    if len(ids) <= budget:
        return ids
    if budget <= 0:
        return []
    enc = tk.encoding()
    cut = len(ids) - budget
    while cut < len(ids):
        try:
            text = enc.decode_bytes(ids[cut:]).decode("utf-8")
        except UnicodeDecodeError:
            cut += 1
            continue
        fresh = enc.encode_ordinary(text)
        if len(fresh) <= budget:
            return fresh
        cut += len(fresh) - budget
    return []


class HarmonyRenderer:
    """Renders SYNTH records and plain text into (tokens, spans)."""

    def __init__(self, reasoning_effort: str = "medium", system: list[int] | None = None):
        """`system` takes the system message's tokens when already rendered (worker processes get them)."""
        self.reasoning_effort = reasoning_effort
        self.system = system if system is not None else system_tokens(reasoning_effort)
        assistant, analysis, final, user = (tk.encode(s) for s in ("assistant", "analysis", "final", "user"))
        self.user_head = [tk.START, *user, tk.MESSAGE]
        self.analysis_head = [tk.START, *assistant, tk.CHANNEL, *analysis, tk.MESSAGE]
        self.final_head = [tk.START, *assistant, tk.CHANNEL, *final, tk.MESSAGE]
        self.assistant_head = [tk.START, *assistant]  # a prompt's end: the completion opens with <|channel|>

    def render(self, query: str, reasoning: str, answer: str, seq_len: int) -> Rendered:
        """Render one conversation; raises Reject for empty or unusable content."""
        if not query.strip():
            raise Reject("empty_query")
        if not answer.strip():
            raise Reject("empty_answer")
        q = _encode_checked(query, "query")
        r = _encode_checked(reasoning, "reasoning") if reasoning else None
        a = _encode_checked(answer, "answer")

        fixed = len(self.system) + len(self.user_head) + 1 + len(self.final_head) + len(a) + 1
        if r is not None:
            fixed += len(self.analysis_head) + 1
        if fixed > seq_len:
            raise Reject("final_too_long")
        # Cut the analysis first (keeping its end); only once it is empty, cut the query (keeping its end).
        truncated = None
        budget = seq_len - fixed
        if r is not None and len(q) + len(r) > budget:
            r, truncated = _suffix(r, budget - len(q)), "analysis"
        budget -= len(r) if r is not None else 0
        if len(q) > budget:
            q, truncated = _suffix(q, budget), "query"

        head = self.system + self.user_head + q + [tk.END]
        analysis = self.analysis_head + r + [tk.END] if r is not None else []
        final = self.final_head + a + [tk.RETURN]
        tokens = np.array(head + analysis + final, dtype=np.int32)
        labels = np.zeros(len(tokens), dtype=np.uint8)
        labels[len(head) : len(head) + len(analysis)] = spans.REASONING
        labels[len(head) + len(analysis) :] = spans.FINAL
        return Rendered(tokens, labels, truncated)

    def render_prompt(self, query: str, seq_len: int) -> Rendered:
        """`<|start|>user<|message|>query<|end|><|start|>assistant`, all span 0. `seq_len` bounds the prompt with
        the longest system message of any effort prepended; the query keeps its end when it is cut."""
        if not query.strip():
            raise Reject("empty_query")
        q = _encode_checked(query, "query")
        fixed = longest_system() + len(self.user_head) + 1 + len(self.assistant_head)
        truncated = None
        if len(q) > seq_len - fixed:
            if seq_len - fixed <= 0:
                raise Reject("prompt_too_long")
            q, truncated = _suffix(q, seq_len - fixed), "query"
        tokens = np.array(self.user_head + q + [tk.END] + self.assistant_head, dtype=np.int32)
        return Rendered(tokens, np.zeros(len(tokens), dtype=np.uint8), truncated)

    @staticmethod
    def render_text(text: str, seq_len: int) -> list[Rendered]:
        """Plain text, fully supervised (span 2), cut into chunks of at most `seq_len` tokens.

        The first token of each chunk has nothing before it to be predicted from, so it carries span 0.
        """
        if not text.strip():
            raise Reject("empty_text")
        ids = np.array(_encode_checked(text, "text"), dtype=np.int32)
        chunks = []
        for start in range(0, len(ids), seq_len):
            tokens = ids[start : start + seq_len]
            labels = np.full(len(tokens), spans.FINAL, dtype=np.uint8)
            labels[0] = spans.NONE
            chunks.append(Rendered(tokens, labels, "chunked" if len(ids) > seq_len else None))
        return chunks


def harmony_conversation(query: str, reasoning: str | None, answer: str, reasoning_effort: str):
    """The same conversation as an openai-harmony object (the reference for tests and tooling).

    `reasoning=None` means no analysis message. `HarmonyRenderer.render` renders a source record with empty
    reasoning without one, while a truncation that empties the analysis keeps its (empty) message.
    """
    from openai_harmony import Conversation, Message, ReasoningEffort, Role, SystemContent

    effort = ReasoningEffort(reasoning_effort.capitalize())
    messages = [
        Message.from_role_and_content(Role.SYSTEM, SystemContent.new().with_reasoning_effort(effort)),
        Message.from_role_and_content(Role.USER, query),
    ]
    if reasoning is not None:
        messages.append(Message.from_role_and_content(Role.ASSISTANT, reasoning).with_channel("analysis"))
    messages.append(Message.from_role_and_content(Role.ASSISTANT, answer).with_channel("final"))
    return Conversation.from_messages(messages)


SPLIT_RULE = "valid if int.from_bytes(sha256(utf8(id))[:8], 'big') / 2**64 < valid_fraction, else train"


def split_of(record_id: str, valid_fraction: float) -> str:
    h = int.from_bytes(hashlib.sha256(record_id.encode("utf-8")).digest()[:8], "big")
    return "valid" if h / 2**64 < valid_fraction else "train"
