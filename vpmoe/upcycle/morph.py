"""Step 3: `vpDense0-5_28.compat` -> `vpDense0-5_28.real` (lossy only where the function must change).

Per layer (kind from the target config: global when (l + 1) % global_every == 0, else local):
- every layer: norms copied; o_proj weight copied, o/qkv/MLP biases added as zeros; FFN copied; sinks at
  `sink_init` and value-residual logits at `value_residual_init` (default -10: exp(-10) in the softmax
  denominator, lambda = sigmoid(-10) ~ 4.5e-5, so both are near-identity).
- global layers: q/k/v projections copied (plain GQA); NoPE + ALiBi replace RoPE (the intended shock).
- local layers: GRAPE-M log-frequencies = scale * log(theta_i), theta_i = base^(-2i/head_dim): frozen, this is
  RoPE exactly (the model's own init, set explicitly). Sliding window (the intended shock).
  K and V exactly through the A-bias: A weight 0, A bias R * onehot(kv head) so that kv head h equals token
  factor h, whose B rows are the compat projection rows of head h (requires R_kv >= n_kv_heads; rows of the
  unused factors are 0). Q by truncated SVD across heads: W_q viewed as M [n_heads, head_dim * D] = U S V^T,
  rank R_q: A bias = R_q * sqrt(n_heads) * U[:, :R_q] (A weight 0), B_r = S_r V_r^T / sqrt(n_heads) (so a
  rank-1 M with equal heads gives A bias = R_q, B = the head's rows, as for K/V). Signs are fixed so that the
  largest-magnitude entry of each V_r is positive (deterministic). The relative Frobenius error
  |M - M_R| / |M| is recorded per local layer (0 when R_q >= n_heads).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from vpmoe.errors import UserError
from vpmoe.model.config import ModelConfig
from vpmoe.model.positions import grape_log_freq_init
from vpmoe.model.transformer import Transformer, build_model
from vpmoe.upcycle.stream import layer_names, layer_shapes


def check_geometry(source: ModelConfig, target: ModelConfig) -> None:
    s, t = source, target
    problems = []
    if s.model.mode != "compat" or t.model.mode != "real":
        problems.append("the morph turns a compat model into a real one")
    for section, key in (("model", "vocab_size"), ("model", "hidden_size"), ("model", "n_layers"),
                         ("attention", "n_heads"), ("attention", "n_kv_heads"), ("attention", "head_dim"),
                         ("attention", "rope_base"), ("ffn", "dense_width")):
        a, b = getattr(getattr(s, section), key), getattr(getattr(t, section), key)
        if a != b:
            problems.append(f"{section}.{key}: source {a} vs target {b}")
    if t.moe.enabled:
        problems.append("the target must be dense")
    if t.attention.tpa_kv_rank < t.attention.n_kv_heads:
        problems.append(f"attention.tpa_kv_rank {t.attention.tpa_kv_rank} < n_kv_heads {t.attention.n_kv_heads}: "
                        f"K/V cannot embed exactly")
    if problems:
        raise UserError("morph refused: " + "; ".join(problems))


def svd_heads(weight: torch.Tensor, n_heads: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rank-`rank` TPA factors of a GQA projection [n_heads * hd, D]: (A bias [n_heads, rank], B [rank * hd, D],
    relative Frobenius error)."""
    out_dim, dim = weight.shape
    hd = out_dim // n_heads
    m = weight.double().reshape(n_heads, hd * dim)
    a_bias, b = _head_factors(m, rank)
    approx = (a_bias / rank) @ b
    err = float((m - approx).norm() / m.norm().clamp_min(1e-300))
    return a_bias.float(), b.reshape(rank * hd, dim).float(), err


def svd_heads_whitened(weight: torch.Tensor, n_heads: int, rank: int, gram: torch.Tensor,
                       ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, float]:
    """As `svd_heads`, but the best rank-`rank` approximation on activations instead of in weight space.

    With X the layer's (normed) inputs and `gram` = X^T X [D, D] = L L^T (Cholesky, after adding `ridge` times its
    mean diagonal), the error on activations is sum_h |X (W_h - W'_h)^T|^2 = |(M - M') (I (x) L)|^2 for M the heads
    matrix [n_heads, hd * D]: the truncated SVD of the whitened M (I (x) L) is optimal (Eckart-Young), and B is
    mapped back by L^-1. The returned error is relative and on activations: |X (W - W')^T| / |X W^T|."""
    out_dim, dim = weight.shape
    hd = out_dim // n_heads
    g = gram.double()
    g = g + ridge * g.diagonal().mean().clamp_min(1e-300) * torch.eye(dim, dtype=torch.float64)
    chol = torch.linalg.cholesky(g)
    whitened = (weight.double().reshape(n_heads, hd, dim) @ chol).reshape(n_heads, hd * dim)
    a_bias, b_white = _head_factors(whitened, rank)
    approx = (a_bias / rank) @ b_white
    err = float((whitened - approx).norm() / whitened.norm().clamp_min(1e-300))
    b = torch.linalg.solve_triangular(chol, b_white.reshape(rank * hd, dim), upper=False, left=False)
    return a_bias.float(), b.float(), err


