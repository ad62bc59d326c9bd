"""Measure the real training step (`Trainer.step`) on synthetic batches: tokens/s, ms per phase, peak memory and
MFU. One process, one device."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

from vpmoe import config as config_io
from vpmoe import distributed
from vpmoe.data.loader import read_manifest
from vpmoe.errors import UserError
from vpmoe.model.config import ModelConfig, load_model_config
from vpmoe.perf.synthetic import SyntheticBatches
from vpmoe.train import health
from vpmoe.train.config import TrainConfig
from vpmoe.train.flops import peak_flops
from vpmoe.train.trainer import Trainer


def as_ce_stage(cfg: TrainConfig) -> TrainConfig:
    """Synthetic batches carry no teacher: a KD config is measured as its CE stage (the offline KD loss only adds
    [tokens, K] tensors next to the [tokens, vocab] logits both stages compute; benchmarks/kd_online_step.py
    measures the online teacher)."""
    if cfg.train.stage == "ce":
        return cfg
    return config_io.replace(cfg, {"train.stage": "ce", "loss.ce": 1.0, "loss.kd": 0.0, "loss.confidence_ce": 0.0,
                                   "teacher": None, "distill": None})


def synthetic_trainer(cfg: TrainConfig, model_cfg: ModelConfig | None = None, seed: int = 0) -> Trainer:
    """A Trainer of `cfg` (as its CE stage) on synthetic batches of `data.seq_len` tokens; `model_cfg` replaces the
    config's model (e.g. a shallower one for a benchmark)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UserError("performance tools measure one process on one device; run them without torchrun")
    if cfg.data.seq_len is None:  # the dataset's, when the config names a built one
        if not (Path(cfg.data.path) / "manifest.json").is_file():
            raise UserError("synthetic batches need a sequence length: set data.seq_len (or --seq-len), or point "
                            "data.path at a built dataset")
        cfg = config_io.replace(cfg, {"data.seq_len": read_manifest(cfg.data.path)["seq_len"]})
    cfg = as_ce_stage(cfg)
    model_cfg = model_cfg or load_model_config(cfg.model.config)
    data = SyntheticBatches(model_cfg.model.vocab_size, cfg.data.seq_len, cfg.data.micro_batch_size, seed)
    return Trainer(cfg, distributed.init(cfg.train.device), data, model_cfg, cfg.data.seq_len)


def set_micro_batch(trainer: Trainer, micro_batch: int, grad_accum: int = 1) -> None:
    """Feed micro-batches of a new size (and accumulation) to an existing trainer."""
    old = trainer.data
    trainer.feed(SyntheticBatches(old.vocab_size, old.seq_len, micro_batch, seed=old.drawn), micro_batch, grad_accum)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(trainer: Trainer, warmup: int, steps: int) -> dict:
    """Run `warmup` steps (compilation, optimizer state), then time `steps` steps. Returns a summary."""
    device = trainer.ranks.device
    for _ in range(warmup):
        trainer.step()
    synchronize(device)
    trainer.take_window()  # drop the warmup's sums and phases
    trainer.timer.read()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    begin = time.perf_counter()
    each = []  # per step: the median resists a step slowed by something outside it
    for _ in range(steps):
        start = time.perf_counter()
        trainer.step()
        synchronize(device)
        each.append(time.perf_counter() - start)
    seconds = time.perf_counter() - begin
    window, _ = trainer.take_window()
    record = trainer.metrics(window, seconds)
    step_ms = dict(record["step_ms"])
    step_ms["total"] = 1000 * seconds / steps
    step_ms["median"] = 1000 * statistics.median(each)
    step_ms["other"] = step_ms["total"] - sum(v for k, v in step_ms.items() if k not in ("total", "median"))
    cfg = trainer.cfg
    summary = {
        "model": trainer.model_cfg.model.name,
        "n_layers": trainer.model_cfg.model.n_layers,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "seq_len": trainer.seq_len,
        "micro_batch_size": cfg.data.micro_batch_size,
        "grad_accum": cfg.data.grad_accum,
        "kernels": f"{trainer.model.kernels.attention}+{trainer.model.kernels.experts}",
        "compile": cfg.train.compile,
        "activation_checkpointing": cfg.train.activation_checkpointing,
        "precision": "bf16" if trainer.autocast is not None else "fp32",
        "steps_timed": steps,
        "tokens_per_s": record["tokens_per_s"],
        "step_ms": {k: round(v, 2) for k, v in step_ms.items()},
        "peak_memory_gib": round(record["memory_gib"], 2),
        "train_flops_per_token": trainer.flops_per_token,
        "model_tflops_per_s": record["tokens_per_s"] * trainer.flops_per_token / 1e12,
        "loss": record["loss"],
    }
    if device.type == "cuda":  # between steps: weights, gradients, optimizer state and what graphs keep
        summary["resident_memory_gib"] = round(torch.cuda.memory_allocated(device) / 2**30, 2)
        summary["reserved_memory_gib"] = round(torch.cuda.memory_reserved(device) / 2**30, 2)
    peak = peak_flops(device)
    if peak is not None:
        summary["nominal_peak_tflops"] = peak / 1e12
        summary["mfu_vs_nominal"] = summary["model_tflops_per_s"] * 1e12 / peak
    if window.routing is not None:
        summary["router"] = health.aggregate(health.layer_health(window.routing, trainer.model.expert_biases()))
    return summary
