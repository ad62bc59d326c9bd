"""Teacher scoring throughput next to the teacher's bare forward, on the same batches, in one run (GPU).

Builds a random mid-sized GPT-OSS (bf16, vocabulary 201088) directly on the GPU and a packed random-token dataset
with Harmony-like span structure (an unsupervised prompt, then reasoning and final spans; documents of 256 to
2048 tokens joined by EOD into 4096-token samples). Then, over the same shards and the same length-bucketed
batches, it times (rounds alternate, median reported):
  bare     `model(input_ids).logits`: the Hugging Face forward with bf16 logits at every position,
  body     the body alone (final hidden states, no head),
  score    what `vpmoe teacher score` does per shard: body, fp32 head at the supervised positions, chunked
           full-vocabulary log-softmax, top-K, target log-prob, entropy, copy to the host, scatter, shard files.
It prints tokens/s of each, the overhead of scoring over the bare forward, bytes written per supervised token,
and a correctness check of the GPU path against an fp64 reference. Usage:
  python benchmarks/bench_teacher.py [--layers 16] [--experts 32] [--tokens 6e5] [--out DIR]

Measured (NVIDIA H200, torch 2.11, transformers 5.17; `--layers 24 --experts 32 --seconds 12`: a 20.9B-param
GPT-OSS, grouped_mm experts, eager attention; 225,055 tokens fed, 179,473 supervised, K 64, median of 2 rounds):
  bare forward 13,106 tok/s, body alone 13,432 tok/s, scoring 12,857 tok/s: +1.9% over the bare forward
  (+4.5% over the body alone); 386.0 bytes written per supervised token. Head stage per 4096-position chunk:
  fp32-output head matmul 6.4 ms, whole score_positions 16.8 ms (22.4 ms with torch.topk instead of the grouped
  top-K). GPU path vs fp64: top-K log-probs within 1.9e-5, top-K ids identical; Hugging Face's bf16 logits would
  be off by up to 7.6e-3 with 98.9% top-K overlap.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vpmoe import tokenizer as tk
from vpmoe.teacher import score as sc
from vpmoe.teacher.documents import make_batches, split_documents
from vpmoe.teacher.load import wrap_model
from vpmoe.testing.teachers import gpt_oss_config, random_gpt_oss
from vpmoe.teacher.topk import score_positions


def random_documents(n_tokens: int, seq_len: int, seed: int):
    """Packed samples of random tokens: per document a prompt (span 0), then reasoning (1) and final (2)."""
    rng = np.random.default_rng(seed)
    tokens, spans, lengths = [], [], []
    used, sample_t, sample_s = 0, [], []
    while used < n_tokens:
        n = int(rng.integers(256, 2049))
        prompt = int(rng.integers(64, 400))
        final = max(1, (n - prompt) // 6)
        t = rng.integers(0, tk.FIRST_SPECIAL, n).astype(np.int32)
        s = np.zeros(n, np.uint8)
        s[prompt : n - final] = 1
        s[n - final :] = 2
        if sample_t and sum(map(len, sample_t)) + len(sample_t) + n > seq_len:
            tokens.append(np.concatenate(sample_t))
            spans.append(np.concatenate(sample_s))
            lengths.append(len(tokens[-1]))
            sample_t, sample_s = [], []
        if sample_t:
            sample_t.append(np.array([tk.EOD], np.int32))
            sample_s.append(np.zeros(1, np.uint8))
        sample_t.append(t)
        sample_s.append(s)
        used += n
    if sample_t:
        tokens.append(np.concatenate(sample_t))
        spans.append(np.concatenate(sample_s))
        lengths.append(len(tokens[-1]))
    return np.concatenate(tokens), np.concatenate(spans), np.array(lengths, np.int64)


def shards_of(tokens, spans, lengths, shard_samples: int):
    starts = np.concatenate([[0], np.cumsum(lengths)])
    out = []
    for first in range(0, len(lengths), shard_samples):
        last = min(first + shard_samples, len(lengths))
        a, b = starts[first], starts[last]
        out.append((sc.Shard("train", len(out), first, last - first),
                    split_documents(tokens[a:b], spans[a:b], lengths[first:last], first)))
    return out


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def check_gpu_path(teacher, docs, k: int, head_chunk: int) -> dict:
    """Our scores for one batch against fp64 math on the same hidden states, and against HF's bf16 logits."""
    batch = make_batches(docs, 4096)[0]
    dev = teacher.input_device
    ids, rows, targets = (torch.from_numpy(a).to(dev) for a in (batch.input_ids, batch.rows, batch.targets))
    with torch.inference_mode():
        hidden = teacher.body(input_ids=ids, use_cache=False).last_hidden_state
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)[:256]
        t = targets[:256]
        ours = score_positions(h, t, teacher.head_weight, None, k, head_chunk)
        exact = torch.log_softmax(h.double() @ teacher.head_weight.double().t(), -1)
        logits = teacher.model(input_ids=ids, use_cache=False).logits
        hf = torch.log_softmax(logits.reshape(-1, exact.shape[1]).index_select(0, rows)[:256].float(), -1)
    exact_top = exact.topk(k, -1).indices

    def overlap(a, b) -> float:
        return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a.tolist(), b.tolist())]))

    def max_err(values, reference) -> float:
        return float((values.double() - reference).abs().max())

    exact_target = exact.gather(1, t[:, None])[:, 0]
    return {
        "finite": bool(torch.isfinite(ours.topk_logprobs).all()),
        "max_abs_err_topk_logprob_vs_fp64": max_err(ours.topk_logprobs, exact.gather(1, ours.topk_ids.long())),
        "max_abs_err_target_vs_fp64": max_err(ours.target_logprob, exact_target),
        "topk_overlap_vs_fp64": overlap(ours.topk_ids, exact_top),
        "max_abs_err_target_hf_bf16_logits_vs_fp64": max_err(hf.gather(1, t[:, None])[:, 0], exact_target),
        "topk_overlap_hf_bf16_logits_vs_fp64": overlap(hf.topk(k, -1).indices, exact_top),
    }