def _head_factors(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A bias [n_heads, rank] and B [rank, cols] with (A / rank) B the best rank-`rank` approximation of m [n_heads,
    cols] (float64; signs fixed so that the largest-magnitude entry of each row of B is positive)."""
    n_heads = m.shape[0]
    u, s, vt = torch.linalg.svd(m, full_matrices=False)
    k = min(rank, s.numel())
    u, s, vt = u[:, :k], s[:k], vt[:k]
    flip = torch.sign(vt.gather(1, vt.abs().argmax(1, keepdim=True)))[:, 0]
    flip[flip == 0] = 1
    u, vt = u * flip, vt * flip[:, None]
    a_bias = torch.zeros(n_heads, rank, dtype=torch.float64)
    b = torch.zeros(rank, m.shape[1], dtype=torch.float64)
    a_bias[:, :k] = rank * math.sqrt(n_heads) * u
    b[:k] = s[:, None] * vt / math.sqrt(n_heads)
    return a_bias, b


def kv_exact(weight: torch.Tensor, n_kv: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A bias R * onehot(head) [n_kv, R] and B [R * hd, D] whose first n_kv factors are the head rows."""
    hd = weight.shape[0] // n_kv
    a_bias = torch.zeros(n_kv, rank)
    a_bias[torch.arange(n_kv), torch.arange(n_kv)] = float(rank)
    b = torch.zeros(rank * hd, weight.shape[1])
    b[: n_kv * hd] = weight
    return a_bias, b


@torch.no_grad()
def convert(source: Transformer, cfg: ModelConfig, sink_init: float = -10.0,
            value_residual_init: float = -10.0) -> tuple[Transformer, dict]:
    """The real model of a compat `source` held in memory (`target_tensors` streams the same tensors)."""
    model = build_model(cfg)
    src = source.state_dict()
    sd = model.state_dict()
    details: dict = {}
    for name, tensor in target_tensors(source.cfg, cfg, lambda names: {n: src[n] for n in names}, details, sink_init,
                                       value_residual_init):
        sd[name].copy_(tensor)
    return model, details


COPIED = ("attn_norm.weight", "mlp_norm.weight", "attn.q_norm.weight", "attn.k_norm.weight", "attn.o_proj.weight",
          "mlp.up.weight", "mlp.down.weight")


def target_tensors(source_cfg: ModelConfig, cfg: ModelConfig, read, details: dict, sink_init: float = -10.0,
                   value_residual_init: float = -10.0) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the real model, layer by layer; `read(names)` gives the compat source's tensors by name (from
    memory or from disk). `details` gets the step's record once the last layer is out."""
    check_geometry(source_cfg, cfg)
    a = cfg.attention
    yield from read(["embed.weight"]).items()
    svd_errors = {}
    kinds = []
    for layer in range(cfg.model.n_layers):
        p = f"layers.{layer}."
        kind = cfg.layer_kind(layer)
        kinds.append(kind)
        shapes = layer_shapes(cfg, layer)
        src = read(layer_names(source_cfg, layer))
        out = {p + name: src[p + name] for name in COPIED}
        for name, shape in shapes.items():  # every bias starts at zero (the TPA A biases are set below)
            if name.endswith(".bias") or name.endswith("_bias"):
                out[name] = torch.zeros(shape)
        out[p + "attn.sinks"] = torch.full(shapes[p + "attn.sinks"], sink_init)
        if p + "value_residual_logit" in shapes:
            out[p + "value_residual_logit"] = torch.full(shapes[p + "value_residual_logit"], value_residual_init)
        if kind == "global":
            for name in ("q_proj", "k_proj", "v_proj"):
                out[p + f"attn.{name}.weight"] = src[p + f"attn.{name}.weight"]
        else:
            out[p + "attn.grape_log_freq"] = grape_log_freq_init(a.head_dim, a.rope_base, a.grape_log_freq_scale)
            a_bias, b, err = svd_heads(src[p + "attn.q_proj.weight"], a.n_heads, a.tpa_q_rank)
            out[p + "attn.q_a.weight"] = torch.zeros(shapes[p + "attn.q_a.weight"])
            out[p + "attn.q_a.bias"] = a_bias.flatten()
            out[p + "attn.q_b.weight"] = b
            svd_errors[str(layer)] = err
            for name in ("k", "v"):
                a_bias, b = kv_exact(src[p + f"attn.{name}_proj.weight"], a.n_kv_heads, a.tpa_kv_rank)
                out[p + f"attn.{name}_a.weight"] = torch.zeros(shapes[p + f"attn.{name}_a.weight"])
                out[p + f"attn.{name}_a.bias"] = a_bias.flatten()
                out[p + f"attn.{name}_b.weight"] = b
        for name in shapes:
            if name not in out:
                raise AssertionError(f"the morph makes no {name!r}")
            yield name, out.pop(name)
        if out:
            raise AssertionError(f"the morph made tensors the real layer does not have: {sorted(out)}")
    yield from read(["final_norm.weight", "head.weight"]).items()
    details.update({
        "layer_kinds": kinds,
        "q_svd_rank": a.tpa_q_rank,
        "q_svd_relative_error": svd_errors,
        "q_svd_relative_error_mean": sum(svd_errors.values()) / max(len(svd_errors), 1),
        "sink_init": sink_init,
        "value_residual_init": value_residual_init,
        "exact": ["GRAPE-M = RoPE (frozen frequencies)", "K/V through the A-bias", "zero biases"],
        "function_changes": ["window on local layers", "NoPE + ALiBi on global layers",
                             "rank-R_q Q on local layers", "sinks and value residual (near-identity)"],
    })
