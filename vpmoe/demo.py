"""`vpmoe demo`: the whole pipeline end to end on CPU with tiny sizes and the real code paths.

corpus (deterministic SYNTH-schema arithmetic problems) -> dataset -> a small dense teacher trained with CE ->
teacher scoring (top-K sidecar) -> a tiny vpMoE student trained from one initialization three times, with CE only,
with offline KD and with online KD (the teacher in the loop) -> a short on-policy distillation stage on the offline-KD
student (prompts built from the same corpus) -> core eval of each (held-out loss per span, held-out KL to the
teacher, micro-suite) and each student's on-policy reverse KL to the teacher on held-out prompts -> a comparison
table and where every artifact lies.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vpmoe import config as config_io
from vpmoe.artifacts.models import load_model, save_model
from vpmoe.data import synthetic
from vpmoe.data.build import DataSection, build
from vpmoe.distributed import Ranks
from vpmoe.errors import UserError
from vpmoe.eval.opd_kl import heldout_reverse_kl
from vpmoe.eval.run import compare, evaluate_checkpoint
from vpmoe.export import export
from vpmoe.model import build_model, load_model_config
from vpmoe.teacher.config import ScoreConfig, ScoreSection, TeacherSection
from vpmoe.teacher.online import OnlineTeacherSection, load_online_teacher
from vpmoe.teacher.score import score
from vpmoe.train.config import load_train_config
from vpmoe.train.trainer import train

MARKER = ".vpmoe-demo"


@dataclass
class DemoSize:
    # Sized for 15 minutes on 2 CPU cores: at hidden 64-128 the 201,088-wide head is most of every step's work
    records: int = 800
    teacher_steps: int = 120
    student_steps: int = 80
    eval_samples: int = 24  # valid samples for held-out metrics
    suite_items: int = 0  # 0 = the whole micro-suite
    max_new_tokens: int = 48
    opd_steps: int = 12
    opd_prompts: int = 8  # held-out prompts for the on-policy reverse KL (x 2 samples each)


def _train(config: str, run_dir: Path, dataset: Path, steps: int, changes: dict | None = None) -> Path:
    """Train one of the shipped tiny configs for `steps` steps into `run_dir`."""
    cfg = config_io.replace(load_train_config(config), {
        "run.dir": run_dir, "data.path": dataset, "train.steps": steps, "checkpoint.every": steps,
        "train.log_every": max(steps // 10, 1), "optim.warmup_steps": min(5, max(steps // 4, 1)), **(changes or {}),
    })
    return train(cfg)


def demo(out: str, size: DemoSize | None = None) -> dict:
    size = size or DemoSize()
    root = Path(out)
    if root.exists():
        if not (root / MARKER).exists():
            raise UserError(f"{root} exists and is not a demo directory: choose another --out")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / MARKER).touch()
    times: dict[str, float] = {}
    where: dict[str, str] = {}

    def stage(name: str, fn: Callable[[], Path]):
        print(f"\n== {name}", flush=True)
        start = time.perf_counter()
        result = fn()
        times[name] = time.perf_counter() - start
        where[name] = str(result)
        return result

    corpus = stage("corpus", lambda: synthetic.write_corpus(root / "corpus", size.records, shards=2, seed=0)[0].parent)
    dataset = stage("dataset", lambda: build(DataSection(
        inputs=[str(corpus / "*.jsonl")], format="synth", out=str(root / "dataset"), seq_len=512, pack=True,
        valid_fraction=0.1, workers=2)))

    def teacher() -> Path:
        run = _train("tiny_ce", root / "runs" / "teacher", dataset, size.teacher_steps,
                     {"model.config": "demo_teacher"})
        return export(run, root / "teacher")

    teacher_dir = stage("teacher", teacher)

    def scoring() -> Path:
        cfg = ScoreConfig(TeacherSection(path=str(teacher_dir), dataset=str(dataset), k=32, dtype="float32"),
                          ScoreSection(device="cpu", batch_tokens=8192, shard_samples=64))
        score(cfg, config_hash="demo")
        return dataset / "train" / "teacher"

    stage("scoring", scoring)

    def init() -> Path:
        torch.manual_seed(0)
        return save_model(build_model(load_model_config("tiny_moe")), root / "student_init")

    student_init = stage("student init", init)
    init_from = {"model.init_from": student_init}
    students = {
        "CE only": stage("student CE", lambda: _train("tiny_ce", root / "runs" / "student_ce", dataset,
                                                      size.student_steps, init_from)),
        "offline KD": stage("student KD", lambda: _train("tiny_kd", root / "runs" / "student_kd", dataset,
                                                         size.student_steps, init_from)),
        "online KD": stage("student online KD", lambda: _train(
            "tiny_kd_online", root / "runs" / "student_kd_online", dataset, size.student_steps,
            {**init_from, "teacher.path": teacher_dir})),
    }

    prompts = stage("prompts", lambda: build(DataSection(
        inputs=[str(corpus / "*.jsonl")], format="prompts", out=str(root / "prompts"), seq_len=256,
        valid_fraction=0.1, workers=2)))
    students["OPD from KD"] = stage("student OPD", lambda: _train(
        "tiny_opd", root / "runs" / "student_opd", prompts, size.opd_steps,
        {"model.init_from": students["offline KD"], "teacher.path": teacher_dir}))

    def evaluate() -> Path:
        online_teacher = load_online_teacher(OnlineTeacherSection(path=str(teacher_dir), dtype="float32"), Ranks())
        for label, run in students.items():
            result = evaluate_checkpoint(run, dataset=str(dataset), max_samples=size.eval_samples,
                                         max_new_tokens=size.max_new_tokens, suite_items=size.suite_items,
                                         parts=["heldout", "teacher_kl", "suite", "sanity"])
            reports[label] = result.report
            reports[label]["opd_kl"] = heldout_reverse_kl(load_model(run), online_teacher, prompts,
                                                          max_prompts=size.opd_prompts, max_new_tokens=32)
            where[f"eval {label}"] = str(result.md_path)
        return root / "runs"

    reports: dict[str, dict] = {}
    stage("eval", evaluate)
    where["comparison plot"] = str(compare(list(reports.values()), root / "compare", "vpmoe demo: the students",
                                           verbose=False)["png"])
    summary = summarize(reports, times, where)
    (root / "summary.json").write_text(json.dumps({"reports": reports, "seconds": times, "artifacts": where},
                                                  indent=2, default=str) + "\n")
    print(summary)
    return {"reports": reports, "seconds": times, "artifacts": where}


def summarize(reports: dict[str, dict], times: dict[str, float], where: dict[str, str]) -> str:
    labels = list(reports)
    rows = [
        ("held-out CE, reasoning", lambda r: r["heldout"]["spans"]["reasoning"]["loss"], "{:.3f}"),
        ("held-out CE, final", lambda r: r["heldout"]["spans"]["final"]["loss"], "{:.3f}"),
        ("held-out KL to teacher, reasoning", lambda r: r["teacher_kl"]["reasoning"]["kl"], "{:.3f}"),
        ("held-out KL to teacher, final", lambda r: r["teacher_kl"]["final"]["kl"], "{:.3f}"),
        ("on-policy reverse KL, held-out prompts", lambda r: r["opd_kl"]["all"]["reverse_kl"], "{:.3f}"),
        ("micro-suite accuracy", lambda r: r["suite"]["accuracy"], "{:.1%}"),
        ("valid Harmony generations", lambda r: r["suite"]["parse_valid_share"], "{:.1%}"),
    ]
    width = max(len(name) for name, _, _ in rows) + 2
    lines = ["", "== comparison (tiny vpMoE student, same initialization, same steps)",
             f"{'':<{width}}" + "".join(f"{label:>14}" for label in labels)]
    for name, get, fmt in rows:
        lines.append(f"{name:<{width}}" + "".join(f"{fmt.format(get(reports[label])):>14}" for label in labels))
    ce = reports["CE only"]["teacher_kl"]["all"]["kl"]
    lines.append("")
    for label in ("offline KD", "online KD"):
        kd = reports[label]["teacher_kl"]["all"]["kl"]
        verdict = "beats" if kd < ce else "does NOT beat"
        lines.append(f"The {label} student {verdict} the CE-only student on held-out KL to the teacher "
                     f"({kd:.3f} vs {ce:.3f} nats per supervised token).")
    before, after = (reports[label]["opd_kl"]["all"]["reverse_kl"] for label in ("offline KD", "OPD from KD"))
    lines.append(f"On-policy distillation takes the offline-KD student's reverse KL to the teacher on its own samples "
                 f"of held-out prompts from {before:.3f} to {after:.3f} nats per sampled token.")
    lines.append("\n== time per stage")
    lines += [f"{name:<{width}}{seconds:>8.1f}s" for name, seconds in times.items()]
    lines.append(f"{'total':<{width}}{sum(times.values()):>8.1f}s")
    lines.append("\n== artifacts")
    lines += [f"{name:<{width}}{path}" for name, path in where.items()]
    return "\n".join(lines)
