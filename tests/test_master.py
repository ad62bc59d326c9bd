"""The bf16 working copy and its fp32 masters (vpmoe.train.master), on the CPU: the layout, the fp32 accumulation
of per-micro-batch gradients against a float64 sum, the optimizer update published to the working copy, and the
state dict the checkpoints save."""

import pytest
import torch

from vpmoe.model import build_model
from vpmoe.model.naming import param_kind
from vpmoe.optim import OptimConfig, build_optimizer
from vpmoe.testing.models import model_config
from vpmoe.train.master import Masters, stays_fp32

BF16 = torch.bfloat16


def tiny():
    torch.manual_seed(0)
    return build_model(model_config("tiny_moe", "model.vocab_size=96", "model.n_layers=3", "attention.window=8"))


def loss_of(model, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (2, 17), generator=g)
    logits = model(ids[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())


def test_layout_casts_all_but_the_fp32_parameters_and_keeps_the_fp32_storage():
    model = tiny()
    before = {name: (p.detach().clone(), p.data_ptr()) for name, p in model.named_parameters()}
    state_before = {name: t.clone() for name, t in model.state_dict().items()}
    masters = Masters(model, BF16)
    mine = dict(masters.named_parameters())
    assert list(mine) == list(before)  # same names, same order (the optimizer's routing table and state)
    assert list(masters.state_dict()) == list(state_before)  # checkpoints see the model's names
    kept = 0
    for name, work in model.named_parameters():
        value, pointer = before[name]
        master = mine[name]
        assert master.dtype == torch.float32 and master.data_ptr() == pointer and torch.equal(master, value)
        if stays_fp32(name):
            kept += 1
            assert work.dtype == torch.float32 and work.data_ptr() == pointer  # one tensor, updated in place
        else:
            assert work.dtype == BF16 and torch.equal(work, value.to(BF16))
    assert kept == sum(param_kind(n) in ("router", "frequency") for n in before) > 0
    for name, tensor in masters.state_dict().items():  # buffers are the model's own, dtype unchanged
        assert tensor.dtype == state_before[name].dtype
        if name not in mine:
            assert torch.equal(tensor, state_before[name])


def test_micro_batch_gradients_add_up_in_fp32():
    """Each micro-batch's bf16 gradient reaches the master's fp32 gradient: against the float64 sum of the
    gradients autograd computes for each micro-batch alone, within fp32 rounding of the running sum."""
    model = tiny()
    masters = Masters(model, BF16)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    work = dict(model.named_parameters())
    seeds = (1, 2, 3)
    alone = [torch.autograd.grad(loss_of(model, s), [work[n] for n in names]) for s in seeds]
    for s in seeds:
        loss_of(model, s).backward()
    mine = dict(masters.named_parameters())
    for i, name in enumerate(names):
        assert work[name].grad is None  # dropped after it was added to the master
        terms = [g[i] for g in alone]
        assert terms[0].dtype == work[name].dtype and mine[name].grad.dtype == torch.float32
        exact = sum(t.double() for t in terms)
        bound = (len(terms) - 1) * 2.0**-24 * sum(t.double().abs() for t in terms)
        assert ((mine[name].grad.double() - exact).abs() <= bound).all(), name


def test_optimizer_updates_the_masters_and_publish_refreshes_the_working_copy():
    model = tiny()
    masters = Masters(model, BF16)
    optimizer, _ = build_optimizer(masters.named_parameters(), OptimConfig(lr_matrix=0.02, lr_adam=0.01))
    start = {n: p.detach().clone() for n, p in masters.named_parameters()}
    loss_of(model, 1).backward()
    grads = {n: p.grad.clone() for n, p in masters.named_parameters() if p.grad is not None}
    optimizer.step()
    # The same optimizer on plain fp32 copies with the same gradients: the masters got exactly that update.
    copies = {n: torch.nn.Parameter(t.clone()) for n, t in start.items()}
    reference, _ = build_optimizer(copies.items(), OptimConfig(lr_matrix=0.02, lr_adam=0.01))
    for n, g in grads.items():
        copies[n].grad = g
    reference.step()
    moved = 0
    for name, master in masters.named_parameters():
        assert torch.equal(master, copies[name]), name
        moved += not torch.equal(master, start[name])
    assert moved > len(start) // 2
    stale = {n: p.detach().clone() for n, p in model.named_parameters()}
    masters.publish()
    for name, work in model.named_parameters():
        assert torch.equal(work, masters.get_parameter(name).to(work.dtype)), name
    assert any(not torch.equal(stale[n], p) for n, p in model.named_parameters() if not stays_fp32(n))


def test_frozen_parameters_get_no_hook_and_no_gradient():
    model = tiny()
    model.embed.weight.requires_grad_(False)
    masters = Masters(model, BF16)
    assert not masters.get_parameter("embed.weight").requires_grad
    loss_of(model, 1).backward()
    assert masters.get_parameter("embed.weight").grad is None
    assert masters.get_parameter("head.weight").grad is not None


@pytest.mark.parametrize("name", ["layers.1.mlp.router.weight", "layers.0.attn.q_proj.weight"])
def test_stays_fp32_names_the_router_and_frequencies(name):
    assert stays_fp32(name) == name.endswith("router.weight")


def test_checkpoint_round_trip_restores_fp32_masters_and_the_working_copy(tmp_path):
    """What Trainer.save and Trainer.resume do with masters: save them (fp32, the model's names) with the optimizer,
    load them into a freshly built model's masters, publish; the next step then matches the uninterrupted one."""
    from vpmoe.artifacts import checkpoints
    from vpmoe.distributed import Ranks

    def built():
        model = tiny()
        masters = Masters(model, BF16)
        optimizer, _ = build_optimizer(masters.named_parameters(), OptimConfig(lr_matrix=0.02, lr_adam=0.01))
        return model, masters, optimizer

    def step(model, masters, optimizer, seed):
        loss_of(model, seed).backward()
        optimizer.step()
        masters.publish()
        optimizer.zero_grad(set_to_none=True)

    model, masters, optimizer = built()
    step(model, masters, optimizer, 1)
    path = checkpoints.save(tmp_path, 1, masters, optimizer, {"step": 1}, Ranks(), {}, keep=1)
    step(model, masters, optimizer, 2)

    model2, masters2, optimizer2 = built()  # fresh weights (the same init: rewritten by the load below)
    for p in masters2.parameters():
        p.data.add_(1.0)
    checkpoints.load(path, masters2, optimizer2, Ranks())
    masters2.publish()
    step(model2, masters2, optimizer2, 2)
    for (name, a), b in zip(masters.named_parameters(), masters2.parameters()):
        assert a.dtype == torch.float32 and torch.equal(a, b), name
    for (name, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton accumulation runs on CUDA")
@pytest.mark.parametrize("grad_dtype", [BF16, torch.float32])
def test_triton_accumulation_equals_torch_add_bitwise(grad_dtype):
    """The same arithmetic as torch's add (fp32 + fp32(grad), one rounding), on a size no block divides."""
    from vpmoe.train.master import TRITON_MIN_NUMEL, accumulate_

    g = torch.Generator(device="cuda").manual_seed(0)
    for numel in (TRITON_MIN_NUMEL + 4097, 1000):  # the Triton kernel, and torch's add below the threshold
        total = torch.randn(numel, device="cuda", generator=g) * 1e3
        grad = torch.randn(numel, device="cuda", generator=g).to(grad_dtype)
        want = total.clone().add_(grad)
        accumulate_(total, grad)
        assert torch.equal(total, want)
