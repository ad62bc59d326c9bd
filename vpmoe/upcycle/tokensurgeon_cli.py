"""`python -m vpmoe.upcycle.tokensurgeon_cli ARGS...`: mergekit-tokensurgeon, unchanged, with the GPT-OSS architecture
known to mergekit.

mergekit 0.1.5 ships no architecture definition for GptOssForCausalLM and cannot infer one (it finds "multiple input
embeddings"), so a gpt-oss vocabulary donor fails out of the box. tokensurgeon reads only a donor's input embedding
and output head, so a definition that names those (and the final norm) is all it needs; the layer templates are
listed for completeness (bf16 names; the MXFP4 release stores the expert weights as *_blocks/*_scales, which
tokensurgeon never reads). The definition is registered in mergekit's in-process table before its CLI runs;
mergekit itself is not patched.
"""

from __future__ import annotations

import json

GPT_OSS = {
    "model_type": "gpt_oss",
    "architectures": ["GptOssForCausalLM"],
    "pre_weights": [{"name": "model.embed_tokens.weight", "vocabulary_axis": 0}],
    "post_weights": [
        {"name": "model.norm.weight"},
        {"name": "lm_head.weight", "vocabulary_axis": 0, "optional": True, "tied_names": ["model.embed_tokens.weight"]},
    ],
    "num_layers_config_key": "num_hidden_layers",
    "layer_templates": {"weights": [
        {"name": "model.layers.${layer_index}." + leaf} for leaf in (
            "input_layernorm.weight", "post_attention_layernorm.weight",
            "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias",
            "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.o_proj.weight", "self_attn.o_proj.bias",
            "self_attn.sinks", "mlp.router.weight", "mlp.router.bias", "mlp.experts.gate_up_proj",
            "mlp.experts.gate_up_proj_bias", "mlp.experts.down_proj", "mlp.experts.down_proj_bias")
    ]},
}


def register_architectures() -> None:
    from mergekit.architecture import json_definitions

    arch = json_definitions._load_architecture_json(json.dumps(GPT_OSS))
    for name in arch.architectures:
        if name not in json_definitions.NAME_TO_ARCH:
            json_definitions.NAME_TO_ARCH[name] = [arch]
            json_definitions.JSON_ARCHITECTURES.append(arch)


def main() -> None:
    register_architectures()
    from mergekit.scripts.tokensurgeon import main as tokensurgeon

    tokensurgeon()


if __name__ == "__main__":
    main()
