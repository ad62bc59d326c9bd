"""Step 2: `qwen3-0_6B-o200k` (Hugging Face Qwen3) -> `vpDense0-5_28.compat` (head + FFN surgery, lossy).

- Embeddings untied: the input embedding and the output head each get their own copy (of lm_head when the donor
  has one, else of the tied embedding).
- Heads: Q heads n_q -> n_q' and KV heads n_kv -> n_kv' by mean pooling adjacent heads (target head i = mean of
  source heads g*i .. g*i + g - 1 of the q/k/v projection rows). QK-norm gains are copied (one gain per layer,
  shared by all heads, applied after the projection, so pooling never rescales q/k as the norm sees them).
- O-projection rule: the o_proj input block of target head i is the SUM of the blocks of the source q heads it
  merges. Why: the source output is sum_h O_h a_h with a_h head h's attention output. Pooled q attends with
  (roughly) the merged heads' average pattern over mean-pooled values, so the target head's output a_i estimates
  the merged heads' average output; sum_h O_h a_h = (sum_h O_h) a_i then holds exactly when the merged heads agree
  (identical q rows within a q group and identical k/v rows within a KV group), which is what "magnitudes are
  kept" means here and what the tests check: a donor with duplicated heads converts without any change of its
  attention output. Averaging O instead would scale coherent heads' output by 1/g.
- GQA: source q head h reads KV head h // (n_q / n_kv); pooled q head i must read the pooled KV head that holds
  the KV heads of all its source heads. Adjacent pooling guarantees it (checked).
- FFN "method A": keep the `dense_width` intermediate units with the largest down-projection column L2 norm (ties:
  lower index first), copy their up rows and down columns, drop the gate, switch SiLU-GLU to ReLU^2.
  The selected indices (ascending) are recorded per layer.
- "fit" (activation-aware, optional): the same structure, then layer by layer on calibration text the o_proj
  and FFN down matrices are refit by ridge least squares so the student's residual stream tracks the donor's:
  for layer l with student residual h (its own, earlier layers already fitted), the attention target is
  donor_mid_l - h and the FFN target donor_out_l - (h + attention); the features are the student's own
  (pooled-head attention outputs; ReLU^2 of the kept up rows).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from vpmoe.errors import UserError
from vpmoe.model.attention import AttentionContext
from vpmoe.model.config import ModelConfig
from vpmoe.model.positions import rope_inv_freq, rotary_cos_sin
from vpmoe.model.transformer import Transformer, build_model, positions_from_doc_ids
from vpmoe.upcycle import hf
from vpmoe.upcycle.stream import fitted_layers, layer_names

HF_LAYER_LEAVES = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_norm.weight",
                   "self_attn.k_norm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                   "self_attn.v_proj.weight", "self_attn.o_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


def check_geometry(facts: dict, cfg: ModelConfig) -> None:
    """Refuse a target config that the donor cannot be pooled into."""
    a = cfg.attention
    problems = []
    if cfg.model.mode != "compat":
        problems.append("the target must be a compat-mode model")
    pairs = (("hidden", cfg.model.hidden_size), ("layers", cfg.model.n_layers), ("head_dim", a.head_dim),
             ("vocab", cfg.model.vocab_size))
    problems += [f"{k}: donor {facts[k]} vs target {v}" for k, v in pairs if facts[k] != v]
    if facts["heads"] % a.n_heads or facts["kv_heads"] % a.n_kv_heads:
        problems.append(f"heads {facts['heads']}/{facts['kv_heads']} do not pool into {a.n_heads}/{a.n_kv_heads}")
    if cfg.ffn.dense_width > facts["intermediate"]:
        problems.append(f"ffn.dense_width {cfg.ffn.dense_width} exceeds the donor's {facts['intermediate']} units")
    if facts["rope_theta"] is not None and facts["rope_theta"] != a.rope_base:
        problems.append(f"RoPE base: donor {facts['rope_theta']} vs target {a.rope_base}")
    if not problems:
        gq, gk = facts["heads"] // a.n_heads, facts["kv_heads"] // a.n_kv_heads
        src_rep, tgt_rep = facts["heads"] // facts["kv_heads"], a.n_heads // a.n_kv_heads
        for i in range(a.n_heads):
            kv_target = i // tgt_rep
            for h in range(gq * i, gq * i + gq):
                if (h // src_rep) // gk != kv_target:
                    problems.append(f"pooled q head {i} would read KV head {kv_target}, but its source head {h} "
                                    f"reads KV head {h // src_rep}, which is pooled elsewhere")
                    break
    if problems:
        raise UserError("head/FFN surgery refused: " + "; ".join(problems))


def pool_rows(weight: torch.Tensor, n_src: int, n_tgt: int, head_dim: int) -> torch.Tensor:
    """[n_src * hd, D] -> [n_tgt * hd, D]: target head i = mean of source heads g*i .. g*i + g - 1."""
    g = n_src // n_tgt
    return weight.view(n_tgt, g, head_dim, -1).mean(1).reshape(n_tgt * head_dim, -1)


def sum_cols(weight: torch.Tensor, n_src: int, n_tgt: int, head_dim: int) -> torch.Tensor:
    """o_proj [D, n_src * hd] -> [D, n_tgt * hd]: target block i = sum of the merged source heads' blocks."""
    g = n_src // n_tgt
    return weight.view(weight.shape[0], n_tgt, g, head_dim).sum(2).reshape(weight.shape[0], n_tgt * head_dim)


