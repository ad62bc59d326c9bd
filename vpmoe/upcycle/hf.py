"""Hugging Face causal-LM directories (the donor and its vocabulary transplant): facts, weights, forward.

Only Qwen3ForCausalLM is converted by the surgery step; facts and weights of any safetensors directory can be read.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from vpmoe.artifacts.models import config_json
from vpmoe.errors import UserError

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"


def rope_theta(cfg: dict) -> float | None:
    """transformers 5 writes rope_parameters.rope_theta, older checkpoints (the real Qwen3) rope_theta."""
    params = cfg.get("rope_parameters") or {}
    value = params.get("rope_theta", cfg.get("rope_theta"))
    return None if value is None else float(value)


def weight_files(directory: str | Path) -> list[Path]:
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise UserError(f"{directory}: no *.safetensors weights")
    return files


def tensor_shapes(directory: str | Path) -> dict[str, list[int]]:
    shapes = {}
    for path in weight_files(directory):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                shapes[name] = list(f.get_slice(name).get_shape())
    return shapes


def load_state(directory: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    state = {}
    for path in weight_files(directory):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                state[name] = f.get_tensor(name).to(dtype)
    return state


class TensorReader:
    """The tensors of a Hugging Face directory by name, read from its safetensors when asked, in fp32 (the streamed
    surgery reads the donor one layer at a time)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.files = {}
        for path in weight_files(directory):
            with safe_open(str(path), framework="pt") as f:
                self.files.update(dict.fromkeys(f.keys(), path))

    def __call__(self, names) -> dict[str, torch.Tensor]:
        out = {}
        for name in names:
            if name not in self.files:
                raise UserError(f"{self.directory}: the weights have no {name!r}")
            with safe_open(str(self.files[name]), framework="pt") as f:
                out[name] = f.get_tensor(name).float()
        return out


def facts(directory: str | Path) -> dict:
    """The shape facts of a directory, as the registry's [hf] tables name them."""
    cfg = config_json(directory)
    shapes = tensor_shapes(directory)
    if EMBED not in shapes:
        raise UserError(f"{directory}: the weights have no {EMBED!r}")
    heads = cfg.get("num_attention_heads")
    hidden = cfg.get("hidden_size")
    return {
        "architecture": (cfg.get("architectures") or ["?"])[0],
        "layers": cfg.get("num_hidden_layers"),
        "hidden": hidden,
        "heads": heads,
        "kv_heads": cfg.get("num_key_value_heads"),
        "head_dim": cfg.get("head_dim") or (hidden // heads if hidden and heads else None),
        "intermediate": cfg.get("intermediate_size"),
        "vocab": shapes[EMBED][0],
        "config_vocab_size": cfg.get("vocab_size"),
        "head_rows": shapes[HEAD][0] if HEAD in shapes else None,
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "rope_theta": rope_theta(cfg),
        "shapes": shapes,
    }


def check_facts(directory: str | Path, want, what: str) -> dict:
    """Refuse a directory whose config or weight shapes differ from the registry's facts `want` (HFFacts)."""
    got = facts(directory)
    for key in ("architecture", "layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab"):
        if got[key] != getattr(want, key):
            raise UserError(f"{directory}: {key} is {got[key]!r} but the registry's {what!r} has "
                            f"{getattr(want, key)!r}")
    if got["config_vocab_size"] != want.vocab:
        raise UserError(f"{directory}: config.json vocab_size is {got['config_vocab_size']} but the registry's "
                        f"{what!r} has {want.vocab} rows")
    if got["head_rows"] is not None and got["head_rows"] != want.vocab:
        raise UserError(f"{directory}: {HEAD} has {got['head_rows']} rows, expected {want.vocab}")
    if want.tie_word_embeddings is not None and got["tie_word_embeddings"] != want.tie_word_embeddings:
        raise UserError(f"{directory}: tie_word_embeddings is {got['tie_word_embeddings']} but the registry's "
                        f"{what!r} says {want.tie_word_embeddings}")
    if want.rope_theta is not None and got["rope_theta"] != want.rope_theta:
        raise UserError(f"{directory}: RoPE base is {got['rope_theta']} but the registry's {what!r} has "
                        f"{want.rope_theta}")
    _check_layer_shapes(directory, got, want)
    if want.special_tokens:
        check_special_tokens(directory, want.special_tokens, what)
    return got


def _check_layer_shapes(directory, got: dict, want) -> None:
    """The attention and MLP shapes of a Qwen3-style layout, where present."""
    if want.architecture != "Qwen3ForCausalLM":
        return
    q, kv, d, i = want.heads * want.head_dim, want.kv_heads * want.head_dim, want.hidden, want.intermediate
    expected = {
        "self_attn.q_proj.weight": [q, d], "self_attn.k_proj.weight": [kv, d], "self_attn.v_proj.weight": [kv, d],
        "self_attn.o_proj.weight": [d, q], "self_attn.q_norm.weight": [want.head_dim],
        "self_attn.k_norm.weight": [want.head_dim], "mlp.gate_proj.weight": [i, d], "mlp.up_proj.weight": [i, d],
        "mlp.down_proj.weight": [d, i], "input_layernorm.weight": [d], "post_attention_layernorm.weight": [d],
    }
    shapes = got["shapes"]
    for layer in range(want.layers):
        for leaf, shape in expected.items():
            name = f"model.layers.{layer}.{leaf}"
            if shapes.get(name) != shape:
                raise UserError(f"{directory}: tensor {name!r} has shape {shapes.get(name)}, expected {shape}")
    extra = [n for n in shapes if n.startswith(f"model.layers.{want.layers}.")]
    if extra:
        raise UserError(f"{directory}: has more than {want.layers} layers ({extra[0]!r})")


def load_tokenizer(directory: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as e:
        raise UserError(f"{directory}: cannot load its tokenizer: {e}") from None


def check_special_tokens(directory: str | Path, specials: dict[str, int], what: str) -> None:
    tok = load_tokenizer(directory)
    for token, token_id in specials.items():
        got = tok.convert_tokens_to_ids(token)
        if got != token_id:
            raise UserError(f"{directory}: special token {token!r} has id {got} but the registry's {what!r} "
                            f"expects {token_id}")


def load_causal_lm(directory: str | Path):
    """The Hugging Face model in fp32, eval mode (drift reports and the surgery's activation fit)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    return model.eval()
