"""`vpmoe eval`: evaluate checkpoints and write reports beside them; compare several.

Where reports land ("beside the checkpoint"):
  training checkpoint <run>/checkpoints/step_NNNNNNN/  ->  <run>/eval/step_NNNNNNN.{json,md}
  checkpoint object or export directory D               ->  D/eval/<D's name>.{json,md}
  several checkpoints                                   ->  also compare.{md,json,png} in `eval.out`
                                                            (default: the run's eval/ when all share one run)
A report made with the same settings for the same checkpoint is reused unless `eval.reuse = false`. Without
`eval.dataset`, a training checkpoint's held-out loss is measured on the dataset its run trained on (its
`data.path`, when that is still there), on `eval.split`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import torch

from vpmoe import provenance
from vpmoe.artifacts import checkpoints
from vpmoe.artifacts.models import CONFIG_FILE, load_model, resolve
from vpmoe.data.loader import read_manifest
from vpmoe.distributed import resolve_device
from vpmoe.errors import UserError
from vpmoe.eval.config import EvalConfig, EvalSection, load_eval_config
from vpmoe.eval.heldout import heldout_loss
from vpmoe.eval.report import SCHEMA, comparison_rows, comparison_table, write_comparison, write_report
from vpmoe.eval.sanity import run_sanity
from vpmoe.eval.suite import load_suite, run_suite, subset
from vpmoe.eval.teacher_kl import heldout_teacher_kl
from vpmoe.model import Kernels
from vpmoe.model.kernels import compute_dtype
from vpmoe.model.params import count_params

FINGERPRINT_FILES = ("complete.json", "provenance.json", "model_config.json", "config.json",
                     "model.safetensors.index.json")


@dataclass
class Target:
    """One checkpoint to evaluate and where its report goes."""

    directory: Path  # the resolved checkpoint directory
    eval_dir: Path  # the eval/ folder beside it
    name: str  # report file stem
    label: str  # short name in tables and plots
    step: int | None  # training step (training checkpoints only)
    run: Path | None  # the run directory (training checkpoints only)

    @property
    def json_path(self) -> Path:
        return self.eval_dir / f"{self.name}.json"

    @property
    def md_path(self) -> Path:
        return self.eval_dir / f"{self.name}.md"


@dataclass
class EvalResult:
    report: dict
    json_path: Path
    md_path: Path
    reused: bool = False


def locate(path: str | Path) -> Target:
    """Resolve a checkpoint path (run dir -> latest checkpoint) and decide where its report goes."""
    artifact = resolve(path)
    if artifact.kind == "hf":
        raise UserError(f"{artifact.directory} is a Hugging Face model, not a vpmoe checkpoint")
    if artifact.run is not None:
        return Target(artifact.directory, artifact.run / "eval", artifact.directory.name, artifact.label,
                      artifact.step, artifact.run)
    return Target(artifact.directory, artifact.directory / "eval", artifact.directory.name, artifact.label, None, None)


def expand(paths: list[str], steps: str = "latest") -> list[Target]:
    """Targets for the configured paths; with steps = "all", a run directory gives every complete checkpoint."""
    targets = []
    for raw in paths:
        path = Path(raw)
        found = checkpoints.complete_checkpoints(path) if steps == "all" and path.is_dir() else []
        is_run = found and not (path / CONFIG_FILE).is_file() and not checkpoints.is_checkpoint(path)
        if is_run:
            found = [p for p in found if _intact(p)]
            if not found:
                raise UserError(f"every complete checkpoint of {path} is damaged: restore one")
        targets += [locate(p) for p in found] if is_run else [locate(path)]
    seen = set()
    unique = []
    for target in targets:
        if target.directory.resolve() not in seen:
            seen.add(target.directory.resolve())
            unique.append(target)
    return unique


def _intact(checkpoint: Path) -> bool:
    problem = checkpoints.verify(checkpoint)
    if problem is not None:
        print(f"warning: skipping checkpoint {checkpoint}: it is damaged ({problem})", file=sys.stderr)
    return problem is None


def fingerprint(directory: Path) -> str:
    """Identifies a checkpoint's content cheaply: its small metadata files (config, provenance, completion)."""
    digest = hashlib.sha256()
    for name in FINGERPRINT_FILES:
        file = directory / name
        if file.is_file():
            digest.update(name.encode() + b"\0" + file.read_bytes() + b"\0")
    for file in sorted(directory.glob("*.safetensors")):
        digest.update(f"{file.name}:{file.stat().st_size}".encode())
    return digest.hexdigest()


