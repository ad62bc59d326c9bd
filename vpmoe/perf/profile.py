"""`vpmoe profile CONFIG`: a small summary JSON of the training step (no raw traces): tokens/s, ms per phase, peak
memory, MFU, the top GPU kernels and operators by time, a router-health snapshot and, on CUDA, the roofline table
`components` (attention, expert GEMMs, dense GEMMs, compiled and eager elementwise, optimizer, host gap: ms per
step, share of the step, achieved TFLOP/s and its fraction of the bf16 matmul rate measured in the same run).

The figures come from timed steps without the profiler; the kernel and operator tables from separate profiled
steps (the profiler slows the host, not the kernels).
"""

from __future__ import annotations

from pathlib import Path

from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from vpmoe import config as config_io
from vpmoe import provenance
from vpmoe.artifacts.files import write_json
from vpmoe.model.config import ModelConfig
from vpmoe.perf.measure import measure, synchronize, synthetic_trainer
from vpmoe.train.config import load_train_config
from vpmoe.train.flops import measured_matmul_flops, train_flops_split

# GPU kernels by component, the first matching name fragment wins (kernel names of the fast path on H100/H200).
COMPONENTS = (
    ("attention", ("flex_attention",)),
    ("expert GEMMs", ("GroupProblemShape", "grouped")),
    ("dense GEMMs", ("nvjet", "gemm", "cutlass", "xmma")),
    ("compiled elementwise", ("triton_",)),
)
GLUE = "eager elementwise"
FLOPS_OF = {"attention": "attention", "expert GEMMs": "experts", "dense GEMMs": "dense"}


def top_table(events, time_of, steps: int, rows: int) -> list[dict]:
    total = sum(time_of(e) for e in events) or 1.0
    ranked = sorted(events, key=time_of, reverse=True)[:rows]
    return [{"name": e.key[:160], "ms_per_step": round(time_of(e) / 1000 / steps, 3),
             "share_pct": round(100 * time_of(e) / total, 2), "calls_per_step": e.count / steps} for e in ranked]


def tables(prof, steps: int, rows: int, cuda: bool) -> dict:
    events = [e for e in prof.key_averages() if not e.is_user_annotation]
    if not cuda:  # no kernels: operators by their own CPU time
        return {"top_operators": top_table([e for e in events if e.device_type == DeviceType.CPU],
                                           lambda e: e.self_cpu_time_total, steps, rows)}
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    operators = [e for e in events if e.device_type == DeviceType.CPU and e.self_device_time_total > 0]
    return {
        "gpu_busy_ms_per_step": round(sum(e.device_time_total for e in kernels) / 1000 / steps, 2),
        "top_kernels": top_table(kernels, lambda e: e.device_time_total, steps, rows),
        "top_operators": top_table(operators, lambda e: e.self_device_time_total, steps, rows),
    }


def component_of(kernel: str) -> str:
    return next((name for name, fragments in COMPONENTS if any(f in kernel for f in fragments)), GLUE)


def components(step: dict, model: dict, flops: dict[str, float], tokens: int, step_ms: float,
               matmul_tflops: float) -> list[dict]:
    """The roofline table: GPU ms per step of each component of forward + backward (kernel names), the optimizer
    (a whole step's GPU time minus forward + backward's) and the host gap (wall time the GPU is idle), each with
    its share of the step and, for matmul components, the achieved TFLOP/s of its model FLOPs."""
    rows = [{"component": name, "ms_per_step": ms} for name, ms in model.items()]
    busy = sum(model.values())
    step_busy = sum(step.values())
    rows.append({"component": "optimizer", "ms_per_step": max(step_busy - busy, 0.0)})
    rows.append({"component": "host gap (GPU idle)", "ms_per_step": max(step_ms - step_busy, 0.0)})
    for row in rows:
        row["ms_per_step"] = round(row["ms_per_step"], 2)
        row["share_pct"] = round(100 * row["ms_per_step"] / step_ms, 2)
        key = FLOPS_OF.get(row["component"])
        if key is not None and row["ms_per_step"] > 0:
            tflops = flops[key] * tokens / (row["ms_per_step"] / 1000) / 1e12
            row["tflops"] = round(tflops, 1)
            row["pct_of_matmul_rate"] = round(100 * tflops / matmul_tflops, 1)
    return rows


def component_ms(prof, steps: int) -> dict[str, float]:
    ms = {name: 0.0 for name, _ in COMPONENTS} | {GLUE: 0.0}
    for e in prof.key_averages():
        if e.device_type == DeviceType.CUDA and not e.is_user_annotation:
            ms[component_of(e.key)] += e.device_time_total / 1000 / steps
    return ms


def profile_steps(trainer, steps: int, rows: int) -> dict:
    """Kernel tables of whole training steps, and of forward + backward alone (the model without the optimizer)."""
    device = trainer.ranks.device
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            trainer.step()
        synchronize(device)
    step_tables = tables(prof, steps, rows, cuda)
    step_components = component_ms(prof, steps) if cuda else None
    with profile(activities=activities) as prof:
        for _ in range(steps):
            trainer.forward_backward()
        synchronize(device)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.take_window()
    trainer.timer.read()
    model_tables = tables(prof, steps, rows, cuda)
    result = {**step_tables, **{f"{key}_forward_backward": value for key, value in model_tables.items()}}
    if cuda:
        result["model_components_ms"] = component_ms(prof, steps)
        result["step_components_ms"] = step_components
    return result


def profile_config(config: str, overrides: list[str], out: str, warmup: int, steps: int, profiled: int,
                   rows: int = 15, model_cfg: ModelConfig | None = None) -> dict:
    cfg = load_train_config(config, overrides)
    with profile():  # start the profiler once before any CUDA graph is captured, or it may miss the graphs' kernels
        pass
    trainer = synthetic_trainer(cfg, model_cfg)
    summary = measure(trainer, warmup, steps)
    summary.update(profile_steps(trainer, profiled, rows))
    if "model_components_ms" in summary:
        c = trainer.cfg.data
        summary["matmul_tflops_measured"] = measured_matmul_flops(trainer.ranks.device) / 1e12
        summary["components"] = components(summary.pop("step_components_ms"), summary.pop("model_components_ms"),
                                           train_flops_split(trainer.model_cfg, trainer.seq_len),
                                           c.micro_batch_size * c.grad_accum * trainer.seq_len,
                                           summary["step_ms"]["median"], summary["matmul_tflops_measured"])
    summary["provenance"] = provenance.record("perf_profile", config_io.config_hash(cfg),
                                              config=provenance.portable_name(config), overrides=overrides,
                                              model=trainer.model_cfg.model.name,
                                              n_layers=trainer.model_cfg.model.n_layers)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, summary)
    ms = summary["step_ms"]
    print(f"wrote {path}: {summary['tokens_per_s']:,.0f} tokens/s, {ms['total']:.1f} ms/step "
          f"(forward {ms.get('forward', 0):.1f}, backward {ms.get('backward', 0):.1f}, optimizer "
          f"{ms.get('optimizer', 0):.1f}), peak {summary['peak_memory_gib']:.1f} GiB")
    for row in summary.get("components", []):
        rate = f", {row['tflops']:.1f} TFLOP/s ({row['pct_of_matmul_rate']:.1f}% of matmul)" if "tflops" in row else ""
        print(f"  {row['component']:<22} {row['ms_per_step']:8.1f} ms {row['share_pct']:5.1f}%{rate}")
    return summary
