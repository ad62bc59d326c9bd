"""parallelize's FSDP2 mixed precision, in one gloo process on the CPU: with bf16 compute, the units gather bf16
weights (blocks, expert banks, root), the router and attention with GRAPE log-frequencies gather fp32, the sharded
master weights and their gradients stay fp32; with fp32 compute nothing is cast."""

import socket

import pytest
import torch
import torch.distributed as dist

from vpmoe.model import build_model
from vpmoe.testing.models import model_config
from vpmoe.train.mesh import Layout, build_meshes
from vpmoe.train.parallelize import shard


@pytest.fixture
def one_rank_group():
    if not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _gathered_dtypes(compute):
    torch.manual_seed(0)
    model = build_model(model_config("tiny_moe", "model.n_layers=2"))
    shard(model, build_meshes(Layout(), "cpu"), compute, world_size=1)
    moe, attention = model.layers[1].mlp, model.layers[0].attn
    assert attention.grape_log_freq is not None  # the fp32 unit is exercised
    seen = {}

    def record(name, tensor_of):
        def hook(module, args):  # returns None: the arguments stay as they are
            seen[name] = tensor_of(module).dtype
        return hook

    moe.experts.register_forward_pre_hook(record("experts", lambda m: m.up))
    moe.router.register_forward_pre_hook(record("router", lambda m: m.weight))
    moe.shared.register_forward_pre_hook(record("shared", lambda m: m.up.weight))
    attention.register_forward_pre_hook(record("grape", lambda m: m.grape_log_freq))
    model.register_forward_pre_hook(record("embed", lambda m: m.embed.weight))
    ids = torch.randint(0, 1000, (1, 16))
    with torch.autocast("cpu", dtype=compute or torch.float32, enabled=compute is not None):
        out = model(ids, logits_at=ids > 500)
    (out.logits.float().logsumexp(-1).sum() + out.aux_loss).backward()
    masters = {p.dtype for p in model.parameters()} | {p.grad.dtype for p in model.parameters() if p.grad is not None}
    return seen, masters


def test_bf16_gathers_fp32_router_and_masters(one_rank_group):
    seen, masters = _gathered_dtypes(torch.bfloat16)
    assert seen == {"experts": torch.bfloat16, "shared": torch.bfloat16, "embed": torch.bfloat16,
                    "router": torch.float32, "grape": torch.float32}
    assert masters == {torch.float32}


def test_fp32_compute_casts_nothing(one_rank_group):
    seen, masters = _gathered_dtypes(None)
    assert set(seen.values()) == {torch.float32} and masters == {torch.float32}
