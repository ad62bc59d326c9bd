"""Scaling of the real training step over GPUs and layouts: tokens/s, tokens/s per GPU, scaling efficiency against
one GPU, and where a step's time goes (forward, backward, optimizer), per layout.

    python benchmarks/scaling.py                                   # bench_vpmoe on 1 and 2 GPUs, ep 1 and 2
    python benchmarks/scaling.py --gpus 1 2 4 8 --ep 1 2 4 8 --layers 40 --out scaling.json
    python benchmarks/scaling.py --gpus 2 --baseline one_gpu.json  # efficiency against an earlier 1-GPU run
    python benchmarks/scaling.py --tiny                            # CPU smoke run: tiny_ce, gloo, 1 and 2 ranks

Each layout runs in its own `torchrun --standalone --nproc_per_node N` (ep divides N; dp_shard = N / ep), every rank
on its own synthetic micro-batches of the config's size (weak scaling: the global batch grows with N), through
`Trainer.step()` (forward, backward, clip, optimizer, expert bias). Several ranks need `train.compile = "on"`
(CUDA graphs are one-GPU only), so every layout, the 1-GPU baseline included, runs with it unless `--set` says
otherwise. Efficiency = tokens/s per GPU / the 1-GPU, ep 1 layout's tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def run_worker(args: argparse.Namespace) -> None:
    """One layout, inside torchrun: every rank measures; rank 0 writes the summary."""
    from vpmoe import distributed
    from vpmoe.model.config import load_model_config
    from vpmoe.perf.measure import as_ce_stage, measure
    from vpmoe.perf.synthetic import SyntheticBatches
    from vpmoe.train.config import load_train_config
    from vpmoe.train.trainer import Trainer

    cfg = as_ce_stage(load_train_config(args.config, [*overrides(args), f"parallel.ep={args.worker_ep}"]))
    model_cfg = load_model_config(cfg.model.config, [f"model.n_layers={args.layers}"] if args.layers else [])
    ranks = distributed.init(cfg.train.device)
    try:
        data = SyntheticBatches(model_cfg.model.vocab_size, cfg.data.seq_len, cfg.data.micro_batch_size,
                                seed=ranks.rank)
        trainer = Trainer(cfg, ranks, data, model_cfg, cfg.data.seq_len)
        result = measure(trainer, args.warmup, args.steps)
        if ranks.is_main:
            result.update(gpus=ranks.world_size, ep=args.worker_ep, dp_shard=ranks.world_size // args.worker_ep)
            Path(args.result).write_text(json.dumps(result))
    finally:
        distributed.finish(ranks)


def overrides(args: argparse.Namespace) -> list[str]:
    base = ["train.device=cpu", "train.precision=fp32", "data.seq_len=128"] if args.tiny else ["train.compile=on"]
    return [*base, *args.overrides]


def layouts(gpus: list[int], eps: list[int]) -> list[tuple[int, int]]:
    return [(n, ep) for n in gpus for ep in eps if ep <= n and n % ep == 0]


def run_layout(args: argparse.Namespace, gpus: int, ep: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
                   __file__, *sys.argv[1:], "--worker-ep", str(ep), "--result", str(result)]
        done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        if done.returncode != 0 or not result.exists():
            return {"gpus": gpus, "ep": ep, "failed": done.returncode}
        return json.loads(result.read_text())


def baseline(results: list[dict]) -> dict | None:
    return next((r for r in results if r.get("gpus") == 1 and r.get("ep") == 1 and "failed" not in r), None)


def report(results: list[dict], base: dict | None) -> None:
    print(f"{'gpus':>4} {'ep':>3} {'dp_shard':>8} {'tokens/s':>12} {'per gpu':>10} {'eff.':>6} {'step ms':>9} "
          f"{'fwd':>8} {'bwd':>8} {'opt':>7} {'other':>7} {'peak GiB':>8}")
    for r in results:
        if "failed" in r:
            print(f"{r['gpus']:>4} {r['ep']:>3}  failed (exit {r['failed']})")
            continue
        per_gpu = r["tokens_per_s"] / r["gpus"]
        r["tokens_per_s_per_gpu"] = per_gpu
        if base is not None:
            r["scaling_efficiency"] = per_gpu / base["tokens_per_s"]
        ms = r["step_ms"]
        eff = f"{100 * r['scaling_efficiency']:5.1f}%" if base is not None else "   n/a"
        print(f"{r['gpus']:>4} {r['ep']:>3} {r['dp_shard']:>8} {r['tokens_per_s']:>12,.0f} {per_gpu:>10,.0f} {eff} "
              f"{ms['total']:>9.1f} {ms.get('forward', 0):>8.1f} {ms.get('backward', 0):>8.1f} "
              f"{ms.get('optimizer', 0):>7.1f} {ms['other']:>7.1f} {r['peak_memory_gib']:>8.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=None, help="a training config (default: bench_vpmoe; "
                                                                 "tiny_ce with --tiny)")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="ranks per layout (one node)")
    parser.add_argument("--ep", type=int, nargs="+", default=[1, 2], help="expert-parallel sizes to try")
    parser.add_argument("--layers", type=int, help="model depth (default: the model config's)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny_ce, sequence 128, gloo")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--baseline", help="the JSON of an earlier run whose 1-GPU, ep 1 layout is the baseline")
    parser.add_argument("--worker-ep", type=int, help=argparse.SUPPRESS)  # internal: one layout under torchrun
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.config = args.config or ("tiny_ce" if args.tiny else "bench_vpmoe")
    if args.tiny:
        args.warmup, args.steps = min(args.warmup, 1), min(args.steps, 2)
    if args.worker_ep is not None:
        run_worker(args)
        return

    results = [run_layout(args, gpus, ep) for gpus, ep in layouts(args.gpus, args.ep)]
    base = baseline(results)
    if base is None and args.baseline:
        base = baseline(json.loads(Path(args.baseline).read_text())["results"])
    report(results, base)
    if args.out:
        from vpmoe import provenance
        from vpmoe.config import config_hash
        from vpmoe.train.config import load_train_config

        record = provenance.record("benchmark_scaling", config_hash(load_train_config(args.config, overrides(args))),
                                   config=provenance.portable_name(args.config), overrides=overrides(args),
                                   layers=args.layers, gpus=args.gpus, ep=args.ep)
        Path(args.out).write_text(json.dumps({"results": results, "provenance": record}, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
