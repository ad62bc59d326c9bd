import random

import numpy as np
import pytest
from openai_harmony import RenderConversationConfig, Role

from vpmoe import tokenizer as tk
from vpmoe.data import synthetic
from vpmoe.data.harmony import HarmonyRenderer, Reject, harmony_conversation

TRAINING = RenderConversationConfig(auto_drop_analysis=False)
ODD = [
    ("Résumé: naïve café?", "Ünïcödé réasoning 東京 🎉", "Ja — ça va."),
    ("Say <|end|> and <|return|> literally.", "The user wants <|start|>assistant text.", "<|end|> done"),
    ("  leading spaces\n\nand blank lines\n", "line1\r\nline2\n\n\n", "\tanswer with tab"),
    ("No reasoning here", "", "Just the answer."),
    ("1234567 + 3.14159 on 2025-01-07", "digits 000111222333", "= 1234570.14159"),
]


def cases(n=60):
    rows = synthetic.records(n, seed=3)
    out = [(r["query"], r["synthetic_reasoning"], r["synthetic_answer"]) for r in rows] + ODD
    rng = random.Random(1)
    alphabet = "abc xyz 0123456789 .,;:!?\n\té漢字🎉<|>"
    for _ in range(20):
        out.append(tuple("".join(rng.choices(alphabet, k=rng.randint(1, 80))) + "q" for _ in range(3)))
    return out


def reference(query, reasoning, answer, effort="medium"):
    conversation = harmony_conversation(query, reasoning or None, answer, effort)
    return tk.harmony().render_conversation_for_training(conversation, TRAINING)


@pytest.mark.parametrize("effort", ["low", "medium", "high"])
def test_tokens_equal_openai_harmony(effort):
    renderer = HarmonyRenderer(effort)
    for query, reasoning, answer in cases():
        rendered = renderer.render(query, reasoning, answer, seq_len=4096)
        assert rendered.tokens.tolist() == reference(query, reasoning, answer, effort)
        assert rendered.truncated is None


def test_spans_decode_to_the_assistant_messages_and_parse_back():
    renderer = HarmonyRenderer("medium")
    for query, reasoning, answer in cases():
        r = renderer.render(query, reasoning, answer, seq_len=4096)
        analysis = tk.decode(r.tokens[r.spans == 1].tolist())
        final = tk.decode(r.tokens[r.spans == 2].tolist())
        if reasoning:
            assert analysis == f"<|start|>assistant<|channel|>analysis<|message|>{reasoning}<|end|>"
        else:
            assert analysis == ""
        assert final == f"<|start|>assistant<|channel|>final<|message|>{answer}<|return|>"
        first = int(np.flatnonzero(r.spans > 0)[0])
        assert np.all(r.spans[first:] > 0) and np.all(np.diff(r.spans[first:].astype(int)) >= 0)
        messages = tk.harmony().parse_messages_from_completion_tokens(r.tokens[first:].tolist(), None)
        texts = [(m.channel, m.content[0].text) for m in messages]
        assert texts == ([("analysis", reasoning)] if reasoning else []) + [("final", answer)]
        assert all(m.author.role == Role.ASSISTANT for m in messages)


def _parts(r):
    messages = tk.harmony().parse_messages_from_completion_tokens(r.tokens.tolist(), None)
    return {
        m.channel or m.author.role.value: m.content[0].text if m.content else ""
        for m in messages if m.author.role != Role.SYSTEM
    }


def test_truncation_keeps_final_then_suffix_of_analysis_then_suffix_of_query():
    renderer = HarmonyRenderer("medium")
    query = "Question words " * 40 + "END_OF_QUESTION"
    reasoning = "step " * 300 + "LAST_STEP é漢🎉"
    answer = "The answer is 42."
    full = renderer.render(query, reasoning, answer, seq_len=4096)
    for seq_len in (len(full.tokens) - 1, len(full.tokens) - 150, 200, 140):
        r = renderer.render(query, reasoning, answer, seq_len=seq_len)
        assert len(r.tokens) <= seq_len
        parts = _parts(r)
        assert parts["final"] == answer
        assert reasoning.endswith(parts["analysis"])
        assert query.endswith(parts["user"])
        # Exactly what harmony renders for the shortened conversation, and as long as allowed.
        expected = harmony_conversation(parts["user"], parts["analysis"], parts["final"], "medium")
        assert r.tokens.tolist() == tk.harmony().render_conversation_for_training(expected, TRAINING)
        if parts["user"] != query:
            assert r.truncated == "query" and parts["analysis"] == ""
        else:
            assert r.truncated == "analysis"
            assert len(r.tokens) >= seq_len - 2  # only a re-encoding boundary may cost a token or two


def test_rejects():
    renderer = HarmonyRenderer("medium")
    with pytest.raises(Reject, match="empty_query"):
        renderer.render("   ", "r", "a", 512)
    with pytest.raises(Reject, match="empty_answer"):
        renderer.render("q", "r", "\n", 512)
    with pytest.raises(Reject, match="final_too_long"):
        renderer.render("q", "r", "word " * 600, 512)
    with pytest.raises(Reject, match="query_not_roundtrip"):
        renderer.render("bad \ud800 surrogate", "r", "a", 512)


def test_plain_text_is_fully_supervised_and_chunked():
    text = "Plain healing text. " * 100
    chunks = HarmonyRenderer.render_text(text, seq_len=128)
    ids = tk.encode(text)
    assert np.concatenate([c.tokens for c in chunks]).tolist() == ids
    for c in chunks:
        assert len(c.tokens) <= 128 and c.spans[0] == 0 and np.all(c.spans[1:] == 2)
    with pytest.raises(Reject, match="empty_text"):
        HarmonyRenderer.render_text(" ", 128)
