"""Tiny random GPT-OSS teachers (real vocabulary, 201088 ids) for tests, the demo and benchmarks."""

from __future__ import annotations

from pathlib import Path

import torch

from vpmoe import tokenizer as tk
from vpmoe.tokenizer import write_hf_tokenizer

TINY = dict(
    hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
    head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=16, max_position_embeddings=4096,
)


def gpt_oss_config(vocab_size: int = tk.VOCAB_SIZE, **overrides):
    """A GPT-OSS config with our special ids (tiny unless overridden)."""
    from transformers import GptOssConfig

    values = dict(TINY, vocab_size=vocab_size, eos_token_id=tk.RETURN, pad_token_id=tk.ENDOFTEXT,
                  bos_token_id=tk.STARTOFTEXT)
    values.update(overrides)
    return GptOssConfig(**values)


def random_gpt_oss(config, seed: int = 0, head_std: float = 0.5, dtype=torch.float32, device="cpu"):
    """A randomly initialized GptOssForCausalLM; `head_std` sets the output head's scale (peaked distributions)."""
    from transformers import GptOssForCausalLM

    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in `dtype` on `device` directly: a large model never exists in fp32
    try:
        with torch.device(device):
            model = GptOssForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, head_std)
    return model.eval()


def save_tiny_teacher(directory: str | Path, seed: int = 0, head_std: float = 0.5, tokenizer: bool = False,
                      vocab_size: int = tk.VOCAB_SIZE, **overrides) -> Path:
    """Write a tiny random GPT-OSS teacher (config.json, generation_config.json, model.safetensors)."""
    directory = Path(directory)
    model = random_gpt_oss(gpt_oss_config(vocab_size, **overrides), seed=seed, head_std=head_std)
    model.save_pretrained(directory)
    if tokenizer:
        write_hf_tokenizer(directory)
    return directory
