"""Conversions and forwards that hold one layer at a time: the real-shape chain in bounded memory.

- `Reader`: a vpmoe object's tensors by name, read from its (sharded) safetensors when asked, in fp32.
- `write_streamed`: (name, tensor) pairs as a step produces them -> sharded safetensors in the configured dtype
  (the fp32-only tensors stay fp32) + config.json; every name and shape is checked against the target config.
- `fitted_layers`: a step's (name, tensor) stream with each layer gathered into a block, changed (fitted) by a
  callback and passed on: the fitted steps stream through it (`pipelined_layers`: with fits running in other
  processes, up to a given number of layers pending at once, passed on in order).
- `RowWalk`: calibration rows' hidden states pushed through a model's blocks one block at a time.
- `streamed_hidden`: the final hidden states of an object on the calibration rows, computed block by block (each
  block built alone and loaded from disk), so that a drift report never needs the whole model in memory.
A streamed step gives exactly the tensors of the in-memory one: both run the step's own `target_tensors`.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from vpmoe.artifacts import weights
from vpmoe.artifacts.files import write_json
from vpmoe.artifacts.models import CONFIG_FILE, model_config
from vpmoe.model.attention import AttentionContext
from vpmoe.model.config import ModelConfig, model_config_to_dict
from vpmoe.model.norms import RMSNorm
from vpmoe.model.positions import rope_inv_freq, rotary_cos_sin
from vpmoe.model.transformer import FP32_NAMES, Block, Transformer

TOP_NAMES = ("embed.weight", "final_norm.weight", "head.weight")
T = TypeVar("T")


def layer_names(cfg: ModelConfig, layer: int) -> list[str]:
    """The state-dict names of one layer of a model of `cfg`, in the model's order."""
    return [f"layers.{layer}.{name}" for name in _meta_block(cfg, layer).state_dict()]


def layer_shapes(cfg: ModelConfig, layer: int) -> dict[str, list[int]]:
    """name -> shape of one layer of a model of `cfg`, in the model's order."""
    return {f"layers.{layer}.{name}": list(t.shape) for name, t in _meta_block(cfg, layer).state_dict().items()}


def _meta_block(cfg: ModelConfig, layer: int) -> Block:
    with torch.device("meta"):
        return Block(cfg, layer)


def expected_shapes(cfg: ModelConfig) -> dict[str, list[int]]:
    with torch.device("meta"):
        model = Transformer(cfg)
    return {name: list(t.shape) for name, t in model.state_dict().items()}


class Reader:
    """The tensors of a vpmoe object directory, read by name when asked (fp32)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.cfg = model_config(directory)

    def __call__(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        names = list(names)
        got = dict(weights.iter_tensors(self.directory, names))
        return {name: got[name].float() for name in names}

    def block(self, layer: int) -> Block:
        block = _meta_block(self.cfg, layer).to_empty(device="cpu")
        prefix = f"layers.{layer}."
        state = self(layer_names(self.cfg, layer))
        block.load_state_dict({name[len(prefix):]: t for name, t in state.items()}, strict=True)
        return block.eval()


def write_streamed(directory: str | Path, cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]],
                   dtype: torch.dtype = torch.float32, shard_bytes: int = weights.DEFAULT_SHARD_BYTES) -> int:
    """Write the (name, tensor) pairs as they come (cast to `dtype` except the fp32-only ones) and config.json;
    returns the number of shards. Refuses (AssertionError: a bug in the step) a name or shape the config does not
    have, a name twice, or a missing one."""
    want = expected_shapes(cfg)
    seen = set()
    Path(directory).mkdir(parents=True, exist_ok=True)
    writer = weights.ShardedWriter(directory, shard_bytes)
    for name, tensor in tensors:
        if name not in want or list(tensor.shape) != want[name] or name in seen:
            raise AssertionError(f"streamed tensor {name} {list(tensor.shape)} does not fit the target config")
        seen.add(name)
        keep_fp32 = name.endswith(FP32_NAMES)
        writer.add(name, tensor.float() if keep_fp32 else tensor.to(dtype))
    missing = sorted(set(want) - seen)
    if missing:
        raise AssertionError(f"the streamed conversion wrote no {missing[0]!r} ({len(missing)} missing)")
    shards = writer.close()
    write_json(Path(directory) / CONFIG_FILE, model_config_to_dict(cfg), sort_keys=True)
    return shards


def fitted_layers(cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]],
                  fit: Callable[[int, Block], object], device: str | torch.device = "cpu"
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass the (name, tensor) pairs on, except that each layer's tensors (consecutive, as every target_tensors
    yields them) are loaded into a Block of `cfg` on `device`, `fit(layer, block)` changes it in place, and the
    block's tensors (on the CPU) are passed on instead, in the layer's order."""
    def start(layer: int, block: Block) -> None:
        fit(layer, block)  # done when it returns: nothing to wait for

    yield from pipelined_layers(cfg, tensors, start, 1, device)


