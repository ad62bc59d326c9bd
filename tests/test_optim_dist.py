"""DTensor / FSDP2 on CPU (gloo, 2 processes): the sharded step equals the single-process step, with the Polar
Express work divided over the ranks (each matrix orthogonalized on one rank only), and the sharded optimizer state,
saved with torch.distributed.checkpoint, loads into a single process and continues exactly."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from vpmoe.optim import OptimConfig, build_optimizer, build_scheduler
from vpmoe.testing.optim import module_from_shapes, small_model_shapes

WORLD = 2
STEPS = 3
CFG = OptimConfig(
    lr_matrix=0.02, lr_adam=0.01, weight_decay=0.1, adam_weight_decay=0.05, warmup_steps=1, decay_steps=5,
    ortho_dtype="float32",
)


def _fsdp_shapes():
    sh = small_model_shapes()
    sh["layers.0.attn.k_a.weight"] = (5, 24)  # odd rows: uneven FSDP2 shards
    sh["layers.1.mlp.experts.up"] = (3, 6, 24)  # odd expert count: one rank holds 2 experts, the other 1
    sh["layers.1.mlp.experts.down"] = (3, 24, 6)
    sh["layers.1.mlp.experts.up_bias"] = (3, 6)
    # FSDP2 refuses 0-dim parameters ("fully_shard doesn't support scalar parameters"); see the report.
    sh["layers.1.value_residual_logit"] = (1,)
    return sh


# (name, shape, placement) for parameters distributed by hand: a bank sharded over rows (gather path) and a
# matrix sharded over its last dim (the row statistic is then replicated).
_MANUAL = [
    ("layers.1.mlp.experts.up", (3, 6, 24), 1),
    ("layers.0.mlp.up.weight", (10, 24), 1),
    ("layers.0.mlp.down.weight", (24, 10), 0),
    ("layers.0.attn_norm.weight", (24,), 0),
]


class LinearLoss(nn.Module):
    """loss = sum_k <p_k, target_k>: the gradient of p_k is target_k whatever the parameters."""

    def __init__(self, shapes):
        super().__init__()
        self.inner = module_from_shapes(shapes, seed=0)

    def forward(self, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum((p * targets[k]).sum() for k, p in self.inner.named_parameters())


def _targets(shapes, step):
    gen = torch.Generator().manual_seed(100 + step)
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


def _full_state(opt, model):
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        st = opt.state.get(p, {})
        out[name] = {k: (v.full_tensor() if isinstance(v, DTensor) else v.clone()) for k, v in st.items()}
    return out


def _worker(rank, port, outdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (WORLD,))
        # --- FSDP2: real forward / backward, gradients reduce-scattered by FSDP2
        orthogonalized = _count_polar_matrices()
        shapes = _fsdp_shapes()
        model = LinearLoss(shapes)
        fully_shard(model, mesh=mesh)
        opt, _ = build_optimizer(model.inner.named_parameters(), CFG)
        sched = build_scheduler(opt, CFG, total_steps=5)
        kinds = {n: (type(p).__name__, tuple(p.placements)) for n, p in model.inner.named_parameters()}
        assert all(k[0] == "DTensor" for k in kinds.values()), kinds
        for t in range(STEPS):
            model(_targets(shapes, t)).backward()
            opt.step()
            sched.step()
            opt.zero_grad()
        polar_matrices = [None] * WORLD
        dist.all_gather_object(polar_matrices, sum(orthogonalized))
        # --- the round robin alone, in float64
        from vpmoe.optim.normuon import sharded_polar_express

        counted = len(orthogonalized)
        polar64 = [sharded_polar_express(x, mesh, steps=5, dtype=torch.float64, first_owner=first)
                   for x, first in _polar64_inputs()]
        polar64_work = [None] * WORLD
        dist.all_gather_object(polar64_work, sum(orthogonalized[counted:]))
        polar64_all = [None] * WORLD
        dist.all_gather_object(polar64_all, polar64)
        full = {n: p.full_tensor() for n, p in model.inner.named_parameters()}
        state = _full_state(opt, model.inner)
        ckpt = os.path.join(outdir, "ckpt")
        dcp.save(
            {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
             "sched": sched.state_dict()},
            checkpoint_id=ckpt,
        )
        # --- hand-placed DTensors
        manual = module_from_shapes({n: s for n, s, _ in _MANUAL}, seed=3)
        placements = {}
        for n, _, dim in _MANUAL:
            mod = manual.get_submodule(n.rsplit(".", 1)[0])
            leaf = n.rsplit(".", 1)[1]
            pl = [Shard(dim)] if dim is not None else [Replicate()]
            placements[n] = pl
            setattr(mod, leaf, nn.Parameter(distribute_tensor(getattr(mod, leaf).data, mesh, pl)))
        mopt, _ = build_optimizer(manual.named_parameters(), CFG)
        for t in range(STEPS):
            g = _targets({n: s for n, s, _ in _MANUAL}, 10 + t)
            for n, p in manual.named_parameters():
                p.grad = distribute_tensor(g[n], mesh, placements[n])
            mopt.step()
        mfull = {n: p.full_tensor() for n, p in manual.named_parameters()}
        mstate = _full_state(mopt, manual)
        assert isinstance(mopt.state[manual.get_submodule("layers.0.mlp").up.weight]["second_moment"], DTensor)
        if rank == 0:
            torch.save({"params": full, "state": state, "manual": mfull, "mstate": mstate,
                        "polar_matrices": polar_matrices, "polar64": polar64_all, "polar64_work": polar64_work},
                       os.path.join(outdir, "result.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _polar64_inputs() -> list[tuple[torch.Tensor, int]]:
    """(matrices, first owner): an odd count of wide matrices starting on rank 1, and tall ones (transposed path)."""
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(7, 6, 10, generator=gen, dtype=torch.float64), 1),
            (torch.randn(3, 12, 5, generator=gen, dtype=torch.float64), 0)]


def _count_polar_matrices() -> list[int]:
    """From now on, the number of matrices of every Polar Express call of the optimizer, in this process."""
    from vpmoe.optim import normuon

    counts, real = [], normuon.polar_express

    def counting(x, **kwargs):
        counts.append(x.shape[0])
        return real(x, **kwargs)

    normuon.polar_express = counting
    return counts


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_run(shapes, steps, cfg=CFG):
    model = LinearLoss(shapes)
    opt, _ = build_optimizer(model.inner.named_parameters(), cfg)
    sched = build_scheduler(opt, cfg, total_steps=5)
    for t in range(steps):
        model(_targets(shapes, t)).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


@pytest.fixture(scope="module")
def dist_result(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    outdir = str(tmp_path_factory.mktemp("optim_dist"))
    mp.start_processes(_worker, args=(_free_port(), outdir), nprocs=WORLD, join=True, start_method="spawn")
    return outdir, torch.load(os.path.join(outdir, "result.pt"), weights_only=False)


def test_fsdp2_step_equals_single_process(dist_result):
    _, res = dist_result
    shapes = _fsdp_shapes()
    model, opt, _ = _single_run(shapes, STEPS)
    ref_state = _full_state(opt, model.inner)
    # Same float32 arithmetic per matrix; Polar Express runs on other batches of matrices on each rank, which moves
    # results by an ulp or so (measured: 6e-8 relative): 1e-6 relative.
    for name, p in model.inner.named_parameters():
        torch.testing.assert_close(res["params"][name], p.detach(), rtol=1e-6, atol=1e-7, msg=name)
        for key, val in ref_state[name].items():
            torch.testing.assert_close(res["state"][name][key], val, rtol=1e-6, atol=1e-7, msg=f"{name} {key}")
    # the parameters moved (the comparison is not between two untouched models)
    init = module_from_shapes(shapes, seed=0)
    moved = [n for n, p in init.named_parameters() if not torch.allclose(p, res["params"][n])]
    assert len(moved) == len(shapes)


def test_polar_express_work_is_divided_over_the_ranks(dist_result, monkeypatch):
    """Each matrix is orthogonalized on exactly one rank: the ranks' counts add up to the single process's, and the
    ranks share the work about evenly (round robin over the step's gathered matrices)."""
    _, res = dist_result
    from vpmoe.optim import normuon

    counts, real = [], normuon.polar_express
    monkeypatch.setattr(normuon, "polar_express", lambda x, **kwargs: counts.append(x.shape[0]) or real(x, **kwargs))
    _single_run(_fsdp_shapes(), STEPS)
    per_rank = res["polar_matrices"]
    assert sum(per_rank) == sum(counts) and max(per_rank) <= 0.6 * sum(counts), (per_rank, sum(counts))


def test_sharded_polar_express_equals_the_unsharded_one_in_float64(dist_result):
    """Round robin over 2 ranks, then all-gathered: every rank holds polar_express of every matrix (float64, 1e-12),
    having computed only its own share."""
    from vpmoe.optim.polar import polar_express

    _, res = dist_result
    for rank in range(WORLD):
        for (x, _), got in zip(_polar64_inputs(), res["polar64"][rank]):
            assert got.dtype == torch.float64
            torch.testing.assert_close(got, polar_express(x, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # 7 matrices from rank 1: odd indices on rank 0 (3), even on rank 1 (4); 3 from rank 0: 2 on rank 0, 1 on rank 1
    assert res["polar64_work"] == [3 + 2, 4 + 1]


def test_hand_placed_dtensors_equal_single_process(dist_result):
    _, res = dist_result
    shapes = {n: s for n, s, _ in _MANUAL}
    model = module_from_shapes(shapes, seed=3)
    opt, _ = build_optimizer(model.named_parameters(), CFG)
    for t in range(STEPS):
        g = _targets(shapes, 10 + t)
        for n, p in model.named_parameters():
            p.grad = g[n].clone()
        opt.step()
    ref_state = _full_state(opt, model)
    for name, p in model.named_parameters():
        torch.testing.assert_close(res["manual"][name], p.detach(), rtol=1e-5, atol=1e-6, msg=name)
        for key, val in ref_state[name].items():
            torch.testing.assert_close(res["mstate"][name][key], val, rtol=1e-5, atol=1e-7, msg=f"{name} {key}")


def test_sharded_checkpoint_loads_into_one_process(dist_result):
    """Save on 2 ranks (DCP, DTensor state), load into 1 process, take step 4: equals 4 single-process steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    outdir, _ = dist_result
    shapes = _fsdp_shapes()
    ref_model, _, _ = _single_run(shapes, STEPS + 1)

    model = LinearLoss(shapes)
    with torch.no_grad():  # scramble: everything must come from the checkpoint
        for p in model.parameters():
            p.mul_(-3.0)
    opt, _ = build_optimizer(model.inner.named_parameters(), CFG)
    sched = build_scheduler(opt, CFG, total_steps=5)
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt),
          "sched": sched.state_dict()}
    dcp.load(sd, checkpoint_id=os.path.join(outdir, "ckpt"))
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    sched.load_state_dict(sd["sched"])
    assert sched.last_epoch == STEPS
    model(_targets(shapes, STEPS)).backward()
    opt.step()
    for (name, p), (_, q) in zip(model.inner.named_parameters(), ref_model.inner.named_parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6, msg=name)
