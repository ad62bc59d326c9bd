"""Batched sampling of completions (rollouts) from a Transformer, fast enough for on-policy distillation.

    sampler = Sampler(model, batch_size=256, max_prompt_len=1024, max_new_tokens=512, mode="compile")
    out = sampler.sample(prompts, generator=generator)   # Rollouts: tokens, mask, log-probs, stopped

Layout. Prompts are left-padded to the longest prompt of the call, so that all rows share one stream index per
decode step; the padding is masked out and positions start at 0 at each prompt's first token, as if each prompt
ran alone. One prefill forward (in row chunks of at most PREFILL_TOKENS tokens, reference attention) fills a
StaticKVCache sized at construction for max_prompt_len + max_new_tokens; each decode step writes one token per row
in place and attends over the preallocated slots (attention_ops.decode_attention): the whole ring of a local
layer, the first multiple of SPAN slots past the current token of a global one. The expert GEMMs of a step run
over the whole batch at once (the model's experts kernel).

Modes (the decode step; the prefill always runs eagerly):
- "eager": plain PyTorch, any device. The only mode on the CPU.
- "graph": CUDA; the whole decode step (all layers and the head) is captured as a CUDA graph (one per span) at
  construction and replayed.
- "compile": CUDA; as "graph", with each block's step compiled by torch.compile first (fewer, fused kernels).
CUDA-graph modes need the "grouped_mm" experts kernel (the others synchronize with the host). A graph replays
the parameters at the addresses seen at capture: update the weights in place (copy_), never rebind them.

Sampling. logits -> / temperature -> top-k -> top-p (the smallest set of tokens whose probability reaches top_p)
-> one token by the Gumbel-max rule argmax(z - log E), E ~ Exp(1) drawn from the caller's generator: an exact
draw from softmax(z), the rule torch.multinomial uses for one sample, without its host synchronization. In
"compile" mode the rule after the draw is compiled too (one pass over the [B, V] logits instead of several).
temperature 0 is greedy. Randomness comes from the generator alone: the same generator state and inputs give
the same rollouts bitwise on the CPU. Noise is drawn for all batch_size rows every step, so a row's sample
depends on its place in the batch.

Stopping. A row ends at its first stop token, which is kept; after it the row holds pad_id, mask False, log-probs
0. Stop detection stays on the device; whether every row has ended is checked (one host synchronization) every
`check_every` steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from vpmoe import tokenizer as tk
from vpmoe.errors import UserError
from vpmoe.model import attention_ops
from vpmoe.model.cache import StaticKVCache
from vpmoe.model.kernels import allow_recompiles
from vpmoe.model.moe import MoE
from vpmoe.model.positions import rope_inv_freq, rotary_cos_sin
from vpmoe.model.transformer import Block, Transformer

STOP_IDS = (tk.RETURN, tk.CALL, tk.ENDOFTEXT)
PREFILL_TOKENS = 32768  # rows per prefill chunk x prompt length: bounds the prefill's activations
# Full-length (global) layers attend over the first multiple of SPAN slots past the current token, not over all
# max_prompt_len + max_new_tokens of them: the cache reads grow with the stream. One CUDA graph per span.
SPAN = 256
MODES = ("eager", "graph", "compile")


@dataclass
class Rollouts:
    tokens: torch.Tensor  # [B, T] completion ids, T = the longest completion; pad_id after a row's end
    mask: torch.Tensor  # [B, T] bool, True on produced tokens (a final stop token included)
    lengths: torch.Tensor  # [B] int64 produced tokens per row
    # [B, T] log-prob of each token under the distribution it was drawn from (after temperature, top-k, top-p);
    # 0 where masked, and 0 everywhere for greedy decoding (a point mass)
    logprobs: torch.Tensor
    plain_logprobs: torch.Tensor  # [B, T] under the model at temperature 1 without filtering; 0 where masked
    stopped: torch.Tensor  # [B] bool: ended with a stop token (False: truncated at max_new_tokens)


class Sampler:
    """Samples completions for up to batch_size prompts per call; built once per model and shape (it holds the
    KV cache and, in the CUDA-graph modes, the captured decode step)."""

    def __init__(
        self,
        model: Transformer,
        *,
        batch_size: int,
        max_prompt_len: int,
        max_new_tokens: int,
        mode: Literal["eager", "graph", "compile"] = "eager",
        check_every: int = 32,
    ):
        if min(batch_size, max_prompt_len, max_new_tokens, check_every) <= 0:
            raise UserError(f"Sampler: batch_size ({batch_size}), max_prompt_len ({max_prompt_len}), max_new_tokens "
                            f"({max_new_tokens}) and check_every ({check_every}) must be positive")
        if mode not in MODES:
            raise UserError(f"Sampler: unknown mode {mode!r} ({', '.join(MODES)})")
        weight = model.embed.weight
        self.device, self.dtype = weight.device, weight.dtype
        model.kernels.check(self.device, self.dtype)
        if mode != "eager" and self.device.type != "cuda":
            raise UserError(f"Sampler mode {mode!r} needs CUDA, the model is on {self.device.type}; use mode='eager'")
        if mode != "eager" and model.kernels.experts != "grouped_mm":
            raise UserError(f"Sampler mode {mode!r} needs the experts kernel 'grouped_mm' (the model has "
                            f"{model.kernels.experts!r}, which synchronizes with the host)")
        self.model, self.mode, self.check_every = model, mode, check_every
        self.batch_size, self.max_prompt_len, self.max_new_tokens = batch_size, max_prompt_len, max_new_tokens
        self.wide = torch.promote_types(self.dtype, torch.float32)  # logits and log-probs
        self.cache = StaticKVCache(model.cfg, batch_size, max_prompt_len + max_new_tokens, self.device, self.dtype)
        self._token = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # the decode step's input
        self._positions = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self._block, self._pick = _decode_block, _pick_token
        if mode == "compile":
            allow_recompiles()
            self._block = torch.compile(_decode_block, dynamic=False)
            self._pick = torch.compile(_pick_token, dynamic=False)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # span -> (graph, its logits)
        if mode != "eager":
            self._capture()

    @torch.no_grad()
    def sample(
        self,
        prompts: list[list[int]],
        *,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        stop_ids: tuple[int, ...] | list[int] = STOP_IDS,
        pad_id: int = tk.EOD,
        max_new_tokens: int | None = None,
    ) -> Rollouts:
        """Completions of `prompts` (at most batch_size, none empty, none longer than max_prompt_len), each of at
        most max_new_tokens (default: the sampler's). generator (on the model's device) is needed unless
        temperature is 0."""
        new_tokens = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        self._check(prompts, generator, temperature, top_p, top_k, new_tokens)
        rows, batch = len(prompts), self.batch_size
        # Unused rows: a one-token prompt, ended from the start. Padding enters the model as id 0 (masked out);
        # pad_id only fills the completions.
        padded = list(prompts) + [[0]] * (batch - rows)
        longest = max(len(p) for p in padded)
        ids = torch.zeros(batch, longest, dtype=torch.long)
        for row, prompt in enumerate(padded):
            ids[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        pads = torch.tensor([longest - len(p) for p in padded])
        index = torch.arange(longest)
        ids, pads = ids.to(self.device), pads.to(self.device)
        doc_ids = (index.to(self.device)[None, :] >= pads[:, None]).long()  # padding is document 0
        positions = (index.to(self.device)[None, :] - pads[:, None]).clamp(min=0)

        self.cache.pads.copy_(pads)
        logits = self._prefill(ids, positions, doc_ids)
        self.cache.t.fill_(longest)
        self._positions.copy_(positions[:, -1] + 1)

        tokens = torch.full((batch, new_tokens), pad_id, dtype=torch.long, device=self.device)
        logprobs = torch.zeros(batch, new_tokens, dtype=self.wide, device=self.device)
        plain_logprobs = torch.zeros_like(logprobs)
        lengths = torch.zeros(batch, dtype=torch.long, device=self.device)
        done = torch.arange(batch, device=self.device) >= rows
        stops = torch.tensor(list(stop_ids), dtype=torch.long, device=self.device)
        for step in range(new_tokens):
            token, logprob, plain = _choose(logits, generator, temperature, top_k, top_p, self._pick)
            live = ~done
            tokens[:, step] = torch.where(live, token, pad_id)
            logprobs[:, step] = torch.where(live, logprob, 0.0)
            plain_logprobs[:, step] = torch.where(live, plain, 0.0)
            lengths += live.long()
            done = done | (token[:, None] == stops).any(-1)
            if step + 1 == new_tokens or ((step + 1) % self.check_every == 0 and bool(done.all())):
                break
            logits = self._decode(token, self._span(longest + step))

        longest_completion = int(lengths[:rows].max())
        mask = torch.arange(longest_completion, device=self.device)[None, :] < lengths[:rows, None]
        return Rollouts(
            tokens=tokens[:rows, :longest_completion], mask=mask, lengths=lengths[:rows],
            logprobs=logprobs[:rows, :longest_completion], plain_logprobs=plain_logprobs[:rows, :longest_completion],
            stopped=done[:rows])

    def _check(self, prompts, generator, temperature, top_p, top_k, new_tokens) -> None:
        if not prompts or len(prompts) > self.batch_size:
            raise UserError(f"Sampler.sample: got {len(prompts)} prompts, the sampler takes 1..{self.batch_size}")
        for row, prompt in enumerate(prompts):
            if not 0 < len(prompt) <= self.max_prompt_len:
                raise UserError(f"Sampler.sample: prompt {row} has {len(prompt)} tokens, the sampler takes "
                                f"1..{self.max_prompt_len}")
        if not 0 < new_tokens <= self.max_new_tokens:
            raise UserError(f"Sampler.sample: max_new_tokens = {new_tokens}, the sampler takes "
                            f"1..{self.max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1 or (top_k is not None and top_k <= 0):
            raise UserError(f"Sampler.sample: temperature ({temperature}) must be >= 0, top_p ({top_p}) in (0, 1], "
                            f"top_k ({top_k}) positive or None")
        if temperature > 0 and (generator is None or generator.device.type != self.device.type):
            raise UserError(f"Sampler.sample: sampling at temperature {temperature} needs a torch.Generator on "
                            f"{self.device}, got {None if generator is None else generator.device}")
        if torch.is_autocast_enabled(self.device.type):
            raise UserError("Sampler.sample runs in the parameters' dtype; call it outside autocast (sample from a "
                            "bf16 copy of fp32 master weights)")

    def _prefill(self, ids: torch.Tensor, positions: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
        """One forward over the prompts (row chunks), storing every layer's keys; the logits [B, V] of the first
        completion token."""
        model, cache = self.model, self.cache
        batch, length = ids.shape
        index = torch.arange(length, device=self.device)
        chunk = max(1, PREFILL_TOKENS // length)
        logits = []
        for start in range(0, batch, chunk):
            rows = slice(start, min(start + chunk, batch))
            rope = _rope(model, positions[rows])
            x = model.embed(ids[rows])
            v_first = None
            for block in model.layers:
                attn = block.attn
                q, k, v, materialized_v = attn.heads(
                    block.attn_norm(x), positions[rows], rope, v_first, _value_mix(block))
                cache.prefill(block.layer, rows, k, v)
                out = attention_ops.reference_attention(
                    q, k, v, q_index=index, k_index=index, q_doc=doc_ids[rows], k_doc=doc_ids[rows],
                    window=attn.window, alibi=attn.alibi, sinks=attn.sinks, scale=attn.scale)
                x = _feed_forward(block, x + attn.merge(out), model.kernels.experts)
                if block.layer == 0:
                    v_first = materialized_v
            logits.append(model.head(model.final_norm(x[:, -1])).to(self.wide))
        return torch.cat(logits)

    def _span(self, t: int) -> int:
        """The span of full-length layers that a step at stream index t reads."""
        return min(self.cache.capacity, (t // SPAN + 1) * SPAN)

    def _decode(self, token: torch.Tensor, span: int) -> torch.Tensor:
        self._token.copy_(token)
        if not self._graphs:
            return self._step(span)
        graph, logits = self._graphs[span]
        graph.replay()
        return logits

    def _step(self, span: int) -> torch.Tensor:
        """Feed self._token at stream index cache.t < span and positions self._positions through every layer,
        return the next token's logits [B, V], then advance t and the positions. Allocates nothing that outlives
        the step and reads only preallocated inputs: a CUDA graph replays it."""
        model, cache = self.model, self.cache
        positions = self._positions[:, None]
        rope = _rope(model, positions)
        read = [cache.span(layer, span) for layer in range(len(model.layers))]
        visibility = {slots: cache.visibility(slots) for slots in set(read)}
        x = model.embed(self._token[:, None])
        v_first = None
        for block in model.layers:
            slots = read[block.layer]
            visible, distance = visibility[slots]
            x, materialized_v = self._block(
                block, x, positions, rope, cache.k[block.layer][:, :, :slots], cache.v[block.layer][:, :, :slots],
                cache.t, visible, distance, v_first, model.kernels.experts)
            if block.layer == 0:
                v_first = materialized_v
        logits = model.head(model.final_norm(x[:, 0])).to(self.wide)
        cache.t.add_(1)
        self._positions.add_(1)
        return logits

    @torch.no_grad()
    def _capture(self) -> None:
        """One CUDA graph per span, sharing one memory pool: replays run one at a time on one stream, and each
        graph's output stays referenced, so no graph's memory is another's live data."""
        pool = torch.cuda.graph_pool_handle()
        spans = sorted({self._span(t) for t in range(self.cache.capacity)})
        for span in spans:
            # Warm-up steps (compilation, autotuning, cuBLAS workspaces) run on a side stream, as capture
            # requires. They write into the cache, which every sample() overwrites or masks before reading.
            self.cache.t.zero_()
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._step(span)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._step(span)
            self._graphs[span] = graph, logits


