"""NorMuon + AdamW against float64 references; batched banks vs per-matrix; fused blocks; checkpoint round trip."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from vpmoe.optim import OptimConfig, build_optimizer, build_scheduler
from vpmoe.optim import normuon as nm
from vpmoe.optim.schedule import WarmupCosine
from vpmoe.testing.optim import RefAdamW, RefNorMuon, make_grads, module_from_shapes, small_model_shapes

CFG = OptimConfig(
    lr_matrix=0.02, lr_adam=0.01, weight_decay=0.1, adam_weight_decay=0.05, warmup_steps=2, decay_steps=6,
    min_lr_ratio=0.1, ortho_dtype="float32",
)
STEPS = 5


def _run(model, grads, cfg=CFG, row_blocks=None):
    opt, _ = build_optimizer(model.named_parameters(), cfg, row_blocks=row_blocks)
    sched = build_scheduler(opt, cfg, total_steps=STEPS)
    params = dict(model.named_parameters())
    lrs = []
    for g in grads:
        for k, p in params.items():
            p.grad = g[k].to(p.dtype).clone()
        lrs.append({grp["group"]: grp["lr"] for grp in opt.param_groups})
        opt.step()
        sched.step()
        opt.zero_grad()
    return opt, lrs


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def test_against_float64_reference():
    shapes = small_model_shapes()
    model = module_from_shapes(shapes)
    init = {k: p.detach().double().numpy().copy() for k, p in model.named_parameters()}
    grads = make_grads(shapes, STEPS)
    _, lrs = _run(model, grads)

    sched = WarmupCosine(CFG.warmup_steps, CFG.decay_steps, CFG.min_lr_ratio)
    for t in range(STEPS):  # the schedule reached the param groups
        assert lrs[t]["normuon"] == pytest.approx(CFG.lr_matrix * sched(t))
        assert lrs[t]["adamw_decay"] == pytest.approx(CFG.lr_adam * sched(t))

    from vpmoe.model.naming import param_kind

    checked = 0
    for name, p in model.named_parameters():
        kind = param_kind(name)
        if kind in ("matrix", "expert_bank"):
            ref = RefNorMuon(init[name], wd=CFG.weight_decay)
            lr_peak = CFG.lr_matrix
        elif kind in ("embedding", "head", "router"):
            ref = RefAdamW(init[name], wd=CFG.adam_weight_decay)
            lr_peak = CFG.lr_adam
        else:
            ref = RefAdamW(init[name], wd=0.0)
            lr_peak = CFG.lr_adam
        for t in range(STEPS):
            ref.step(grads[t][name].double().numpy(), lr_peak * sched(t))
        got = p.detach().double().numpy()
        # compare the accumulated change (the parameters themselves are dominated by their initial values)
        err = _rel(got - init[name], ref.w - init[name])
        tol = 5e-5 if kind in ("matrix", "expert_bank") else 5e-6
        assert err < tol, (name, err)
        checked += 1
    assert checked == len(shapes)


def test_update_rms_is_adamw_like():
    """One step from zero state: RMS of the NorMuon update ~= 0.2 * lr (the Moonlight convention)."""
    shapes = {"layers.0.mlp.up.weight": (64, 256), "layers.1.mlp.experts.down": (3, 256, 32)}
    model = module_from_shapes(shapes)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    cfg = OptimConfig(lr_matrix=1.0, weight_decay=0.0, ortho_dtype="float32")
    _run(model, make_grads(shapes, 1), cfg=cfg)
    for k, p in model.named_parameters():
        rms = float((p.detach() - before[k]).pow(2).mean().sqrt())
        assert 0.15 < rms < 0.25, (k, rms)


def test_bank_equals_per_matrix():
    e, m, n = 5, 12, 40
    bank_shapes = {"layers.1.mlp.experts.up": (e, m, n), "layers.1.mlp.experts.down": (e, n, m)}
    bank = module_from_shapes(bank_shapes)
    singles_shapes = {}
    for i in range(e):
        singles_shapes[f"layers.{10 + i}.mlp.up.weight"] = (m, n)
        singles_shapes[f"layers.{10 + i}.mlp.down.weight"] = (n, m)
    singles = module_from_shapes(singles_shapes)
    experts = bank.get_submodule("layers.1.mlp.experts")
    with torch.no_grad():
        for i in range(e):
            single = singles.get_submodule(f"layers.{10 + i}.mlp")
            single.up.weight.copy_(experts.up[i])
            single.down.weight.copy_(experts.down[i])
    grads = make_grads(bank_shapes, 4)
    sgrads = [
        {**{f"layers.{10 + i}.mlp.up.weight": g["layers.1.mlp.experts.up"][i] for i in range(e)},
         **{f"layers.{10 + i}.mlp.down.weight": g["layers.1.mlp.experts.down"][i] for i in range(e)}}
        for g in grads
    ]
    opt_b, _ = _run(bank, grads)
    opt_s, _ = _run(singles, sgrads)
    bank_p = experts
    for i in range(e):
        single = singles.get_submodule(f"layers.{10 + i}.mlp")
        torch.testing.assert_close(bank_p.up[i], single.up.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bank_p.down[i], single.down.weight, rtol=1e-5, atol=1e-6)
        sm = opt_b.state[bank_p.up]["second_moment"][i]
        torch.testing.assert_close(sm, opt_s.state[single.up.weight]["second_moment"], rtol=1e-5, atol=1e-9)


def test_no_statistic_spans_the_expert_axis():
    """Scaling one expert's gradient by 1000 leaves every other expert's update unchanged (bit for bit)."""
    shapes = {"layers.1.mlp.experts.up": (6, 8, 32)}
    grads = make_grads(shapes, 3)
    a = module_from_shapes(shapes)
    b = copy.deepcopy(a)
    _run(a, grads)
    grads_b = [{k: v.clone() for k, v in g.items()} for g in grads]
    for g in grads_b:
        g["layers.1.mlp.experts.up"][3] *= 1000.0
    _run(b, grads_b)
    pa = dict(a.named_parameters())["layers.1.mlp.experts.up"]
    pb = dict(b.named_parameters())["layers.1.mlp.experts.up"]
    keep = [0, 1, 2, 4, 5]
    torch.testing.assert_close(pa[keep], pb[keep], rtol=0, atol=0)
    assert not torch.allclose(pa[3], pb[3])


def test_chunked_batching_matches_unchunked(monkeypatch):
    """Same-shape matrices concatenated into one call, or split across several calls: the same result."""
    shapes = {f"layers.{i}.attn.o_proj.weight": (16, 24) for i in range(7)}
    shapes["layers.1.mlp.experts.up"] = (3, 16, 24)
    grads = make_grads(shapes, 3)
    a = module_from_shapes(shapes)
    b = copy.deepcopy(a)
    _run(a, grads)
    monkeypatch.setattr(nm, "_CHUNK_ELEMS", 16 * 24 * 2)
    _run(b, grads)
    for (k, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.parametrize("blocks", [(8, 8, 8), (16, 4, 4)])
def test_fused_blocks_are_orthogonalized_per_block(blocks):
    """A fused q/k/v matrix with row_blocks gives the same result as three separate matrices."""
    d = 20
    fused_shapes = {"layers.0.attn.qkv.weight": (sum(blocks), d)}
    fused = module_from_shapes(fused_shapes)
    parts = ("q_proj", "k_proj", "v_proj")
    sep_shapes = {f"layers.0.attn.{nm_}.weight": (r, d) for nm_, r in zip(parts, blocks)}
    sep = module_from_shapes(sep_shapes)
    w = fused.layers.get_submodule("0").attn.qkv.weight
    with torch.no_grad():
        for p, chunk in zip(parts, torch.split(w, list(blocks))):
            getattr(sep.layers.get_submodule("0").attn, p).weight.copy_(chunk)
    grads = make_grads(fused_shapes, 3)
    sgrads = [
        {f"layers.0.attn.{p}.weight": c for p, c in zip(parts, torch.split(g["layers.0.attn.qkv.weight"], list(blocks)))}
        for g in grads
    ]
    _run(fused, grads, row_blocks={"layers.0.attn.qkv.weight": blocks})
    _run(sep, sgrads)
    got = torch.split(w.detach(), list(blocks))
    for p, chunk in zip(parts, got):
        torch.testing.assert_close(chunk, getattr(sep.layers.get_submodule("0").attn, p).weight, rtol=1e-5, atol=1e-6)
    # without row_blocks the fused matrix is one matrix: a different result
    whole = module_from_shapes(fused_shapes)
    _run(whole, grads)
    assert not torch.allclose(whole.layers.get_submodule("0").attn.qkv.weight, w, atol=1e-4)


def test_checkpoint_round_trip_continues_exactly():
    shapes = small_model_shapes()
    grads = make_grads(shapes, 4)
    a = module_from_shapes(shapes)
    b = copy.deepcopy(a)
    _run(a, grads)

    opt, _ = build_optimizer(b.named_parameters(), CFG)
    sched = build_scheduler(opt, CFG, total_steps=STEPS)
    params = dict(b.named_parameters())

    def step(g):
        for k, p in params.items():
            p.grad = g[k].clone()
        opt.step()
        sched.step()
        opt.zero_grad()

    step(grads[0])
    step(grads[1])
    saved_opt = copy.deepcopy(opt.state_dict())
    saved_sched = copy.deepcopy(sched.state_dict())
    saved_params = {k: v.detach().clone() for k, v in params.items()}
    # a fresh optimizer and scheduler, as after a restart
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved_params[k])
    opt, _ = build_optimizer(b.named_parameters(), CFG)
    sched = build_scheduler(opt, CFG, total_steps=STEPS)
    opt.load_state_dict(saved_opt)
    sched.load_state_dict(saved_sched)
    step(grads[2])
    step(grads[3])
    for (k, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=k)


def test_bf16_params_keep_fp32_state():
    shapes = {"layers.0.mlp.up.weight": (16, 32), "layers.0.attn_norm.weight": (32,)}
    model = module_from_shapes(shapes, dtype=torch.bfloat16)
    opt, _ = _run(model, make_grads(shapes, 2))
    for st in opt.state.values():
        for k, v in st.items():
            if k != "step":
                assert v.dtype == torch.float32, k
    sd = opt.state_dict()
    opt2, _ = build_optimizer(model.named_parameters(), CFG)
    opt2.load_state_dict(sd)
    for st in opt2.state.values():
        for k, v in st.items():
            if k != "step":
                assert v.dtype == torch.float32, k


def test_no_grad_and_frozen_params_are_untouched():
    shapes = small_model_shapes()
    model = module_from_shapes(shapes)
    model.get_submodule("layers.0.attn.o_proj").weight.requires_grad_(False)
    frozen = model.get_submodule("layers.0.attn.o_proj").weight.detach().clone()
    opt, table = build_optimizer(model.named_parameters(), CFG)
    assert "frozen" in table
    assert all(p.requires_grad for g in opt.param_groups for p in g["params"])
    nograd = model.get_submodule("layers.1.mlp.experts").up
    before = nograd.detach().clone()
    for k, p in model.named_parameters():
        if p.requires_grad and p is not nograd:
            p.grad = torch.randn_like(p)
    opt.step()
    assert torch.equal(model.get_submodule("layers.0.attn.o_proj").weight, frozen)
    assert torch.equal(nograd, before)


def test_a_failed_compile_ends_the_step_with_what_to_do(monkeypatch):
    """optim.compile = "on" whose compilation fails is an error naming the setting, not a silent switch to eager."""
    from vpmoe.errors import RunError

    def broken(name):
        def fn(*args):
            raise RuntimeError("inductor could not compile")
        return fn

    monkeypatch.setattr(nm, "_compiled", broken)
    monkeypatch.setattr(nm, "_COMPILE_MIN", 0)
    shapes = {"layers.0.mlp.up.weight": (16, 32)}
    model = module_from_shapes(shapes)
    before = model.get_submodule("layers.0.mlp.up").weight.detach().clone()
    opt, _ = build_optimizer(model.named_parameters(), dataclasses.replace(CFG, compile="on"))
    for name, p in model.named_parameters():
        p.grad = make_grads(shapes, 1)[0][name].clone()
    with pytest.raises(RunError, match=r"RuntimeError: inductor could not compile.*set optim.compile = \"off\""):
        opt.step()
    assert torch.equal(model.get_submodule("layers.0.mlp.up").weight, before)
