"""Block outputs captured with forward hooks (hidden-state distillation reads them from student and teacher).

decoder_layers(model) is the list of blocks whose outputs are the hidden states: `model.layers` of a vpmoe
Transformer, `model.get_decoder().layers` (or `model.layers` of a body) of a Hugging Face causal LM.
capture_outputs(modules) keeps each module's output (a tuple's first element: a vpmoe Block returns (x, v, stats))
while its block is open. Hooking the last block gives the final pre-norm output; the embedding is never a block.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The blocks whose outputs are the hidden states: `model.layers` of a vpmoe Transformer, the decoder's
    `layers` of a Hugging Face causal LM."""
    layers = getattr(model, "layers", None)
    if layers is None and hasattr(model, "get_decoder"):
        layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no list of decoder layers (model.layers or "
                         f"model.get_decoder().layers)")
    return layers


@contextmanager
def capture_outputs(modules: Sequence[nn.Module]) -> Iterator[list[torch.Tensor | None]]:
    """Within the block, each forward of modules[i] stores its output (a tuple's first element) in captured[i].

    Use it around the forward only: with activation checkpointing a block runs again in backward, and a hook
    still registered then would store that recomputation too.
    """
    captured: list[torch.Tensor | None] = [None] * len(modules)

    def hook(index: int):
        def store(_module, _args, output):
            captured[index] = output[0] if isinstance(output, tuple) else output
        return store

    handles = [module.register_forward_hook(hook(i)) for i, module in enumerate(modules)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
