"""`vpmoe train CONFIG`: one training stage (ce or kd_offline) in one loop, single process or torchrun + FSDP2.

Each optimizer step takes `grad_accum` micro-batches per rank. Their span token counts are summed over the
whole global batch before the first forward, so every micro-batch's loss is already normalized by the global
counts (see vpmoe.train.losses) and gradients add up to the global-batch gradient exactly. FSDP2 averages
gradients over ranks, so the span terms are multiplied by the world size; the MoE aux loss (a per-sequence
mean) is divided by the number of micro-batches and left to FSDP's average.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vpmoe import config as config_io
from vpmoe import provenance
from vpmoe.data.loader import Batch, Loader, read_manifest
from vpmoe.errors import RunError, UserError
from vpmoe.model import Kernels, build_model, load_config, load_model_config, load_weights
from vpmoe.model.config import ModelConfig, model_config_to_dict
from vpmoe.model.naming import freeze_group
from vpmoe.optim import build_optimizer, build_scheduler
from vpmoe.teacher.sidecar import TeacherSidecar, batch_rows
from vpmoe.train import checkpoint, health, losses
from vpmoe.train.config import TrainConfig, TrainSection, load_train_config
from vpmoe.train.distributed import Dist, all_reduce_sum, setup, shard_model
from vpmoe.train.flops import peak_flops, train_flops_per_token
from vpmoe.train.metrics import MetricsSink
from vpmoe.train.timing import PhaseTimer

SPANS = {1: "reasoning", 2: "final"}


def train_from_config(path: str, overrides: list[str]) -> Path:
    return train(load_train_config(path, overrides))


def train(cfg: TrainConfig) -> Path:
    d = setup(cfg.train.device)
    try:
        return Trainer(cfg, d).run()
    finally:
        from vpmoe.train.distributed import finish

        finish(d)


def apply_freeze(model: torch.nn.Module, groups: list[str]) -> list[str]:
    """Freeze every parameter of the named groups; a group that matches nothing is an error."""
    frozen, hit = [], set()
    for name, param in model.named_parameters():
        group = freeze_group(name)
        if group in groups:
            param.requires_grad_(False)
            frozen.append(name)
            hit.add(group)
    missing = [g for g in groups if g not in hit]
    if missing:
        raise UserError(f"train.freeze: group {missing[0]!r} matches no parameter of this model")
    return frozen


def build_training_model(model_cfg: ModelConfig, train: TrainSection, device: torch.device, init_from: str = ""):
    """The model as a training stage runs it (before FSDP): kernels, initial weights, frozen groups, activation
    checkpointing and compiled blocks. Returns (model, names of frozen parameters)."""
    kernels = Kernels.fast() if train.kernels == "fast" else Kernels()
    model = build_model(model_cfg, device=device, kernels=kernels)
    if init_from:
        load_weights(model, init_from)
    frozen = apply_freeze(model, train.freeze)
    model.activation_checkpointing = train.activation_checkpointing
    if train.compile == "cudagraphs" and device.type != "cuda":
        raise UserError(f"train.compile = \"cudagraphs\" needs CUDA, the model runs on {device.type}; "
                        "use compile = \"off\"")
    if train.compile != "off":
        model.compile_blocks(cuda_graphs=train.compile == "cudagraphs")
    return model, frozen


@dataclass
class StepStats:
    """Sums over the micro-batches of one or more steps (divided by span counts when logged)."""

    terms: dict[str, float] = field(default_factory=dict)
    span_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    span_counts: torch.Tensor | None = None
    routing: torch.Tensor | None = None
    tokens: int = 0
    steps: int = 0


class Trainer:
    """`batches` replaces the dataset loader (benchmarks and autotuning feed synthetic batches, stage ce only);
    `model_overrides` (SECTION.KEY=VALUE) change the model config, e.g. its depth for a benchmark."""

    def __init__(self, cfg: TrainConfig, d: Dist, batches=None, model_overrides: list[str] | None = None):
        self.cfg, self.d = cfg, d
        self.run_dir = Path(cfg.run.dir)
        self.stage = cfg.train.stage
        random.seed(cfg.run.seed)
        np.random.seed(cfg.run.seed)
        torch.manual_seed(cfg.run.seed)

        self.model_cfg = load_model_config(cfg.model.config, model_overrides)
        if cfg.model.init_from:
            source = load_config(cfg.model.init_from)
            if source != self.model_cfg:
                raise UserError(f"model.init_from {cfg.model.init_from} holds a {source.model.name} model, which "
                                f"differs from model.config {cfg.model.config}")
        self.bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and d.device.type == "cuda")
        if self.bf16 and d.device.type != "cuda":
            raise UserError("train.precision = \"bf16\" is for CUDA; use \"fp32\" or \"auto\" on the CPU")
        # CUDA-graphed blocks: gradients must live outside the graphs' memory pool (see allocate_grads)
        self.graph_safe_grads = cfg.train.compile == "cudagraphs"
        if self.graph_safe_grads and d.distributed:
            raise UserError("train.compile = \"cudagraphs\" runs on one GPU only (FSDP manages gradients itself); "
                            "with several ranks use compile = \"on\"")
        self.model, self.frozen = build_training_model(self.model_cfg, cfg.train, d.device, cfg.model.init_from)
        self.update_bias = self.model_cfg.moe.enabled and "router" not in cfg.train.freeze
        if d.distributed:
            shard_model(self.model, d)
        self.optimizer, table = build_optimizer(self.model.named_parameters(), cfg.optim)
        try:
            self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.steps)
        except ValueError as e:
            raise UserError(f"{e} (optim.warmup_steps, optim.decay_steps, train.steps)") from None
        if d.is_main:
            print(table)

        if batches is None:
            self.manifest = read_manifest(cfg.data.path)
            self.loader = Loader(cfg.data.path, "train", cfg.data.seq_len, cfg.data.micro_batch_size, cfg.run.seed,
                                 rank=d.rank, world_size=d.world_size)
        elif self.stage != "ce":
            raise UserError(f"synthetic batches carry no teacher: they run stage \"ce\", not {self.stage!r}")
        else:
            self.manifest, self.loader = {}, batches
        self.teacher = None
        if self.stage == "kd_offline":
            self.teacher = TeacherSidecar(cfg.data.path, "train")
        self.span_weights = torch.tensor([0.0, *cfg.loss.span_weights], device=d.device)
        self.step = 0
        self.confidence_mean: float | None = None
        self.flops_per_token = train_flops_per_token(self.model_cfg, cfg.data.seq_len)
        self.peak = peak_flops(d.device)
        self.timer = PhaseTimer(d.device)

    # ---- state -------------------------------------------------------------------------------------------------

    def trainer_state(self) -> dict:
        return {
            "step": self.step, "scheduler": self.scheduler.state_dict(), "loader": self.loader.state_dict(),
            "confidence_mean": self.confidence_mean,
        }

    def resume(self) -> bool:
        path = checkpoint.latest(self.run_dir)
        if path is None:
            return False
        state = checkpoint.load(path, self.model, self.optimizer, self.d)
        self.step = state["step"]
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["loader"])
        self.confidence_mean = state["confidence_mean"]
        if self.d.is_main:
            print(f"resumed from {path} (step {self.step})")
        return True

    def save(self) -> Path:
        files = {
            "config.toml": config_io.dumps_toml(self.cfg), "provenance.json": self.provenance_text,
            "model_config.json": json.dumps(model_config_to_dict(self.model_cfg), indent=2, sort_keys=True) + "\n",
        }
        return checkpoint.save(self.run_dir, self.step, self.model, self.optimizer, self.trainer_state(), self.d,
                               files, self.cfg.checkpoint.keep)

    # ---- the loop ----------------------------------------------------------------------------------------------

    def run(self) -> Path:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.provenance_text = json.dumps(self.provenance(), indent=2) + "\n"
        self.resume()
        if self.d.is_main:
            provenance.atomic_write_text(self.run_dir / "config.toml", config_io.dumps_toml(self.cfg))
            provenance.atomic_write_text(self.run_dir / "provenance.json", self.provenance_text)
            _truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
        sink = MetricsSink(self.run_dir, self.cfg.logging, self.run_dir.name, config_io.to_dict(self.cfg)) \
            if self.d.is_main else None
        bar = tqdm(total=self.cfg.train.steps, initial=self.step, desc=f"train {self.stage}", unit="step",
                   disable=not self.d.is_main or None)
        stats, start = StepStats(), time.perf_counter()
        try:
            while self.step < self.cfg.train.steps:
                self.train_step(stats)
                self.step += 1
                bar.update(1)
                last = self.step == self.cfg.train.steps
                if self.step % self.cfg.train.log_every == 0 or last:
                    record = self.log_record(stats, time.perf_counter() - start)
                    if sink is not None:
                        sink.log(self.step, record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                    self.check_health(record)
                    stats, start = StepStats(), time.perf_counter()
                if self.step % self.cfg.checkpoint.every == 0 or last:
                    self.save()
        finally:
            bar.close()
            if sink is not None:
                sink.close()
        final = checkpoint.latest(self.run_dir)
        if self.d.is_main:
            print(f"wrote {self.run_dir}: {self.step} steps, last checkpoint {final}")
        return self.run_dir

    def train_step(self, stats: StepStats) -> None:
        cfg, d = self.cfg, self.d
        batches = [next(self.loader).to(d.device) for _ in range(cfg.data.grad_accum)]
        counts = all_reduce_sum(sum(losses.span_counts(b.label_spans) for b in batches), d)
        teachers = [None] * len(batches)
        if self.teacher is not None:
            teachers = [batch_rows(self.teacher, b.sample_index.tolist(), d.device) for b in batches]
        if cfg.loss.confidence_ce > 0:
            self.update_confidence_mean(teachers)

        if self.graph_safe_grads:
            self.allocate_grads()
        routing = None
        step_terms: dict[str, torch.Tensor] = {}
        for batch, teacher in zip(batches, teachers):
            with self.timer.phase("forward"):
                loss, terms, sums, batch_routing = self.micro_step(batch, teacher, counts)
            with self.timer.phase("backward"):
                loss.backward()
            for key, value in terms.items():
                step_terms[key] = step_terms.get(key, 0) + value.detach()
            for key, value in sums.items():
                stats.span_sums[key] = stats.span_sums.get(key, 0) + value.detach()
            if batch_routing is not None:
                routing = batch_routing if routing is None else routing + batch_routing

        with self.timer.phase("optimizer"):
            grad_norm = self.clip_gradients()
            terms_now = {k: all_reduce_sum(v.clone(), d) for k, v in step_terms.items()}
            if not all(math.isfinite(v.item()) for v in terms_now.values()) or not math.isfinite(grad_norm):
                self.fail_non_finite(terms_now, grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=not self.graph_safe_grads)
            if routing is not None:
                routing = all_reduce_sum(routing, d)
                if self.update_bias:
                    self.model.update_expert_bias(routing)
                stats.routing = routing if stats.routing is None else stats.routing + routing

        for key, value in terms_now.items():
            stats.terms[key] = stats.terms.get(key, 0.0) + value.item()
        stats.terms["grad_norm"] = stats.terms.get("grad_norm", 0.0) + grad_norm
        stats.span_counts = counts if stats.span_counts is None else stats.span_counts + counts
        stats.tokens += int(sum(b.input_ids.numel() for b in batches)) * d.world_size
        stats.steps += 1

    def allocate_grads(self) -> None:
        """Zero gradients for every trainable parameter that has none, so that backward accumulates into them
        in place instead of keeping a tensor from a CUDA graph's memory pool (the next replay overwrites it)."""
        for p in self.model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)

    def micro_step(self, batch: Batch, teacher: dict | None, counts: torch.Tensor):
        cfg = self.cfg
        mask = batch.label_spans > 0
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with autocast:
            out = self.model(batch.input_ids, batch.position_ids, batch.doc_ids, logits_at=mask)
        logits = out.logits
        targets = batch.labels[mask]
        spans = batch.label_spans[mask]
        ce = losses.cross_entropy(logits, targets)
        terms: dict[str, torch.Tensor] = {}
        sums = {"ce": losses.span_sums(ce.detach(), spans)}
        if cfg.loss.ce > 0:
            terms["ce"] = cfg.loss.ce * losses.span_normalized(ce, spans, counts, self.span_weights)
        if teacher is not None and cfg.loss.kd > 0:
            kd = losses.topk_kl(logits, teacher["topk_ids"], teacher["topk_logprobs"], cfg.loss.temperature)
            terms["kd"] = cfg.loss.kd * losses.span_normalized(kd, spans, counts, self.span_weights)
            sums["kd"] = losses.span_sums(kd.detach(), spans)
        if teacher is not None and cfg.loss.confidence_ce > 0:
            weights = losses.confidence_weights(teacher["target_logprob"], self.confidence_mean,
                                                cfg.loss.temperature)
            terms["confidence_ce"] = cfg.loss.confidence_ce * losses.span_normalized(
                weights * ce, spans, counts, self.span_weights)
        loss = self.d.world_size * sum(terms.values())
        if out.aux_loss is not None:
            aux = self.model_cfg.moe.aux_loss_coeff * out.aux_loss / cfg.data.grad_accum
            terms["aux"] = aux / self.d.world_size  # logged as the mean over ranks after the sum-reduce
            loss = loss + aux
        return loss, terms, sums, out.routing_counts

    def update_confidence_mean(self, teachers: list[dict]) -> None:
        """EMA of the global batch's mean teacher log-prob of the actual tokens (exact across resume)."""
        total = torch.stack([sum(t["target_logprob"].sum() for t in teachers),
                             torch.tensor(float(sum(len(t["target_logprob"]) for t in teachers)),
                                          device=self.d.device)]).double()
        total = all_reduce_sum(total, self.d)
        batch_mean = (total[0] / total[1].clamp(min=1)).item()
        m = self.cfg.loss.confidence_momentum
        self.confidence_mean = batch_mean if self.confidence_mean is None else m * self.confidence_mean + (1 - m) * batch_mean

    def clip_gradients(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.cfg.train.grad_clip or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    def fail_non_finite(self, terms: dict[str, torch.Tensor], grad_norm: float) -> None:
        bad = sorted({name.rsplit(".", 1)[0] for name, p in self.model.named_parameters()
                      if p.grad is not None and not torch.isfinite(p.grad).all()})
        shown = ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
        raise RunError(
            f"non-finite loss or gradient at step {self.step + 1}: {shown}, grad_norm={grad_norm:.4g}; "
            f"modules with non-finite gradients: {bad[:10] or 'none'}. Resume from the last checkpoint with a "
            f"lower learning rate (optim.lr_matrix / optim.lr_adam) or stricter train.grad_clip."
        )

    # ---- observability ---------------------------------------------------------------------------------------

    def log_record(self, stats: StepStats, seconds: float) -> dict:
        n = max(stats.steps, 1)
        terms = {k: v / n for k, v in stats.terms.items() if k != "grad_norm"}
        counts = stats.span_counts  # already summed over the global batch
        spans = {}
        for index, name in SPANS.items():
            entry = {"tokens": int(counts[index].item())}
            for key, value in stats.span_sums.items():
                total = all_reduce_sum(value.clone(), self.d)[index].item()
                entry[key] = total / max(counts[index].item(), 1)
            spans[name] = entry
        lrs = {}
        for group in self.optimizer.param_groups:
            lrs.setdefault(group.get("family", "group"), group["lr"])
        record = {
            "loss": sum(terms.values()),
            "terms": terms,
            "spans": spans,
            "lr": lrs,
            "grad_norm": stats.terms.get("grad_norm", 0.0) / n,
            "tokens_per_s": stats.tokens / max(seconds, 1e-9),
            "step_ms": {phase: ms / n for phase, ms in self.timer.read().items()},
            "epoch": self.loader.epoch,
        }
        if self.peak is not None:
            record["mfu"] = record["tokens_per_s"] * self.flops_per_token / (self.peak * self.d.world_size)
        if self.d.device.type == "cuda":
            record["memory_gib"] = torch.cuda.max_memory_allocated(self.d.device) / 2**30
        else:
            record["memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        if stats.routing is not None:
            per_layer = health.layer_health(stats.routing, self.model.expert_biases())
            record["router"] = health.aggregate(per_layer)
            record["router_layers"] = {
                f"layer_{layer}": {k: v[i].item() for k, v in per_layer.items()}
                for i, layer in enumerate(self.model_cfg.moe_layers)
            }
            self._per_layer = per_layer
            self._routed_tokens = int(stats.routing[0].sum().item()) // max(self.model_cfg.moe.topk, 1)
        return record

    def check_health(self, record: dict) -> None:
        if "router" not in record or not self.cfg.health.collapse_check:
            return
        if self._routed_tokens < self.cfg.health.collapse_min_tokens:
            return
        moe = self.model_cfg.moe
        bad = health.collapsed_layers(self._per_layer, moe.n_experts, moe.topk)
        if bad:
            layers = [self.model_cfg.moe_layers[i] for i in bad]
            raise RunError(
                f"router collapse at step {self.step}: MoE layer(s) {layers} route almost every token to "
                f"{moe.topk} experts (CV {self._per_layer['cv_pct'][bad[0]].item():.0f}%). Resume from an earlier "
                f"checkpoint with a lower optim.lr_adam (the router's LR), a higher moe.bias_update_rate, or "
                f"symmetry-breaking noise in the upcycled experts; health.collapse_check = false overrides this."
            )

    def provenance(self) -> dict:
        data_provenance = self.manifest.get("provenance", {})
        parents = [{"dataset": provenance.portable_name(self.cfg.data.path), **data_provenance}]
        if self.cfg.model.init_from:
            init = Path(self.cfg.model.init_from) / "provenance.json"
            parents.append(json.loads(init.read_text()) if init.is_file() else
                           {"init_from": provenance.portable_name(self.cfg.model.init_from)})
        if self.teacher is not None:
            parents.append({"teacher": self.teacher.section.get("provenance", {})})
        return provenance.record("run", config_io.config_hash(self.cfg), parents=parents, stage=self.stage,
                                 world_size=self.d.world_size)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics logged after `step` (a resumed run logs those steps again)."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        provenance.atomic_write_text(path, "".join(line + "\n" for line in kept))
