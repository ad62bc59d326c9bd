"""Tiny upcycling chains for tests, the step-2 benchmark and experiments: random Hugging Face Qwen3 donors and a
registry whose objects are miniatures of the real ones (same recipe, small shapes)."""

from __future__ import annotations

from pathlib import Path

import torch

from vpmoe import tokenizer as tk
from vpmoe.config import shipped_dir

MODEL_CONFIGS = shipped_dir("model")

# The miniature geometry: donor 16 q / 8 kv heads of 8 dims -> 8 q / 2 kv heads; 2 blocks of 4 layers -> 3 blocks.
TINY_DONOR = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=8)
_HEADS = ["attention.n_heads=8", "attention.n_kv_heads=2", "attention.head_dim=8", "ffn.dense_width=32"]
TINY_OVERRIDES = {
    "vpDense0-5_28.compat": ("tiny_compat.toml", ["model.n_layers=8", *_HEADS]),
    "vpDense0-5_28.real": ("tiny_real.toml", ["model.n_layers=8", *_HEADS, "attention.tpa_q_rank=4",
                                              "attention.tpa_kv_rank=2"]),
    "vpDense": ("tiny_dense.toml", ["model.n_layers=12", *_HEADS, "attention.tpa_q_rank=4",
                                    "attention.tpa_kv_rank=2"]),
    "vpMoE": ("tiny_moe.toml", ["model.n_layers=12", *_HEADS, "attention.tpa_q_rank=4", "attention.tpa_kv_rank=2",
                                "moe.n_experts=64", "moe.expert_width=8", "moe.shared_width=32"]),
}


def qwen3_config(vocab_size: int = tk.VOCAB_SIZE, tied: bool = True, **overrides):
    from transformers import Qwen3Config

    values = dict(TINY_DONOR, vocab_size=vocab_size, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=tied,
                  max_position_embeddings=4096, attention_bias=False)
    values.update(overrides)
    return Qwen3Config(**values)


def random_qwen3(config, seed: int = 0, spread: float = 0.3):
    """A random Qwen3ForCausalLM whose norm gains are not all one (so copying them is tested)."""
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(1 - spread, 1 + spread)
            elif name.endswith("embed_tokens.weight"):
                p.normal_(0.0, 0.5)
    return model.eval()


def save_qwen3(directory: str | Path, seed: int = 0, vocab_size: int = tk.VOCAB_SIZE, tied: bool = True,
               model=None, **overrides) -> Path:
    model = model if model is not None else random_qwen3(qwen3_config(vocab_size, tied, **overrides), seed)
    model.save_pretrained(str(directory))
    return Path(directory)


def registry_text(root_name: str = "qwen3-0_6B-o200k", vocab: int = tk.VOCAB_SIZE, donor: dict | None = None,
                  pins: dict[str, str] | None = None, root: bool = True) -> str:
    """A registry of the miniature chain from an HF root (the o200k donor) to vpMoE (without the root's entry when
    `root` is False: transplant_registry_text has it, as the transplant's target)."""
    d = dict(TINY_DONOR, **(donor or {}))
    pins = pins or {}
    lines = [] if not root else [
        f'[objects."{root_name}"]', 'kind = "hf"', 'parent = ""', 'step = ""',
        f'sha256 = "{pins.get(root_name, "")}"',
        f'[objects."{root_name}".hf]', 'architecture = "Qwen3ForCausalLM"',
        f'layers = {d["num_hidden_layers"]}', f'hidden = {d["hidden_size"]}', f'heads = {d["num_attention_heads"]}',
        f'kv_heads = {d["num_key_value_heads"]}', f'head_dim = {d["head_dim"]}',
        f'intermediate = {d["intermediate_size"]}', f'vocab = {vocab}', 'rope_theta = 1000000.0', '',
    ]
    parent = root_name
    for name, step in (("vpDense0-5_28.compat", "surgery"), ("vpDense0-5_28.real", "morph"), ("vpDense", "expand"),
                       ("vpMoE", "granular")):
        config, overrides = TINY_OVERRIDES[name]
        lines += [f'[objects."{name}"]', 'kind = "vpmoe"', f'parent = "{parent}"', f'step = "{step}"',
                  f'model_config = "{(MODEL_CONFIGS / config).as_posix()}"',
                  "overrides = [" + ", ".join(f'"{o}"' for o in overrides) + "]",
                  f'sha256 = "{pins.get(name, "")}"', '']
        parent = name
    return "\n".join(lines)


