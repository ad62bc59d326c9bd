"""Measure the real training step (`Trainer.train_step`) on synthetic batches: tokens/s, ms per phase, peak
memory and MFU. One process, one device."""

from __future__ import annotations

import dataclasses
import os
import time

import torch

from vpmoe.errors import UserError
from vpmoe.model import load_model_config
from vpmoe.perf.synthetic import SyntheticBatches
from vpmoe.train import health
from vpmoe.train.config import TrainConfig
from vpmoe.train.distributed import setup
from vpmoe.train.flops import peak_flops
from vpmoe.train.trainer import StepStats, Trainer


def as_ce_stage(cfg: TrainConfig) -> TrainConfig:
    """Synthetic batches carry no teacher: a KD config is measured as its CE stage (the KD loss itself only adds
    [tokens, K] tensors next to the [tokens, vocab] logits both stages compute)."""
    if cfg.train.stage == "ce":
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stage="ce"),
                               loss=dataclasses.replace(cfg.loss, ce=1.0, kd=0.0, confidence_ce=0.0))


def synthetic_trainer(cfg: TrainConfig, model_overrides: list[str] | None = None, seed: int = 0) -> Trainer:
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UserError("performance tools measure one process on one device; run them without torchrun")
    cfg = as_ce_stage(cfg)
    vocab = load_model_config(cfg.model.config, model_overrides).model.vocab_size
    batches = SyntheticBatches(vocab, cfg.data.seq_len, cfg.data.micro_batch_size, seed)
    return Trainer(cfg, setup(cfg.train.device), batches=batches, model_overrides=model_overrides)


def set_micro_batch(trainer: Trainer, micro_batch: int, grad_accum: int = 1) -> None:
    """Feed micro-batches of a new size (and accumulation) to an existing trainer."""
    data = dataclasses.replace(trainer.cfg.data, micro_batch_size=micro_batch, grad_accum=grad_accum)
    trainer.cfg = dataclasses.replace(trainer.cfg, data=data)
    old = trainer.loader
    trainer.loader = SyntheticBatches(old.vocab_size, old.seq_len, micro_batch, seed=old.drawn)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(trainer: Trainer, warmup: int, steps: int) -> dict:
    """Run `warmup` steps (compilation, optimizer state), then time `steps` steps. Returns a summary."""
    device = trainer.d.device
    for _ in range(warmup):
        trainer.train_step(StepStats())
        trainer.step += 1
    synchronize(device)
    trainer.timer.read()  # drop the warmup's phases
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stats = StepStats()
    begin = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(stats)
        trainer.step += 1
    synchronize(device)
    seconds = time.perf_counter() - begin
    record = trainer.log_record(stats, seconds)
    step_ms = dict(record["step_ms"])
    step_ms["total"] = 1000 * seconds / steps
    step_ms["other"] = step_ms["total"] - sum(v for k, v in step_ms.items() if k != "total")
    cfg = trainer.cfg
    summary = {
        "model": trainer.model_cfg.model.name,
        "n_layers": trainer.model_cfg.model.n_layers,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "seq_len": cfg.data.seq_len,
        "micro_batch_size": cfg.data.micro_batch_size,
        "grad_accum": cfg.data.grad_accum,
        "kernels": f"{trainer.model.kernels.attention}+{trainer.model.kernels.experts}",
        "compile": cfg.train.compile,
        "activation_checkpointing": cfg.train.activation_checkpointing,
        "precision": "bf16" if trainer.bf16 else "fp32",
        "steps_timed": steps,
        "tokens_per_s": record["tokens_per_s"],
        "step_ms": {k: round(v, 2) for k, v in step_ms.items()},
        "peak_memory_gib": round(record["memory_gib"], 2),
        "train_flops_per_token": trainer.flops_per_token,
        "model_tflops_per_s": record["tokens_per_s"] * trainer.flops_per_token / 1e12,
        "loss": record["loss"],
    }
    peak = peak_flops(device)
    if peak is not None:
        summary["nominal_peak_tflops"] = peak / 1e12
        summary["mfu_vs_nominal"] = summary["model_tflops_per_s"] * 1e12 / peak
    if stats.routing is not None:
        summary["router"] = health.aggregate(health.layer_health(stats.routing, trainer.model.expert_biases()))
    return summary
