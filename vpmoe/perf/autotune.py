"""`vpmoe autotune CONFIG`: the largest micro-batch that fits at a sequence length, and the accumulation that
reaches a target global batch.

Each trial runs two full training steps (forward, backward, optimizer: the optimizer state exists from the first
step on) of the config's model, kernels, precision, freezing, compile and checkpointing settings, on synthetic
batches, in one process. Sizes double until one runs out of memory, then a bisection finds the largest that fits.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch._dynamo

from vpmoe import config as config_io
from vpmoe import provenance
from vpmoe.errors import UserError
from vpmoe.perf.measure import measure, set_micro_batch, synthetic_trainer
from vpmoe.train.config import load_train_config


@dataclass
class Trial:
    micro_batch: int
    fits: bool
    peak_memory_gib: float | None = None
    tokens_per_s: float | None = None


def largest_fitting(fits: Callable[[int], bool], limit: int) -> int:
    """The largest n in [1, limit] with fits(n), assuming fits is monotone (True up to some n, then False).
    Doubles from 1, then bisects. Returns 0 when even 1 does not fit."""
    good, bad = 0, None
    n = 1
    while n <= limit:
        if fits(n):
            good = n
            n *= 2
        else:
            bad = n
            break
    if bad is None:
        if good == limit:
            return good
        bad = limit + 1
    while bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good


def accumulation_plan(micro_batch: int, target: int, world_size: int) -> tuple[int, int]:
    """(micro-batch, grad_accum) for a global batch of exactly `target` sequences over `world_size` ranks, with
    the largest micro-batch <= `micro_batch` that divides the per-rank share."""
    if target % world_size:
        raise UserError(f"a global batch of {target} sequences does not split over {world_size} ranks")
    per_rank = target // world_size
    size = max(m for m in range(1, min(micro_batch, per_rank) + 1) if per_rank % m == 0)
    return size, per_rank // size


def autotune(config: str, overrides: list[str], seq_len: int | None, targets: list[int], world_size: int,
             limit: int) -> dict:
    cfg = load_train_config(config, overrides)
    changes = {"data.micro_batch_size": 1, "data.grad_accum": 1}
    if seq_len is not None:
        changes["data.seq_len"] = seq_len
    cfg = config_io.replace(cfg, changes)
    if cfg.train.device == "cpu" or not torch.cuda.is_available():
        raise UserError("autotune measures GPU memory: it needs CUDA and train.device = \"cuda\" or \"auto\"")
    trainer = synthetic_trainer(cfg)
    trials: list[Trial] = []

    def fits(micro_batch: int) -> bool:
        torch._dynamo.reset()  # each size compiles afresh; caches never fill up and fall back to eager
        set_micro_batch(trainer, micro_batch)
        try:
            result = measure(trainer, warmup=1, steps=1)
            trial = Trial(micro_batch, True, result["peak_memory_gib"], result["tokens_per_s"])
        except torch.OutOfMemoryError:
            trial = Trial(micro_batch, False)
        trainer.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        trials.append(trial)
        shown = (f"fits, peak {trial.peak_memory_gib:.1f} GiB, {trial.tokens_per_s:,.0f} tokens/s" if trial.fits
                 else "out of memory")
        print(f"micro-batch {micro_batch:4d} x {cfg.data.seq_len}: {shown}", flush=True)
        return trial.fits

    best = largest_fitting(fits, limit)
    if best == 0:
        raise UserError(f"not even one sequence of {cfg.data.seq_len} tokens fits on "
                        f"{torch.cuda.get_device_name()}; turn on train.activation_checkpointing, freeze more "
                        "groups or shorten data.seq_len")
    plans = []
    for target in targets:
        micro, accum = accumulation_plan(best, target, world_size)
        plans.append({"global_batch": target, "world_size": world_size, "micro_batch_size": micro,
                      "grad_accum": accum, "tokens_per_step": target * cfg.data.seq_len})
    return {
        "provenance": provenance.record("autotune", config_io.config_hash(cfg), config=provenance.portable_name(config),
                                        overrides=overrides, seq_len=cfg.data.seq_len),
        "device": torch.cuda.get_device_name(),
        "seq_len": cfg.data.seq_len,
        "max_micro_batch_size": best,
        "hit_limit": best == limit,
        "trials": [vars(t) for t in trials],
        "plans": plans,
    }


def print_report(report: dict) -> None:
    limit_note = " (the search limit; raise --max-micro-batch to look further)" if report["hit_limit"] else ""
    print(f"\nlargest micro-batch at seq_len {report['seq_len']} on {report['device']}: "
          f"{report['max_micro_batch_size']}{limit_note}")
    for plan in report["plans"]:
        print(f"global batch {plan['global_batch']:5d} on {plan['world_size']} rank(s): "
              f"--set data.micro_batch_size={plan['micro_batch_size']} --set data.grad_accum={plan['grad_accum']}"
              f"  ({plan['tokens_per_step']:,} tokens per step)")