def step_config_text(step: str, source: str, target: str, input_dir, output_dir, registry, seed: int = 0,
                     records: int = 4, extra: str = "") -> str:
    return "\n".join([
        "[upcycle]", f'step = "{step}"', f'source = "{source}"', f'target = "{target}"',
        f'input = "{Path(input_dir).as_posix()}"', f'output = "{Path(output_dir).as_posix()}"',
        f'registry = "{Path(registry).as_posix()}"', f"seed = {seed}", "",
        "[calibration]", f"records = {records}", "", extra, "",
    ])


# ---- tiny tokenizers and donors for the vocabulary transplant (mergekit runs on them) -----------------------------

HARMONY_SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>", "<|start|>",
                    "<|end|>", "<|message|>", "<|call|>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus(n: int, seed: int) -> list[str]:
    from vpmoe.data import synthetic

    texts = ["system user assistant analysis final Reasoning: medium low high You are ChatGPT, a large language "
             "model trained by OpenAI. Knowledge cutoff: 2024-06 Current date: # Valid channels: commentary."]
    for r in synthetic.records(n, seed, prefix="tok"):
        texts += [r["query"], r["synthetic_reasoning"], r["synthetic_answer"]]
    return texts


def tiny_bpe(vocab_size: int, specials: list[str], seed: int = 0):
    """A byte-level BPE tokenizer trained on the synthetic corpus (a PreTrainedTokenizerFast)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(200, seed), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def save_transplant_pair(root: str | Path, source_vocab: int = 400, donor_vocab: int = 600) -> dict:
    """A tiny Qwen3 with its own small tokenizer (`root/source`) and a tiny GPT-OSS vocabulary donor whose tokenizer
    has the Harmony special tokens (`root/donor`). Returns the facts a registry needs."""
    from vpmoe.testing.teachers import gpt_oss_config, random_gpt_oss

    root = Path(root)
    src_tok = tiny_bpe(source_vocab, QWEN_SPECIALS, seed=1)
    save_qwen3(root / "source", vocab_size=len(src_tok), seed=5)
    src_tok.save_pretrained(str(root / "source"))
    don_tok = tiny_bpe(donor_vocab, HARMONY_SPECIALS, seed=2)
    ids = {key: don_tok.convert_tokens_to_ids(tok) for key, tok in
           (("pad_token_id", "<|endoftext|>"), ("bos_token_id", "<|startoftext|>"), ("eos_token_id", "<|return|>"))}
    # hidden 128 > k = 64: OMP over 64 atoms is well posed only in a wider space (gpt-oss-20b: 2880)
    donor = random_gpt_oss(gpt_oss_config(len(don_tok), hidden_size=128, **ids), seed=6)
    donor.save_pretrained(str(root / "donor"))
    don_tok.save_pretrained(str(root / "donor"))
    return {"source_vocab": len(src_tok), "donor_vocab": len(don_tok),
            "specials": {t: don_tok.convert_tokens_to_ids(t) for t in HARMONY_SPECIALS}}


def transplant_registry_text(facts: dict, vocab: int | None = None) -> str:
    d = TINY_DONOR
    qwen = [f'layers = {d["num_hidden_layers"]}', f'hidden = {d["hidden_size"]}',
            f'heads = {d["num_attention_heads"]}', f'kv_heads = {d["num_key_value_heads"]}',
            f'head_dim = {d["head_dim"]}', f'intermediate = {d["intermediate_size"]}', 'rope_theta = 1000000.0']
    specials = [f'"{t}" = {i}' for t, i in facts["specials"].items()]
    return "\n".join([
        '[objects."qwen3-0_6B"]', 'kind = "hf"', 'parent = ""', 'step = ""',
        '[objects."qwen3-0_6B".hf]', 'architecture = "Qwen3ForCausalLM"', *qwen,
        f'vocab = {facts["source_vocab"]}', 'tie_word_embeddings = true', '',
        '[objects."gpt-oss-20b"]', 'kind = "hf"', 'parent = ""', 'step = ""',
        '[objects."gpt-oss-20b".hf]', 'architecture = "GptOssForCausalLM"', 'layers = 2', 'hidden = 128',
        'heads = 2', 'kv_heads = 1', 'head_dim = 16', 'intermediate = 32', f'vocab = {facts["donor_vocab"]}', '',
        '[objects."qwen3-0_6B-o200k"]', 'kind = "hf"', 'parent = "qwen3-0_6B"', 'step = "transplant"',
        '[objects."qwen3-0_6B-o200k".hf]', 'architecture = "Qwen3ForCausalLM"', *qwen,
        f'vocab = {vocab or facts["donor_vocab"]}',
        '[objects."qwen3-0_6B-o200k".hf.special_tokens]', *specials, '',
    ])


# ---- the real-shape step 1: a Qwen3-0.6B-size tokenizer and a vocabulary donor that holds only what is read ------

QWEN3_VOCAB = 151936  # rows of Qwen3-0.6B's embedding


def synthetic_qwen3_tokenizer(size: int = QWEN3_VOCAB, own: int = 11933):
    """A byte-level BPE tokenizer of exactly `size` tokens, built in-process from o200k Harmony (nothing fetched):
    the o200k regular tokens of the lowest ranks (with every merge among them, so it tokenizes text as a smaller
    o200k would), `own` tokens that o200k lacks (the source-only rows a transplant drops), and Qwen's special tokens
    last. Shared with o200k by string: size - own - len(QWEN_SPECIALS) regular tokens, plus <|endoftext|>."""
    import json
    import tempfile

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        raw = json.loads(tk.write_hf_tokenizer(tmp).read_text(encoding="utf-8"))
    shared = size - own - len(QWEN_SPECIALS)
    vocab = {t: i for t, i in raw["model"]["vocab"].items() if i < shared}
    if len(vocab) != shared:
        raise AssertionError("o200k's regular ids are not dense")
    merges = [m for m in raw["model"]["merges"] if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    mine = [f"ĠQwenOnly{i:05d}" for i in range(own)]
    if any(t in raw["model"]["vocab"] for t in mine):
        raise AssertionError("a source-only token is in o200k")
    vocab.update({t: shared + i for i, t in enumerate(mine)})
    raw["model"]["vocab"], raw["model"]["merges"] = vocab, merges
    raw["added_tokens"] = [{"id": shared + own + i, "content": t, "single_word": False, "lstrip": False,
                            "rstrip": False, "normalized": False, "special": True}
                           for i, t in enumerate(QWEN_SPECIALS)]
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(raw)), eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    if len(tok) != size:
        raise AssertionError(f"the synthetic tokenizer has {len(tok)} tokens, not {size}")
    return tok


def save_vocab_donor(directory: str | Path, config, tokenizer=None, seed: int = 0, dtype=torch.bfloat16) -> Path:
    """A GPT-OSS vocabulary donor that holds only the tensors the transplant reads (the input embedding and the final
    norm; the head is tied to the embedding), random, with `config` (the registry checks its geometry) and the given
    tokenizer, or o200k Harmony's when None. A real-shape stand-in for gpt-oss-20b without its 20B weights."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.tie_word_embeddings = True
    config.architectures = ["GptOssForCausalLM"]
    config.save_pretrained(str(directory))
    gen = torch.Generator().manual_seed(seed)
    embed = torch.empty(config.vocab_size, config.hidden_size, dtype=dtype)
    for start in range(0, config.vocab_size, 8192):  # in slices: never an fp32 copy of the whole matrix
        rows = embed[start:start + 8192]
        rows.copy_(torch.randn(rows.shape, generator=gen))
    save_file({"model.embed_tokens.weight": embed, "model.norm.weight": torch.ones(config.hidden_size, dtype=dtype)},
              str(directory / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is None:
        tk.write_hf_tokenizer(directory)
    else:
        tokenizer.save_pretrained(str(directory))
    return directory
