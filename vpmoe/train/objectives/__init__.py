"""Training stages as objectives (see base.py for the interface); `build_objective` picks one by `train.stage`."""

from __future__ import annotations

from vpmoe.distributed import Ranks
from vpmoe.errors import UserError
from vpmoe.train.config import TrainConfig
from vpmoe.train.objectives.base import LossOutput, Objective, TrainBatch
from vpmoe.train.objectives.ce import CrossEntropy
from vpmoe.train.objectives.kd_offline import OfflineKD
from vpmoe.train.objectives.kd_online import OnlineKD
from vpmoe.train.objectives.opd import OnPolicyDistillation

STAGES: dict[str, type[Objective]] = {
    "ce": CrossEntropy, "kd_offline": OfflineKD, "kd_online": OnlineKD, "opd": OnPolicyDistillation,
}


def build_objective(cfg: TrainConfig, ranks: Ranks) -> Objective:
    stage = STAGES.get(cfg.train.stage)
    if stage is None:
        raise UserError(f"train.stage = \"{cfg.train.stage}\" has no objective in this version; stages: "
                        f"{', '.join(STAGES)}")
    return stage(cfg, ranks)


__all__ = ["STAGES", "LossOutput", "Objective", "TrainBatch", "build_objective"]
