"""`vpmoe upcycle CONFIG`: one conversion step between checkpoint objects.

1. Load the config and the registry; the target's registry entry must name this step and the source as parent.
2. Check the input directory against the source's entry (shapes/config, pinned hash, provenance).
3. Run the step, dispatched by name from `steps.STEPS` (one interface for all five): it converts, writes the new
   object into a staging directory beside the output (weights + config.json, or the HF directory for the
   transplant) and measures drift on the fixed calibration batch.
4. Optionally heal: a short `vpmoe train` stage on the new object ([heal]), measured again (drift.json "healing":
   held-out loss and top-1 agreement with the source after the conversion and after healing).
5. Write drift.json (its metrics are the final object's) and provenance.json, check the result against the
   target's entry, then move it into place.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vpmoe import config as config_io
from vpmoe.artifacts import files
from vpmoe.errors import UserError
from vpmoe.provenance import portable_name, record
from vpmoe.upcycle import drift, heal, objects
from vpmoe.upcycle.config import UpcycleConfig, load_upcycle_config
from vpmoe.upcycle.registry import Registry, load_registry
from vpmoe.upcycle.steps import STEPS, StepContext


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
    with files.staged_dir(u.output, lambda existing: objects.may_replace(existing, u.overwrite)) as staging:
        summary = _run_step(cfg, registry, given, staging)
    return Path(u.output), summary


def _run_step(cfg: UpcycleConfig, registry: Registry, given: dict, staging: Path) -> str:
    u = cfg.upcycle
    source, target = registry.get(u.source), registry.get(u.target)
    step = STEPS[u.step]
    torch.manual_seed(u.seed)
    rows = drift.calibration_rows(cfg.calibration)
    result = step.run(StepContext(cfg, registry, staging, rows))
    details, report = result.details, result.report
    numbers = {k: details[k] for k in step.numbers if k in details}
    healing = None
    if cfg.heal.config:
        healed, details["healing"] = heal.heal(cfg, staging, target.model_config())
        healed_report = drift.drift_report(result.source(), drift.vpmoe_logits(healed), rows)
        healing = {**details["healing"], "after_conversion": drift.brief(report),
                   "after_healing": drift.brief(healed_report)}
        report = healed_report
    output_digest = objects.weights_sha256(staging)
    calibration = {**config_io.to_dict(cfg.calibration), "tokens": int(sum(len(r.tokens) for r in rows))}
    # Drift is always against this step's own input (the previous object of the chain), never the original donor:
    # the donor's agreement after several steps is benchmarks/upcycle_chain.py's (drift_from_donor).
    drift_doc = {"step": u.step, "source": source.name, "target": target.name, "calibration": calibration,
                 "reference": f"source: the step's input object {source.name!r} (the previous object in the chain, "
                              f"not the original donor)",
                 "metrics": report, "step_numbers": numbers}
    if healing is not None:
        drift_doc["healing"] = healing
    files.write_json(staging / objects.DRIFT_FILE, drift_doc, sort_keys=True)
    parent = _parent_record(given["provenance"], source.name, given["weights_sha256"])
    prov = record(
        "checkpoint_object", config_io.config_hash(cfg), parents=[parent],
        object=target.name, step=u.step, source=source.name,
        input=portable_name(u.input), input_weights_sha256=given["weights_sha256"],
        weights_sha256=output_digest, registry=portable_name(registry.path), registry_sha256=registry.sha256,
        config=_portable_config(cfg), seed=u.seed, details=details,
    )
    files.write_json(staging / objects.PROVENANCE_FILE, prov, sort_keys=True)
    objects.check_input(staging, target)  # the result is what the registry says the target is
    return step.summary(report)


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
