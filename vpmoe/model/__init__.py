"""The vpMoE model in plain PyTorch (architecture: the project's spec/architecture.md).

    cfg = load_model_config("vpMoE")                 # a shipped config by name, or a path to a TOML file
    model = build_model(cfg, device="cuda", dtype=torch.bfloat16, kernels=Kernels.named("fast"))
    out = model(input_ids, position_ids, doc_ids)   # ModelOutput(logits, aux_loss, routing_counts)
    model.update_expert_bias(global_counts)          # once per optimizer step
    rollouts = Sampler(model, batch_size=256, max_prompt_len=1024, max_new_tokens=512, mode="compile").sample(
        prompts, generator=generator)                # completions, masks and the sampler's log-probs

Weights on disk (safetensors, training checkpoints) are vpmoe.artifacts' business, not the model's.
"""

from vpmoe.model.cache import KVCache
from vpmoe.model.config import ModelConfig, load_model_config
from vpmoe.model.generate import Generation, generate
from vpmoe.model.kernels import Kernels
from vpmoe.model.params import count_params
from vpmoe.model.sample import Rollouts, Sampler
from vpmoe.model.transformer import ModelOutput, Transformer, build_model, positions_from_doc_ids

__all__ = [
    "Generation", "KVCache", "Kernels", "ModelConfig", "ModelOutput", "Rollouts", "Sampler", "Transformer",
    "build_model", "count_params", "generate", "load_model_config", "positions_from_doc_ids",
]
