"""Step 2 (head + FFN surgery): mean pooling (the baseline) vs the activation-aware least-squares fit, measured on
a small donor trained here on the demo corpus.

    python benchmarks/upcycle_step2.py [--steps 250] [--out benchmarks/results/upcycle_step2.json]

1. Corpus: the project's synthetic SYNTH records rendered as Harmony conversations (o200k ids), split into train,
   held-out and fit-calibration records (different generator seeds). The ids are relabelled to a dense vocabulary
   of the ids that occur (a few hundred), so the donor is small; the relabelling changes nothing else.
2. Donor: a Hugging Face Qwen3ForCausalLM with the donor's geometry in miniature (16 q / 8 kv heads, QK-norm,
   SwiGLU, tied embeddings, RoPE 1e6), trained with AdamW for a fixed number of steps on CPU (deterministic).
3. Step 2 both ways -> compat models (8 q / 2 kv heads, ReLU^2 FFN of 1/6 of the donor's width, as 512 / 3072),
   then step 3 (morph to real mode) of each, to see whether the difference survives the next shock.
4. Held-out loss (mean next-token NLL over all positions, and per span) of the donor and of every result.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from vpmoe.data import synthetic
from vpmoe.data.harmony import HarmonyRenderer
from vpmoe.model.config import AttentionSection, FFNSection, ModelConfig, ModelSection
from vpmoe.spans import NAMES as SPAN_NAMES
from vpmoe.upcycle import morph, surgery
from vpmoe.upcycle.drift import CalibrationRow, _Accumulator, compare_logits

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 128, 4, 16, 8, 8, 384
TARGET_HEADS, TARGET_KV, DENSE_WIDTH = 8, 2, 64


def render(records, renderer):
    out = []
    for r in records:
        x = renderer.render(r["query"], r["synthetic_reasoning"], r["synthetic_answer"], 512)
        out.append((x.tokens.astype(np.int64), x.spans))
    return out


def relabel(sets):
    ids = sorted({int(t) for rows in sets for tokens, _ in rows for t in tokens})
    table = {t: i for i, t in enumerate(ids)}
    return len(ids), [[(np.array([table[int(t)] for t in tok]), sp) for tok, sp in rows] for rows in sets]


def batches(rows, batch, rng):
    order = rng.permutation(len(rows))
    for start in range(0, len(order) - batch + 1, batch):
        chunk = [rows[i][0] for i in order[start:start + batch]]
        length = max(len(c) for c in chunk)
        ids = torch.zeros(batch, length, dtype=torch.long)
        mask = torch.zeros(batch, length, dtype=torch.long)
        for i, c in enumerate(chunk):
            ids[i, :len(c)] = torch.from_numpy(c)
            mask[i, :len(c)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        yield ids, mask, labels


def train_donor(vocab, train_rows, steps, seed, batch=16):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, rope_theta=1e6,
                      rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=1024)
    model = Qwen3ForCausalLM(cfg)
    model.config._attn_implementation = "sdpa"  # eager attention is ~10x slower on CPU
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.95))
    rng = np.random.default_rng(seed)
    step, losses = 0, []
    model.train()
    while step < steps:
        for ids, mask, labels in batches(train_rows, batch, rng):
            lr = 3e-3 * min(1.0, (step + 1) / 50)
            for group in opt.param_groups:
                group["lr"] = lr
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
            if step >= steps:
                break
    return model.eval(), float(np.mean(losses[-20:]))


@torch.no_grad()
def donor_logits(donor, rows):
    return [donor(input_ids=torch.from_numpy(tokens)[None]).logits[0].float() for tokens, _ in rows]


@torch.no_grad()
def evaluate(logits_fn, rows, reference=None):
    """Held-out loss (mean next-token NLL, all positions and per span) and, given the donor's logits, the drift from
    the donor (drift.compare_logits: KL(donor || model), top-1 agreement, max |dlogit|)."""
    sums = {name: [0.0, 0] for name in ("all", *SPAN_NAMES.values())}
    acc = {name: _Accumulator() for name in ("all", *SPAN_NAMES.values())}
    for i, (tokens, spans) in enumerate(rows):
        ids = torch.from_numpy(tokens)
        logits = logits_fn(ids[None])[0].float()
        logp = torch.log_softmax(logits.double(), -1)
        nll = -logp[:-1].gather(1, ids[1:, None])[:, 0]
        labels = spans[1:]
        sums["all"][0] += float(nll.sum())
        sums["all"][1] += nll.numel()
        for code, name in SPAN_NAMES.items():
            keep = torch.from_numpy(labels == code)
            sums[name][0] += float(nll[keep].sum())
            sums[name][1] += int(keep.sum())
        if reference is not None:
            compare_logits(reference[i][:-1], logits[:-1], ids[1:], torch.from_numpy(labels.astype(np.int64)), acc)
    loss = {name: s / n for name, (s, n) in sums.items() if n}
    drift = None
    if reference is not None:
        a = acc["all"].report()
        drift = {k: a[k] for k in ("kl_mean", "top1_agreement", "max_abs_dlogit")}
    return loss, drift


def compat_config(vocab, mode="compat"):
    return ModelConfig(
        model=ModelSection(name=f"bench_{mode}", mode=mode, vocab_size=vocab, hidden_size=HIDDEN, n_layers=LAYERS),
        attention=AttentionSection(n_heads=TARGET_HEADS, n_kv_heads=TARGET_KV, head_dim=HEAD_DIM, rope_base=1e6,
                                   tpa_q_rank=4, tpa_kv_rank=2),
        ffn=FFNSection(dense_width=DENSE_WIDTH),
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=250, help="AdamW steps of the donor (batch 16; ~2-3 CPU minutes)")
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--valid", type=int, default=100)
    parser.add_argument("--fit", type=int, default=64, help="calibration records of the activation-aware fit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/upcycle_step2.json")
    args = parser.parse_args(argv)

    t0 = time.time()
    renderer = HarmonyRenderer("medium")
    train = render(synthetic.records(args.train, seed=100 + args.seed, prefix="train"), renderer)
    valid = render(synthetic.records(args.valid, seed=200 + args.seed, prefix="valid"), renderer)
    fit = render(synthetic.records(args.fit, seed=300 + args.seed, prefix="fit"), renderer)
    vocab, (train, valid, fit) = relabel([train, valid, fit])
    print(f"corpus: {len(train)} train / {len(valid)} held-out / {len(fit)} fit records, vocabulary {vocab} ids, "
          f"{time.time() - t0:.0f}s")

    t = time.time()
    donor, train_loss = train_donor(vocab, train, args.steps, args.seed)
    train_minutes = (time.time() - t) / 60
    print(f"donor: {args.steps} AdamW steps (batch 16) in {train_minutes:.1f} min, train loss {train_loss:.4f}")
    reference = donor_logits(donor, valid)
    results = {"donor": evaluate(lambda x: donor(input_ids=x).logits, valid)[0]}

    state = {k: v.detach().float() for k, v in donor.state_dict().items()}
    facts = {"hidden": HIDDEN, "layers": LAYERS, "head_dim": HEAD_DIM, "vocab": vocab, "heads": HEADS,
             "kv_heads": KV_HEADS, "intermediate": INTERMEDIATE, "rope_theta": 1e6}
    fit_rows = [CalibrationRow(t.astype(np.int32), s) for t, s in fit]
    cfg = compat_config(vocab)
    timings, fits, drifts = {}, {}, {}
    t = time.time()
    donor_states = surgery.donor_residual_states(donor, fit_rows)
    timings["donor_states"] = time.time() - t
    for method in ("mean", "fit"):
        t = time.time()
        model, details = surgery.convert(state, facts, cfg, method, donor=donor, fit_rows=fit_rows, ridge=1e-3,
                                         donor_states=donor_states)
        timings[method] = time.time() - t
        real, _ = morph.convert(model, compat_config(vocab, "real"))
        for name, m in ((f"compat_{method}", model.eval()), (f"real_{method}", real.eval())):
            results[name], drifts[name] = evaluate(lambda x, m=m: m(x).logits, valid, reference)
        if method == "fit":
            fits = details["fit"]
    sweep = {}
    for ridge in (1e-4, 1e-2, 1e-1):
        model, _ = surgery.convert(state, facts, cfg, "fit", donor=donor, fit_rows=fit_rows, ridge=ridge,
                                   donor_states=donor_states)
        sweep[str(ridge)] = evaluate(lambda x, m=model.eval(): m(x).logits, valid)[0]["all"]

    print(f"\nheld-out loss (nats/token; {len(valid)} records, unigram-uniform would be {math.log(vocab):.2f})")
    print(f"{'model':<22}{'all':>8}{'reasoning':>11}{'final':>8}{'gap to donor':>14}")
    for name, r in results.items():
        gap = r["all"] - results["donor"]["all"]
        print(f"{name:<22}{r['all']:>8.4f}{r['reasoning']:>11.4f}{r['final']:>8.4f}{gap:>14.4f}")
    print("\ndrift from the donor on the held-out records (KL(donor || result) nats, top-1 agreement, max |dlogit|)")
    for name, d in drifts.items():
        print(f"{name:<22}{d['kl_mean']:>8.4f}{d['top1_agreement']:>8.3f}{d['max_abs_dlogit']:>8.2f}")
    print(f"fit ridge sensitivity (compat, all): {json.dumps({k: round(v, 4) for k, v in sweep.items()})}")
    print(f"surgery time: mean {timings['mean']:.1f}s, fit {timings['fit']:.1f}s (+ donor forward "
          f"{timings['donor_states']:.1f}s); total {time.time() - t0:.0f}s")
    out = {"corpus": {"train": len(train), "valid": len(valid), "fit": len(fit), "vocab": vocab},
           "donor": {"steps": args.steps, "minutes": train_minutes, "train_loss": train_loss,
                     "geometry": {"hidden": HIDDEN, "layers": LAYERS, "heads": HEADS, "kv_heads": KV_HEADS,
                                  "head_dim": HEAD_DIM, "intermediate": INTERMEDIATE}},
           "target": {"heads": TARGET_HEADS, "kv_heads": TARGET_KV, "dense_width": DENSE_WIDTH},
           "held_out_loss": results, "drift_from_donor": drifts, "fit_ridge_sweep": sweep,
           "fit_layers": fits["layers"], "seed": args.seed}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
