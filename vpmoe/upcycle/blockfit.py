"""Block-wise morph (step 3 with calibration data): each real block learns to reproduce its compat block on the
compat model's own activations.

The calibration rows pass through the compat model one block at a time. For block l, with x the compat hidden
states at its input and y = compat_block_l(x) its output, the real block l (as `morph.convert` mapped it) is fitted
on the fit rows to minimize |real_block_l(x) - y|^2 / |y - x|^2 (the error relative to what the block adds to the
residual stream), with Adam, training only the parameter groups named in `trainable` (what the morph introduced or
changed); every other parameter stays as mapped. Blocks are independent given the compat activations (each reads
x, never the real model's own stream). With `workers` = 1 they run in order, so that one block's activations are in
memory at a time, and with upcycle.stream (`streamed_tensors`) one compat and one real block too: the compat
activations are computed block by block from the embedding, each compat block read alone from disk. The one link
between blocks is the value residual: later blocks mix in layer 0's V, which the real model computes from the
embeddings; it is taken from the (fitted) real layer 0.

With `workers` = W > 1 (morph.workers, CPU only), layer 0 is fitted here, then layers 1.. in a pool of W spawned
processes: this process walks the compat blocks and hands each layer's fit (the real block's weights, its rows'
activations and v_first, as plain tensors) to the pool, at most W layers pending at once (W blocks and W sets of
activations in memory), each one taken back in layer order. A job runs `fit_block` as the serial walk does.

Before the fit, a local layer's TPA Q may be re-initialized activation-aware (`morph.svd_heads_whitened` with the
Gram matrix of the block's normed inputs). The error is measured on held-out rows for the mapped block, after the
Q init and after the fit; a block whose held-out error does not drop below the mapped one keeps its mapped weights.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.multiprocessing

from vpmoe.model.config import ModelConfig
from vpmoe.model.naming import param_kind
from vpmoe.model.transformer import Block, Transformer
from vpmoe.upcycle import morph
from vpmoe.upcycle.config import FIT_GROUPS
from vpmoe.upcycle.drift import CalibrationRow
from vpmoe.upcycle.stream import Reader, _meta_block, in_order, pipelined_layers, row_context

TPA_LEAVES = ("q_a", "q_b", "k_a", "k_b", "v_a", "v_b")


@dataclass
class FitSettings:
    steps: int = 200  # Adam steps per block
    lr: float = 1e-3
    rows_per_step: int = 4  # fit rows whose gradients one step sums
    q_init: str = "whitened"  # "whitened" (activation-aware SVD) or "svd" (keep the mapping's weight-space SVD)
    trainable: tuple[str, ...] = FIT_GROUPS
    ridge: float = 1e-6  # relative ridge of the whitening's Gram matrix


def trainable_names(block: Block, groups: tuple[str, ...]) -> list[str]:
    """The block's parameters (names relative to the block) in the named groups:
    tpa: the TPA factors of a local layer (A and B of q, k, v); bias: every bias the morph added at zero (qkv, o,
    FFN; not the TPA A biases, which are tpa); sink, value_residual, frequency (GRAPE-M); global_qk: q/k projection
    weights of a global layer, whose positions the morph changed from RoPE to NoPE + ALiBi."""
    names = []
    for name, _ in block.named_parameters():
        leaf_module = name.split(".")[-2] if "." in name else ""
        kind = param_kind(f"layers.{block.layer}.{name}")
        if leaf_module in TPA_LEAVES:
            group = "tpa"
        elif kind in ("bias", "sink", "value_residual", "frequency"):
            group = kind
        elif block.attn.kind == "global" and name in ("attn.q_proj.weight", "attn.k_proj.weight"):
            group = "global_qk"
        else:
            continue
        if group in groups:
            names.append(name)
    return names


def _run(block: Block, kernel: str, x: torch.Tensor, ctx, v_first) -> tuple:
    out, v, _ = block(x[None], ctx, kernel, v_first=v_first)
    return out[0], v


def relative_error(block: Block, kernel: str, xs, ys, ctxs, v_firsts) -> float:
    """|block(x) - y| / |y - x| over the rows (float64 sums of fp32 outputs)."""
    num = den = 0.0
    with torch.no_grad():
        for x, y, ctx, vf in zip(xs, ys, ctxs, v_firsts):
            out, _ = _run(block, kernel, x, ctx, vf)
            num += float((out - y).double().square().sum())
            den += float((y - x).double().square().sum())
    return (num / max(den, 1e-300)) ** 0.5


class BlockWalk:
    """The block-wise fit, one layer at a time: `step(layer, compat_block, real_block)` fits the real block (in
    place) on the compat activations at its input and moves them on through the compat block. The in-memory fit
    (`fit_blocks`) and the streamed one (`streamed_tensors`) both run it, so they do the same arithmetic; `start`
    hands the fit of a layer after 0 to a pool of processes instead (`fit_pool`)."""

    def __init__(self, embed: torch.Tensor, compat_cfg: ModelConfig, real_cfg: ModelConfig,
                 fit_rows: list[CalibrationRow], heldout_rows: list[CalibrationRow], settings: FitSettings,
                 kernel: str = "padded_bmm", workers: int = 1):
        rows = fit_rows + heldout_rows
        self.n_fit, self.settings, self.kernel = len(fit_rows), settings, kernel
        self.real_cfg, self.workers = real_cfg, workers
        device = embed.device
        if workers > 1 and device.type != "cpu":
            raise ValueError(f"morph.workers = {workers} fits blocks in CPU processes, the models are on {device}: "
                             "set morph.workers = 1 on CUDA")
        self.ids = [torch.from_numpy(r.tokens.astype("int64")).to(device) for r in rows]
        self.compat_ctx = [row_context(compat_cfg, x.shape[0], device) for x in self.ids]
        self.real_ctx = [row_context(real_cfg, x.shape[0], device) for x in self.ids]
        with torch.no_grad():
            self.xs = [embed[x] for x in self.ids]  # the compat hidden states at the next block's input
        self.v_first = [None] * len(rows)
        self.blocks: list[dict] = []

    def step(self, layer: int, compat_block: Block, block: Block) -> dict:
        with torch.no_grad():
            ys = [_run(compat_block, self.kernel, x, ctx, None)[0] for x, ctx in zip(self.xs, self.compat_ctx)]
        entry = fit_block(layer, compat_block.attn.q_proj.weight, block, self.kernel, self.xs, ys, self.real_ctx,
                          self.v_first, self.n_fit, self.settings)
        self.blocks.append(entry)
        if layer == 0:
            with torch.no_grad():
                self.v_first = [_run(block, self.kernel, x, ctx, None)[1] for x, ctx in zip(self.xs, self.real_ctx)]
        self.xs = ys
        return entry

    def start(self, layer: int, compat_block: Block, block: Block, pool: Executor | None) -> Callable[[], dict]:
        """Start the fit of `block`: in `pool` for a layer after 0 (layer 0 gives the others v_first: it is
        fitted here, as without a pool); returns the callable that waits for the fit, loads its weights into
        `block` and returns its report entry. Fits started in a pool must be waited for in layer order."""
        if pool is None or layer == 0:
            entry = self.step(layer, compat_block, block)
            return lambda: entry
        with torch.no_grad():
            ys = [_run(compat_block, self.kernel, x, ctx, None)[0] for x, ctx in zip(self.xs, self.compat_ctx)]
        tensors = {"state": block.state_dict(), "q_weight": compat_block.attn.q_proj.weight.detach(),
                   "xs": self.xs, "ys": ys, "v_first": self.v_first}
        future = pool.submit(_fit_job, layer, self.real_cfg, _pack(tensors), self.n_fit, self.settings, self.kernel)
        self.xs = ys

        def done() -> dict:
            try:
                entry, state = future.result()
            except Exception as e:
                raise RuntimeError(f"block-wise morph: the fit of layer {layer} failed in a worker process: "
                                   f"{type(e).__name__}: {e}") from e
            block.load_state_dict(_unpack(state), strict=True)
            if entry["layer"] != len(self.blocks):
                raise AssertionError(f"block fits taken back out of order: layer {entry['layer']}")
            self.blocks.append(entry)
            return entry

        return done

    def report(self) -> dict:
        s = self.settings
        return {
            "fit_tokens": int(sum(x.shape[0] for x in self.ids[:self.n_fit])),
            "heldout_tokens": int(sum(x.shape[0] for x in self.ids[self.n_fit:])),
            "steps": s.steps, "lr": s.lr, "q_init": s.q_init, "workers": self.workers,
            "trainable": list(s.trainable),
            "blocks": self.blocks,
            "note": "rel_err = |real_block(x) - compat_block(x)| / |compat_block(x) - x| on held-out rows, x the "
                    "compat model's hidden states at the block input; mapped: the weight mapping alone, init: after "
                    "the Q init, fit: after the fit; kept: the weights the block ends with",
        }


def fit_blocks(compat: Transformer, real: Transformer, fit_rows: list[CalibrationRow],
               heldout_rows: list[CalibrationRow], settings: FitSettings, progress=None, workers: int = 1) -> dict:
    """Fit every block of `real` (in place) to its compat block; returns the per-block report for drift.json.
    Both models on one device (morph.device); `workers` > 1: layers 1.. in that many CPU processes."""
    walk = BlockWalk(compat.embed.weight, compat.cfg, real.cfg, fit_rows, heldout_rows, settings,
                     compat.kernels.experts, workers)
    with fit_pool(workers) as pool:
        started = (walk.start(layer, c_block, r_block, pool)
                   for layer, (c_block, r_block) in enumerate(zip(compat.layers, real.layers)))
        for layer, entry in enumerate(in_order(started, workers)):
            if progress is not None:
                progress(layer, entry)
    return walk.report()


def streamed_tensors(reader: Reader, cfg: ModelConfig, mapped: Iterator[tuple[str, torch.Tensor]],
                     fit_rows: list[CalibrationRow], heldout_rows: list[CalibrationRow], settings: FitSettings,
                     details: dict, device: str | torch.device = "cpu", progress=None, workers: int = 1
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """The block-wise morph from disk, one layer at a time: `mapped` is the mapped morph's (name, tensor) stream
    (morph.target_tensors over `reader`, the compat object); each real layer is gathered from it, fitted against the
    compat block read alone from `reader`, and yielded fitted (or kept mapped). details["blockwise"] gets the
    report of `fit_blocks` at the end. In memory: a compat block, a real block and the calibration activations
    (`workers` > 1: up to that many real blocks and sets of activations, the layers still yielded in order)."""
    embed = reader(["embed.weight"])["embed.weight"].to(device)
    walk = BlockWalk(embed, reader.cfg, cfg, fit_rows, heldout_rows, settings, workers=workers)
    del embed

    with fit_pool(workers) as pool:
        def start(layer: int, block: Block) -> Callable[[], None]:
            done = walk.start(layer, reader.block(layer).to(device), block, pool)

            def finish() -> None:
                entry = done()
                if progress is not None:
                    progress(layer, entry)

            return finish

        yield from pipelined_layers(cfg, mapped, start, workers, device)
    details["blockwise"] = walk.report()


@contextmanager
def fit_pool(workers: int) -> Iterator[Executor | None]:
    """A pool of `workers` spawned processes for block fits, each with an equal share of this process's torch
    threads and its default dtype; shut down on every exit (pending fits cancelled, running ones waited for).
    None for one worker: the fits run here."""
    if workers == 1:
        yield None
        return
    threads = max(1, torch.get_num_threads() // workers)
    pool = ProcessPoolExecutor(workers, mp_context=torch.multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(threads, torch.get_default_dtype()))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _init_worker(threads: int, dtype: torch.dtype) -> None:
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)


def _fit_job(layer: int, cfg: ModelConfig, packed: bytes, n_fit: int, settings: FitSettings,
             kernel: str) -> tuple[dict, bytes]:
    """One layer's fit in a worker process: the block of `cfg` rebuilt from its weights (their dtypes kept), its
    rows' contexts as BlockWalk builds them; returns the report entry and the block's weights after the fit."""
    t = _unpack(packed)
    block = _meta_block(cfg, layer).to_empty(device="cpu")
    block.load_state_dict(t["state"], strict=True, assign=True)
    ctxs = [row_context(cfg, x.shape[0]) for x in t["xs"]]
    entry = fit_block(layer, t["q_weight"], block, kernel, t["xs"], t["ys"], ctxs, t["v_first"], n_fit, settings)
    return entry, _pack(block.state_dict())


def _pack(tensors) -> bytes:
    """Tensors as bytes for another process: copied through the pipe, not shared memory (/dev/shm may be small,
    and sharing would move this process's own tensors there)."""
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.getvalue()


def _unpack(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


def fit_block(layer: int, q_weight: torch.Tensor, block: Block, kernel: str, xs, ys, ctxs, v_firsts, n_fit: int,
              settings: FitSettings) -> dict:
    """Fit one real block on rows [:n_fit], measure on rows [n_fit:] (all rows if there are none held out);
    `q_weight` is the compat block's W_q (the whitened Q init of a local layer)."""
    held = slice(n_fit, None) if len(xs) > n_fit else slice(None)
    measure = lambda: relative_error(block, kernel, xs[held], ys[held], ctxs[held], v_firsts[held])  # noqa: E731
    mapped_state = {k: v.clone() for k, v in block.state_dict().items()}
    mapped = measure()
    entry = {"layer": layer, "kind": block.attn.kind, "rel_err": {"mapped": mapped}}
    if block.attn.kind == "local" and settings.q_init == "whitened":
        entry["q_whitened_relative_error"] = whiten_q(block, q_weight, xs[:n_fit], settings.ridge)
    entry["rel_err"]["init"] = measure()
    names = trainable_names(block, settings.trainable)
    params = dict(block.named_parameters())
    for name, p in params.items():
        p.requires_grad_(name in names)
    if names and settings.steps > 0:
        opt = torch.optim.Adam([params[n] for n in names], lr=settings.lr)
        for step in range(settings.steps):
            opt.zero_grad(set_to_none=True)
            for i in ((step * settings.rows_per_step + j) % n_fit for j in range(settings.rows_per_step)):
                out, _ = _run(block, kernel, xs[i], ctxs[i], v_firsts[i])
                den = (ys[i] - xs[i]).square().sum().clamp_min(1e-12)
                ((out - ys[i]).square().sum() / den / settings.rows_per_step).backward()
            opt.step()
    for p in params.values():
        p.requires_grad_(True)
    entry["rel_err"]["fit"] = measure()
    entry["trained"] = names
    if entry["rel_err"]["fit"] >= mapped:  # never worse than the mapping: keep it
        block.load_state_dict(mapped_state)
        entry["kept"] = "mapped"
    else:
        entry["kept"] = "fit"
    return entry


@torch.no_grad()
def whiten_q(block: Block, q_weight: torch.Tensor, xs, ridge: float) -> float:
    """Re-initialize a local block's TPA Q from the compat W_q `q_weight` by the activation-aware SVD, with the
    Gram matrix of the block's normed inputs `xs`; returns its relative error on those activations."""
    attn = block.attn
    normed = torch.cat([block.attn_norm(x) for x in xs]).double()
    a_bias, b, err = morph.svd_heads_whitened(q_weight.cpu(), attn.n_heads, attn.q_a.out_features // attn.n_heads,
                                              (normed.T @ normed).cpu(), ridge)
    attn.q_a.weight.zero_()
    attn.q_a.bias.copy_(a_bias.flatten())
    attn.q_b.weight.copy_(b)
    return err