def pipelined_layers(cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]],
                     start: Callable[[int, Block], Callable[[], None] | None], depth: int,
                     device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """`fitted_layers` with fits that run elsewhere: `start(layer, block)` starts the change of the block and
    returns the callable that waits for it to complete (None: complete already). Up to `depth` layers are pending
    at once, each passed on when its fit is complete; the stream keeps its order (a tensor after pending layers
    waits for them). depth 1: each layer is fitted and passed on before the next one is gathered."""
    def jobs():
        layer, names, got = 0, None, {}
        for name, tensor in tensors:
            if not name.startswith("layers."):
                yield lambda pair=(name, tensor): [pair]
                continue
            names = names or layer_names(cfg, layer)
            got[name] = tensor
            if len(got) < len(names):
                continue
            prefix = f"layers.{layer}."
            block = _meta_block(cfg, layer).to_empty(device=device)
            block.load_state_dict({n[len(prefix):]: got.pop(n) for n in names}, strict=True)
            if got:
                raise AssertionError(f"layer {layer} got tensors it does not have: {sorted(got)}")
            yield functools.partial(_layer_tensors, block, names, prefix, start(layer, block))
            del block
            layer, names = layer + 1, None

    for pairs in in_order(jobs(), depth):
        yield from pairs
        del pairs  # the layer's tensors are the consumer's now


def _layer_tensors(block: Block, names: list[str], prefix: str, done: Callable[[], None] | None):
    if done is not None:
        done()
    state = block.state_dict()
    return [(n, state[n[len(prefix):]].detach().cpu()) for n in names]


def in_order(jobs: Iterable[Callable[[], T]], depth: int) -> Iterator[T]:
    """The results of `jobs` in their order: `jobs` starts each job as it gives it (the callable that waits for the
    job and returns its result), and is advanced only while fewer than `depth` jobs are pending."""
    pending: deque = deque()
    for done in jobs:
        pending.append(done)
        if len(pending) >= depth:
            yield pending.popleft()()
    while pending:
        yield pending.popleft()()


class RowWalk:
    """The hidden states [1, S, D] of calibration rows (one unpacked document each) through a model's blocks, one
    block at a time, from the embedding (what streamed_hidden computes; `advance` takes the next block)."""

    def __init__(self, cfg: ModelConfig, embed: torch.Tensor, rows):
        device = embed.device
        ids = [torch.from_numpy(r.tokens.astype(np.int64)).to(device)[None] for r in rows]
        with torch.no_grad():
            self.xs = [embed[x] for x in ids]
        self.contexts = [row_context(cfg, x.shape[1], device) for x in ids]
        self.v_first: list = [None] * len(rows)

    @torch.no_grad()
    def advance(self, block: Block) -> None:
        outs = [block(x, ctx, "padded_bmm", v_first=vf) for x, ctx, vf in zip(self.xs, self.contexts, self.v_first)]
        self.xs = [out[0] for out in outs]
        if block.layer == 0:
            self.v_first = [out[1] for out in outs]


@torch.no_grad()
def streamed_hidden(reader: Reader, rows, on_block: Callable[[int, Block], None] | None = None) -> list[torch.Tensor]:
    """The final-normed hidden states [S, D] of each calibration row, one block in memory at a time (each row is
    one unpacked document, as drift.vpmoe_logits runs it). `on_block(layer, block)` may hook the block before it
    runs (router margins)."""
    cfg = reader.cfg
    ids = [torch.from_numpy(r.tokens.astype(np.int64))[None] for r in rows]
    embed = reader(["embed.weight"])["embed.weight"]
    xs = [embed[x] for x in ids]
    contexts = [row_context(cfg, x.shape[1]) for x in ids]
    v_first: list = [None] * len(rows)
    for layer in range(cfg.model.n_layers):
        block = reader.block(layer)
        if on_block is not None:
            on_block(layer, block)
        outs = [block(x, ctx, "padded_bmm", v_first=vf) for x, ctx, vf in zip(xs, contexts, v_first)]
        xs = [out[0] for out in outs]
        if layer == 0:
            v_first = [out[1] for out in outs]
        del block
    norm = RMSNorm(cfg.model.hidden_size, cfg.model.norm_eps)
    norm.weight.copy_(reader(["final_norm.weight"])["final_norm.weight"])
    return [norm(x)[0] for x in xs]


def row_context(cfg: ModelConfig, seq: int, device: str | torch.device = "cpu") -> AttentionContext:
    """What Transformer.body builds for one unpacked row of `seq` tokens (no KV cache, reference kernel)."""
    position_ids = torch.arange(seq, device=device)[None]
    ctx = AttentionContext(position_ids=position_ids, doc_ids=torch.zeros(1, seq, dtype=torch.long, device=device),
                           token_index=torch.arange(seq, device=device), kernel="reference")
    if not cfg.real:
        a = cfg.attention
        ctx.rope = rotary_cos_sin(position_ids, rope_inv_freq(a.head_dim, a.rope_base, device=device))
    return ctx


def streamed_logits(reader: Reader, rows, on_block=None):
    """A drift.LogitsFn over `rows` (called with them in order) from the streamed hidden states."""
    hidden = streamed_hidden(reader, rows, on_block)
    head = reader(["head.weight"])["head.weight"]
    calls = iter(zip(rows, hidden))

    def run(ids: torch.Tensor) -> torch.Tensor:
        row, h = next(calls)
        if not torch.equal(ids, torch.from_numpy(row.tokens.astype(np.int64))):
            raise AssertionError("streamed logits are served in the order of the rows they were computed for")
        return h @ head.T

    return run
