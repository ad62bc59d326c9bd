"""`vpmoe profile CONFIG`: a small summary JSON of the training step (no raw traces): tokens/s, ms per phase, peak
memory, MFU, the top GPU kernels and operators by time, and a router-health snapshot.

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
    with profile(activities=activities) as prof:
        for _ in range(steps):
            trainer.forward_backward()
        synchronize(device)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.take_window()
    trainer.timer.read()
    model_tables = tables(prof, steps, rows, cuda)
    return {**step_tables, **{f"{key}_forward_backward": value for key, value in model_tables.items()}}


def profile_config(config: str, overrides: list[str], out: str, warmup: int, steps: int, profiled: int,
                   rows: int = 15, model_cfg: ModelConfig | None = None) -> dict:
    cfg = load_train_config(config, overrides)
    with profile():  # start the profiler once before any CUDA graph is captured, or it may miss the graphs' kernels
        pass
    trainer = synthetic_trainer(cfg, model_cfg)
    summary = measure(trainer, warmup, steps)
    summary.update(profile_steps(trainer, profiled, rows))
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
    return summary
