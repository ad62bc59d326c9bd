"""The whole conversion chain on a small donor trained here: held-out loss and agreement with the donor after every
step, after the block-wise morph, and after healing.

    python benchmarks/upcycle_chain.py [--steps 250] [--fit-steps 200] [--heal-steps 200]
                                       [--out benchmarks/results/upcycle_chain.json]

1. Corpus and donor as in benchmarks/upcycle_step2.py (SYNTH records as Harmony conversations, ids relabelled to a
   dense vocabulary; a Qwen3ForCausalLM in miniature: 16 q / 8 kv heads, SwiGLU, tied embeddings, trained with
   AdamW on CPU, deterministic).
2. Step 2 with the activation-aware fit -> compat (8 q / 2 kv heads, ReLU^2 FFN of 1/6 of the donor's width).
3. Step 3 mapped (weight mapping only, as before) and block-wise (vpmoe.upcycle.blockfit on the compat model's own
   activations over the fit records, with the whitened-SVD Q init, and with the plain SVD init for comparison).
4. Step 4 (depth expansion, 4 -> 8 layers) and step 5 (granular MoE, 4 slices per dense FFN, noise 0): both exact;
   max |dlogit| against their source is reported (goal for step 5: <= 1e-4 in fp32).
5. Healing: `--heal-steps` AdamW steps of next-token cross-entropy on the train records (batch 16) on the final MoE
   (the benchmark's stand-in for `vpmoe upcycle`'s [heal] stage, whose `vpmoe train` needs the full o200k
   vocabulary), with the aux-loss-free balancing update after every step.

The real-shape chain (`--real-shape DIR`, CPU is enough): a random donor with Qwen3-0.6B's exact geometry at the
o200k vocabulary (the `qwen3-0_6B-o200k` object; step 1, mergekit with gpt-oss-20b as vocabulary donor, is not run)
goes through steps 2-5 of the shipped registry to the 6.0B-parameter vpMoE, each step a `vpmoe upcycle` in its own
process (steps 4 and 5 streamed, weights in `--dtype`); reported per step: peak RSS, minutes, and whether the
written tensors have the spec's shapes and parameter count (goal: peak RSS <= 16 GiB). `--tiny` runs the same on
the test miniature (seconds), to check the path.

    python benchmarks/upcycle_chain.py --real-shape /tmp/upcycle_real [--dtype fp32|bf16] [--tiny]

Held-out loss: mean next-token NLL on records the donor never saw; agreement: KL(donor || model), top-1 agreement,
max |dlogit| (vpmoe.upcycle.drift.compare_logits). Goals (issue 19): block-wise real <= 1.5 nats before any
end-to-end training; full chain + 200 healing steps within 10% of the compat fit's loss.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from upcycle_step2 import HIDDEN, LAYERS, batches, compat_config, donor_logits, evaluate, relabel, render, train_donor
from vpmoe import tokenizer as tk
from vpmoe.artifacts import weights
from vpmoe.artifacts.files import write_json
from vpmoe.artifacts.models import model_config
from vpmoe.config import shipped_dir
from vpmoe.data import synthetic
from vpmoe.data.harmony import HarmonyRenderer
from vpmoe.model.config import MoESection
from vpmoe.model.params import count_params
from vpmoe.provenance import record
from vpmoe.testing import upcycle as testing
from vpmoe.upcycle import blockfit, expand, granular, morph, surgery
from vpmoe.upcycle.config import load_upcycle_config
from vpmoe.upcycle.drift import CalibrationRow
from vpmoe.upcycle.objects import weights_sha256
from vpmoe.upcycle.run import upcycle
from vpmoe.upcycle.stream import expected_shapes

HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 16, 8, 8, 384
EXPANDED_LAYERS = 8


def dense_config(vocab, layers):
    cfg = compat_config(vocab, "real")
    cfg.model.name, cfg.model.n_layers = "bench_dense", layers
    return cfg


def moe_config(vocab, layers):
    cfg = dense_config(vocab, layers)
    cfg.model.name = "bench_moe"
    width = cfg.ffn.dense_width
    cfg.moe = MoESection(enabled=True, n_experts=32, expert_width=width // 4, shared_width=width, topk=4, n_groups=8,
                         group_topk=4)
    return cfg


def heal(model, train_rows, steps, lr, seed, batch=16):
    """AdamW next-token CE (+ the MoE aux loss) for `steps` steps; the expert-bias update after each step."""
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    rng = np.random.default_rng(seed)
    step, losses = 0, []
    while step < steps:
        for ids, mask, labels in batches(train_rows, batch, rng):
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / 20)
            doc_ids = (mask == 0).long()  # padding is a document of its own
            out = model(ids, doc_ids=doc_ids)
            loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                     ignore_index=-100)
            total = loss + (model.cfg.moe.aux_loss_coeff * out.aux_loss if out.aux_loss is not None else 0)
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if out.routing_counts is not None:
                model.update_expert_bias(out.routing_counts)
            losses.append(float(loss.detach()))
            step += 1
            if step >= steps:
                break
    return model.eval(), float(np.mean(losses[-20:]))


REAL_STEPS = [("surgery", "qwen3-0_6B-o200k", "vpDense0-5_28.compat", "donor", "compat"),
              ("morph", "vpDense0-5_28.compat", "vpDense0-5_28.real", "compat", "real"),
              ("expand", "vpDense0-5_28.real", "vpDense", "real", "dense"),
              ("granular", "vpDense", "vpMoE", "dense", "moe")]
SPEC_TOTALS = {"vpDense0-5_28.compat": 514_654_208, "vpDense0-5_28.real": 504_621_443, "vpDense": 676_949_807,
               "vpMoE": 6_022_557_487}  # architecture.md section 4


def run_one_step(config: str, overrides: list[str]) -> None:
    """Child process: one `vpmoe upcycle`, then its peak RSS and seconds as one JSON line."""
    t = time.time()
    upcycle(load_upcycle_config(config, overrides))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"seconds": time.time() - t, "peak_rss_gib": rss / 2**30}))


def real_shape(root: Path, dtype: str, tiny: bool, records: int) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    if tiny:
        registry = root / "objects.toml"
        registry.write_text(testing.registry_text())
    else:
        registry = shipped_dir("upcycle") / "objects.toml"
    if not (root / "donor" / "provenance.json").exists():
        t = time.time()
        donor = None if tiny else testing.qwen3_config(
            hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
            num_key_value_heads=8, head_dim=128, tied=True)
        testing.save_qwen3(root / "donor", seed=0, **({} if tiny else {"model": testing.random_qwen3(donor)}))
        if not tiny:  # the registry checks the donor's o200k Harmony special tokens and the transplant's record
            tk.write_hf_tokenizer(root / "donor")
            write_json(root / "donor" / "provenance.json", record(
                "checkpoint_object", "", object="qwen3-0_6B-o200k", step="transplant",
                weights_sha256=weights_sha256(root / "donor"),
                details={"note": "random weights of Qwen3-0.6B's geometry at the o200k vocabulary: a stand-in for "
                                 "the transplant's output (benchmarks/upcycle_chain.py --real-shape)"}))
        print(f"random donor written in {time.time() - t:.0f}s")
    results = {}
    for step, source, target, inp, out in REAL_STEPS:
        config = root / f"{step}.toml"
        config.write_text(testing.step_config_text(step, source, target, root / inp, root / out, registry,
                                                   records=records))
        overrides = ["upcycle.overwrite=true"]
        if step in ("expand", "granular"):
            overrides += ["upcycle.stream=true", f"upcycle.dtype={dtype}"]
        proc = subprocess.run([sys.executable, __file__, "--run-step", str(config), *overrides], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise SystemExit(f"step {step} failed:\n{proc.stderr[-3000:]}")
        numbers = json.loads(proc.stdout.strip().splitlines()[-1])
        cfg = model_config(root / out)
        numbers["shapes_match_config"] = weights.shapes(root / out) == expected_shapes(cfg)
        numbers["params_total"] = count_params(cfg)["total"]
        if not tiny:
            numbers["params_match_spec"] = numbers["params_total"] == SPEC_TOTALS[target]
        drift = json.loads((root / out / "drift.json").read_text())["metrics"]["spans"]["all"]
        numbers["drift"] = {k: drift[k] for k in ("kl_mean", "top1_agreement", "max_abs_dlogit")}
        results[f"{step} -> {target}"] = numbers
        print(f"{step:<9} -> {target:<22} {numbers['seconds'] / 60:6.1f} min  peak RSS {numbers['peak_rss_gib']:5.2f} "
              f"GiB  params {numbers['params_total']:,}  shapes ok {numbers['shapes_match_config']}")
    return {"dtype": dtype, "tiny": tiny, "calibration_records": records, "steps": results,
            "goal_peak_rss_le_16gib": max(r["peak_rss_gib"] for r in results.values()) <= 16}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=250, help="AdamW steps of the donor (batch 16)")
    parser.add_argument("--fit-steps", type=int, default=200, help="Adam steps per block of the block-wise morph")
    parser.add_argument("--fit-lr", type=float, default=1e-3)
    parser.add_argument("--heal-steps", type=int, default=200)
    parser.add_argument("--heal-lr", type=float, default=1e-3)
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--valid", type=int, default=100)
    parser.add_argument("--fit", type=int, default=64, help="calibration records of the step-2 and step-3 fits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/upcycle_chain.json")
    parser.add_argument("--real-shape", metavar="DIR", help="run the real-shape chain in DIR instead (see above)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights of the streamed steps")
    parser.add_argument("--tiny", action="store_true", help="--real-shape on the test miniature")
    parser.add_argument("--records", type=int, default=8, help="--real-shape: calibration records of the drift")
    parser.add_argument("--run-step", nargs="+", metavar=("CONFIG", "OVERRIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_step:
        return run_one_step(args.run_step[0], args.run_step[1:])
    if args.real_shape:
        report = real_shape(Path(args.real_shape), args.dtype, args.tiny, args.records)
        name = f"upcycle_chain_real_shape_{args.dtype}.json"
        out = Path(args.real_shape) / name if args.tiny else Path(args.out).with_name(name)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"goal peak RSS <= 16 GiB: {report['goal_peak_rss_le_16gib']}; wrote {out}")
        return

    t0 = time.time()
    renderer = HarmonyRenderer("medium")
    train = render(synthetic.records(args.train, seed=100 + args.seed, prefix="train"), renderer)
    valid = render(synthetic.records(args.valid, seed=200 + args.seed, prefix="valid"), renderer)
    fit = render(synthetic.records(args.fit, seed=300 + args.seed, prefix="fit"), renderer)
    vocab, (train, valid, fit) = relabel([train, valid, fit])
    print(f"corpus: {len(train)} train / {len(valid)} held-out / {len(fit)} fit records, vocabulary {vocab} ids")

    timings = {}
    t = time.time()
    donor, train_loss = train_donor(vocab, train, args.steps, args.seed)
    timings["donor_training"] = time.time() - t
    reference = donor_logits(donor, valid)
    loss, drift = {"donor": evaluate(lambda x: donor(input_ids=x).logits, valid)[0]}, {}

    def measure(name, model):
        model.eval()
        loss[name], drift[name] = evaluate(lambda x: model(x).logits, valid, reference)
        print(f"{name:<28} held-out loss {loss[name]['all']:.4f}  top-1 agreement "
              f"{drift[name]['top1_agreement']:.3f}  ({time.time() - t0:.0f}s)")

    state = {k: v.detach().float() for k, v in donor.state_dict().items()}
    facts = {"hidden": HIDDEN, "layers": LAYERS, "head_dim": HEAD_DIM, "vocab": vocab, "heads": HEADS,
             "kv_heads": KV_HEADS, "intermediate": INTERMEDIATE, "rope_theta": 1e6}
    fit_rows = [CalibrationRow(tok.astype(np.int32), sp) for tok, sp in fit]
    t = time.time()
    compat, _ = surgery.convert(state, facts, compat_config(vocab), "fit", donor=donor, fit_rows=fit_rows,
                                ridge=1e-3)
    timings["surgery_fit"] = time.time() - t
    measure("compat_fit", compat)

    mapped, details = morph.convert(compat, compat_config(vocab, "real"))
    measure("real_mapped", mapped)
    n_held = max(1, len(fit_rows) // 8)
    block_reports = {}
    for q_init in ("svd", "whitened"):
        real = copy.deepcopy(mapped)
        t = time.time()
        settings = blockfit.FitSettings(steps=args.fit_steps, lr=args.fit_lr, q_init=q_init)
        block_reports[q_init] = blockfit.fit_blocks(compat, real, fit_rows[:-n_held], fit_rows[-n_held:], settings)
        timings[f"blockwise_{q_init}"] = time.time() - t
        measure(f"real_blockwise_{q_init}_init", real)

    dense, _ = expand.convert(real, dense_config(vocab, EXPANDED_LAYERS))
    measure("dense_expanded", dense)
    moe, gran = granular.convert(dense, moe_config(vocab, EXPANDED_LAYERS), seed=args.seed)
    measure("moe", moe)
    with torch.no_grad():
        exact = {"expand": max(float((dense(torch.from_numpy(tk)[None]).logits - real(torch.from_numpy(tk)[None])
                                      .logits).abs().max()) for tk, _ in valid[:8]),
                 "granular": max(float((moe(torch.from_numpy(tk)[None]).logits - dense(torch.from_numpy(tk)[None])
                                        .logits).abs().max()) for tk, _ in valid[:8])}
    print(f"exact steps, max |dlogit| vs their source: {exact}")

    t = time.time()
    healed, heal_loss = heal(moe, train, args.heal_steps, args.heal_lr, args.seed)
    timings["healing"] = time.time() - t
    measure(f"moe_healed_{args.heal_steps}", healed)

    print(f"\nheld-out loss (nats/token; {len(valid)} records; uniform would be {math.log(vocab):.2f})")
    print(f"{'object':<28}{'all':>8}{'reasoning':>11}{'final':>8}{'top-1 agr.':>12}{'KL':>8}")
    for name, r in loss.items():
        d = drift.get(name) or {"top1_agreement": 1.0, "kl_mean": 0.0}
        print(f"{name:<28}{r['all']:>8.4f}{r['reasoning']:>11.4f}{r['final']:>8.4f}{d['top1_agreement']:>12.3f}"
              f"{d['kl_mean']:>8.3f}")
    goals = {"blockwise_real_le_1.5": loss["real_blockwise_whitened_init"]["all"] <= 1.5,
             "healed_within_10pct_of_compat_fit":
                 loss[f"moe_healed_{args.heal_steps}"]["all"] <= 1.1 * loss["compat_fit"]["all"],
             "granular_exact_1e-4": exact["granular"] <= 1e-4}
    print(f"goals: {goals}; times (s): { {k: round(v, 1) for k, v in timings.items()} }")
    out = {"corpus": {"train": len(train), "valid": len(valid), "fit": len(fit), "vocab": vocab},
           "donor": {"steps": args.steps, "train_loss": train_loss},
           "settings": {"fit_steps": args.fit_steps, "fit_lr": args.fit_lr, "heal_steps": args.heal_steps,
                        "heal_lr": args.heal_lr, "heal_final_train_loss": heal_loss, "seed": args.seed},
           "held_out_loss": loss, "drift_from_donor": drift, "exact_max_abs_dlogit": exact, "goals": goals,
           "blockwise": {k: v["blocks"] for k, v in block_reports.items()},
           "q_svd_relative_error": details["q_svd_relative_error"], "seconds": timings}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
