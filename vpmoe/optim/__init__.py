"""Optimizer: NorMuon + Polar Express for hidden matrices and expert banks, AdamW for the rest, one schedule.

    opt, table = build_optimizer(model.named_parameters(), cfg)      # cfg: OptimConfig
    print(table)                                                      # routing table, at start-up (rank 0)
    sched = build_scheduler(opt, cfg, total_steps)
    ... loss.backward(); opt.step(); sched.step(); opt.zero_grad()
"""

from vpmoe.optim.config import OptimConfig
from vpmoe.optim.normuon import VpmoeOptimizer, build_optimizer, group_hparams, normuon_row_scales
from vpmoe.optim.polar import POLAR_EXPRESS_COEFFS, polar_express, polar_express_coefficients
from vpmoe.optim.routing import ROUTES, route_parameters, routing_table
from vpmoe.optim.schedule import WarmupCosine, build_scheduler

__all__ = [
    "OptimConfig", "POLAR_EXPRESS_COEFFS", "ROUTES", "VpmoeOptimizer", "WarmupCosine", "build_optimizer",
    "build_scheduler", "group_hparams", "normuon_row_scales", "polar_express", "polar_express_coefficients",
    "route_parameters", "routing_table",
]
