"""`vpmoe train CONFIG`: one training stage, single process or torchrun + FSDP2.

The Trainer is the loop; the stage is an objective (vpmoe.train.objectives) that the loop knows only through its
interface. One optimizer step (`Trainer.step`) takes `grad_accum` micro-batches per rank from the objective, sums
their span token counts over the whole global batch before the first forward, runs forward and backward per
micro-batch (each loss already normalized by the global counts, so the gradients add up to the global-batch
gradient exactly), clips, steps the optimizer and the schedule, and updates the experts' balancing bias from the
global routing counts. `Trainer.run` repeats that with metrics, health checks and checkpoints, resuming from the
run directory. Tools (profile, autotune, benchmarks) build a Trainer on their own data and call `step()`.
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
from vpmoe import distributed, provenance
from vpmoe.artifacts import checkpoints
from vpmoe.artifacts.files import write_text
from vpmoe.artifacts.lock import lock_dir
from vpmoe.artifacts.models import model_config, read_provenance
from vpmoe.data.loader import Loader, read_manifest
from vpmoe.distributed import Ranks, all_reduce_sum
from vpmoe.errors import RunError, UserError
from vpmoe.model.config import ModelConfig, load_model_config, model_config_to_dict
from vpmoe.optim import build_optimizer, build_scheduler
from vpmoe.spans import SUPERVISED
from vpmoe.train import health, losses, resume
from vpmoe.train.config import TrainConfig, load_train_config
from vpmoe.train.flops import peak_flops, train_flops_per_token
from vpmoe.train.grad_norm import scale_grads_, total_norm
from vpmoe.train.metrics import MetricsSink
from vpmoe.train.objectives import build_objective
from vpmoe.train.parallelize import autocast_dtype, build_student
from vpmoe.train.timing import PhaseTimer


def train_from_config(path: str, overrides: list[str]) -> Path:
    return train(load_train_config(path, overrides))


def train(cfg: TrainConfig) -> Path:
    """Run the stage of `cfg` to its last step (resuming from its run directory); returns the run directory."""
    ranks = distributed.init(cfg.train.device)
    try:
        with contextlib.ExitStack() as held:  # rank 0 holds the run directory until the run is over
            distributed.agree(ranks, lambda: held.enter_context(lock_dir(cfg.run.dir, "the training run")))
            return Trainer.from_config(cfg, ranks).run()
    finally:
        distributed.finish(ranks)


@dataclass
class Window:
    """Sums over the optimizer steps since the metrics were last read."""

    terms: dict[str, float] = field(default_factory=dict)  # loss terms, mean over ranks
    span_sums: dict[str, torch.Tensor] = field(default_factory=dict)  # per-token values per span, this rank
    span_counts: torch.Tensor | None = None  # global span token counts
    routing: torch.Tensor | None = None  # global tokens per expert [n_moe_layers, E]
    grad_norm: float = 0.0
    tokens: int = 0  # global tokens (all rows, padding included)
    steps: int = 0

    def add(self, terms: dict[str, float], span_sums: dict, counts, routing, grad_norm: float, tokens: int) -> None:
        for key, value in terms.items():
            self.terms[key] = self.terms.get(key, 0.0) + value
        for key, value in span_sums.items():
            self.span_sums[key] = self.span_sums.get(key, 0) + value
        self.span_counts = counts if self.span_counts is None else self.span_counts + counts
        if routing is not None:
            self.routing = routing if self.routing is None else self.routing + routing
        self.grad_norm += grad_norm
        self.tokens += tokens
        self.steps += 1


@dataclass
class StepSums:
    """Sums over the micro-batches of one optimizer step (this rank), detached."""

    counts: torch.Tensor  # global span token counts of the step
    tokens: int  # this rank's tokens (all rows, padding included)
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    span_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    routing: torch.Tensor | None = None

    def add(self, terms: dict[str, torch.Tensor], span_sums: dict[str, torch.Tensor], routing) -> None:
        for key, value in terms.items():
            self.terms[key] = self.terms.get(key, 0) + value.detach()
        for key, value in span_sums.items():
            self.span_sums[key] = self.span_sums.get(key, 0) + value.detach()
        if routing is not None:
            self.routing = routing if self.routing is None else self.routing + routing


@dataclass
class StepResult:
    loss: float
    terms: dict[str, float]
    grad_norm: float


class Trainer:
    """The training loop around one objective. `data` yields `vpmoe.data.loader.Batch`es (the dataset's loader,
    or synthetic batches for performance tools) and has `state_dict`/`load_state_dict` and `epoch`."""

    def __init__(self, cfg: TrainConfig, ranks: Ranks, data, model_cfg: ModelConfig, seq_len: int,
                 manifest: dict | None = None):
        self.cfg, self.ranks, self.data, self.model_cfg = cfg, ranks, data, model_cfg
        self.seq_len, self.manifest = seq_len, manifest or {}
        self.run_dir = Path(cfg.run.dir)
        random.seed(cfg.run.seed)
        np.random.seed(cfg.run.seed)
        torch.manual_seed(cfg.run.seed)

        self.model, self.frozen, self.masters = build_student(model_cfg, cfg.train, ranks, cfg.model.init_from,
                                                              cfg.parallel)
        # What the optimizer, clipping and checkpoints see: the fp32 masters of a bf16 working copy, or the model
        self.weights = self.masters if self.masters is not None else self.model
        self.autocast = autocast_dtype(cfg.train, ranks.device)
        self.objective = build_objective(cfg, ranks)
        self.objective.attach(self.model)
        self.extra = torch.nn.ModuleDict(self.objective.modules())  # the stage's own modules, replicated
        self.update_bias = model_cfg.moe.enabled and "router" not in cfg.train.freeze
        # CUDA-graphed blocks: gradients must live outside the graphs' memory pool (see allocate_grads; the masters'
        # hooks copy them out themselves)
        self.graph_safe_grads = cfg.train.compile == "cudagraphs" and self.masters is None
        self.optimizer, table = build_optimizer(self.weights.named_parameters(), cfg.optim,
                                                extra_groups=self.objective.optimizer_groups())
        try:
            self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.steps)
        except ValueError as e:
            raise UserError(f"{e} (optim.warmup_steps, optim.decay_steps, train.steps)") from None
        if ranks.is_main:
            print(table)
        self.global_step = 0
        self.start_step = 0  # where this start of the run began (its provenance record says so)
        self.previous_provenance: dict | None = None  # the run's record before this start
        self.window = Window()
        self.flops_per_token = train_flops_per_token(model_cfg, seq_len)
        self.peak = peak_flops(ranks.device)
        self.timer = PhaseTimer(ranks.device)
        self.window_start = time.perf_counter()

    @classmethod
    def from_config(cls, cfg: TrainConfig, ranks: Ranks) -> Trainer:
        """The trainer of a config: its model config and its dataset's train split."""
        model_cfg = load_model_config(cfg.model.config)
        if cfg.model.init_from:
            source = model_config(cfg.model.init_from)
            if source != model_cfg:
                raise UserError(f"model.init_from {cfg.model.init_from} holds a {source.model.name} model, which "
                                f"differs from model.config {cfg.model.config}")
        manifest = read_manifest(cfg.data.path)
        seq_len = dataset_seq_len(cfg, manifest)
        loader = Loader(cfg.data.path, "train", seq_len, cfg.data.micro_batch_size, cfg.run.seed,
                        rank=ranks.rank, world_size=ranks.world_size)
        longest = int(loader.reader.tokens.lengths.max())
        if longest > seq_len:
            raise UserError(f"data.seq_len = {seq_len} but {cfg.data.path} holds samples of {longest} tokens; "
                            f"leave data.seq_len out to use the dataset's ({manifest['seq_len']})")
        return cls(cfg, ranks, loader, model_cfg, seq_len, manifest)

    def feed(self, data, micro_batch_size: int, grad_accum: int) -> None:
        """Take `grad_accum` micro-batches of `micro_batch_size` rows per step from `data` from now on (the
        performance tools measure several sizes with one trainer)."""
        self.cfg = config_io.replace(self.cfg, {"data.micro_batch_size": micro_batch_size,
                                                "data.grad_accum": grad_accum})
        self.data = data

    # ---- one optimizer step ------------------------------------------------------------------------------------

    def step(self) -> StepResult:
        """One optimizer step over `grad_accum` micro-batches per rank (collective under torchrun)."""
        ranks = self.ranks
        sums = self.forward_backward()
        with self.timer.phase("optimizer"):
            grad_norm = self.clip_gradients()
            terms = {k: all_reduce_sum(v.clone(), ranks) for k, v in sums.terms.items()}
            if not all(math.isfinite(v.item()) for v in terms.values()) or not math.isfinite(grad_norm):
                self.fail_non_finite(terms, grad_norm)
            self.optimizer.step()
            if self.masters is not None:
                self.masters.publish()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=not self.graph_safe_grads)
            routing = all_reduce_sum(sums.routing, ranks) if sums.routing is not None else None
            if routing is not None and self.update_bias:
                self.model.update_expert_bias(routing)
        self.global_step += 1
        values = {k: v.item() for k, v in terms.items()}
        self.window.add(values, sums.span_sums, sums.counts, routing, grad_norm, sums.tokens * ranks.world_size)
        return StepResult(sum(values.values()), values, grad_norm)

    def forward_backward(self) -> StepSums:
        """The gradients of one step's micro-batches (no optimizer step); returns their sums for the step."""
        batches = self.objective.batches(self.data, self.cfg.data.grad_accum)
        counts = all_reduce_sum(sum(losses.span_counts(b.rows.label_spans) for b in batches), self.ranks)
        if self.graph_safe_grads:
            self.allocate_grads()
        sums = StepSums(counts=counts, tokens=sum(b.rows.input_ids.numel() for b in batches))
        for batch in batches:
            with self.timer.phase("forward"):
                loss = self.micro_step(batch, counts, sums, len(batches))
            with self.timer.phase("backward"):
                loss.backward()
        if self.ranks.distributed:  # the stage's modules are replicated: average their gradients as FSDP does
            for p in self.extra.parameters():
                if p.grad is not None:
                    all_reduce_sum(p.grad, self.ranks).div_(self.ranks.world_size)
        return sums

    def micro_step(self, batch, counts: torch.Tensor, sums: StepSums, micro_batches: int) -> torch.Tensor:
        """Forward of one of the step's `micro_batches` micro-batches (grad_accum, or more when the stage splits
        them); returns the tensor to backpropagate and adds its terms to `sums`. The aux loss is their mean."""
        autocast = torch.autocast(self.ranks.device.type, dtype=self.autocast) if self.autocast else \
            contextlib.nullcontext()
        with autocast:
            out = self.objective.loss(self.model, batch, counts)
        terms = dict(out.terms)
        loss = self.ranks.world_size * out.loss
        if out.aux_loss is not None:
            aux = self.model_cfg.moe.aux_loss_coeff * out.aux_loss / micro_batches
            terms["aux"] = aux / self.ranks.world_size  # logged as the mean over ranks after the sum-reduce
            loss = loss + aux
        sums.add(terms, out.span_sums, out.routing)
        return loss

    def allocate_grads(self) -> None:
        """Zero gradients for every trainable parameter that has none, so that backward accumulates into them
        in place instead of keeping a tensor from a CUDA graph's memory pool (the next replay overwrites it)."""
        for p in self.model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)

    def clip_gradients(self) -> float:
        """Clip the global gradient norm of the model (sharded) and the stage's modules (replicated) together."""
        grads = [p.grad for module in (self.weights, self.extra) for p in module.parameters() if p.grad is not None]
        total = total_norm(grads)
        scale = self.cfg.train.grad_clip / (total + 1e-6)
        if self.cfg.train.grad_clip and scale < 1.0:
            scale_grads_(grads, scale)
        return total

    def fail_non_finite(self, terms: dict[str, torch.Tensor], grad_norm: float) -> None:
        bad = sorted({name.rsplit(".", 1)[0] for name, p in self.weights.named_parameters()
                      if p.grad is not None and not torch.isfinite(p.grad).all()})
        shown = ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items())
        raise RunError(
            f"non-finite loss or gradient at step {self.global_step + 1}: {shown}, grad_norm={grad_norm:.4g}; "
            f"modules with non-finite gradients: {bad[:10] or 'none'}. Resume from the last checkpoint with a "
            f"lower learning rate (optim.lr_matrix / optim.lr_adam) or stricter train.grad_clip."
        )

    # ---- metrics and health --------------------------------------------------------------------------------------

    def take_window(self) -> tuple[Window, float]:
        """The sums of the steps since the last call and the seconds they took; a fresh window starts."""
        window, seconds = self.window, time.perf_counter() - self.window_start
        self.window, self.window_start = Window(), time.perf_counter()
        return window, seconds

    def metrics(self, w: Window, seconds: float) -> dict:
        """The metrics record of a window of steps (collective: every rank calls it)."""
        n = max(w.steps, 1)
        terms = {k: v / n for k, v in w.terms.items()}
        spans = {}
        for index, name in SUPERVISED.items():
            tokens = int(w.span_counts[index].item()) if w.span_counts is not None else 0
            entry = {"tokens": tokens}
            for key, value in w.span_sums.items():
                entry[key] = all_reduce_sum(value.clone(), self.ranks)[index].item() / max(tokens, 1)
            spans[name] = entry
        lrs = {}
        for group in self.optimizer.param_groups:
            lrs.setdefault(group.get("family", "group"), group["lr"])
        record = {
            "loss": sum(terms.values()), "terms": terms, "spans": spans, "lr": lrs, "grad_norm": w.grad_norm / n,
            "tokens_per_s": w.tokens / max(seconds, 1e-9),
            "step_ms": {phase: ms / n for phase, ms in self.timer.read().items()},
            "epoch": self.data.epoch,
            **self.objective.metrics(),
        }
        if self.peak is not None:
            record["mfu"] = record["tokens_per_s"] * self.flops_per_token / (self.peak * self.ranks.world_size)
        if self.ranks.device.type == "cuda":
            record["memory_gib"] = torch.cuda.max_memory_allocated(self.ranks.device) / 2**30
        else:
            record["memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        if w.routing is not None:
            per_layer = health.layer_health(w.routing, self.model.expert_biases())
            record["router"] = health.aggregate(per_layer)
            record["router_layers"] = {f"layer_{layer}": {k: v[i].item() for k, v in per_layer.items()}
                                       for i, layer in enumerate(self.model_cfg.moe_layers)}
        return record

    def check_health(self, window: Window) -> None:
        """Stop the run when a MoE layer's routing collapsed over the window (RunError, exit 1)."""
        if window.routing is None or not self.cfg.health.collapse_check:
            return
        moe = self.model_cfg.moe
        if int(window.routing[0].sum().item()) // max(moe.topk, 1) < self.cfg.health.collapse_min_tokens:
            return
        per_layer = health.layer_health(window.routing, self.model.expert_biases())
        bad = health.collapsed_layers(per_layer, moe.n_experts, moe.topk)
        if bad:
            layers = [self.model_cfg.moe_layers[i] for i in bad]
            raise RunError(
                f"router collapse at step {self.global_step}: MoE layer(s) {layers} route almost every token to "
                f"{moe.topk} experts (CV {per_layer['cv_pct'][bad[0]].item():.0f}%). Resume from an earlier "
                f"checkpoint with a lower optim.lr_adam (the router's LR), a higher moe.bias_update_rate, or "
                f"symmetry-breaking noise in the upcycled experts; health.collapse_check = false overrides this."
            )

    # ---- checkpoints -------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything but the model and optimizer that a resume needs (per rank)."""
        return {"step": self.global_step, "scheduler": self.scheduler.state_dict(), "loader": self.data.state_dict(),
                "objective": self.objective.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.global_step = state["step"]
        self.scheduler.load_state_dict(state["scheduler"])
        self.data.load_state_dict(state["loader"])
        self.objective.load_state_dict(state["objective"])

    def resume(self) -> Path | None:
        """Load the run directory's latest intact checkpoint, if any, once it is known to hold this model, stage and
        dataset (vpmoe.train.resume)."""
        path = checkpoints.choose(self.run_dir, self.ranks)
        if path is not None:
            distributed.agree(self.ranks, lambda: resume.check(self.cfg, path, self.model_cfg, self.manifest))
            self.load_state_dict(checkpoints.load(path, self.weights, self.optimizer, self.ranks, self.extra))
            if self.masters is not None:
                self.masters.publish()
        self.start_step = self.global_step
        self.previous_provenance = resume.previous_record(self.run_dir, path)
        return path

    def save(self) -> Path:
        files = {"config.toml": config_io.dumps_toml(self.cfg), "provenance.json": self.provenance_text(),
                 checkpoints.MODEL_CONFIG: json.dumps(model_config_to_dict(self.model_cfg), indent=2,
                                                      sort_keys=True) + "\n"}
        return checkpoints.save(self.run_dir, self.global_step, self.weights, self.optimizer, self.state_dict(),
                                self.ranks, files, self.cfg.checkpoint.keep, self.extra)

    def provenance_text(self) -> str:
        parents = [{"dataset": provenance.portable_name(self.cfg.data.path), **self.manifest.get("provenance", {})}]
        if self.cfg.model.init_from:
            init = read_provenance(self.cfg.model.init_from)
            parents.append(init or {"init_from": provenance.portable_name(self.cfg.model.init_from)})
        parents += self.objective.provenance()
        record = provenance.record("run", config_io.config_hash(self.cfg), parents=parents,
                                   stage=self.cfg.train.stage, world_size=self.ranks.world_size,
                                   dataset_sha256=resume.dataset_sha256(self.manifest), from_step=self.start_step)
        return json.dumps(resume.with_history(record, self.previous_provenance), indent=2) + "\n"

    # ---- the run -----------------------------------------------------------------------------------------------

    def run(self) -> Path:
        """Train to `train.steps`, logging every `train.log_every` and saving every `checkpoint.every` steps."""
        cfg, ranks = self.cfg, self.ranks
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resumed = self.resume()
        if ranks.is_main:
            if resumed is not None:
                print(f"resumed from {resumed} (step {self.global_step})")
            write_text(self.run_dir / "config.toml", config_io.dumps_toml(cfg))
            write_text(self.run_dir / "provenance.json", self.provenance_text())
            resume.truncate_metrics(self.run_dir / "metrics.jsonl", self.global_step)
        sink = MetricsSink(self.run_dir, cfg.logging, self.run_dir.name, config_io.to_dict(cfg)) \
            if ranks.is_main else None
        bar = tqdm(total=cfg.train.steps, initial=self.global_step, desc=f"train {cfg.train.stage}", unit="step",
                   disable=not ranks.is_main or None)
        self.take_window()
        try:
            while self.global_step < cfg.train.steps:
                self.step()
                bar.update(1)
                last = self.global_step == cfg.train.steps
                if self.global_step % cfg.train.log_every == 0 or last:
                    window, seconds = self.take_window()
                    record = self.metrics(window, seconds)
                    if sink is not None:
                        sink.log(self.global_step, record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                    self.check_health(window)
                if self.global_step % cfg.checkpoint.every == 0 or last:
                    self.save()
        finally:
            bar.close()
            if sink is not None:
                sink.close()
        if ranks.is_main:
            print(f"wrote {self.run_dir}: {self.global_step} steps, last checkpoint {checkpoints.latest(self.run_dir)}")
        return self.run_dir


def dataset_seq_len(cfg: TrainConfig, manifest: dict) -> int:
    """The row length of a run: the dataset's own (its manifest owns it), or a smaller one the config asks for."""
    built = int(manifest["seq_len"])
    asked = cfg.data.seq_len
    if asked is None:
        return built
    if asked > built:
        raise UserError(f"data.seq_len = {asked} but {cfg.data.path} was built with seq_len {built}; leave "
                        f"data.seq_len out (or at most {built}), or build the dataset for {asked}")
    return asked
