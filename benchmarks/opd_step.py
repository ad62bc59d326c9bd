"""The whole on-policy distillation step through the real trainer and objective (stage opd), split into sampling,
teacher scoring and training, with the sampler's memory-bound figure beside it.

    python benchmarks/opd_step.py                         # H200: vpMoE student, batch 256, prompt 256, 512 new
    python benchmarks/opd_step.py --layers 8              # a smaller student (and teacher)
    python benchmarks/opd_step.py --tiny                  # CPU smoke run (tiny_moe, fp32, eager sampler)

Setup: a `prompts` dataset of random-text queries cut so that every prompt (system message included) is about
--prompt tokens; a student of --config with random weights; a teacher of --teacher-config (default: the student's)
with other random weights, saved as a checkpoint object and loaded by the stage's own teacher loader on the same
GPU. The step samples --batch rows (--batch / 4 prompts x 4 samples, one micro-batch), which with random weights
almost never stop early: every row runs to --new tokens; the teacher and the training go through them --train-rows
rows at a time (compiled blocks with activation checkpointing on the GPU). The first --warmup steps (compilation,
autotuning) are not timed; then per step: sampling (the sampler's call, host sync included), teacher scoring
(building the rows, the alignment checks and the teacher's forward), training (the student's forward with the
chunked head losses, backward, optimizer) and the rest (copying the weights into the sampling copy, curriculum),
from the objective's and the trainer's own timers.

Memory bound of a decode step (benchmarks/opd_rollout.py): every parameter but the embedding is read once per
step, plus the KV-cache slots the step reads, at --bandwidth bytes/s (H200 HBM3e: 4.8e12).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from opd_rollout import kv_read_bytes  # noqa: I001 (a sibling script)
from vpmoe import config as config_io
from vpmoe.artifacts.models import save_model
from vpmoe.data.build import DataSection, build
from vpmoe.distributed import Ranks
from vpmoe.model import build_model, load_model_config
from vpmoe.model.sample import SPAN
from vpmoe.train.config import load_train_config
from vpmoe.train.trainer import Trainer

SAMPLES = 4
WORDS = ("the of and to in is was for on with as by at from that this which are be or an it has have not but "
         "apples cards marbles river number seven twelve equal share friend answer total more each").split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="vpMoE")
    parser.add_argument("--teacher-config", help="the teacher's model config (default: the student's)")
    parser.add_argument("--layers", type=int, help="override model.n_layers of student and teacher")
    parser.add_argument("--batch", type=int, help="sampled rows per step (prompts x 4)")
    parser.add_argument("--prompt", type=int, help="prompt tokens, system message included")
    parser.add_argument("--new", type=int, help="new tokens per row")
    parser.add_argument("--sampler", default="compile", choices=("eager", "graph", "compile"))
    parser.add_argument("--train-rows", type=int, help="rows per training and teacher forward (opd.train_rows)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--bandwidth", type=float, default=4.8e12, help="memory bandwidth, bytes/s")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny_moe, fp32, eager sampler")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    defaults = dict(batch=8, prompt=96, new=8, train_rows=4) if args.tiny else \
        dict(batch=256, prompt=256, new=512, train_rows=8)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.batch % SAMPLES:
        parser.error(f"--batch must be a multiple of {SAMPLES}")

    with tempfile.TemporaryDirectory() as tmp:
        result = run(args, Path(tmp))
    print(json.dumps(result, indent=2))
    step, bound = result["step_s"], result["memory_bound"]
    print(f"\nOPD step ({result['student']}, batch {args.batch}, prompt {args.prompt}, {args.new} new tokens): "
          f"{step['total']:.2f} s = sampling {step['sampling']:.2f} + teacher scoring {step['teacher_scoring']:.2f} "
          f"+ training {step['training']:.2f} + other {step['other']:.2f}")
    print(f"sampling: {result['sampled_tokens_per_s']:,.0f} sampled tokens/s; memory bound at "
          f"{bound['bandwidth_tb_per_s']} TB/s: weights {bound['weights_gb_per_step']} GB -> "
          f"{bound['weights_only_tokens_per_s']:,} tokens/s, with the KV cache "
          f"{bound['weights_and_kv_tokens_per_s']:,}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def model_cfg(name: str, layers: int | None):
    cfg = load_model_config(name)
    return config_io.replace(cfg, {"model.n_layers": layers}) if layers else cfg


def prompts_dataset(root: Path, count: int, prompt: int) -> Path:
    """`count` records whose queries are long random text: the build cuts each to `prompt` tokens with the longest
    system message."""
    rng = random.Random(0)
    lines = [json.dumps({"synth_id": f"bench-{i}", "query": " ".join(rng.choice(WORDS) for _ in range(2 * prompt))})
             for i in range(count)]
    (root / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return build(DataSection(inputs=[str(root / "prompts.jsonl")], format="prompts", out=str(root / "ds"),
                             seq_len=prompt, valid_fraction=0.0))


def run(args, root: Path) -> dict:
    device = "cpu" if args.tiny else "cuda"
    student_cfg = model_cfg("tiny_moe" if args.tiny else args.config, args.layers)
    teacher_cfg = model_cfg("tiny_moe" if args.tiny else (args.teacher_config or args.config), args.layers)
    torch.manual_seed(1)
    teacher = build_model(teacher_cfg, device=device, dtype=None if args.tiny else torch.bfloat16)
    save_model(teacher, root / "teacher")
    del teacher
    (root / "student.toml").write_text(config_io.dumps_toml(student_cfg))
    prompts = args.batch // SAMPLES
    dataset = prompts_dataset(root, prompts * (args.warmup + args.steps), args.prompt)
    changes = {
        "run.dir": root / "run", "data.path": dataset, "model.config": root / "student.toml", "model.init_from": "",
        "data.micro_batch_size": prompts, "data.grad_accum": 1, "train.steps": args.warmup + args.steps,
        "teacher.path": root / "teacher", "teacher.placement": "device", "opd.samples_per_prompt": SAMPLES,
        "opd.train_rows": args.train_rows, "train.activation_checkpointing": not args.tiny,
        "opd.max_new_tokens": args.new, "curriculum.max_new_tokens": [args.new] * 3, "opd.rollouts_every": 0,
        "opd.sampler": "eager" if args.tiny else args.sampler, "opd.forward_kl": 0.0, "optim.warmup_steps": 1,
    }
    if args.tiny:
        changes.update({"train.device": "cpu", "train.precision": "fp32", "train.kernels": "reference",
                        "train.compile": "off", "teacher.dtype": "float32"})
    cfg = config_io.replace(load_train_config("stage3_opd"), changes)
    ranks = Ranks(device=torch.device(device))
    trainer = Trainer.from_config(cfg, ranks)
    objective = trainer.objective

    for _ in range(args.warmup):
        trainer.step()
    trainer.timer.read()
    objective.metrics()
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.step()
    total = (time.perf_counter() - start) / args.steps
    phases = {name: ms / 1000 / args.steps for name, ms in trainer.timer.read().items()}
    rollouts = objective.metrics()["opd"]
    sampling, teacher_s = rollouts["sample_s"] / args.steps, rollouts["teacher_s"] / args.steps
    training = sum(phases.values())
    model = objective.policy
    weight_bytes = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                       if not name.startswith("embed."))
    capacity = objective.sampler.max_prompt_len + args.new
    steps = range(args.prompt, args.prompt + args.new - 1)
    kv_bytes = sum(kv_read_bytes(student_cfg, args.batch, capacity, min(capacity, (t // SPAN + 1) * SPAN),
                                 model.embed.weight.element_size()) for t in steps) / max(len(steps), 1)
    return {
        "student": f"{student_cfg.model.name} ({student_cfg.model.n_layers} layers)",
        "teacher": f"{teacher_cfg.model.name} ({teacher_cfg.model.n_layers} layers)",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
        "batch": args.batch, "prompt": args.prompt, "new_tokens": args.new, "sampler": cfg.opd_section.sampler,
        "train_rows": args.train_rows,
        "length_mean": rollouts["length"].get("mean"),
        "step_s": {"total": total, "sampling": sampling, "teacher_scoring": teacher_s, "training": training,
                   "other": total - sampling - teacher_s - training},
        "training_phases_s": phases,
        "sampled_tokens_per_s": rollouts["sampled_tokens_per_s"],
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        "memory_bound": {
            "weights_gb_per_step": round(weight_bytes / 1e9, 2), "kv_cache_gb_per_step": round(kv_bytes / 1e9, 2),
            "bandwidth_tb_per_s": args.bandwidth / 1e12,
            "weights_only_tokens_per_s": round(args.batch / (weight_bytes / args.bandwidth)),
            "weights_and_kv_tokens_per_s": round(args.batch / ((weight_bytes + kv_bytes) / args.bandwidth)),
        },
    }


if __name__ == "__main__":
    main()
