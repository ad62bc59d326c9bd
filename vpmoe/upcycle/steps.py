"""The five conversion steps as objects with one interface, and `STEPS`, the table `vpmoe upcycle` dispatches from.

A step gets a `StepContext` (the config, the registry, the staging directory to write the new object into, the
fixed calibration batch), writes the object's weights and config there, and returns a `StepOutput`: the step's
details (provenance) and the drift report of the result against its source. `numbers` names the details that
drift.json repeats beside the drift they cause; `summary` is the one line printed at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tqdm import tqdm

from vpmoe.artifacts.models import load_model, save_model
from vpmoe.errors import UserError
from vpmoe.provenance import portable_name
from vpmoe.upcycle import blockfit, drift, expand, granular, hf, morph, objects, stream, surgery, transplant
from vpmoe.upcycle.config import UpcycleConfig
from vpmoe.upcycle.drift import CalibrationRow
from vpmoe.upcycle.registry import Registry


@dataclass
class StepContext:
    cfg: UpcycleConfig
    registry: Registry
    staging: Path  # the new object is written here; run.py moves it into place once it is checked
    rows: list[CalibrationRow]  # the fixed calibration batch of the drift report


@dataclass
class StepOutput:
    details: dict  # the step's own record (provenance "details")
    report: dict  # drift of the result from its source on the calibration batch
    # A fresh logits function of the source (vpmoe results: healing measures the healed object with it).
    source: Callable[[], drift.LogitsFn] | None = None


class Transplant:
    numbers = ("rows", "padded_rows", "rows_copied", "rows_approximated", "method", "k")

    def run(self, ctx: StepContext) -> StepOutput:
        u, t = ctx.cfg.upcycle, ctx.cfg.transplant
        if not t.donor:
            raise UserError("transplant.donor must name the local directory of the vocabulary donor")
        donor = Path(t.donor)
        if t.donor_object:
            objects.check_input(donor, ctx.registry.get(t.donor_object))
        target = ctx.registry.get(u.target)
        details = transplant.run(Path(u.input), donor, ctx.staging, t.method, t.k, t.batch_size, u.seed,
                                 target.hf.vocab, t.pad_to_vocab, t.device)
        details["donor"] = {"object": t.donor_object or None, "path": portable_name(donor),
                            "weights_sha256": objects.weights_sha256(donor)}
        source_model, result_model = hf.load_causal_lm(u.input), hf.load_causal_lm(ctx.staging)
        report = drift.drift_across_tokenizers(source_model, hf.load_tokenizer(u.input), result_model,
                                               hf.load_tokenizer(ctx.staging), ctx.rows)
        return StepOutput(details, report)

    def summary(self, report: dict) -> str:
        a = report["spans"]["all"]
        return (f"bits/byte {a['source_bits_per_byte']:.4g} -> {a['result_bits_per_byte']:.4g}, "
                f"KL on aligned positions {a.get('kl_mean', float('nan')):.4g} nats")


class _VpmoeStep:
    """A step whose result is a vpmoe model: convert, measure its drift from the source, save it."""

    numbers: tuple[str, ...] = ()

    def run(self, ctx: StepContext) -> StepOutput:
        target_cfg = ctx.registry.get(ctx.cfg.upcycle.target).model_config()
        _check_vocab(target_cfg.model.vocab_size, ctx.rows)
        source_fn, result, details = self.convert(ctx, target_cfg)
        report = drift.drift_report(source_fn, drift.vpmoe_logits(result), ctx.rows)
        save_model(result, ctx.staging)
        return StepOutput(details, report, lambda: source_fn)

    def convert(self, ctx: StepContext, target_cfg):
        """(the source's logits function, the result model, details)."""
        raise NotImplementedError

    def summary(self, report: dict) -> str:
        return drift.summary(report)


class _StreamedStep(_VpmoeStep):
    """With upcycle.stream: the step's `target_tensors` run from disk to disk, and drift is measured block by block
    (the result always; the source too when it is a vpmoe object: a Hugging Face donor is run whole, the one full
    model then in memory)."""

    def run(self, ctx: StepContext) -> StepOutput:
        if not ctx.cfg.upcycle.stream:
            return super().run(ctx)
        target_cfg = ctx.registry.get(ctx.cfg.upcycle.target).model_config()
        _check_vocab(target_cfg.model.vocab_size, ctx.rows)
        reader = self.reader(ctx)
        details: dict = {}
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[ctx.cfg.upcycle.dtype]
        stream.write_streamed(ctx.staging, target_cfg, self.target_tensors(ctx, reader, target_cfg, details), dtype)
        result = stream.Reader(ctx.staging)
        report = drift.drift_report(self.source_logits(ctx, reader),
                                    stream.streamed_logits(result, ctx.rows, self.hook(details)), ctx.rows)
        self.finish(details)
        details["streamed"] = {"dtype": ctx.cfg.upcycle.dtype}
        return StepOutput(details, report, lambda: self.source_logits(ctx, reader))

    def reader(self, ctx: StepContext):
        """The source's tensors by name, read from disk when asked."""
        return stream.Reader(ctx.cfg.upcycle.input)

    def source_logits(self, ctx: StepContext, reader) -> drift.LogitsFn:
        return stream.streamed_logits(reader, ctx.rows)

    def target_tensors(self, ctx: StepContext, reader, target_cfg, details: dict):
        raise NotImplementedError

    def hook(self, details: dict):
        """`on_block` of the result's streamed forward (None: nothing to record)."""
        return None

    def finish(self, details: dict) -> None:
        """Complete the details from what the streamed forward recorded."""


class Surgery(_StreamedStep):
    numbers = ("method", "fit")

    def convert(self, ctx: StepContext, target_cfg):
        u, s = ctx.cfg.upcycle, ctx.cfg.surgery
        donor = hf.load_causal_lm(u.input)
        fit_rows = None
        if s.method == "fit":
            fit_rows = drift.calibration_rows(ctx.cfg.calibration, records=s.fit_records, seed=s.fit_seed,
                                              prefix="fit")
        facts = hf.facts(u.input)
        # the donor model's own tensors (one copy of the donor in memory); a head the files do not hold is tied
        state = {k: v.detach() for k, v in donor.state_dict().items() if k != hf.HEAD or facts["head_rows"]}
        result, details = surgery.convert(state, facts, target_cfg, s.method, donor=donor, fit_rows=fit_rows,
                                          ridge=s.ridge)
        return drift.hf_logits(donor), result, details

    def reader(self, ctx: StepContext):
        return hf.TensorReader(ctx.cfg.upcycle.input)

    def source_logits(self, ctx: StepContext, reader) -> drift.LogitsFn:
        return drift.hf_logits(hf.load_causal_lm(ctx.cfg.upcycle.input))

    def target_tensors(self, ctx: StepContext, reader, target_cfg, details: dict):
        s = ctx.cfg.surgery
        tensors = surgery.target_tensors(hf.facts(ctx.cfg.upcycle.input), target_cfg, reader, details)
        if s.method != "fit":
            return tensors
        fit_rows = drift.calibration_rows(ctx.cfg.calibration, records=s.fit_records, seed=s.fit_seed, prefix="fit")
        return surgery.streamed_fit_tensors(ctx.cfg.upcycle.input, target_cfg, tensors, fit_rows, s.ridge, details)


class Morph(_StreamedStep):
    numbers = ("q_svd_rank", "q_svd_relative_error", "q_svd_relative_error_mean", "sink_init", "value_residual_init",
               "method", "blockwise")

    def convert(self, ctx: StepContext, target_cfg):
        m = ctx.cfg.morph
        source = load_model(ctx.cfg.upcycle.input)
        result, details = morph.convert(source, target_cfg, m.sink_init, m.value_residual_init)
        details["method"] = "blockwise" if ctx.cfg.blockwise_morph else "mapped"
        if ctx.cfg.blockwise_morph:
            fit_rows, heldout_rows = _fit_data(ctx, target_cfg.model.vocab_size)
            settings = _fit_settings(m)
            _check_device(m.device)
            source.to(m.device)
            result.to(m.device)
            with tqdm(total=target_cfg.model.n_layers, desc="block-wise morph", unit="block") as bar:
                details["blockwise"] = blockfit.fit_blocks(source, result, fit_rows, heldout_rows, settings,
                                                           progress=lambda layer, entry: bar.update(),
                                                           workers=m.workers)
            source.to("cpu")
            result.to("cpu")
            details["blockwise"]["calibration"] = portable_name(ctx.cfg.fit_data.dataset)
        return drift.vpmoe_logits(source), result, details

    def target_tensors(self, ctx: StepContext, reader, target_cfg, details: dict):
        m = ctx.cfg.morph
        details["method"] = "blockwise" if ctx.cfg.blockwise_morph else "mapped"
        tensors = morph.target_tensors(reader.cfg, target_cfg, reader, details, m.sink_init, m.value_residual_init)
        if not ctx.cfg.blockwise_morph:
            return tensors
        return self._fitted(ctx, reader, target_cfg, tensors, details)

    def _fitted(self, ctx: StepContext, reader, target_cfg, tensors, details: dict):
        m = ctx.cfg.morph
        fit_rows, heldout_rows = _fit_data(ctx, target_cfg.model.vocab_size)
        _check_device(m.device)
        with tqdm(total=target_cfg.model.n_layers, desc="block-wise morph (streamed)", unit="block") as bar:
            yield from blockfit.streamed_tensors(reader, target_cfg, tensors, fit_rows, heldout_rows,
                                                 _fit_settings(m), details, m.device,
                                                 progress=lambda layer, entry: bar.update(), workers=m.workers)
        details["blockwise"]["calibration"] = portable_name(ctx.cfg.fit_data.dataset)


class Expand(_StreamedStep):
    numbers = ("new_layers",)

    def target_tensors(self, ctx: StepContext, reader, target_cfg, details: dict):
        return expand.target_tensors(reader.cfg, target_cfg, reader, details)

    def convert(self, ctx: StepContext, target_cfg):
        source = load_model(ctx.cfg.upcycle.input)
        result, details = expand.convert(source, target_cfg)
        return drift.vpmoe_logits(source), result, details


class Granular(_StreamedStep):
    numbers = ("noise", "noise_std", "router_std", "router_margins", "router_fit")

    def target_tensors(self, ctx: StepContext, reader, target_cfg, details: dict):
        g = ctx.cfg.granular
        details["_gaps"] = {}
        tensors = granular.target_tensors(reader.cfg, target_cfg, reader, ctx.cfg.upcycle.seed, g.router_std,
                                          g.noise, details)
        return self._fitted(ctx, reader, target_cfg, tensors, details) if g.fit_router else tensors

    def _fitted(self, ctx: StepContext, reader, target_cfg, tensors, details: dict):
        g = ctx.cfg.granular
        fit_rows, heldout_rows = _fit_data(ctx, target_cfg.model.vocab_size)
        yield from granular.streamed_tensors(reader, target_cfg, tensors, fit_rows, heldout_rows,
                                             granular.check_geometry(reader.cfg, target_cfg), g.router_fit_steps,
                                             g.router_fit_lr, details)
        details["router_fit"]["calibration"] = portable_name(ctx.cfg.fit_data.dataset)

    def hook(self, details: dict):
        gaps = details["_gaps"]

        def on_block(layer, block):
            if hasattr(block.mlp, "router"):
                gaps[layer] = []
                granular.gap_hook(block.mlp.router, gaps[layer], details["slices"])

        return on_block

    def finish(self, details: dict) -> None:
        details["router_margins"] = granular.margins(details.pop("_gaps"))

    def convert(self, ctx: StepContext, target_cfg):
        u, g = ctx.cfg.upcycle, ctx.cfg.granular
        source = load_model(u.input)
        result, details = granular.convert(source, target_cfg, u.seed, g.router_std, g.noise)
        if g.fit_router:
            fit_rows, heldout_rows = _fit_data(ctx, target_cfg.model.vocab_size)
            details["router_fit"] = granular.fit_router(source, result, fit_rows, heldout_rows, details["slices"],
                                                        g.router_fit_steps, g.router_fit_lr)
            details["router_fit"]["calibration"] = portable_name(ctx.cfg.fit_data.dataset)
        details["router_margins"] = granular.router_margins(result, ctx.rows, details["slices"])
        return drift.vpmoe_logits(source), result, details


STEPS = {"transplant": Transplant(), "surgery": Surgery(), "morph": Morph(), "expand": Expand(),
         "granular": Granular()}


def _fit_data(ctx: StepContext, vocab: int) -> tuple[list[CalibrationRow], list[CalibrationRow]]:
    """The fit rows and the held-out rows of [fit_data]."""
    f = ctx.cfg.fit_data
    rows = drift.dataset_rows(f.dataset, 0, f.fit_samples + f.heldout_samples, f.max_tokens)
    _check_vocab(vocab, rows)
    return rows[:f.fit_samples], rows[f.fit_samples:]


def _fit_settings(m) -> blockfit.FitSettings:
    return blockfit.FitSettings(steps=m.steps, lr=m.lr, rows_per_step=m.rows_per_step, q_init=m.q_init,
                                trainable=tuple(m.trainable))


def _check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("morph.device = \"cuda\" but no CUDA device is available")


def _check_vocab(vocab: int, rows: list[CalibrationRow]) -> None:
    top = max(int(r.tokens.max()) for r in rows)
    if top >= vocab:
        raise UserError(f"the calibration batch uses o200k Harmony ids up to {top}, but the model has {vocab} rows")