def head_stage(teacher, k: int, rows: int, where: str) -> dict:
    """Milliseconds for one chunk of `rows` supervised positions: the head alone, and each top-K method."""
    import vpmoe.teacher.topk as topk

    g = torch.Generator(device=where).manual_seed(0)
    h = torch.randn(rows, teacher.head_weight.shape[1], device=where, generator=g).to(teacher.head_weight.dtype)
    t = torch.randint(0, tk.VOCAB_SIZE, (rows,), device=where, generator=g)

    def ms(fn, reps=5):
        fn()
        return 1e3 * statistics.median(timed(fn) for _ in range(reps))

    out = {"rows": rows, "head_matmul_fp32_out": ms(lambda: topk.head_logits(h, teacher.head_weight))}
    out["score_positions_grouped_topk"] = ms(lambda: topk.score_positions(h, t, teacher.head_weight, None, k, rows))
    grouped = topk.topk_grouped
    topk.topk_grouped = lambda x, kk: torch.topk(x, kk, dim=-1, sorted=True)
    try:
        out["score_positions_torch_topk"] = ms(lambda: topk.score_positions(h, t, teacher.head_weight, None, k, rows))
    finally:
        topk.topk_grouped = grouped
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=2880)
    parser.add_argument("--tokens", type=float, default=6e5, help="dataset tokens (all are scored each round)")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch-tokens", type=int, default=16384)
    parser.add_argument("--head-chunk", type=int, default=4096)
    parser.add_argument("--shard-samples", type=int, default=32)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=15.0, help="target seconds per timed pass (data is cut)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: checks the script only")
    parser.add_argument("--out", default=os.environ.get("OUT"))
    args = parser.parse_args()
    where = "cpu" if args.cpu_smoke else "cuda"
    if where == "cuda":
        assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU (or --cpu-smoke)"
    device = torch.cuda.get_device_name() if where == "cuda" else "cpu"
    heads, kv, head_dim = (64, 8, 64) if where == "cuda" else (2, 1, 16)

    cfg = gpt_oss_config(hidden_size=args.hidden, intermediate_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                         num_local_experts=args.experts,
                         num_experts_per_tok=4, sliding_window=128, max_position_embeddings=131072)
    start = time.perf_counter()
    model = random_gpt_oss(cfg, seed=0, head_std=0.02, dtype=torch.bfloat16, device=where)
    params = sum(p.numel() for p in model.parameters())
    teacher = wrap_model(model, where)
    memory = (lambda: torch.cuda.max_memory_allocated() / 2**30) if where == "cuda" else (lambda: 0.0)
    print(f"{device}: random GPT-OSS, {args.layers} layers, {args.experts} experts (top 4), hidden {args.hidden}, "
          f"{params / 1e9:.2f}B params, experts {getattr(model.config, '_experts_implementation', '?')}, "
          f"attention {getattr(model.config, '_attn_implementation', '?')}; "
          f"built in {time.perf_counter() - start:.0f}s, "
          f"{memory():.1f} GiB", flush=True)

    tokens, spans, lengths = random_documents(int(args.tokens), args.seq_len, seed=1)
    shards = shards_of(tokens, spans, lengths, args.shard_samples)
    batches = [make_batches(docs, args.batch_tokens) for _, docs in shards]
    fed = sum(b.tokens for bs in batches for b in bs)
    supervised = sum(len(docs.supervised) for _, docs in shards)
    padded = sum(b.input_ids.size for bs in batches for b in bs)
    print(f"data: {len(lengths)} samples, {len(tokens)} tokens, {fed} fed ({padded} padded), {supervised} supervised, "
          f"{len(shards)} shards, {sum(map(len, batches))} batches", flush=True)

    check = check_gpu_path(teacher, shards[0][1], args.k, args.head_chunk)
    print("check:", json.dumps(check), flush=True)
    stage = head_stage(teacher, args.k, args.head_chunk, where)
    print("head stage (ms per chunk):", json.dumps(stage), flush=True)

    work = Path(tempfile.mkdtemp(prefix="vpmoe-bench-teacher-"))

    @torch.inference_mode()
    def bare():
        for bs in batches:
            for b in bs:
                model(input_ids=torch.from_numpy(b.input_ids).to(where), use_cache=False).logits

    @torch.inference_mode()
    def body():
        for bs in batches:
            for b in bs:
                teacher.body(input_ids=torch.from_numpy(b.input_ids).to(where), use_cache=False)

    def score():
        for shard, docs in shards:
            result = sc.run_documents(teacher, docs, args.k, args.batch_tokens, args.head_chunk)
            sc.write_shard(work, shard, docs, result)

    # warm-up (one shard of each), then keep as many shards as fit `--seconds` per timed pass
    with torch.inference_mode():
        for b in batches[0][:2]:
            model(input_ids=torch.from_numpy(b.input_ids).to(where), use_cache=False)
    sc.run_documents(teacher, shards[0][1], args.k, args.batch_tokens, args.head_chunk)
    with torch.inference_mode():
        rate = sum(b.tokens for b in batches[0]) / timed(
            lambda: [model(input_ids=torch.from_numpy(b.input_ids).to(where), use_cache=False) for b in batches[0]])
    keep, total = 0, 0
    while keep < len(shards) and (total == 0 or total / rate < args.seconds):
        total += sum(b.tokens for b in batches[keep])
        keep += 1
    shards, batches = shards[:keep], batches[:keep]
    fed = sum(b.tokens for bs in batches for b in bs)
    supervised = sum(len(docs.supervised) for _, docs in shards)
    print(f"warm (bare ~{rate:,.0f} tok/s); timing {keep} shards, {fed} tokens fed, {supervised} supervised; "
          f"peak memory so far {memory():.1f} GiB", flush=True)

    times = {"bare": [], "body": [], "score": []}
    for r in range(args.rounds):
        for name, fn in (("bare", bare), ("body", body), ("score", score)):
            times[name].append(timed(fn))
            print(f"round {r} {name}: {fed / times[name][-1]:,.0f} tok/s", flush=True)
    written = sum(p.stat().st_size for p in work.rglob("*.npy") if "counts" not in p.name)
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "device": device, "params": params, "layers": args.layers, "experts": args.experts, "hidden": args.hidden,
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "head_stage_ms": stage,
        "tokens_fed": fed, "supervised": supervised, "batch_tokens": args.batch_tokens, "k": args.k,
        "head_chunk": args.head_chunk, "times_s": times,
        "tok_per_s": {k: fed / v for k, v in median.items()},
        "overhead_vs_bare": median["score"] / median["bare"] - 1,
        "overhead_vs_body": median["score"] / median["body"] - 1,
        "bytes_per_supervised_token": written / supervised,
        "peak_memory_gib": memory(),
        "check": check,
    }
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_teacher.json").write_text(json.dumps(result, indent=2))
    t = result["tok_per_s"]
    print(f"\n{device}, {params / 1e9:.1f}B-param random GPT-OSS, {fed} tokens fed, {supervised} supervised, "
          f"K {args.k}")
    print(f"  bare forward (HF logits, bf16, all positions) {t['bare']:>12,.0f} tok/s")
    print(f"  body only (no head)                           {t['body']:>12,.0f} tok/s")
    print(f"  scoring (top-K + entropy + write)             {t['score']:>12,.0f} tok/s")
    print(f"  scoring overhead over the bare forward         {100 * result['overhead_vs_bare']:+.1f}%")
    print(f"  scoring overhead over the body alone           {100 * result['overhead_vs_body']:+.1f}%")
    print(f"  bytes written per supervised token             {result['bytes_per_supervised_token']:.1f}")
    print(f"  peak GPU memory {result['peak_memory_gib']:.1f} GiB")


if __name__ == "__main__":
    main()
