"""`vpmoe upcycle CONFIG`: one conversion step between checkpoint objects.

1. Load the config and the registry; the target's registry entry must name this step and the source as parent.
2. Check the input directory against the source's entry (shapes/config, pinned hash, provenance).
3. Convert, write the new object into a staging directory beside the output (weights + config.json, or the HF
   directory for the transplant), measure drift on the fixed calibration batch, write drift.json and
   provenance.json, check the result against the target's entry, then move it into place.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from vpmoe import config as config_io
from vpmoe.errors import UserError
from vpmoe.artifacts.models import load_model, save_model
from vpmoe.provenance import portable_name, record
from vpmoe.upcycle import drift, hf, objects
from vpmoe.upcycle.config import UpcycleConfig, load_upcycle_config
from vpmoe.upcycle.registry import Registry, load_registry


def upcycle_from_config(path: str | Path, overrides: list[str] | None = None) -> Path:
    cfg = load_upcycle_config(path, overrides)
    out, summary = upcycle(cfg)
    print(f"wrote {out}: {cfg.upcycle.target} from {cfg.upcycle.source} ({cfg.upcycle.step}); {summary}")
    return out


def upcycle(cfg: UpcycleConfig) -> tuple[Path, str]:
    u = cfg.upcycle
    registry = load_registry(u.registry)
    source, target = registry.get(u.source), registry.get(u.target)
    if target.step != u.step or target.parent != source.name:
        raise UserError(f"registry {portable_name(registry.path)}: {target.name!r} is made by step "
                        f"{target.step or '(none, a root)'!r} from {target.parent or '(nothing)'!r}, not by step "
                        f"{u.step!r} from {source.name!r}")
    given = objects.check_input(u.input, source)
    staging = objects.prepare_output(u.output, u.overwrite)
    try:
        return _run_step(cfg, registry, given, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _run_step(cfg: UpcycleConfig, registry: Registry, given: dict, staging: Path) -> tuple[Path, str]:
    u = cfg.upcycle
    source, target = registry.get(u.source), registry.get(u.target)
    torch.manual_seed(u.seed)
    rows = drift.calibration_rows(cfg.calibration)
    if u.step == "transplant":
        details, report = _transplant(cfg, registry, staging, rows)
    else:
        details, report = _convert(cfg, registry, staging, rows)
    output_digest = objects.weights_sha256(staging)
    calibration = {**config_io.to_dict(cfg.calibration), "tokens": int(sum(len(r.tokens) for r in rows))}
    drift_doc = {"step": u.step, "source": source.name, "target": target.name, "calibration": calibration,
                 "metrics": report, "step_numbers": _step_numbers(u.step, details)}
    objects.write_json(staging / objects.DRIFT_FILE, drift_doc)
    parent = _parent_record(given["provenance"], source.name, given["weights_sha256"])
    prov = record(
        "checkpoint_object", config_io.config_hash(cfg), parents=[parent],
        object=target.name, step=u.step, source=source.name,
        input=portable_name(u.input), input_weights_sha256=given["weights_sha256"],
        weights_sha256=output_digest, registry=portable_name(registry.path), registry_sha256=registry.sha256,
        config=_portable_config(cfg), seed=u.seed, details=details,
    )
    objects.write_json(staging / objects.PROVENANCE_FILE, prov)
    objects.check_input(staging, target)  # the result is what the registry says the target is
    out = objects.finish_output(staging, u.output)
    summary = _transplant_summary(report) if u.step == "transplant" else drift.summary(report)
    return out, summary


def _parent_record(prov: dict | None, name: str, digest: str) -> dict:
    """The input's provenance without its bulky parts (config, step details); its own parents stay."""
    if prov is None:
        return {"object": name, "weights_sha256": digest}
    return {k: v for k, v in prov.items() if k not in ("config", "details")}


def _portable_config(cfg: UpcycleConfig) -> dict:
    raw = config_io.to_dict(cfg)
    for section, key in (("upcycle", "input"), ("upcycle", "output"), ("upcycle", "registry"), ("transplant", "donor")):
        if raw[section][key]:
            raw[section][key] = portable_name(raw[section][key])
    return raw


