"""o200k Harmony tokenizer: the pinned o200k_base ranks plus the Harmony special tokens, 201088 ids.

The ranks ship inside the PyPI package `bpe-openai`. They are decompressed once into a local cache and
sha256-checked on every load; nothing is fetched from the network. `openai-harmony` is pointed at the same file.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.resources
import os
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from vpmoe.errors import UserError

O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
RANKS_FILE = "o200k_base.tiktoken"
VOCAB_SIZE = 201088  # rows of the embedding; never derived from the largest special id

STARTOFTEXT = 199998
EOD = ENDOFTEXT = 199999
RETURN = 200002
CONSTRAIN = 200003
CHANNEL = 200005
START = 200006
END = 200007
MESSAGE = 200008
CALL = 200012

NAMED_SPECIALS = {
    "<|startoftext|>": STARTOFTEXT,
    "<|endoftext|>": ENDOFTEXT,
    "<|return|>": RETURN,
    "<|constrain|>": CONSTRAIN,
    "<|channel|>": CHANNEL,
    "<|start|>": START,
    "<|end|>": END,
    "<|message|>": MESSAGE,
    "<|call|>": CALL,
}
FIRST_SPECIAL = STARTOFTEXT

# The o200k_base pre-tokenizer split: letters with case classes, digits in groups of at most 3,
# punctuation runs, newlines, whitespace.
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)


def special_tokens() -> dict[str, int]:
    """All special tokens inside the vocabulary: the named Harmony ones and `<|reserved_N|>` for the rest."""
    named_ids = set(NAMED_SPECIALS.values())
    table = dict(NAMED_SPECIALS)
    for token_id in range(FIRST_SPECIAL, VOCAB_SIZE):
        if token_id not in named_ids:
            table[f"<|reserved_{token_id}|>"] = token_id
    return table


def cache_dir() -> Path:
    root = os.environ.get("VPMOE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vpmoe")
    return Path(root) / "tokenizer"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ranks_path() -> Path:
    """The local, hash-checked o200k_base ranks file (decompressed from `bpe-openai` on first use)."""
    target = cache_dir() / RANKS_FILE
    if not target.exists():
        try:
            packed = importlib.resources.files("bpe_openai") / "data" / f"{RANKS_FILE}.gz"
            data = gzip.decompress(packed.read_bytes())
        except (ModuleNotFoundError, FileNotFoundError) as e:
            raise UserError(f"the o200k ranks are missing: install the pinned `bpe-openai` package ({e})") from None
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    digest = _sha256(target)
    if digest != O200K_SHA256:
        raise UserError(
            f"tokenizer ranks {target} have sha256 {digest}, expected {O200K_SHA256}; "
            f"delete the file to re-extract it from the pinned `bpe-openai` package"
        )
    return target


@functools.cache
def encoding() -> tiktoken.Encoding:
    """The o200k Harmony encoding (tiktoken), 201088 ids."""
    return tiktoken.Encoding(
        name="o200k_harmony",
        pat_str=O200K_PATTERN,
        mergeable_ranks=load_tiktoken_bpe(str(ranks_path())),
        special_tokens=special_tokens(),
        explicit_n_vocab=VOCAB_SIZE,
    )


@functools.cache
def harmony():
    """openai-harmony's GPT-OSS encoding, reading the same local ranks file (no network)."""
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(ranks_path().parent)
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


def encode(text: str) -> list[int]:
    """Encode plain text; special-token strings in the text are treated as ordinary text."""
    return encoding().encode_ordinary(text)


def decode(ids) -> str:
    return encoding().decode(list(ids))


def tokenizer_hash() -> str:
    return O200K_SHA256


def write_hf_tokenizer(directory: str | Path) -> Path:
    """`tokenizer.json` of o200k Harmony (our ranks, special tokens at our ids), as a Hugging Face model directory
    holds it (exports, test teachers). Needs `transformers`."""
    try:
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError:
        raise UserError("writing tokenizer.json needs `transformers`: pip install 'vpmoe[teacher]'") from None

    specials = [name for name, _ in sorted(special_tokens().items(), key=lambda item: item[1])]
    converted = TikTokenConverter(
        vocab_file=str(ranks_path()), pattern=O200K_PATTERN, extra_special_tokens=specials
    ).converted()
    if converted.token_to_id("<|return|>") != RETURN:
        raise RuntimeError("the converted tokenizer does not put <|return|> at our id")
    path = Path(directory) / "tokenizer.json"
    converted.save(str(path))
    return path
