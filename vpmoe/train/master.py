"""fp32 master weights behind a bf16 working copy, for one process computing in bf16 (FSDP2's mixed-precision policy
does the same job when the model is sharded).

The model's parameters are cast to bf16 once (buffers and `stays_fp32` parameters keep their dtype) and its forward
reads them as they are: no cast per micro-batch. `Masters` is a module with the model's state-dict names that holds
the fp32 weights (the model's own tensors for buffers and fp32 parameters), so the optimizer, gradient clipping and
checkpoints see fp32 tensors under the model's names. As soon as autograd has a trained parameter's gradient for a micro-batch, a hook adds it into the master's fp32
gradient (one cast-and-add kernel) and drops it. After the optimizer step, `publish()` copies the masters into the
working copy.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from vpmoe.model.naming import param_kind


def stays_fp32(name: str) -> bool:
    """Parameters the working copy keeps in fp32, like the fp32 units of the sharded case: the router (top-k
    selection) and GRAPE-M log-frequencies (rotation angles grow with the position)."""
    return param_kind(name) in ("router", "frequency")


class Masters(nn.Module):
    """The fp32 weights of `model`, whose parameters this constructor casts to `dtype` (but those that stay fp32)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        masters: dict[int, nn.Parameter] = {}  # by the model parameter's identity (a tied weight has one master)
        for name, tensor in model.state_dict(keep_vars=True).items():
            if isinstance(tensor, nn.Parameter):
                if id(tensor) not in masters:  # shares the fp32 storage
                    masters[id(tensor)] = nn.Parameter(tensor.detach(), requires_grad=tensor.requires_grad)
                tensor = masters[id(tensor)]
            _register(self, name, tensor)
        self.pairs = [(p, masters[id(p)]) for p in model.parameters() if p.requires_grad]
        for name, p in model.named_parameters():
            if p.is_floating_point() and not stays_fp32(name):
                p.data = p.data.to(dtype)  # new bf16 storage for the model; the master keeps the fp32 one
        self.cast = [(work, master) for work, master in self.pairs if work.dtype != master.dtype]
        for work, master in self.pairs:
            work.register_post_accumulate_grad_hook(_accumulate_into(master))

    @torch.no_grad()
    def publish(self) -> None:
        """Copy the (updated) masters into the model's working copy, in place (CUDA graphs keep its addresses)."""
        if self.cast:
            working, masters = zip(*self.cast)
            torch._foreach_copy_(list(working), list(masters))


def _accumulate_into(master: nn.Parameter):
    def hook(work: torch.Tensor) -> None:
        # Copy, never alias: the incoming gradient may live in a CUDA graph's pool, which the next replay overwrites.
        if master.grad is None:
            master.grad = work.grad.to(master.dtype, copy=True)
        else:
            accumulate_(master.grad, work.grad)
        work.grad = None
    return hook


# On CUDA, contiguous tensors of at least this many elements take the Triton kernel (the expert banks, embedding and
# head: ~95% of the vpMoE's parameters); for smaller ones a launch from Python costs more than the bandwidth it saves.
TRITON_MIN_NUMEL = 1 << 22


def accumulate_(total: torch.Tensor, grad: torch.Tensor) -> None:
    """total (fp32) += grad (any float dtype), in place. PyTorch's add of mixed dtypes is an unvectorized kernel
    (about half an H200's memory bandwidth in the profile); large CUDA tensors take a vectorized Triton kernel with
    the same arithmetic (fp32 + fp32(grad), rounded once)."""
    if (total.is_cuda and total.numel() >= TRITON_MIN_NUMEL and total.is_contiguous() and grad.is_contiguous()
            and total.shape == grad.shape):
        _triton_accumulate(total, grad)
    else:
        total.add_(grad)


def _triton_accumulate(total: torch.Tensor, grad: torch.Tensor) -> None:
    block = 4096
    _accumulate_kernel()[(-(-total.numel() // block),)](total, grad, total.numel(), BLOCK=block, num_warps=8)


@functools.cache
def _accumulate_kernel():
    import triton  # CUDA only: not installed with CPU PyTorch
    import triton.language as tl

    @triton.jit
    def accumulate(total, grad, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        summed = tl.load(total + offsets, mask=mask) + tl.load(grad + offsets, mask=mask).to(tl.float32)
        tl.store(total + offsets, summed, mask=mask)

    return accumulate


def _register(root: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Register `tensor` under the dotted `name`, creating empty parent modules as needed."""
    *path, leaf = name.split(".")
    module = root
    for part in path:
        if part not in module._modules:
            module.add_module(part, nn.Module())
        module = module._modules[part]
    if isinstance(tensor, nn.Parameter):
        module.register_parameter(leaf, tensor)
    else:
        module.register_buffer(leaf, tensor)
