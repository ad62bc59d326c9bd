"""Step 4: `vpDense0-5_28.real` -> `vpDense` (exact): order- and type-preserving depth expansion.

Both depths are whole blocks of `global_every` layers (L L L G): 28 = 7 blocks, 80 = 20 blocks. Source block b
goes to target block round(b * (T - 1) / (S - 1)) at the same position inside the block, so the original layers
keep their order and kind, the first block stays first (layer 0 keeps the value-residual source v_first, and
the dense FFN) and the last stays last. Every other target layer is new: a copy of the nearest original layer
of the same kind, local or global (by target position, the earlier one on a tie), with attention o_proj and
FFN down weights and biases zero. A new layer then adds exactly 0 to the residual stream: its attention output
is o_proj(...) = 0 and its FFN output down(...) = 0, whatever its q/k/v, sinks or value-residual mixing
compute; the original layers see the same inputs and the same v_first, so the logits equal the source's.
(Layer 0 makes v_first and has no value-residual logit: a new layer that copies it takes layer 1's logit.)
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from vpmoe.errors import UserError
from vpmoe.model.config import ModelConfig, model_config_to_dict
from vpmoe.model.transformer import Transformer, build_model
from vpmoe.upcycle.stream import layer_names


def layer_mapping(n_src: int, n_tgt: int, every: int) -> tuple[list[int], list[int | None]]:
    """(source layer of each target layer, the original target position or None for new layers).

    Returns `copy_of[t]` (the source layer that target layer t copies) and `original[t]` (the source layer when t
    is an original, else None)."""
    if n_src % every or n_tgt % every or n_tgt < n_src:
        raise UserError(f"depth expansion needs whole blocks of {every} layers and a deeper target "
                        f"({n_src} -> {n_tgt})")
    s_blocks, t_blocks = n_src // every, n_tgt // every
    if s_blocks == 1:
        block_of = [0]
    else:
        block_of = [(2 * b * (t_blocks - 1) + (s_blocks - 1)) // (2 * (s_blocks - 1)) for b in range(s_blocks)]
    original: list[int | None] = [None] * n_tgt
    for b, tb in enumerate(block_of):
        for i in range(every):
            original[tb * every + i] = b * every + i
    copy_of = []
    for t in range(n_tgt):
        if original[t] is not None:
            copy_of.append(original[t])
            continue
        is_global = (t + 1) % every == 0
        same_kind = [u for u in range(n_tgt) if original[u] is not None and ((u + 1) % every == 0) == is_global]
        nearest = min(same_kind, key=lambda u: (abs(u - t), u))
        copy_of.append(original[nearest])
    return copy_of, original


def check_geometry(source: ModelConfig, target: ModelConfig) -> None:
    s, t = model_config_to_dict(source), model_config_to_dict(target)
    s["model"].pop("n_layers"), t["model"].pop("n_layers")
    s["model"].pop("name"), t["model"].pop("name")
    if s != t or not source.real:
        raise UserError("depth expansion keeps everything but the depth (and name) of a real-mode dense model; "
                        "the source and target configs differ elsewhere")
    if source.moe.enabled:
        raise UserError("depth expansion works on dense models")


@torch.no_grad()
def convert(source: Transformer, cfg: ModelConfig) -> tuple[Transformer, dict]:
    """The expanded model of a `source` held in memory (`target_tensors` streams the same tensors)."""
    model = build_model(cfg, init=False)
    src = source.state_dict()
    sd = model.state_dict()
    details: dict = {}
    for name, tensor in target_tensors(source.cfg, cfg, lambda names: {n: src[n] for n in names}, details):
        sd[name].copy_(tensor)
    return model, details


def target_tensors(source_cfg: ModelConfig, cfg: ModelConfig, read,
                   details: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the expanded model, layer by layer; `read(names)` gives the source's tensors by name (from
    memory or from disk; a source layer is read again for every target layer that copies it). `details` is filled
    with the step's record once the last layer is out."""
    check_geometry(source_cfg, cfg)
    copy_of, original = layer_mapping(source_cfg.model.n_layers, cfg.model.n_layers, cfg.attention.global_every)
    for t, s in enumerate(copy_of):
        if source_cfg.layer_kind(s) != cfg.layer_kind(t):
            raise AssertionError(f"layer kinds differ at target {t} <- source {s}")
    yield from read(["embed.weight"]).items()
    zeroed = ("attn.o_proj.weight", "attn.o_proj.bias", "mlp.down.weight", "mlp.down.bias")
    for t, s in enumerate(copy_of):
        prefix_t, prefix_s = f"layers.{t}.", f"layers.{s}."
        src = read(layer_names(source_cfg, s))
        for name in layer_names(cfg, t):
            leaf = name[len(prefix_t):]
            if original[t] is None and leaf in zeroed:
                yield name, torch.zeros_like(src[prefix_s + leaf])
            elif leaf == "value_residual_logit" and s == 0:
                # Layer 0 makes v_first and has no logit; a new layer copying it takes layer 1's.
                yield name, read(["layers.1.value_residual_logit"])["layers.1.value_residual_logit"]
            else:
                yield name, src[prefix_s + leaf]
    yield from read(["final_norm.weight", "head.weight"]).items()
    details.update({
        "source_layers": source_cfg.model.n_layers,
        "target_layers": cfg.model.n_layers,
        "copy_of": copy_of,
        "original": original,
        "new_layers": [t for t in range(cfg.model.n_layers) if original[t] is None],
        "identity_rule": "new layers: attn.o_proj and mlp.down weights and biases zero",
    })
