"""The vpMoE / vpDense transformer: embedding, pre-norm blocks, final norm, untied head.

forward(input_ids [B, S], position_ids [B, S] | None, doc_ids [B, S] | None, cache=None) -> ModelOutput
- logits_at (bool [B, S], optional) computes logits only at those positions: ModelOutput.logits is then [N, V]
  in row-major order (training needs them at supervised positions only; the 201088-wide head dominates).
- head(hidden [N, D] (or [B, S, D]), head_weight [V, D]), optional, replaces the head: no logits are made and
  ModelOutput.head_output is what it returns (chunked losses straight from the final hidden states).
- doc_ids marks documents within a packed row: attention never crosses a change of doc id (padding may be its
  own document). position_ids restart at 0 in each document; when omitted they are derived from doc_ids.
- ModelOutput.aux_loss is the sum over MoE layers of seq_aux_loss (unscaled: multiply by cfg.moe.aux_loss_coeff);
  ModelOutput.routing_counts is [n_moe_layers, E] int64, tokens routed per expert in this forward, on device.
- With a KVCache, input_ids continue the cached stream; attention then runs the reference kernel whatever
  Kernels say (few queries per step, and FlexAttention would recompile for every cache length).
- Kernels (reference / fast) are a runtime choice, checked against the device and compute dtype on every call.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vpmoe.errors import UserError
from vpmoe.model.attention import Attention, AttentionContext, StaticBlockMasks
from vpmoe.model.cache import KVCache
from vpmoe.model.config import ModelConfig
from vpmoe.model.kernels import Kernels, allow_recompiles
from vpmoe.model.moe import DenseFFN, MoE
from vpmoe.model.norms import RMSNorm
from vpmoe.model.positions import rope_inv_freq, rotary_cos_sin

# Parameters and buffers that stay fp32 whatever the compute dtype (see Transformer.cast_).
FP32_NAMES = ("grape_log_freq", "expert_bias")


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, S, V]; None when a `head` function replaced the head
    aux_loss: torch.Tensor | None  # sum over MoE layers of seq_aux_loss, unscaled; None for dense models
    routing_counts: torch.Tensor | None  # [n_moe_layers, E] int64; None for dense models
    head_output: Any = None  # what the `head` function returned


@dataclass
class BodyOutput:
    hidden: torch.Tensor  # [B, S, D], after the final norm
    aux_loss: torch.Tensor | None
    routing_counts: torch.Tensor | None


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        dim, eps = cfg.model.hidden_size, cfg.model.norm_eps
        self.layer = layer
        self.attn_norm = RMSNorm(dim, eps)
        self.attn = Attention(cfg, layer)
        # Value residual: layers >= 1 of real mode mix in layer 0's V with lambda = sigmoid(logit).
        # Shape [1], not a 0-dim scalar: FSDP2 cannot shard 0-dim parameters.
        self.value_residual_logit = nn.Parameter(torch.zeros(1)) if cfg.real and layer > 0 else None
        self.mlp_norm = RMSNorm(dim, eps)
        if cfg.is_moe_layer(layer):
            self.mlp = MoE(dim, cfg.moe, bias=cfg.real)
        else:
            self.mlp = DenseFFN(dim, cfg.ffn.dense_width, bias=cfg.real)

    def forward(self, x, ctx: AttentionContext, experts_kernel: str, v_first=None, cache=None):
        mix = torch.sigmoid(self.value_residual_logit) if self.value_residual_logit is not None else None
        attn_out, v = self.attn(self.attn_norm(x), ctx, v_first=v_first, value_mix=mix, cache=cache)
        x = x + attn_out
        stats = None
        if isinstance(self.mlp, MoE):
            mlp_out, stats = self.mlp(self.mlp_norm(x), experts_kernel)
        else:
            mlp_out = self.mlp(self.mlp_norm(x))
        return x + mlp_out, v, stats

    @torch.no_grad()
    def reset_parameters(self, init_std: float, out_std: float) -> None:
        self.attn_norm.reset_parameters()
        self.mlp_norm.reset_parameters()
        self.attn.reset_parameters(init_std, out_std)
        self.mlp.reset_parameters(init_std, out_std)
        if self.value_residual_logit is not None:
            self.value_residual_logit.zero_()


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: Kernels | None = None):
        super().__init__()
        self.cfg = cfg
        self.kernels = kernels or Kernels()
        m = cfg.model
        self.embed = nn.Embedding(m.vocab_size, m.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, layer) for layer in range(m.n_layers))
        self.final_norm = RMSNorm(m.hidden_size, m.norm_eps)
        self.head = nn.Linear(m.hidden_size, m.vocab_size, bias=False)
        self.moe_layers = cfg.moe_layers
        # Recompute each block in backward instead of keeping its activations (training only).
        self.activation_checkpointing = False
        self.static_masks: StaticBlockMasks | None = None  # set by compile_blocks(cuda_graphs=True)
        self.init_weights()

    def set_kernels(self, kernels: Kernels) -> None:
        self.kernels = kernels

    def compile_blocks(self, cuda_graphs: bool = False) -> None:
        """torch.compile each block in place (parameter names unchanged). Blocks of one kind share compiled code.

        cuda_graphs: each block's forward and backward also replay as CUDA graphs (torch's "reduce-overhead"
        mode), which removes the per-kernel launch cost that dominates at these layer sizes. Then every forward
        is one full sequence (no KV cache) followed by its backward before the next forward starts, and
        parameter gradients must exist before the first backward (`Trainer` allocates them): a gradient that
        autograd would otherwise take over from a graph's output memory is overwritten by the next replay."""
        allow_recompiles()  # a few block kinds (dense, local, global; first/other layers), none may fall to eager
        for block in self.layers:
            block.compile(mode="reduce-overhead" if cuda_graphs else None)
        self.static_masks = StaticBlockMasks() if cuda_graphs else None

    @torch.no_grad()
    def init_weights(self) -> None:
        """Fresh-model initialization (a no-op on the meta device). Output projections get std / sqrt(2 L)."""
        m = self.cfg.model
        out_std = m.init_std / math.sqrt(2 * m.n_layers)
        nn.init.normal_(self.embed.weight, std=m.init_std)
        nn.init.normal_(self.head.weight, std=m.init_std)
        self.final_norm.reset_parameters()
        for block in self.layers:
            block.reset_parameters(m.init_std, out_std)

    def cast_(self, dtype: torch.dtype) -> Transformer:
        """Cast floating parameters and buffers to dtype, except the fp32-only ones (GRAPE-M log-frequencies,
        expert bias): their precision matters and they are tiny."""
        for name, tensor in list(self.named_parameters()) + list(self.named_buffers()):
            if tensor.is_floating_point() and not name.endswith(FP32_NAMES):
                tensor.data = tensor.data.to(dtype)
        return self

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_at: torch.Tensor | None = None,
        head: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
    ) -> ModelOutput:
        out = self.body(input_ids, position_ids, doc_ids, cache)
        hidden = out.hidden
        if logits_at is not None:  # the head only where a loss needs it: [N, V] instead of [B, S, V]
            hidden = hidden[logits_at]
        if head is not None:  # inside the forward, where FSDP2 has gathered the head's weight
            return ModelOutput(None, out.aux_loss, out.routing_counts, head(hidden, self.head.weight))
        return ModelOutput(self.head(hidden), out.aux_loss, out.routing_counts)

    def body(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> BodyOutput:
        """Everything but the head: the final-normed hidden states [B, S, D] and the MoE statistics."""
        batch, seq = input_ids.shape
        device = input_ids.device
        if self.static_masks is not None:
            if cache is not None or self.activation_checkpointing:
                raise UserError("blocks compiled with CUDA graphs run full-sequence forwards without activation "
                                "checkpointing; decode with a model built without train.compile = \"cudagraphs\"")
            torch.compiler.cudagraph_mark_step_begin()  # a new forward: the previous one's graph outputs are done
        start = cache.length if cache is not None else 0
        if doc_ids is None:
            doc_ids = torch.zeros_like(input_ids)
        if position_ids is None:
            position_ids = positions_from_doc_ids(doc_ids) + start
        ctx = AttentionContext(
            position_ids=position_ids,
            doc_ids=doc_ids,
            token_index=torch.arange(start, start + seq, device=device),
            # KV-cache decoding runs the reference kernel: few queries, and flex would recompile per cache length.
            kernel=self.kernels.attention if cache is None else "reference",
            static_masks=self.static_masks,
        )
        if not self.cfg.real:
            a = self.cfg.attention
            ctx.rope = rotary_cos_sin(position_ids, rope_inv_freq(a.head_dim, a.rope_base, device=device))

        if ctx.kernel == "flex":  # block masks built once per forward, before any (compiled) block reads them
            for window in {block.attn.window for block in self.layers}:
                ctx.block_mask(window)

        x = self.embed(input_ids)
        self.kernels.check(device, compute_dtype(x))
        recompute = self.activation_checkpointing and cache is None and torch.is_grad_enabled()
        v_first = None
        aux_losses, counts = [], []
        for block in self.layers:
            if recompute:
                x, v, stats = checkpoint(block, x, ctx, self.kernels.experts, v_first, use_reentrant=False)
            else:
                layer_cache = cache[block.layer] if cache is not None else None
                x, v, stats = block(x, ctx, self.kernels.experts, v_first=v_first, cache=layer_cache)
            if block.layer == 0:
                v_first = v
            if stats is not None:
                aux_losses.append(stats.aux_loss)
                counts.append(stats.counts)
        if cache is not None:
            cache.length += seq
        hidden = self.final_norm(x)
        if not counts:
            return BodyOutput(hidden, None, None)
        return BodyOutput(hidden, torch.stack(aux_losses).sum(), torch.stack(counts))

    @torch.no_grad()
    def update_expert_bias(self, counts: torch.Tensor) -> None:
        """Aux-loss-free balancing, once per optimizer step: counts [n_moe_layers, E] are the tokens routed per
        expert over the whole global batch (summed over micro-batches and all-reduced over ranks)."""
        if counts.shape != (len(self.moe_layers), self.cfg.moe.n_experts):
            raise ValueError(f"counts must be [{len(self.moe_layers)}, {self.cfg.moe.n_experts}], got "
                             f"{list(counts.shape)}")
        for row, layer in zip(counts, self.moe_layers):
            self.layers[layer].mlp.router.update_expert_bias(row, self.cfg.moe.bias_update_rate)

    def expert_biases(self) -> torch.Tensor:
        """[n_moe_layers, E] fp32, for health metrics."""
        return torch.stack([self.layers[layer].mlp.router.expert_bias for layer in self.moe_layers])


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on for x's device (fp32 master weights, bf16 compute),
    else x's own (which is the parameters' dtype, also under FSDP mixed precision)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def positions_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 wherever the doc id changes along a row, [B, S] int64."""
    batch, seq = doc_ids.shape
    index = torch.arange(seq, device=doc_ids.device).expand(batch, seq)
    new_doc = torch.ones_like(doc_ids, dtype=torch.bool)
    new_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    starts = torch.where(new_doc, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - starts


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                kernels: Kernels | None = None, init: bool = True) -> Transformer:
    """Construct on the meta device, allocate on `device`, initialize fresh weights (unless `init` is False: the
    caller loads every tensor next), optionally cast. Without init, the tensors are allocated in `dtype` directly:
    a model about to be loaded never exists in fp32 (a 6B MoE loads in bf16 in 12 GB, not 24)."""
    with torch.device("meta"):
        model = Transformer(cfg, kernels)
    if dtype is not None and not init:
        model.cast_(dtype)
    model.to_empty(device=device)
    if init:
        model.init_weights()
        if dtype is not None:
            model.cast_(dtype)
    return model
