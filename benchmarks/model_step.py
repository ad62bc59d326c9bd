"""Forward + backward step time and peak memory of a model config on one GPU (bf16, fast kernels).

    python benchmarks/model_step.py configs/model/vpMoE.toml --seq 2048 --batch 1 --out result.json

The step is: embedding -> 80 layers -> head, cross-entropy on all tokens (+ aux_loss * coeff), backward. No
optimizer. Packed rows: each row holds a few documents, as the trainer will feed. One extra step runs under
torch.cuda.set_sync_debug_mode("warn") to count host synchronizations in the hot path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from vpmoe.model import Kernels, build_model, load_model_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--kernels", choices=["fast", "reference"], default="fast")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (experiment)")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="print the top ROWS operators of one profiled step by CUDA time")
    parser.add_argument("--out")
    args = parser.parse_args()

    cfg = load_model_config(args.config, args.overrides)
    kernels = Kernels.named(args.kernels)
    torch.manual_seed(0)
    started = time.perf_counter()
    model = build_model(cfg, device="cuda", dtype=torch.bfloat16, kernels=kernels)
    build_s = time.perf_counter() - started
    n_params = sum(p.numel() for p in model.parameters())
    if args.compile:
        model.compile_blocks()

    vocab = cfg.model.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq + 1), device="cuda")
    inputs, targets = ids[:, :-1], ids[:, 1:]
    doc_ids = torch.zeros(args.batch, args.seq, dtype=torch.long, device="cuda")
    for cut in (args.seq // 3, args.seq // 2 + 17):  # three documents per row
        doc_ids[:, cut:] += 1

    def step() -> torch.Tensor:
        out = model(inputs, doc_ids=doc_ids)
        loss = F.cross_entropy(out.logits.float().view(-1, vocab), targets.reshape(-1))
        if out.aux_loss is not None:
            loss = loss + cfg.moe.aux_loss_coeff * out.aux_loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    started = time.perf_counter()
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - started

    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        loss = step()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end))
    peak_alloc = torch.cuda.max_memory_allocated() / 2**30
    peak_reserved = torch.cuda.max_memory_reserved() / 2**30

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        step()
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message).splitlines()[0] for w in caught
             if "synchroniz" in str(w.message).lower() and "prototype feature" not in str(w.message)]

    profile_table = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        profile_table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.profile)

    median = statistics.median(times)
    result = {
        "config": cfg.model.name,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "kernels": args.kernels,
        "compiled_blocks": args.compile,
        "params": n_params,
        "seq": args.seq,
        "batch": args.batch,
        "step_ms_median": round(median, 1),
        "step_ms_min": round(min(times), 1),
        "step_ms_max": round(max(times), 1),
        "tokens_per_s": round(args.batch * args.seq / (median / 1000)),
        "peak_allocated_gib": round(peak_alloc, 2),
        "peak_reserved_gib": round(peak_reserved, 2),
        "build_s": round(build_s, 1),
        "warmup_s": round(warmup_s, 1),
        "final_loss": round(float(loss), 4),
        "host_syncs_in_one_step": len(syncs),
        "host_sync_examples": sorted(set(syncs))[:5],
    }
    if profile_table is not None:
        print(profile_table)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
