"""Where metrics go: `metrics.jsonl` always (rank 0); TensorBoard and Weights & Biases when enabled."""

from __future__ import annotations

import json
from pathlib import Path

from vpmoe.errors import UserError
from vpmoe.train.config import LoggingSection


def flatten(record: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out


class MetricsSink:
    def __init__(self, run_dir: Path, cfg: LoggingSection, run_name: str, config: dict):
        self.file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.tb = self.wandb = None
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("logging.tensorboard = true needs the `tensorboard` package: pip install tensorboard") from None
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise UserError("logging.wandb = true needs the `wandb` package: pip install wandb") from None
            self.wandb = wandb.init(project=cfg.wandb_project, name=run_name, dir=str(run_dir), mode=cfg.wandb_mode,
                                    config=config, resume="allow", id=run_name)

    def log(self, step: int, record: dict) -> None:
        self.file.write(json.dumps({"step": step, **record}) + "\n")
        self.file.flush()
        flat = flatten(record)
        if self.tb is not None:
            for key, value in flat.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(flat, step=step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
