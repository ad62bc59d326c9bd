"""Rollout throughput of the Sampler (vpmoe.model.sample) beside the memory-bound estimate, and the old `generate`
loop for before/after.

    python benchmarks/opd_rollout.py                          # H200: vpMoE, batch 256, prompt 256, 512 new tokens
    python benchmarks/opd_rollout.py --layers 8 --batch 64    # a smaller model
    python benchmarks/opd_rollout.py --tiny                   # CPU smoke run (tiny_moe, fp32, eager)

Random weights, bf16, fast kernels, every row exactly --prompt tokens, no stop tokens (every row runs to
--new tokens), temperature 1. Per mode: the sampler's construction (CUDA-graph capture, compilation), one
warm-up call, then a full call and a prefill-only call (max_new_tokens = 1); the decode step time is their
difference over the remaining steps. Sampled tokens/s counts every sampled token of the full call (prefill
included). The eager mode decodes --eager-new tokens only (its per-step time is what matters).

Memory bound of a decode step: every parameter but the embedding is read once (all experts are hit at batch
256 x top-4 over 256 experts), plus the KV cache slots the step reads (local layers: the window; global layers:
the current span of the stream, averaged over the run's steps), at --bandwidth bytes/s (H200 HBM3e: 4.8e12).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from vpmoe import config
from vpmoe.model import Kernels, Sampler, build_model, generate, load_model_config
from vpmoe.model.sample import SPAN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="vpMoE")
    parser.add_argument("--layers", type=int, help="override model.n_layers")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--prompt", type=int)
    parser.add_argument("--new", type=int)
    parser.add_argument("--modes", default="compile,graph,eager", help="comma-separated: compile, graph, eager")
    parser.add_argument("--eager-new", type=int, default=32, help="new tokens of the eager mode's timed call")
    parser.add_argument("--old-batch", type=int, help="batch of the old generate loop (0: skip it)")
    parser.add_argument("--old-new", type=int, help="new tokens of the old generate loop")
    parser.add_argument("--bandwidth", type=float, default=4.8e12, help="memory bandwidth, bytes/s")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="print the top ROWS CUDA kernels of 8 decode steps of the first mode")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny_moe, fp32, reference kernels")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()

    small = dict(batch=4, prompt=32, new=16, old_batch=4, old_new=8) if args.tiny else {}
    full = dict(batch=256, prompt=256, new=512, old_batch=64, old_new=16)
    for key, value in full.items():
        if getattr(args, key) is None:
            setattr(args, key, small.get(key, value))
    device, dtype, kernels = ("cpu", torch.float32, Kernels()) if args.tiny else ("cuda", torch.bfloat16,
                                                                                  Kernels.fast())
    modes = ["eager"] if args.tiny else [m.strip() for m in args.modes.split(",") if m.strip()]

    cfg = load_model_config("tiny_moe" if args.tiny else args.config)
    if args.layers:
        cfg = config.replace(cfg, {"model.n_layers": args.layers})
    torch.manual_seed(0)
    model = build_model(cfg, device=device, dtype=dtype, kernels=kernels).requires_grad_(False)
    vocab = cfg.model.vocab_size
    prompts = torch.randint(0, vocab, (args.batch, args.prompt)).tolist()

    weight_bytes = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                       if not name.startswith("embed."))
    result = {
        "config": cfg.model.name, "n_layers": cfg.model.n_layers, "device": _device_name(device),
        "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "batch": args.batch,
        "prompt": args.prompt, "new_tokens": args.new, "modes": {},
    }
    for mode in modes:
        try:
            result["modes"][mode] = run_mode(model, prompts, mode, args, device)
        except Exception as error:  # one failing mode must not hide the others' figures; printed, not swallowed
            result["modes"][mode] = {"error": f"{type(error).__name__}: {error}"}
        print(mode, json.dumps(result["modes"][mode]), flush=True)

    capacity, steps = args.prompt + args.new, range(args.prompt, args.prompt + args.new - 1)
    kv_bytes = sum(kv_read_bytes(cfg, args.batch, capacity, min(capacity, (t // SPAN + 1) * SPAN),
                                 model.embed.weight.element_size()) for t in steps) / max(len(steps), 1)
    step_bytes = weight_bytes + kv_bytes
    bound = {
        "weights_gb_per_step": round(weight_bytes / 1e9, 2),
        "kv_cache_gb_per_step": round(kv_bytes / 1e9, 2),
        "bandwidth_tb_per_s": args.bandwidth / 1e12,
        "weights_only_ms": round(weight_bytes / args.bandwidth * 1e3, 2),
        "weights_only_tokens_per_s": round(args.batch / (weight_bytes / args.bandwidth)),
        "weights_and_kv_ms": round(step_bytes / args.bandwidth * 1e3, 2),
        "weights_and_kv_tokens_per_s": round(args.batch / (step_bytes / args.bandwidth)),
    }
    result["memory_bound"] = bound

    if args.old_batch:
        try:
            result["old_generate"] = run_old(model, prompts[:args.old_batch], args, device)
        except Exception as error:
            result["old_generate"] = {"error": f"{type(error).__name__}: {error}"}

    print(json.dumps(result, indent=2))
    print(f"\nmemory bound at {bound['bandwidth_tb_per_s']} TB/s: weights {bound['weights_gb_per_step']} GB "
          f"-> {bound['weights_only_ms']} ms/step = {bound['weights_only_tokens_per_s']:,} tokens/s at batch "
          f"{args.batch}; with the KV cache ({bound['kv_cache_gb_per_step']} GB) {bound['weights_and_kv_ms']} ms "
          f"= {bound['weights_and_kv_tokens_per_s']:,} tokens/s")
    for mode, figures in result["modes"].items():
        if "error" in figures:
            print(f"{mode:>8}: FAILED {figures['error']}")
        else:
            print(f"{mode:>8}: {figures['sampled_tokens_per_s']:,} sampled tokens/s, {figures['decode_ms_per_step']} "
                  f"ms per decode step, prefill {figures['prefill_s']} s")
    old = result.get("old_generate")
    if old and "error" not in old:
        print(f"     old: {old['sampled_tokens_per_s']:,} sampled tokens/s, {old['decode_ms_per_step']} ms per decode "
              f"step (generate, batch {old['batch']}, {old['new_tokens']} new tokens)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


def run_mode(model, prompts, mode, args, device) -> dict:
    new = args.new if mode != "eager" or args.tiny else min(args.new, args.eager_new)
    _release(device)
    started = time.perf_counter()
    sampler = Sampler(model, batch_size=len(prompts), max_prompt_len=args.prompt, max_new_tokens=new, mode=mode)
    _sync(device)
    build_s = time.perf_counter() - started
    generator = torch.Generator(device).manual_seed(0)

    def call(max_new_tokens):
        _sync(device)
        begin = time.perf_counter()
        out = sampler.sample(prompts, generator=generator, stop_ids=(), max_new_tokens=max_new_tokens)
        _sync(device)
        return time.perf_counter() - begin, out

    started = time.perf_counter()
    call(min(new, 8))
    warmup_s = time.perf_counter() - started
    full_s, out = call(new)
    prefill_s, _ = call(1)
    assert int(out.lengths.min()) == new, "every row must run to max_new_tokens"
    step_s = (full_s - prefill_s) / max(new - 1, 1)
    figures = {
        "new_tokens": new,
        "sampled_tokens_per_s": round(len(prompts) * new / full_s),
        "decode_ms_per_step": round(step_s * 1e3, 3),
        "decode_tokens_per_s": round(len(prompts) / step_s),
        "prefill_s": round(prefill_s, 3),
        "full_call_s": round(full_s, 3),
        "build_s": round(build_s, 1),
        "warmup_s": round(warmup_s, 1),
    }
    if device == "cuda":
        figures["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    if args.profile and device == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            call(9)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.profile))
        args.profile = 0
    del sampler, out
    return figures


def kv_read_bytes(cfg, batch: int, capacity: int, span: int, element_size: int) -> int:
    """Keys and values a decode step reads (StaticKVCache's layout): a local layer's ring, a global layer's span."""
    a = cfg.attention
    slots = sum(min(a.window, capacity) if cfg.layer_kind(layer) == "local" else span
                for layer in range(cfg.model.n_layers))
    return 2 * batch * a.n_kv_heads * a.head_dim * slots * element_size


def run_old(model, prompts, args, device) -> dict:
    """The plain loop (`generate`): growing cache, one host synchronization per token."""
    generator = torch.Generator(device).manual_seed(0)

    def call(new):
        _sync(device)
        begin = time.perf_counter()
        generate(model, prompts, new, temperature=1.0, generator=generator)
        _sync(device)
        return time.perf_counter() - begin

    _release(device)
    call(2)
    full_s = call(args.old_new)
    prefill_s = call(1)
    step_s = (full_s - prefill_s) / max(args.old_new - 1, 1)
    return {
        "batch": len(prompts), "new_tokens": args.old_new,
        "sampled_tokens_per_s": round(len(prompts) * args.old_new / full_s),
        "decode_ms_per_step": round(step_s * 1e3, 3),
        "prefill_s": round(prefill_s, 3),
    }


def _sync(device) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _release(device) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _device_name(device) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


if __name__ == "__main__":
    main()
