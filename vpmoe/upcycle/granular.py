"""Step 5: `vpDense` -> `vpMoE` (granular upcycling; exact at init when noise is 0).

For every MoE layer (layers >= moe.first_moe_layer; earlier layers are dense and copied), with the dense FFN of
width W = G * expert_width (G = 4 slices of 128 for the real model) and E = n_experts experts:
- expert j gets slice s = j mod G of the dense FFN: up rows / up bias [s*w:(s+1)*w], down columns [:, s*w:(s+1)*w]
  times G / scaling_factor (4 / 2.5 = 1.6); expert down bias 0.
- virtual groups: experts G*r .. G*r + G - 1 share one router row (E / G rows drawn N(0, router_std^2) from the
  seed, then each replicated G times); expert_bias 0.
- shared expert: up = the dense up (all W units, weights and bias), down weight 0, down bias = the dense down bias.
  (Any up would do at init since its down is 0; the dense up gives it features that already mean something.)

Why it is exact: replicated rows give the G experts of a virtual group the same score. A routing group of
n_experts / n_groups experts holds whole virtual groups (G divides it), so the routing group that holds the best
virtual group has the highest group score and is kept, and when the best virtual group is unique its G experts
are strictly the top scores among the kept groups: top-k (k = G) picks exactly them, whatever the tie-breaking
among them. Their weights are equal, scaling_factor / G each, so the routed sum is
sum_s (2.5 / G) * (G / 2.5) * down_s relu^2(up_s x + b_s) = the dense FFN without its down bias, which the shared
expert adds. The construction needs topk == G (checked). It stops being exact only where two virtual groups tie
for the best score in fp32; the drift report counts such tokens (`router_near_ties`).

Noise (optional, symmetry breaking): every expert's up and down get N(0, (noise * std(tensor))^2) added, from the
seed; the scale and the drift it causes are recorded.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from vpmoe.errors import UserError
from vpmoe.model.config import ModelConfig, model_config_to_dict
from vpmoe.model.transformer import Transformer, build_model
from vpmoe.upcycle.stream import Reader, RowWalk, fitted_layers, layer_names


def check_geometry(source: ModelConfig, target: ModelConfig) -> int:
    """Returns G, the number of slices (= experts per virtual group)."""
    s, t = model_config_to_dict(source), model_config_to_dict(target)
    for d in (s, t):
        d["model"].pop("name")
        d.pop("moe")
    if s != t or not target.moe.enabled or source.moe.enabled:
        raise UserError("granular upcycling turns a dense model into an MoE of the same shape otherwise; the source "
                        "and target configs differ elsewhere")
    m, width = target.moe, source.ffn.dense_width
    if width % m.expert_width:
        raise UserError(f"ffn.dense_width {width} is not a multiple of moe.expert_width {m.expert_width}")
    g = width // m.expert_width
    per_group = m.n_experts // m.n_groups
    problems = []
    if m.topk != g:
        problems.append(f"moe.topk {m.topk} must equal the number of slices {g}")
    if m.n_experts % g or per_group % g:
        problems.append(f"{g}-expert virtual groups must tile the {m.n_groups} routing groups of {per_group}")
    if m.shared_width != width:
        problems.append(f"moe.shared_width {m.shared_width} must equal ffn.dense_width {width}")
    if problems:
        raise UserError("granular upcycling refused: " + "; ".join(problems))
    return g


@torch.no_grad()
def convert(source: Transformer, cfg: ModelConfig, seed: int = 0, router_std: float = 0.02,
            noise: float = 0.0) -> tuple[Transformer, dict]:
    """The MoE model of a dense `source` held in memory (`target_tensors` streams the same tensors)."""
    model = build_model(cfg, init=False)
    src = source.state_dict()
    sd = model.state_dict()
    details: dict = {}
    for name, tensor in target_tensors(source.cfg, cfg, lambda names: {n: src[n] for n in names}, seed, router_std,
                                       noise, details):
        sd[name].copy_(tensor)
    return model, details


def target_tensors(source_cfg: ModelConfig, cfg: ModelConfig, read, seed: int, router_std: float, noise: float,
                   details: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the MoE model, layer by layer; `read(names)` gives the dense source's tensors by name (from
    memory or from disk). `details` is filled with the step's record once the last layer is out."""
    g = check_geometry(source_cfg, cfg)
    m = cfg.moe
    w = m.expert_width
    gen = torch.Generator().manual_seed(seed)
    yield from read(["embed.weight"]).items()
    noise_std = {}
    slices = torch.arange(m.n_experts) % g
    for layer in range(cfg.model.n_layers):
        p = f"layers.{layer}."
        src = read(layer_names(source_cfg, layer))
        if not cfg.is_moe_layer(layer):  # dense layers are copied as they are
            yield from src.items()
            continue
        yield from ((n, t) for n, t in src.items() if ".mlp." not in n)
        p += "mlp."
        up, up_b = src[p + "up.weight"], src[p + "up.bias"]
        down, down_b = src[p + "down.weight"], src[p + "down.bias"]
        up_slices = up.view(g, w, -1)  # [G, w, D]
        down_slices = down.view(down.shape[0], g, w).permute(1, 0, 2)  # [G, D, w]
        experts_up = up_slices[slices].clone()
        experts_down = down_slices[slices] * (g / m.scaling_factor)
        if noise > 0:
            up_std, down_std = float(up.std()), float(down.std())
            experts_up += torch.randn(experts_up.shape, generator=gen) * (noise * up_std)
            experts_down += torch.randn(experts_down.shape, generator=gen) * (noise * down_std * g / m.scaling_factor)
            noise_std[str(layer)] = {"up": noise * up_std, "down": noise * down_std * g / m.scaling_factor}
        rows = torch.randn(m.n_experts // g, cfg.model.hidden_size, generator=gen) * router_std
        yield p + "shared.up.weight", up
        yield p + "shared.up.bias", up_b
        yield p + "shared.down.weight", torch.zeros_like(down)
        yield p + "shared.down.bias", down_b
        yield p + "experts.up", experts_up
        yield p + "experts.down", experts_down
        yield p + "experts.up_bias", up_b.view(g, w)[slices]
        yield p + "experts.down_bias", torch.zeros(m.n_experts, down.shape[0])
        yield p + "router.weight", rows.repeat_interleave(g, dim=0)
        yield p + "router.expert_bias", torch.zeros(m.n_experts)
    yield from read(["final_norm.weight", "head.weight"]).items()
    details.update({
        "slices": g,
        "virtual_groups": m.n_experts // g,
        "expert_slice": "expert j gets slice j mod G",
        "down_scale": g / m.scaling_factor,
        "router_std": router_std,
        "noise": noise,
        "noise_std": noise_std,
        "shared_expert": "up = dense up; down weight 0; down bias = dense down bias",
        "moe_layers": cfg.moe_layers,
    })


@torch.no_grad()
def router_margins(model: Transformer, rows, g: int, tol: float = 1e-6) -> dict:
    """On the calibration rows: per MoE layer, the smallest gap between the best and second-best virtual group's
    score, and the tokens whose gap is below `tol` (where the construction may stop being exact)."""
    gaps: dict[int, list[torch.Tensor]] = {layer: [] for layer in model.moe_layers}
    hooks = [gap_hook(model.layers[layer].mlp.router, gaps[layer], g) for layer in model.moe_layers]
    try:
        for row in rows:
            model(torch.from_numpy(row.tokens.astype("int64"))[None])
    finally:
        for h in hooks:
            h.remove()
    return margins(gaps, tol)


def gap_hook(router, gaps: list, g: int):
    """Record, for every token the router sees, the gap between its two best virtual groups' selection scores."""
    def hook(mod, args):
        x = args[0].float()
        scores = torch.sigmoid(x @ mod.weight[::g].float().T) + mod.expert_bias[::g]
        top2 = scores.topk(2, dim=-1).values
        gaps.append(top2[:, 0] - top2[:, 1])

    return router.register_forward_pre_hook(hook)


def margins(gaps: dict[int, list[torch.Tensor]], tol: float = 1e-6) -> dict:
    all_gaps = {layer: torch.cat(v) for layer, v in gaps.items()}
    return {
        "min_gap": min(float(v.min()) for v in all_gaps.values()) if all_gaps else None,
        "router_near_ties": sum(int((v < tol).sum()) for v in all_gaps.values()),
        "tie_tolerance": tol,
    }


def fit_router(dense: Transformer, model: Transformer, fit_rows, heldout_rows, g: int, steps: int,
               lr: float, chunk: int = 256) -> dict:
    """Fit every MoE layer's router rows (one per virtual group, replicated G times as at init) so that a token
    picks the virtual group whose experts best reproduce the dense FFN; the experts are not touched.

    On the dense model's own activations at each FFN input (x = mlp_norm(h), target y = the dense FFN's output):
    for every virtual group r, e_r(x) = |group_r(x) + shared(x) - y| with group_r the routed sum of r's G experts at
    weight scaling_factor / G each (what the MoE computes when it picks r). The rows are fitted with Adam by softmax
    cross-entropy of the group logits x W_r^T towards argmin_r e_r(x) (selection ranks sigmoid(logit) + expert_bias,
    and expert_bias is 0 at init, so the group with the largest logit is picked). The MoE-vs-dense error
    |moe(x) - y| / |y| on the held-out rows is recorded per layer before and after; a layer whose error does not drop
    keeps its random rows. With noise 0 every group reproduces the dense FFN: the fit then has nothing to choose.
    The dense activations are computed one block at a time (`RouterWalk`, which the streamed fit runs as well)."""
    walk = RouterWalk(dense.cfg, dense.embed.weight, fit_rows, heldout_rows, g, steps, lr, chunk)
    for layer, block in enumerate(dense.layers):
        walk.step(block, model.layers[layer] if model.cfg.is_moe_layer(layer) else None)
    return walk.report()


class RouterWalk:
    """The router fit one layer at a time: `step(dense_block, moe_block)` records the dense FFN's inputs and outputs
    of the block on the rows, fits the MoE block's router on them (in place; `moe_block` None for a dense layer) and
    moves the rows on through the dense block."""

    def __init__(self, dense_cfg: ModelConfig, embed: torch.Tensor, fit_rows, heldout_rows, g: int, steps: int,
                 lr: float, chunk: int = 256):
        self.rows = RowWalk(dense_cfg, embed, list(fit_rows) + list(heldout_rows))
        self.n_fit, self.g, self.steps, self.lr, self.chunk = len(fit_rows), g, steps, lr, chunk
        self.fit_tokens = int(sum(len(r.tokens) for r in fit_rows))
        self.heldout_tokens = int(sum(len(r.tokens) for r in heldout_rows))
        self.layers: dict[str, dict] = {}

    def step(self, dense_block, moe_block) -> None:
        xs, ys = [], []

        def hook(mod, args, out):
            xs.append(args[0].reshape(-1, args[0].shape[-1]))
            ys.append(out.reshape(-1, out.shape[-1]))

        handle = dense_block.mlp.register_forward_hook(hook) if moe_block is not None else None
        try:
            self.rows.advance(dense_block)
        finally:
            if handle is not None:
                handle.remove()
        if moe_block is None:
            return
        n = self.n_fit
        self.layers[str(dense_block.layer)] = fit_router_layer(
            moe_block.mlp, torch.cat(xs[:n]), torch.cat(ys[:n]), torch.cat(xs[n:]), torch.cat(ys[n:]), self.g,
            self.steps, self.lr, self.chunk)

    def report(self) -> dict:
        return {"steps": self.steps, "lr": self.lr, "fit_tokens": self.fit_tokens,
                "heldout_tokens": self.heldout_tokens, "layers": self.layers,
                "note": "moe_vs_dense_rel_err = |moe(x) - dense_ffn(x)| / |dense_ffn(x)| on held-out rows, x the "
                        "dense model's FFN inputs; random: the init's rows, fit: after the fit; kept: the rows the "
                        "layer ends with"}


def fit_router_layer(moe, fit_x, fit_y, held_x, held_y, g: int, steps: int, lr: float, chunk: int) -> dict:
    """Fit one MoE layer's router rows in place (see fit_router); returns the layer's record."""
    before = _moe_error(moe, held_x, held_y)
    with torch.no_grad():
        best = _group_errors(moe, fit_x, fit_y, g, chunk).argmin(-1)
    initial = moe.router.weight.detach().clone()
    rows = initial[::g].clone().requires_grad_(True)
    opt = torch.optim.Adam([rows], lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(fit_x @ rows.T, best)
        loss.backward()
        opt.step()
    with torch.no_grad():
        moe.router.weight.copy_(rows.detach().repeat_interleave(g, dim=0))
        after = _moe_error(moe, held_x, held_y)
        kept = "fit" if after < before else "random"
        if kept == "random":
            moe.router.weight.copy_(initial)
    return {"moe_vs_dense_rel_err": {"random": before, "fit": after}, "kept": kept,
            "distinct_best_groups": int(best.unique().numel()), "final_loss": float(loss.detach())}


def streamed_tensors(reader: Reader, cfg: ModelConfig, tensors: Iterator[tuple[str, torch.Tensor]], fit_rows,
                     heldout_rows, g: int, steps: int, lr: float, details: dict
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """The router fit from disk, one layer at a time: `tensors` is target_tensors' stream over `reader` (the dense
    object); each MoE layer is gathered from it, its router fitted on the dense block (read alone from `reader`) and
    yielded. details["router_fit"] gets fit_router's report at the end."""
    walk = RouterWalk(reader.cfg, reader(["embed.weight"])["embed.weight"], fit_rows, heldout_rows, g, steps, lr)
    yield from fitted_layers(cfg, tensors, lambda layer, block: walk.step(
        reader.block(layer), block if cfg.is_moe_layer(layer) else None))
    details["router_fit"] = walk.report()


def _group_errors(moe, x: torch.Tensor, y: torch.Tensor, g: int, chunk: int) -> torch.Tensor:
    """e [N, E / G]: |virtual group r's routed sum + shared(x) - y| for every token and group."""
    bank = moe.experts
    n_experts, width, dim = bank.up.shape
    weight = moe.router.scaling_factor / g
    errors = []
    for start in range(0, x.shape[0], chunk):
        xc, yc = x[start:start + chunk], y[start:start + chunk]
        h = torch.einsum("nd,ewd->new", xc, bank.up)
        if bank.up_bias is not None:
            h = h + bank.up_bias
        out = torch.einsum("new,edw->ned", torch.relu(h).square(), bank.down)  # [n, E, D]
        if bank.down_bias is not None:
            out = out + bank.down_bias
        groups = out.view(xc.shape[0], n_experts // g, g, dim).sum(2) * weight
        errors.append((groups + moe.shared(xc)[:, None] - yc[:, None]).norm(dim=-1))
    return torch.cat(errors)


@torch.no_grad()
def _moe_error(moe, x: torch.Tensor, y: torch.Tensor) -> float:
    out, _ = moe(x[None])
    return float((out[0] - y).double().norm() / y.double().norm().clamp_min(1e-30))