def _settings_hash(settings: EvalSection, suite_sha256: str | None) -> str:
    payload = dict(settings.settings())
    if {"heldout", "teacher_kl"} & set(settings.parts) and settings.dataset:
        payload["dataset_manifest"] = hashlib.sha256(json.dumps(read_manifest(settings.dataset),
                                                                sort_keys=True).encode()).hexdigest()
    if suite_sha256:
        payload["suite_sha256"] = suite_sha256
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _device_dtype(settings: EvalSection) -> tuple[torch.device, torch.dtype]:
    device = resolve_device(settings.device)
    return device, compute_dtype(settings.precision, device)


def _parent_provenance(target: Target, settings: EvalSection) -> list[dict]:
    parents = []
    for candidate in (target.directory / "provenance.json",):
        if candidate.is_file():
            parents.append(json.loads(candidate.read_text()))
    if {"heldout", "teacher_kl"} & set(settings.parts) and settings.dataset:
        parents.append({"dataset": provenance.portable_name(settings.dataset),
                        **read_manifest(settings.dataset).get("provenance", {})})
    return parents


def evaluate_checkpoint(path: str | Path, settings: EvalSection | None = None, *, verbose: bool = True,
                        **overrides) -> EvalResult:
    """Evaluate one checkpoint and write its report beside it.

    `settings` defaults to EvalSection(); keyword `overrides` replace its fields (dataset=..., max_samples=...).
    Returns the report dict and where it was written (reused when a report with the same settings exists).
    """
    settings = dataclasses.replace(settings or EvalSection(checkpoint=str(path)), checkpoint=str(path), **overrides)
    try:
        settings.validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    return _evaluate(locate(path), settings, verbose)


def _run_dataset(target: Target, split: str) -> str:
    """The dataset a training checkpoint was trained on (its config's data.path) when it is still there and has
    samples in `split`; "" otherwise."""
    if target.run is None:
        return ""
    try:
        path = tomllib.loads((target.directory / "config.toml").read_text(encoding="utf-8"))["data"]["path"]
        samples = read_manifest(path)["splits"][split]["samples"]
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError, UserError):
        return ""
    return path if samples else ""


