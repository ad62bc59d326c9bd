import hashlib
import re
import subprocess
import sys

import pytest

from vpmoe import tokenizer as tk
from vpmoe.errors import UserError

MULTILINGUAL = [
    "Hello, world! How are you today?",
    "Größenänderung: Straße, Äpfel und Übermut.",
    "東京は日本の首都です。人口は約1400万人。",
    "Привет, как дела? Всё хорошо.",
    "مرحبا بالعالم، كيف حالك؟",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "emoji 🎉🚀 mixed with code: `def f(x): return x**2`\n\ttabs\r\nand CRLF",
    "<|start|> looks special but is plain text <|end|>",
]


def test_vocabulary_size_and_special_ids():
    enc = tk.encoding()
    assert enc.n_vocab == tk.VOCAB_SIZE == 201088
    expected = {"<|start|>": 200006, "<|end|>": 200007, "<|message|>": 200008, "<|channel|>": 200005,
                "<|return|>": 200002, "<|endoftext|>": 199999}
    for text, token_id in expected.items():
        assert enc.encode(text, allowed_special="all") == [token_id]
        assert tk.harmony().encode(text, allowed_special="all") == [token_id]
    assert max(tk.special_tokens().values()) == tk.VOCAB_SIZE - 1


def test_special_tokens_match_harmony_within_the_vocabulary():
    harmony = tk.harmony()
    ours = tk.special_tokens()
    for text in harmony.special_tokens_set:
        (token_id,) = harmony.encode(text, allowed_special="all")
        if token_id < tk.VOCAB_SIZE:  # harmony also names id 201088, which is outside our 201088 rows
            assert ours[text] == token_id


@pytest.mark.parametrize("text", ["1234567", "3.14159", "2025-01-07", "1000000000000", "12:34:56.789"])
def test_digits_group_by_at_most_three(text):
    ids = tk.encode(text)
    runs = re.findall(r"\d+", text)
    bound = sum(-(-len(run) // 3) for run in runs) + sum(not c.isdigit() for c in text)
    assert len(ids) <= bound
    for token in ids:
        piece = tk.decode([token])
        assert sum(c.isdigit() for c in piece) <= 3


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_round_trip_and_agreement_with_harmony(text):
    ids = tk.encode(text)
    assert tk.decode(ids) == text
    assert ids == tk.harmony().encode(text, disallowed_special=())


def test_ranks_hash_mismatch_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("VPMOE_CACHE", str(tmp_path))
    good = tk.ranks_path()
    assert hashlib.sha256(good.read_bytes()).hexdigest() == tk.O200K_SHA256
    good.write_bytes(good.read_bytes() + b"x")
    with pytest.raises(UserError, match="expected 446a9538"):
        tk.ranks_path()


def test_cli_exits_2_on_a_corrupt_asset(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / tk.RANKS_FILE).write_bytes(b"corrupt")
    result = subprocess.run(
        [sys.executable, "-m", "vpmoe.cli", "doctor"], capture_output=True, text=True,
        env={"VPMOE_CACHE": str(tmp_path), "PATH": ""},
    )
    assert result.returncode == 2
    assert "sha256" in result.stdout + result.stderr