def select_units(down: torch.Tensor, width: int) -> torch.Tensor:
    """FFN method A: the `width` units with the largest down-proj column L2 norm, ascending indices."""
    norms = down.double().norm(dim=0)
    order = torch.argsort(norms, descending=True, stable=True)
    return order[:width].sort().values


@torch.no_grad()
def convert(state: dict[str, torch.Tensor], facts: dict, cfg: ModelConfig, method: str = "mean",
            donor=None, fit_rows=None, ridge: float = 1e-3, donor_states=None) -> tuple[Transformer, dict]:
    """Build the compat model from donor weights `state` (HF names). `donor`/`fit_rows` serve method "fit"
    (`donor_states` optionally reuses donor_residual_states(donor, fit_rows))."""
    if method not in ("mean", "fit"):
        raise UserError(f"surgery.method must be 'mean' or 'fit', got {method!r}")
    model = build_model(cfg)
    sd = model.state_dict()
    details: dict = {}
    facts = {**facts, "head_rows": state[hf.HEAD].shape[0] if hf.HEAD in state else None}
    for name, tensor in target_tensors(facts, cfg, lambda names: {n: state[n] for n in names}, details):
        sd[name].copy_(tensor)
    details["method"] = method
    if method == "fit":
        if donor is None or not fit_rows:
            raise ValueError("method 'fit' needs the donor model and calibration rows")
        details["fit"] = fit_residual_stream(model, donor, fit_rows, ridge, donor_states)
    return model, details


