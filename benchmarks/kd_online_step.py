"""The kd_online training step next to the ce step and the teacher's bare forward, in one run (issue 16).

    python benchmarks/kd_online_step.py --out kd_online_step.json         # H200: 80-layer vpMoE, micro-batch 2,
                                                                          # GPT-OSS-20B shape at 12 of its 24 blocks
    python benchmarks/kd_online_step.py --teacher-layers 24 --micro-batch 4 --activation-checkpointing
    python benchmarks/kd_online_step.py --tiny                            # CPU smoke run (tiny student / teacher)

Memory (H200, 141 GiB): the student's step with compile "on" peaks near 132 GiB at micro-batch 4 (90 GiB with
activation checkpointing; benchmarks/results/vpMoE_train_step_h200.json), the full 20B-shaped teacher takes 39 GiB
(12 blocks: 20 GiB), hence the defaults.

Student: the vpMoE of configs/train/bench_vpmoe.toml (fast kernels, bf16 autocast) with train.compile = "on"
(kd_online reads block outputs with hooks, which CUDA-graph replays would overwrite), seq 2048, on synthetic packed
batches (vpmoe.perf.synthetic: 3 documents per row, every label supervised; the Hugging Face teacher gets each
document alone, in right-padded buckets of similar length: `fed_per_row_token` says how much it computes per row
token).
Teacher: a randomly initialized GPT-OSS of the 20B shape (d 2880, 32 experts top-4, 64 heads, sliding window 128;
`--teacher-layers` of its 24 blocks) in bf16 on the same GPU, built in memory (a 40 GB checkpoint is not written
and read back; the loader's checks are the tests' business).
Rows (each the real `Trainer.step` or the teacher's `forward`, after warmup):
  ce            the student's CE step (forward, backward, optimizer)
  kd_online     the same student with the stage's mix (teacher forward per micro-batch, chunked KL, hidden term)
  teacher       the teacher's bare forward over the same micro-batches (no_grad: body, states at the supervised
                positions, and the head's logits there, chunk by chunk)
Goal: kd_online step time <= (ce step + teacher forward) x 1.10, on the median of the timed steps (means beside).
Loss side: the peak memory above the inputs of the kd_online loss alone (chunked CE + forward KL from hidden states,
the hidden-state cosine through the projections, forward + backward) at 8,192 tokens, per chunk size; goal <= 2 GiB
(the head's fp32 gradient, which every step holds, is counted in and shown apart).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

from vpmoe import config as config_io
from vpmoe.distributed import Ranks, resolve_device
from vpmoe.model.config import load_model_config
from vpmoe.perf.measure import measure, synchronize
from vpmoe.perf.synthetic import SyntheticBatches
from vpmoe.teacher import load
from vpmoe.teacher.online import OnlineTeacher, documents
from vpmoe.testing.teachers import gpt_oss_config, random_gpt_oss
from vpmoe.train import head_losses
from vpmoe.train.config import load_train_config
from vpmoe.train.hidden_distill import HiddenProjections, auto_layer_pairs
from vpmoe.train.objectives import kd_online
from vpmoe.train.trainer import Trainer

GPT_OSS_20B = dict(hidden_size=2880, intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64,
                   num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4,
                   sliding_window=128, max_position_embeddings=131072)


def build_teacher(args, device: torch.device) -> OnlineTeacher:
    shape = {} if args.tiny else dict(GPT_OSS_20B, num_hidden_layers=args.teacher_layers)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model = random_gpt_oss(gpt_oss_config(**shape), seed=1, head_std=0.02, dtype=dtype, device=device)
    if not args.tiny:
        model.set_attn_implementation(args.attn_implementation)
        if args.experts_implementation:
            model.set_experts_implementation(args.experts_implementation)
    return OnlineTeacher(load.wrap_model(model.requires_grad_(False), str(device), "random GPT-OSS"), vpmoe=False,
                         name="random GPT-OSS")


def trainer_for(stage: str, args, teacher: OnlineTeacher, device: torch.device) -> Trainer:
    if args.tiny:
        cfg = load_train_config("tiny_kd_online", ["teacher.path=in-memory", "data.seq_len=128",
                                                   f"data.micro_batch_size={args.micro_batch}"])
    else:
        recompute = "true" if args.activation_checkpointing else "false"
        cfg = load_train_config("bench_vpmoe", [f"data.micro_batch_size={args.micro_batch}", "data.grad_accum=1",
                                                "train.compile=on", f"data.seq_len={args.seq_len}",
                                                f"train.activation_checkpointing={recompute}"])
        if stage == "kd_online":
            cfg = config_io.replace(cfg, {"train.stage": "kd_online", "loss.ce": 1.0, "teacher.path": "in-memory",
                                          "teacher.dtype": "bfloat16",
                                          "distill.kl_chunk_tokens": args.kl_chunk_tokens})
    if stage == "ce":
        cfg = config_io.replace(cfg, {"train.stage": "ce", "teacher": None, "distill": None})
    kd_online.load_online_teacher = lambda section, ranks: teacher  # the in-memory teacher, not a checkpoint
    model_cfg = load_model_config(cfg.model.config, [f"model.n_layers={args.layers}"] if args.layers else [])
    data = SyntheticBatches(model_cfg.model.vocab_size, cfg.data.seq_len, cfg.data.micro_batch_size, seed=0)
    return Trainer(cfg, Ranks(device=device), data, model_cfg, cfg.data.seq_len)


def teacher_forward(teacher: OnlineTeacher, trainer: Trainer, args, device) -> dict:
    data = SyntheticBatches(trainer.model_cfg.model.vocab_size, trainer.seq_len, args.micro_batch, seed=0)
    layers = [t for _, t in auto_layer_pairs(trainer.model_cfg.model.n_layers, teacher.n_layers)]

    def once():
        rows = next(data).to(device)
        states = teacher.forward(rows.input_ids, rows.position_ids, rows.doc_ids, rows.label_spans > 0, layers)
        for chunk in states.hidden.split(args.kl_chunk_tokens):  # the logits a forward ends with, chunk by chunk
            torch.nn.functional.linear(chunk, teacher.head_weight)

    for _ in range(args.warmup):
        once()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    each = []
    for _ in range(args.steps):
        begin = time.perf_counter()
        once()
        synchronize(device)
        each.append(time.perf_counter() - begin)
    seconds = sum(each) / args.steps
    rows = next(data)
    fed = documents(rows.input_ids, rows.doc_ids, rows.label_spans > 0).fed_tokens
    out = {"step_ms": 1000 * seconds, "median_ms": 1000 * statistics.median(each), "tokens_per_s": args.micro_batch * trainer.seq_len / seconds,
           "weights_gib": teacher.weight_bytes / 2**30,
           # each packed document is fed alone, in right-padded buckets: fed tokens per row token
           "fed_per_row_token": fed / rows.input_ids.numel()}
    if device.type == "cuda":
        out["forward_peak_extra_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    return out


def loss_side_memory(teacher: OnlineTeacher, student_dim: int, n_student: int, chunk: int, args, device) -> dict:
    """Peak memory above the inputs of the kd_online loss at `args.loss_tokens` tokens (forward + backward)."""
    n, vocab = args.loss_tokens, teacher.head_weight.shape[0]
    g = torch.Generator(device=device).manual_seed(0)
    act = torch.bfloat16 if device.type == "cuda" else torch.float32  # the student's activations under autocast
    hidden = torch.randn(n, student_dim, device=device, generator=g, dtype=act).requires_grad_(True)
    weight = (0.02 * torch.randn(vocab, student_dim, device=device, generator=g)).requires_grad_(True)
    targets = torch.randint(0, vocab, (n,), device=device, generator=g)
    pairs = auto_layer_pairs(n_student, teacher.n_layers)
    t_dtype = teacher.head_weight.dtype
    t_hidden = torch.randn(n, teacher.hidden_size, device=device, generator=g).to(t_dtype)
    t_layers = [torch.randn(n, teacher.hidden_size, device=device, generator=g).to(t_dtype) for _ in pairs]
    s_layers = [torch.randn(n, student_dim, device=device, generator=g, dtype=act).requires_grad_(True)
                for _ in pairs]
    projections = HiddenProjections(pairs, student_dim, teacher.hidden_size).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def once():
        with autocast:
            values = head_losses.compute(hidden, weight, targets=targets, ce=True, forward_kl=True,
                                         teacher=head_losses.TeacherHead(t_hidden, teacher.head_weight),
                                         chunk_size=chunk)
            cosine = projections(s_layers, t_layers)
        (0.25 * values.ce.mean() + 0.5 * values.forward_kl.mean() + 0.25 * cosine.mean()).backward()

    once()
    synchronize(device)
    if device.type != "cuda":
        return {"tokens": n, "note": "memory is measured on CUDA only"}
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    once()
    synchronize(device)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    # of which the head's fp32 gradient, which every step holds
    return {"tokens": n, "chunk_tokens": chunk, "peak_extra_gib": peak, "head_grad_gib": weight.numel() * 4 / 2**30}


def release(*objects) -> None:
    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny student and teacher")
    parser.add_argument("--layers", type=int, help="student depth (default: the model config's, 80)")
    parser.add_argument("--teacher-layers", type=int, default=12, help="24 is the full 20B shape (39 GiB)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--kl-chunk-tokens", type=int, default=256)
    parser.add_argument("--loss-tokens", type=int, default=8192)
    parser.add_argument("--attn-implementation", default="eager", help="the teacher's (transformers)")
    parser.add_argument("--experts-implementation", help="the teacher's (transformers; e.g. grouped_mm)")
    parser.add_argument("--activation-checkpointing", action="store_true", help="the student's, in both steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if args.tiny:
        args.micro_batch, args.warmup, args.steps, args.loss_tokens = 1, 1, 2, 256
        args.kl_chunk_tokens = 128
    device = resolve_device("cpu" if args.tiny else "cuda")

    teacher = build_teacher(args, device)
    results: dict = {"teacher_layers": teacher.n_layers, "teacher_hidden": teacher.hidden_size}
    for stage in ("ce", "kd_online"):
        trainer = trainer_for(stage, args, teacher, device)
        results[stage] = measure(trainer, args.warmup, args.steps)
        if stage == "ce":
            results["teacher"] = teacher_forward(teacher, trainer, args, device)
            student_dim, n_student = trainer.model_cfg.model.hidden_size, trainer.model_cfg.model.n_layers
        release(trainer)
        print(f"{stage}: {results[stage]['step_ms']['median']:.1f} ms/step (median), "
              f"{results[stage]['tokens_per_s']:.0f} tokens/s, peak {results[stage]['peak_memory_gib']} GiB")
    # the goal on median steps (one slow step moves a mean of 10 by 10%), the means beside them
    median = results["ce"]["step_ms"]["median"] + results["teacher"]["median_ms"]
    mean = results["ce"]["step_ms"]["total"] + results["teacher"]["step_ms"]
    results["goal_step"] = {"kd_online_ms": results["kd_online"]["step_ms"]["median"],
                            "ce_plus_teacher_ms": median,
                            "ratio": results["kd_online"]["step_ms"]["median"] / median, "goal_ratio": 1.10,
                            "ratio_of_means": results["kd_online"]["step_ms"]["total"] / mean}
    results["loss_side"] = [loss_side_memory(teacher, student_dim, n_student, chunk, args, device)
                            for chunk in ([args.kl_chunk_tokens] if args.tiny else sorted({256, 512, 1024,
                                                                                             args.kl_chunk_tokens}))]
    print(f"teacher forward: {results['teacher']['median_ms']:.1f} ms (median), {results['teacher']['tokens_per_s']:.0f} tokens/s")
    print(f"kd_online / (ce + teacher) = {results['goal_step']['ratio']:.3f} (goal <= 1.10)")
    print(f"loss side: {results['loss_side']}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
