"""The training step of a config on one GPU: fast path against the plain reference, in one run.

    python benchmarks/train_step.py configs/train/bench_vpmoe.toml --out result.json [--layers 40]

Variants (each in its own process, so memory and compile caches start clean):
  fast          the config as it is (its micro-batch, kernels, compile and checkpointing settings)
  fast_nograph  the same with compiled blocks but no CUDA graphs (train.compile = "on")
  fast_ckpt     compile = "on" with activation checkpointing switched on (its memory and speed cost)
  fast_small    the fast path at the reference's micro-batch, no accumulation (the reference's step shape)
  reference     no compile, reference attention (materialized scores), a Python loop over experts
Every variant runs the real `Trainer.step` (forward, backward, optimizer) on synthetic packed batches and
reports tokens/s, ms per phase, peak memory and MFU. MFU = model FLOPs/s (vpmoe.train.flops: 6 FLOPs per active
matmul weight per token + causal/windowed attention score FLOPs) / the bf16 rate of an 8192^3 matmul measured on
the same GPU in the same run; the nominal dense bf16 peak (989 TFLOP/s for H100/H200 SXM) is shown too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

VARIANTS = ("fast", "fast_nograph", "fast_ckpt", "fast_small", "reference")


def run_variant(args: argparse.Namespace) -> dict:
    from vpmoe.model.config import load_model_config
    from vpmoe.perf.measure import measure, synthetic_trainer
    from vpmoe.train.config import load_train_config

    overrides = list(args.overrides)
    if args.variant in ("fast_nograph", "fast_ckpt"):
        overrides.append("train.compile=on")
    if args.variant == "fast_ckpt":
        overrides.append("train.activation_checkpointing=true")
    if args.variant in ("fast_small", "reference"):
        overrides += [f"data.micro_batch_size={args.reference_micro_batch}", "data.grad_accum=1"]
    if args.variant == "reference":
        overrides += ["train.kernels=naive", "train.compile=off", "train.activation_checkpointing=false"]
    cfg = load_train_config(args.config, overrides)
    model_cfg = load_model_config(cfg.model.config, [f"model.n_layers={args.layers}"] if args.layers else [])
    trainer = synthetic_trainer(cfg, model_cfg)
    steps = args.reference_steps if args.variant == "reference" else args.steps
    result = measure(trainer, args.warmup, steps)
    result["variant"] = args.variant
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--layers", type=int, help="model depth (default: the model config's); for smaller GPUs")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--reference-micro-batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--reference-steps", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: run one variant
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.variant:
        Path(args.result).write_text(json.dumps(run_variant(args)))
        return

    from vpmoe.train.flops import measured_matmul_flops

    matmul = measured_matmul_flops(torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}: 8192^3 bf16 matmul {matmul / 1e12:.0f} TFLOP/s", flush=True)
    results = []
    for variant in args.variants:
        with tempfile.TemporaryDirectory() as tmp:
            result_path = Path(tmp) / "result.json"
            command = [sys.executable, __file__, *sys.argv[1:], "--variant", variant, "--result", str(result_path)]
            done = subprocess.run(command)
            if done.returncode != 0:
                print(f"variant {variant} failed (exit {done.returncode})", flush=True)
                results.append({"variant": variant, "failed": done.returncode})
                continue
            result = json.loads(result_path.read_text())
        result["matmul_tflops_measured"] = matmul / 1e12
        result["mfu"] = result["model_tflops_per_s"] * 1e12 / matmul
        results.append(result)
        ms = result["step_ms"]
        print(f"{variant:12s} mb {result['micro_batch_size']:3d}  {result['tokens_per_s']:10,.0f} tok/s  "
              f"step {ms['total']:8.1f} ms (fwd {ms.get('forward', 0):7.1f}, bwd {ms.get('backward', 0):7.1f}, "
              f"opt {ms.get('optimizer', 0):6.1f}, other {ms['other']:5.1f})  peak {result['peak_memory_gib']:6.1f} "
              f"GiB  {result['model_tflops_per_s']:6.1f} TFLOP/s  MFU {100 * result['mfu']:5.1f}% "
              f"(nominal {100 * result.get('mfu_vs_nominal', 0):4.1f}%)", flush=True)
    by_name = {r["variant"]: r for r in results if "failed" not in r}
    if "fast_small" in by_name and "reference" in by_name:
        print(f"fast / reference at micro-batch {args.reference_micro_batch}: "
              f"{by_name['fast_small']['tokens_per_s'] / by_name['reference']['tokens_per_s']:.1f}x tokens/s")
    if "fast" in by_name and "reference" in by_name:
        print(f"fast (micro-batch {by_name['fast']['micro_batch_size']}) / reference: "
              f"{by_name['fast']['tokens_per_s'] / by_name['reference']['tokens_per_s']:.1f}x tokens/s")
    if args.out:
        from vpmoe import provenance
        from vpmoe.config import config_hash
        from vpmoe.train.config import load_train_config

        record = provenance.record("benchmark_train_step", config_hash(load_train_config(args.config, args.overrides)),
                                   config=provenance.portable_name(args.config), overrides=args.overrides,
                                   layers=args.layers, variants=args.variants)
        Path(args.out).write_text(json.dumps({"matmul_tflops_measured": matmul / 1e12, "results": results,
                                              "provenance": record}, indent=2) + "\n")


if __name__ == "__main__":
    main()