def target_tensors(facts: dict, cfg: ModelConfig, read, details: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the compat model by pooling and unit selection (method "mean"), layer by layer; `read(names)`
    gives the donor's tensors by HF name (from memory or from disk). `details` gets the step's record at the end."""
    check_geometry(facts, cfg)
    a = cfg.attention
    hd = a.head_dim
    tied = not facts["head_rows"]
    yield "embed.weight", read([hf.EMBED])[hf.EMBED]
    selected = []
    for layer in range(cfg.model.n_layers):
        src = f"model.layers.{layer}."
        dst = f"layers.{layer}."
        state = read([src + leaf for leaf in HF_LAYER_LEAVES])
        out = {
            "attn_norm.weight": state[src + "input_layernorm.weight"],
            "mlp_norm.weight": state[src + "post_attention_layernorm.weight"],
            "attn.q_norm.weight": state[src + "self_attn.q_norm.weight"],
            "attn.k_norm.weight": state[src + "self_attn.k_norm.weight"],
            "attn.q_proj.weight": pool_rows(state[src + "self_attn.q_proj.weight"], facts["heads"], a.n_heads, hd),
            "attn.o_proj.weight": sum_cols(state[src + "self_attn.o_proj.weight"], facts["heads"], a.n_heads, hd),
        }
        for name in ("k_proj", "v_proj"):
            out[f"attn.{name}.weight"] = pool_rows(state[src + f"self_attn.{name}.weight"], facts["kv_heads"],
                                                   a.n_kv_heads, hd)
        down = state[src + "mlp.down_proj.weight"]
        units = select_units(down, cfg.ffn.dense_width)
        out["mlp.up.weight"] = state[src + "mlp.up_proj.weight"][units]
        out["mlp.down.weight"] = down[:, units]
        selected.append(units.tolist())
        for name in layer_names(cfg, layer):
            yield name, out.pop(name[len(dst):])
        if out:
            raise AssertionError(f"surgery made tensors the compat layer does not have: {sorted(out)}")
    yield "final_norm.weight", read(["model.norm.weight"])["model.norm.weight"]
    # a tied donor's head is its embedding, read again (a copy of its own: the two rows blocks are untied here)
    yield "head.weight", read([hf.EMBED if tied else hf.HEAD])[hf.EMBED if tied else hf.HEAD].clone()
    details.update({
        "method": "mean",
        "q_heads": [facts["heads"], a.n_heads],
        "kv_heads": [facts["kv_heads"], a.n_kv_heads],
        "head_pooling": "mean of adjacent heads (q, k, v rows); o_proj input blocks summed",
        "ffn": "method A: top dense_width units by down-proj column L2 norm; up rows + down columns; gate dropped; "
               "ReLU^2",
        "tied_donor_embeddings": tied,
        "selected_units": selected,
    })


def _context(cfg: ModelConfig, ids: torch.Tensor) -> AttentionContext:
    """What Transformer.forward builds for one unpacked compat row [1, S]."""
    doc_ids = torch.zeros_like(ids)
    position_ids = positions_from_doc_ids(doc_ids)
    ctx = AttentionContext(position_ids=position_ids, doc_ids=doc_ids, token_index=torch.arange(ids.shape[1]),
                           kernel="reference")
    a = cfg.attention
    ctx.rope = rotary_cos_sin(position_ids, rope_inv_freq(a.head_dim, a.rope_base))
    return ctx


def _lstsq(features: torch.Tensor, target: torch.Tensor, ridge: float) -> torch.Tensor:
    """W [out, in] minimizing |features W^T - target|^2 + lam |W|^2, lam = ridge * mean diag of the Gram matrix."""
    x, y = features.double(), target.double()
    gram = x.T @ x
    lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
    gram.diagonal().add_(lam)
    return torch.linalg.solve(gram, x.T @ y).T.float()


class DonorWalk:
    """The donor's residual stream on the rows, one Hugging Face decoder layer at a time: `step(layer)` (the model's
    own layer module, loaded) returns per row its stream after the layer's attention and after its MLP, [S, D], and
    moves on. The one code path of the in-memory and the streamed fit (the latter loads one layer at a time into a
    model built on the meta device)."""

    def __init__(self, donor, embed: torch.Tensor, rows):
        from transformers.masking_utils import create_causal_mask

        config = donor.config
        if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ["full_attention"]):
            raise UserError("surgery.method = \"fit\": the donor has sliding-window layers, which it does not handle")
        ids = [torch.from_numpy(r.tokens.astype("int64"))[None] for r in rows]
        with torch.no_grad():
            self.hs = [embed[x] for x in ids]
        self.positions = [torch.arange(x.shape[1])[None] for x in ids]
        self.masks = [create_causal_mask(config=config, inputs_embeds=h, attention_mask=None, cache=None,
                                         position_ids=p) for h, p in zip(self.hs, self.positions)]
        rotary = donor.model.rotary_emb
        if rotary.inv_freq.is_meta:  # a meta-device skeleton: a real rotary embedding of the same config
            rotary = type(rotary)(config)
        with torch.no_grad():
            self.rope = [rotary(h, p) for h, p in zip(self.hs, self.positions)]

    @torch.no_grad()
    def step(self, layer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        mids, outs, attn_out = [], [], []
        hook = layer.self_attn.register_forward_hook(
            lambda mod, args, out: attn_out.append(out[0] if isinstance(out, tuple) else out))
        try:
            new = [layer(h, attention_mask=m, position_embeddings=r, position_ids=p)
                   for h, m, r, p in zip(self.hs, self.masks, self.rope, self.positions)]
        finally:
            hook.remove()
        new = [o[0] if isinstance(o, tuple) else o for o in new]
        for h, a, o in zip(self.hs, attn_out, new):
            mids.append((h + a)[0])
            outs.append(o[0])
        self.hs = new
        return mids, outs


@torch.no_grad()
def donor_residual_states(donor, rows) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Per calibration row: the donor's residual stream after each layer's attention and after its MLP, [S, D]."""
    walk = DonorWalk(donor, donor.model.embed_tokens.weight, rows)
    per_layer = [walk.step(layer) for layer in donor.model.layers]
    return [([m[r] for m, _ in per_layer], [o[r] for _, o in per_layer]) for r in range(len(rows))]


