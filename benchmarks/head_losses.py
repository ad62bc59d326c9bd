"""Chunked head losses (vpmoe.train.head_losses) against the naive full-logits head: time and peak extra memory.

    python benchmarks/head_losses.py                 # GPU: 8192 tokens x 201088 vocab, student 1024, teacher 2880
    python benchmarks/head_losses.py --tiny          # CPU smoke run at a tiny size (no memory figures)
    python benchmarks/head_losses.py --frozen-head   # the student head without gradient (hidden states only)

Both run under bf16 autocast: the student head weight is an fp32 master copy (requires grad unless --frozen-head),
the student hidden states bf16 with gradient, the teacher's hidden states and head bf16 without gradient. The naive
version computes [N, V] logits, fp32 log-softmaxes and F.kl_div as DistillKit / TRL do. Each row is one forward +
backward of sum(per_token * weights). "peak extra" is the peak allocated memory above the inputs during that call,
the head weight's fp32 gradient (same in both versions) included; "vs naive" is the relative norm of the
difference of the per-token values and of the gradients from the naive version's.
Goal (issue 16): loss-side peak memory <= 2 GiB extra at 8,192 tokens.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from vpmoe.train import head_losses as hl

LOSSES = {  # name: the terms of compute(), with the weight of each in the benchmarked sum
    "ce": {"ce": 1.0},
    "forward_kl": {"forward_kl": 1.0},
    "reverse_kl": {"reverse_kl": 1.0},
    "kd_online (ce + fkl)": {"ce": 0.25, "forward_kl": 0.5},
    "opd (rkl + 0.2 fkl)": {"reverse_kl": 1.0, "forward_kl": 0.2},
}


def naive(hidden, weight, targets, teacher, terms):
    z = F.linear(hidden, weight).float()
    out = {}
    if "ce" in terms:
        out["ce"] = F.cross_entropy(z, targets, reduction="none")
    if "forward_kl" in terms or "reverse_kl" in terms:
        log_s = torch.log_softmax(z, -1)
        log_t = torch.log_softmax(F.linear(teacher.hidden, teacher.weight).float(), -1)
        if "forward_kl" in terms:
            out["forward_kl"] = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)
        if "reverse_kl" in terms:
            out["reverse_kl"] = F.kl_div(log_t, log_s, log_target=True, reduction="none").sum(-1)
    return out


def chunked(chunk):
    def run(hidden, weight, targets, teacher, terms):
        kd = "forward_kl" in terms or "reverse_kl" in terms
        out = hl.compute(hidden, weight, targets=targets, teacher=teacher if kd else None, chunk_size=chunk,
                         **{t: True for t in terms})
        return {t: getattr(out, t) for t in terms}
    return run


def measure(fn, inputs, terms, token_weights, device, warmup, steps):
    hidden, weight = inputs[0], inputs[1]
    params = [p for p in (hidden, weight) if p.requires_grad]

    def once():
        for p in params:
            p.grad = None
        with torch.autocast(device, dtype=torch.bfloat16):
            values = fn(*inputs, terms)
        loss = sum((values[t] * token_weights * w).sum() for t, w in terms.items())
        loss.backward()
        return values

    for _ in range(warmup):
        once()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for p in params:
        p.grad = None
    sync()
    peak = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        values = once()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
        if peak is None and device == "cuda":
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    result = {t: v.detach().float() for t, v in values.items()}
    grads = [p.grad.detach().float() for p in params]
    return sorted(times)[len(times) // 2], peak, result, grads


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=201088)
    parser.add_argument("--student-dim", type=int, default=1024)
    parser.add_argument("--teacher-dim", type=int, default=2880)
    parser.add_argument("--chunks", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--losses", nargs="+", choices=list(LOSSES), default=list(LOSSES))
    parser.add_argument("--frozen-head", action="store_true")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: 96 tokens x 1000 vocab, dims 32 / 48")
    parser.add_argument("--out", help="also write the rows as JSON")
    args = parser.parse_args()
    if args.tiny:
        args.tokens, args.vocab, args.student_dim, args.teacher_dim = 96, 1000, 32, 48
        args.chunks, args.warmup, args.steps = [16, 40], 1, 2
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device (or --tiny for a CPU smoke run)")

    g = torch.Generator(device).manual_seed(0)
    n, v = args.tokens, args.vocab
    hidden = torch.randn(n, args.student_dim, generator=g, device=device).bfloat16().requires_grad_()
    weight = (torch.randn(v, args.student_dim, generator=g, device=device) * args.student_dim**-0.5 * 3)
    weight.requires_grad_(not args.frozen_head)
    teacher = hl.TeacherHead(
        torch.randn(n, args.teacher_dim, generator=g, device=device).bfloat16(),
        (torch.randn(v, args.teacher_dim, generator=g, device=device) * args.teacher_dim**-0.5 * 3).bfloat16(),
    )
    targets = torch.randint(0, v, (n,), generator=g, device=device)
    token_weights = torch.rand(n, generator=g, device=device) / n  # span-normalized weights stand-in
    inputs = (hidden, weight, targets, teacher)

    print(f"{n} tokens x {v} vocab, student {args.student_dim} (head {'frozen' if args.frozen_head else 'trained'},"
          f" fp32 master), teacher {args.teacher_dim} bf16, bf16 autocast on {device}")
    if device == "cuda":
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; one [N, V] fp32 tensor = "
              f"{n * v * 4 / 2**30:.2f} GiB, the head's fp32 gradient = {weight.numel() * 4 / 2**30:.2f} GiB")
    header = f"{'loss':<22} {'method':<12} {'ms fwd+bwd':>11} {'peak extra GiB':>15} {'values vs naive':>16} " \
             f"{'grads vs naive':>15}"
    print(header)
    print("-" * len(header))
    rows = []
    for name in args.losses:
        terms = LOSSES[name]
        ms, peak, ref_values, ref_grads = measure(naive, inputs, terms, token_weights, device, args.warmup,
                                                  args.steps)
        rows.append(dict(loss=name, method="naive", ms=ms, peak_gib=peak))
        print(f"{name:<22} {'naive':<12} {ms:>11.1f} {_gib(peak):>15} {'':>16} {'':>15}")
        for chunk in args.chunks:
            ms, peak, values, grads = measure(chunked(chunk), inputs, terms, token_weights, device, args.warmup,
                                              args.steps)
            err_v = max(rel(values[t], ref_values[t]) for t in terms)
            err_g = max(rel(a, b) for a, b in zip(grads, ref_grads))
            rows.append(dict(loss=name, method=f"chunk {chunk}", ms=ms, peak_gib=peak, values_rel=err_v,
                             grads_rel=err_g))
            print(f"{'':<22} {f'chunk {chunk}':<12} {ms:>11.1f} {_gib(peak):>15} {err_v:>16.1e} {err_g:>15.1e}")
        del ref_values, ref_grads
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(tokens=n, vocab=v, student_dim=args.student_dim, teacher_dim=args.teacher_dim,
                           frozen_head=args.frozen_head, device=device, rows=rows), f, indent=1)


def _gib(value):
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    main()