def _evaluate(target: Target, settings: EvalSection, verbose: bool) -> EvalResult:
    if "heldout" in settings.parts and not settings.dataset:
        settings = dataclasses.replace(settings, dataset=_run_dataset(target, settings.split))
        if settings.dataset and verbose:
            print(f"held-out loss on {settings.dataset} ({settings.split}), the dataset {target.label} was trained on")
    suite = subset(load_suite(settings.suite), settings.suite_items) if "suite" in settings.parts else None
    needs_data = {"heldout", "teacher_kl"} & set(settings.parts)
    if needs_data and settings.dataset and not Path(settings.dataset).is_dir():
        what = "is not a directory" if Path(settings.dataset).exists() else "does not exist"
        raise UserError(f"eval.dataset {settings.dataset} {what}")
    if "teacher_kl" in settings.parts and not settings.dataset:
        raise UserError("eval.parts has teacher_kl: set eval.dataset to a dataset with a teacher sidecar")
    settings_hash = _settings_hash(settings, suite.sha256 if suite else None)
    print_ = print if verbose else (lambda *a, **k: None)
    ident = fingerprint(target.directory)
    if settings.reuse and target.json_path.is_file():
        try:
            old = json.loads(target.json_path.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("settings_hash") == settings_hash and old.get("checkpoint", {}).get("fingerprint") == ident:
            print_(f"reused {target.json_path} (same checkpoint, same settings)")
            return EvalResult(old, target.json_path, target.md_path, reused=True)

    start = time.perf_counter()
    device, dtype = _device_dtype(settings)
    model = load_model(target.directory, device=device, dtype=dtype, kernels=Kernels.named(settings.kernels))
    model.eval()
    params = count_params(model.cfg)
    report: dict = {
        "schema": SCHEMA,
        "checkpoint": {"label": target.label, "name": target.name, "path": provenance.portable_name(target.directory),
                       "step": target.step, "run": provenance.portable_name(target.run) if target.run else None,
                       "fingerprint": ident, "report": provenance.portable_name(target.json_path)},
        "model": {"name": model.cfg.model.name, "mode": model.cfg.model.mode, "params_total": params["total"],
                  "params_active": params["active"]},
        "settings": settings.settings(),
        "settings_hash": settings_hash,
        "device": {"type": device.type, "dtype": str(dtype).removeprefix("torch.")},
    }
    print_(f"eval {target.label}: {target.directory}")
    if "heldout" in settings.parts:
        if settings.dataset:
            report["heldout"] = heldout_loss(model, settings.dataset, settings.split, settings.max_samples,
                                             settings.batch_size)
            print_(f"  held-out: {_heldout_line(report['heldout'])}")
        else:
            print_("  held-out: skipped (eval.dataset is empty, and no dataset the checkpoint was trained on is here)")
    if "teacher_kl" in settings.parts:
        report["teacher_kl"] = heldout_teacher_kl(model, settings.dataset, settings.split, settings.batch_size,
                                                  settings.max_samples)
        print_(f"  held-out KL to the teacher: {report['teacher_kl']['all']['kl']:.4f} nats/token over "
               f"{report['teacher_kl']['all']['tokens']:,} tokens")
    if suite is not None:
        report["suite"] = run_suite(model, suite, settings.max_new_tokens, settings.batch_size,
                                    settings.reasoning_effort)
        print_(f"  suite: {_suite_line(report['suite'])}")
    if "sanity" in settings.parts:
        report["sanity"] = run_sanity(model, report.get("suite"), settings.reasoning_effort)
        failed = [c["name"] for c in report["sanity"]["checks"] if not c["ok"]]
        print_(f"  sanity: {'ok' if not failed else 'FAILED ' + ', '.join(failed)}")
    report["seconds"] = round(time.perf_counter() - start, 3)
    report["provenance"] = provenance.record(
        "eval", settings_hash, parents=_parent_provenance(target, settings),
        checkpoint=report["checkpoint"]["path"], suite_sha256=suite.sha256 if suite else None)
    write_report(report, target.json_path, target.md_path)
    print_(f"wrote {target.json_path} and {target.md_path.name} ({report['seconds']:.1f} s)")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return EvalResult(report, target.json_path, target.md_path)


def _heldout_line(h: dict) -> str:
    s = h["spans"]["all"]
    if not s["tokens"]:
        return "no supervised tokens"
    return (f"loss {s['loss']:.4f}  ppl {s['perplexity']:.2f}  bits/byte {s['bits_per_byte']:.4f} "
            f"over {s['tokens']:,} tokens of {h['samples']} samples")


def _suite_line(s: dict) -> str:
    return (f"{s['correct']}/{s['items']} correct ({s['accuracy']:.1%}); harmony parsed {s['parse_valid_share']:.0%}, "
            f"<|return|> {s['stop_with_return_share']:.0%}, valid {s['valid_harmony_share']:.0%}")


def _comparison_dir(targets: list[Target], out: str) -> Path:
    if out:
        return Path(out)
    runs = {t.run.resolve() if t.run else None for t in targets}
    if len(runs) == 1 and None not in runs:
        return targets[0].eval_dir
    raise UserError("the checkpoints do not all belong to one run: set eval.out (or --out) to a directory for "
                    "the comparison (compare.md, compare.json, compare.png)")


def compare(reports: list, out: str | Path, title: str = "Core eval comparison", verbose: bool = True
            ) -> dict[str, Path]:
    """A comparison of existing reports (EvalResult, report dicts, or paths to report JSON files): prints the
    table and writes compare.md, compare.json and compare.png into `out`; returns their paths."""
    loaded = []
    for item in reports:
        if isinstance(item, EvalResult):
            loaded.append(item.report)
        elif isinstance(item, dict):
            loaded.append(item)
        else:
            path = Path(item)
            if not path.is_file():
                raise UserError(f"report {path} does not exist")
            loaded.append(json.loads(path.read_text()))
    if not loaded:
        raise UserError("nothing to compare")
    paths = write_comparison(loaded, Path(out), title)
    if verbose:
        print()
        print(comparison_table(comparison_rows(loaded)))
        print(f"\nwrote {paths['md']}, {paths['json'].name} and {paths['png'].name}")
    return paths


def run_eval(cfg: EvalConfig, verbose: bool = True) -> tuple[list[EvalResult], dict[str, Path] | None]:
    """Evaluate every configured checkpoint; with several, also write the comparison."""
    settings = cfg.eval
    targets = expand(settings.checkpoints(), settings.steps)
    out = _comparison_dir(targets, settings.out) if len(targets) > 1 else None
    results = [_evaluate(t, settings, verbose) for t in targets]
    paths = None
    if out is not None:
        title = f"Core eval: {targets[0].run.name}" if settings.out == "" else "Core eval comparison"
        paths = compare(results, out, title, verbose)
    return results, paths


def eval_from_cli(config: str | None, checkpoints: list[str], dataset: str | None = None, all_steps: bool = False,
                  out: str | None = None, overrides: list[str] | None = None):
    """`vpmoe eval CONFIG` or `vpmoe eval --checkpoint DIR [--checkpoint DIR ...] [--dataset DS] [--all-steps]
    [--out DIR]`; the shortcut options override the config's values."""
    if config is None and not checkpoints:
        raise UserError("vpmoe eval needs a config (vpmoe eval CONFIG) or a checkpoint (vpmoe eval --checkpoint DIR)")
    changes: dict = {}
    if checkpoints:
        changes["eval.checkpoint"] = checkpoints if len(checkpoints) > 1 else checkpoints[0]
    if dataset is not None:
        changes["eval.dataset"] = dataset
    if all_steps:
        changes["eval.steps"] = "all"
    if out is not None:
        changes["eval.out"] = out
    return run_eval(load_eval_config(config, overrides, changes))