def _step_numbers(step: str, details: dict) -> dict:
    """The step's own numbers, repeated in drift.json beside the drift they cause."""
    keys = {
        "transplant": ("rows", "padded_rows", "rows_copied", "rows_approximated", "method", "k"),
        "surgery": ("method",),
        "morph": ("q_svd_rank", "q_svd_relative_error", "q_svd_relative_error_mean", "sink_init",
                  "value_residual_init"),
        "expand": ("new_layers",),
        "granular": ("noise", "noise_std", "router_std", "router_margins"),
    }[step]
    numbers = {k: details[k] for k in keys if k in details}
    if step == "surgery" and "fit" in details:
        numbers["fit"] = details["fit"]
    return numbers


def _transplant(cfg: UpcycleConfig, registry: Registry, staging: Path, rows) -> tuple[dict, dict]:
    from vpmoe.upcycle import transplant

    u, t = cfg.upcycle, cfg.transplant
    if not t.donor:
        raise UserError("transplant.donor must name the local directory of the vocabulary donor")
    donor = Path(t.donor)
    if t.donor_object:
        objects.check_input(donor, registry.get(t.donor_object))
    target = registry.get(u.target)
    details = transplant.run(Path(u.input), donor, staging, t.method, t.k, t.batch_size, u.seed,
                             target.hf.vocab, t.pad_to_vocab, t.device)
    details["donor"] = {"object": t.donor_object or None, "path": portable_name(donor),
                        "weights_sha256": objects.weights_sha256(donor)}
    source_model, result_model = hf.load_causal_lm(u.input), hf.load_causal_lm(staging)
    report = drift.drift_across_tokenizers(source_model, hf.load_tokenizer(u.input), result_model,
                                           hf.load_tokenizer(staging), rows)
    return details, report


def _transplant_summary(report: dict) -> str:
    a = report["spans"]["all"]
    return (f"bits/byte {a['source_bits_per_byte']:.4g} -> {a['result_bits_per_byte']:.4g}, "
            f"KL on aligned positions {a.get('kl_mean', float('nan')):.4g} nats")


def _check_vocab(vocab: int, rows) -> None:
    top = max(int(r.tokens.max()) for r in rows)
    if top >= vocab:
        raise UserError(f"the calibration batch uses o200k Harmony ids up to {top}, but the model has {vocab} rows")


def _convert(cfg: UpcycleConfig, registry: Registry, staging: Path, rows) -> tuple[dict, dict]:
    u = cfg.upcycle
    target_cfg = registry.get(u.target).model_config()
    _check_vocab(target_cfg.model.vocab_size, rows)
    if u.step == "surgery":
        from vpmoe.upcycle import surgery

        facts = hf.facts(u.input)
        donor = hf.load_causal_lm(u.input)
        fit_rows = None
        if cfg.surgery.method == "fit":
            fit_rows = drift.calibration_rows(cfg.calibration, records=cfg.surgery.fit_records,
                                              seed=cfg.surgery.fit_seed, prefix="fit")
        result, details = surgery.convert(hf.load_state(u.input), facts, target_cfg, cfg.surgery.method,
                                          donor=donor, fit_rows=fit_rows, ridge=cfg.surgery.ridge)
        source_fn = drift.hf_logits(donor)
    else:
        source = load_model(u.input)
        if u.step == "morph":
            from vpmoe.upcycle import morph

            result, details = morph.convert(source, target_cfg, cfg.morph.sink_init, cfg.morph.value_residual_init)
        elif u.step == "expand":
            from vpmoe.upcycle import expand

            result, details = expand.convert(source, target_cfg)
        else:
            from vpmoe.upcycle import granular

            g = cfg.granular
            result, details = granular.convert(source, target_cfg, u.seed, g.router_std, g.noise)
            details["router_margins"] = granular.router_margins(result, rows, details["slices"])
        source_fn = drift.vpmoe_logits(source)
    report = drift.drift_report(source_fn, drift.vpmoe_logits(result), rows)
    save_model(result, staging)
    return details, report
