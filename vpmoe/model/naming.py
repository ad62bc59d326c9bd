"""Parameter names of the vpMoE model and what they are.

Every module that treats parameters by role (optimizer routing, freezing, weight decay, checkpoint conversion)
asks this file, so that the naming lives in one place. Names are relative to the model (no prefix):

    embed.weight                                  [V, D]      embedding
    head.weight                                   [V, D]      head (untied)
    final_norm.weight, layers.N.attn_norm.weight, layers.N.mlp_norm.weight,
    layers.N.attn.q_norm.weight, layers.N.attn.k_norm.weight             norm
    layers.N.attn.{q,k,v,o}_proj.weight           2-D         matrix   (global layers and compat mode)
    layers.N.attn.{q,k,v}_a.weight, {q,k,v}_b.weight  2-D     matrix   (TPA factors on local layers)
    *.bias                                        1-D/2-D     bias
    layers.N.attn.{q,k,v}_bias                    [H*hd]      bias     (local layers: added to the TPA q/k/v)
    layers.N.attn.sinks                           [H]         sink
    layers.N.attn.grape_log_freq                  [head_dim/2] frequency
    layers.N.value_residual_logit                 [1]         value_residual
    layers.N.mlp.{up,down}.weight                 2-D         matrix   (dense FFN)
    layers.N.mlp.shared.{up,down}.weight          2-D         matrix   (shared expert)
    layers.N.mlp.experts.{up,down}                [E, out, in] expert_bank
    layers.N.mlp.experts.{up,down}_bias           [E, out]    bias
    layers.N.mlp.router.weight                    [E, D]      router

Buffers (in state_dict and checkpoints, never parameters): layers.N.mlp.router.expert_bias [E] fp32, the
aux-loss-free balancing bias, updated by Transformer.update_expert_bias, not by an optimizer.
"""

from __future__ import annotations

KINDS = (
    "embedding", "head", "norm", "matrix", "expert_bank", "bias", "sink", "value_residual", "frequency", "router",
)
FREEZE_GROUPS = (
    "embeddings", "attention", "router", "experts", "shared_expert", "dense_ffn", "norms", "head",
)


def param_kind(name: str) -> str:
    """The role of a parameter, one of KINDS. Unknown names raise ValueError."""
    leaf = name.rsplit(".", 1)[-1]
    if name == "embed.weight":
        return "embedding"
    if name == "head.weight":
        return "head"
    if "norm." in name and leaf == "weight":
        return "norm"
    if leaf == "bias" or leaf.endswith("_bias"):
        return "bias"
    if leaf == "sinks":
        return "sink"
    if leaf == "grape_log_freq":
        return "frequency"
    if leaf == "value_residual_logit":
        return "value_residual"
    if name.endswith(".router.weight"):
        return "router"
    if ".mlp.experts." in name and leaf in ("up", "down"):
        return "expert_bank"
    if leaf == "weight" and (".attn." in name or ".mlp." in name):
        return "matrix"
    raise ValueError(f"parameter {name!r} has no known role (see vpmoe/model/naming.py)")


def freeze_group(name: str) -> str:
    """The named group a parameter belongs to for freezing, one of FREEZE_GROUPS."""
    if name.startswith("embed."):
        return "embeddings"
    if name.startswith("head."):
        return "head"
    if param_kind(name) == "norm":
        return "norms"
    if ".attn." in name or name.endswith(".value_residual_logit"):
        return "attention"
    if ".mlp.router." in name:
        return "router"
    if ".mlp.experts." in name:
        return "experts"
    if ".mlp.shared." in name:
        return "shared_expert"
    if ".mlp." in name:
        return "dense_ffn"
    raise ValueError(f"parameter {name!r} is in no freeze group (see vpmoe/model/naming.py)")