class FitWalk:
    """fit_residual_stream one layer at a time: `step(layer, block)` refits the compat block's o_proj and FFN down
    (in place) against the donor's layer, given by `donor_layer(layer)` (states precomputed by
    donor_residual_states, or a DonorWalk step)."""

    def __init__(self, cfg: ModelConfig, embed: torch.Tensor, rows, ridge: float, donor_layer):
        ids = [torch.from_numpy(r.tokens.astype("int64"))[None] for r in rows]
        self.contexts = [_context(cfg, x) for x in ids]
        with torch.no_grad():
            self.h = [embed[x][0] for x in ids]
        self.tokens, self.ridge, self.donor_layer = sum(x.shape[1] for x in ids), ridge, donor_layer
        self.layers: list[dict] = []

    @torch.no_grad()
    def step(self, layer: int, block) -> None:
        h, ridge = self.h, self.ridge
        donor_mids, donor_outs = self.donor_layer(layer)
        feats = []
        hook = block.attn.o_proj.register_forward_pre_hook(lambda mod, args: feats.append(args[0][0]))
        try:
            for x, ctx in zip(h, self.contexts):
                block.attn(block.attn_norm(x[None]), ctx)
        finally:
            hook.remove()
        a_feat = torch.cat(feats)
        a_target = torch.cat([donor_mids[r] - h[r] for r in range(len(h))])
        before = _rel_err(a_feat @ block.attn.o_proj.weight.T, a_target)
        block.attn.o_proj.weight.copy_(_lstsq(a_feat, a_target, ridge))
        after = _rel_err(a_feat @ block.attn.o_proj.weight.T, a_target)
        mids = [x + f @ block.attn.o_proj.weight.T for x, f in zip(h, feats)]
        f_feats = [torch.relu(block.mlp.up(block.mlp_norm(m))).square() for m in mids]
        m_feat = torch.cat(f_feats)
        m_target = torch.cat([donor_outs[r] - mids[r] for r in range(len(h))])
        ffn_before = _rel_err(m_feat @ block.mlp.down.weight.T, m_target)
        block.mlp.down.weight.copy_(_lstsq(m_feat, m_target, ridge))
        ffn_after = _rel_err(m_feat @ block.mlp.down.weight.T, m_target)
        self.h = [m + f @ block.mlp.down.weight.T for m, f in zip(mids, f_feats)]
        self.layers.append({"layer": layer, "attn_rel_err": [before, after], "ffn_rel_err": [ffn_before, ffn_after]})

    def report(self) -> dict:
        return {"tokens": self.tokens, "ridge": self.ridge, "layers": self.layers,
                "note": "rel_err = |prediction - target| / |target| before and after the fit, on the fit data"}


def fit_residual_stream(model: Transformer, donor, rows, ridge: float, states=None) -> dict:
    """Refit o_proj and FFN down of every layer, in order, by ridge least squares (see the module docstring).
    `states` (from donor_residual_states) may be passed to reuse the donor's forward."""
    if states is not None:
        donor_layer = lambda layer: ([s[0][layer] for s in states], [s[1][layer] for s in states])  # noqa: E731
    else:
        walk = DonorWalk(donor, donor.model.embed_tokens.weight, rows)
        donor_layer = lambda layer: walk.step(donor.model.layers[layer])  # noqa: E731
    fit = FitWalk(model.cfg, model.embed.weight, rows, ridge, donor_layer)
    for layer, block in enumerate(model.layers):
        fit.step(layer, block)
    return fit.report()


def streamed_fit_tensors(directory, cfg: ModelConfig, tensors: Iterator[tuple[str, torch.Tensor]], rows,
                         ridge: float, details: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """Method "fit" from the donor's safetensors, one layer at a time: `tensors` is target_tensors' stream (method
    "mean"); each compat layer is gathered from it and refitted against the donor's layer, loaded alone into a
    donor skeleton on the meta device. details["fit"] gets fit_residual_stream's report at the end."""
    from transformers import AutoConfig, AutoModelForCausalLM

    reader = hf.TensorReader(directory)
    with torch.device("meta"):
        donor = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(directory)), dtype=torch.float32)
    donor.eval()
    embed = reader([hf.EMBED])[hf.EMBED]
    walk = DonorWalk(donor, embed, rows)

    def donor_layer(layer: int):
        module = donor.model.layers[layer].to_empty(device="cpu")
        prefix = f"model.layers.{layer}."
        state = reader([prefix + n for n in module.state_dict()])
        module.load_state_dict({n[len(prefix):]: t for n, t in state.items()}, strict=True)
        try:
            return walk.step(module)
        finally:
            module.to_empty(device="meta")  # frees the layer's weights

    fit = FitWalk(cfg, embed, rows, ridge, donor_layer)
    del embed
    yield from fitted_layers(cfg, tensors, fit.step)
    details["fit"] = fit.report()
    details["method"] = "fit"


def _rel_err(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float((pred - target).double().norm() / target.double().norm().clamp_min(1e-30))
