"""Expert parallelism is exact: a MoE layer whose routed experts are split over 2 gloo processes (all-to-all
dispatch and combine) gives, in float64, the outputs and the gradients (inputs, router, shared expert, every expert)
of the unsharded layer run over both ranks' tokens in one process, including experts that receive no token at all
and experts that receive tokens from one rank only. And the [parallel] layout is refused with exit 2 when it cannot
hold."""

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vpmoe.errors import UserError
from vpmoe.model.config import MoESection
from vpmoe.model.moe import MoE
from vpmoe.train.config import ParallelSection
from vpmoe.train.mesh import Layout, resolve_layout

WORLD = 2
DIM = 12
MOE = MoESection(enabled=True, n_experts=8, expert_width=6, shared_width=10, topk=2, n_groups=2, group_topk=2)
NEVER = (2, 5)  # experts no token may choose (one owned by each rank)


def _layer() -> MoE:
    torch.manual_seed(0)
    layer = MoE(DIM, MOE, bias=True).double()
    layer.reset_parameters(0.3, 0.3)
    with torch.no_grad():
        for bias in (layer.experts.up_bias, layer.experts.down_bias, layer.shared.up.bias):
            bias.normal_(0.0, 0.1)
        layer.router.expert_bias[list(NEVER)] = -1e9  # selection never picks them
    return layer


def _inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank r's tokens [2, 5, D] and the weights of its loss sum(out * w); rank 1's tokens avoid expert 0."""
    gen = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(2, 5, DIM, generator=gen, dtype=torch.float64)
    return x, torch.randn(2, 5, DIM, generator=gen, dtype=torch.float64)


def _reference() -> dict:
    layer = _layer()
    outs, grads_x, counts = [], [], []
    for rank in range(WORLD):
        x, w = _inputs(rank)
        x.requires_grad_(True)
        _set_rank_bias(layer, rank)
        out, routing = layer.mix(x)
        (out * w).sum().backward()
        outs.append(out.detach())
        grads_x.append(x.grad)
        counts.append(routing.counts)
    grads = {name: p.grad for name, p in layer.named_parameters()}
    return {"out": outs, "grad_x": grads_x, "grads": grads, "counts": counts}


def _set_rank_bias(layer: MoE, rank: int) -> None:
    """Expert 0 (owned by rank 0) gets tokens from rank 0 only."""
    layer.router.expert_bias[0] = -1e9 if rank == 1 else 0.0


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor
        from torch.nn import Parameter

        from vpmoe.model.expert_parallel import ExpertParallel

        mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("ep",))
        layer = _layer()
        for name, param in list(layer.experts.named_parameters(recurse=False)):
            setattr(layer.experts, name, Parameter(distribute_tensor(param.detach(), mesh, [Shard(0)],
                                                                     src_data_rank=None)))
        layer.dispatch = ExpertParallel(mesh.get_group(), MOE.n_experts)
        _set_rank_bias(layer, rank)
        x, w = _inputs(rank)
        x.requires_grad_(True)
        y, routing = layer.mix(x)
        (y * w).sum().backward()
        grads = {}
        for name, p in layer.named_parameters():
            if name.startswith("experts."):
                grads[name] = p.grad.full_tensor()  # each rank holds the gradient of its own experts
            else:  # replicated: each rank's gradient covers its own tokens
                grads[name] = p.grad.clone()
                dist.all_reduce(grads[name])
        torch.save({"out": y.detach(), "grad_x": x.grad, "grads": grads, "counts": routing.counts,
                    "local_rows": layer.experts.local_weights().up.shape[0]}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ep_result(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = str(tmp_path_factory.mktemp("expert_parallel"))
    mp.start_processes(_worker, args=(_free_port(), out), nprocs=WORLD, join=True, start_method="spawn")
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def test_expert_parallel_layer_equals_the_unsharded_layer(ep_result):
    ref = _reference()
    # the test covers what it claims: idle experts everywhere, expert 0 fed by rank 0 only, experts split in half
    total = sum(ref["counts"])
    assert all(total[e] == 0 for e in NEVER) and ref["counts"][1][0] == 0 < ref["counts"][0][0]
    assert all(r["local_rows"] == MOE.n_experts // WORLD for r in ep_result)
    for rank, got in enumerate(ep_result):
        torch.testing.assert_close(got["out"], ref["out"][rank], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["grad_x"], ref["grad_x"][rank], rtol=1e-12, atol=1e-12)
        assert torch.equal(got["counts"], ref["counts"][rank])
        assert got["grads"].keys() == ref["grads"].keys()
        for name, grad in ref["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-12, atol=1e-12, msg=name)
    for e in NEVER:  # an expert nobody chose has a zero gradient, not a missing one
        assert torch.count_nonzero(ep_result[0]["grads"]["experts.up"][e]) == 0


def test_layouts_that_cannot_hold_are_refused():
    assert resolve_layout(ParallelSection(), 8, 256) == Layout(1, 8, 1)
    assert resolve_layout(ParallelSection(ep=2, dp_replicate=2), 8, 256) == Layout(2, 2, 2)
    with pytest.raises(UserError, match=r"parallel.dp_replicate x parallel.dp_shard x parallel.ep = 1 x 3 x 2 "
                                        r"must equal the world size, 4 \("):
        resolve_layout(ParallelSection(dp_shard=3, ep=2), 4, 256)
    with pytest.raises(UserError, match="must equal the world size"):
        resolve_layout(ParallelSection(ep=3), 4, 258)  # 4 // 3 = 1 shard: 3 ranks, not 4
    with pytest.raises(UserError, match=r"parallel.ep = 3 does not divide moe.n_experts = 256"):
        resolve_layout(ParallelSection(ep=3), 3, 256)
    with pytest.raises(UserError, match="needs a MoE model"):
        resolve_layout(ParallelSection(ep=2), 2, None)


def test_doctor_reports_the_mesh_and_refuses_a_bad_one_with_exit_2():
    from vpmoe.doctor import _mesh

    assert "dp_replicate 1 x dp_shard 2 x ep 2" in _mesh("tiny_ce", ["parallel.ep=2"], 4)
    with pytest.raises(UserError, match=r"x 3 must equal the world size, 2 \("):  # what `vpmoe train` would say
        _mesh("tiny_ce", ["parallel.ep=3"], 2)
    bad = subprocess.run([sys.executable, "-m", "vpmoe.cli", "doctor", "--config", "tiny_ce", "--world-size", "3",
                          "--set", "parallel.ep=3"], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert bad.returncode == 2
    assert "FAIL  mesh: parallel.ep = 3 does not divide moe.n_experts = 32" in bad.stdout
    assert "Traceback" not in bad.stderr