def _choose(
    logits: torch.Tensor,
    generator: torch.Generator | None,
    temperature: float,
    top_k: int | None,
    top_p: float,
    pick,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [B, V] (fp32 or wider) -> (token [B], its log-prob under the distribution drawn from [B], its
    log-prob at temperature 1 without filtering [B]). No host synchronization. pick: _pick_token or a compiled
    copy of it (the generator's draw stays outside compiled code)."""
    if temperature == 0:
        token = logits.argmax(-1)
        plain = logits.gather(1, token[:, None])[:, 0] - logits.logsumexp(-1)
        return token, torch.zeros_like(plain), plain
    noise = torch.empty_like(logits).exponential_(generator=generator)
    return pick(logits, noise, temperature, top_k, top_p)


def _pick_token(
    logits: torch.Tensor, noise: torch.Tensor, temperature: float, top_k: int | None, top_p: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Gumbel-max draw of _choose from Exp(1) noise [B, V]."""
    z = logits if temperature == 1 else logits / temperature
    if top_k is not None:
        kth = z.topk(min(top_k, z.shape[-1]), dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1:
        sorted_z, order = z.sort(dim=-1, descending=True)
        probs = sorted_z.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first token always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        z = z.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    # E = 0 would make -log E infinite; the clamp changes the draw with probability ~0 and keeps -inf masks.
    token = (z - noise.clamp(min=torch.finfo(noise.dtype).tiny).log()).argmax(-1)
    plain_normalizer = logits.logsumexp(-1)
    normalizer = plain_normalizer if z is logits else z.logsumexp(-1)
    logprob = z.gather(1, token[:, None])[:, 0] - normalizer
    plain = logits.gather(1, token[:, None])[:, 0] - plain_normalizer
    return token, logprob, plain


def _decode_block(
    block: Block,
    x: torch.Tensor,
    positions: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    keys: torch.Tensor,
    values: torch.Tensor,
    t: torch.Tensor,
    visible: torch.Tensor,
    distance: torch.Tensor,
    v_first: torch.Tensor | None,
    experts_kernel: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block.forward for one new token per row (x [B, 1, D]) at stream index t: its keys go into this layer's
    cache slots (keys, values [B, Hkv, S, hd]) in place, its query attends over them."""
    attn = block.attn
    q, k, v, materialized_v = attn.heads(block.attn_norm(x), positions, rope, v_first, _value_mix(block))
    slot = (t % keys.shape[2]).view(1)
    keys[:, :, slot] = k
    values[:, :, slot] = v
    out = attention_ops.decode_attention(
        q, keys, values, visible=visible, distance=distance, alibi=attn.alibi, sinks=attn.sinks, scale=attn.scale)
    return _feed_forward(block, x + attn.merge(out), experts_kernel), materialized_v


def _feed_forward(block: Block, x: torch.Tensor, experts_kernel: str) -> torch.Tensor:
    h = block.mlp_norm(x)
    if isinstance(block.mlp, MoE):
        return x + block.mlp.mix(h, experts_kernel)[0]
    return x + block.mlp(h)


def _value_mix(block: Block) -> torch.Tensor | None:
    logit = block.value_residual_logit
    return torch.sigmoid(logit) if logit is not None else None


def _rope(model: Transformer, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Compat mode's RoPE cos/sin for positions [B, S] (shared by all layers), as Transformer.body builds it."""
    if model.cfg.real:
        return None
    a = model.cfg.attention
    return rotary_cos_sin(positions, rope_inv_freq(a.head_dim, a.rope_base, device=positions.device))
