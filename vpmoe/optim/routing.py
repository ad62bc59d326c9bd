"""Which optimizer family and group every parameter belongs to (by vpmoe.model.naming.param_kind)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch

from vpmoe.errors import UserError
from vpmoe.model.naming import param_kind

# kind -> (family, group). Groups: "normuon", "adamw_decay", "adamw_no_decay".
ROUTES: dict[str, tuple[str, str]] = {
    "matrix": ("normuon", "normuon"),
    "expert_bank": ("normuon", "normuon"),
    "embedding": ("adamw", "adamw_decay"),
    "head": ("adamw", "adamw_decay"),
    "router": ("adamw", "adamw_decay"),
    "norm": ("adamw", "adamw_no_decay"),
    "bias": ("adamw", "adamw_no_decay"),
    "sink": ("adamw", "adamw_no_decay"),
    "value_residual": ("adamw", "adamw_no_decay"),
    "frequency": ("adamw", "adamw_no_decay"),
}
GROUP_ORDER = ("normuon", "adamw_decay", "adamw_no_decay")
_NDIM = {"matrix": 2, "expert_bank": 3}


@dataclasses.dataclass
class Routed:
    name: str
    param: torch.Tensor
    kind: str
    family: str
    group: str
    trainable: bool


def route_parameters(named_params: Iterable[tuple[str, torch.Tensor]]) -> list[Routed]:
    """Route every parameter; raises UserError naming every parameter that falls in no group or has a bad shape.

    Frozen parameters (requires_grad False) are routed too (so that a misnamed frozen parameter is still an error)
    but marked trainable=False; the optimizer leaves them out.
    """
    routed: list[Routed] = []
    problems: list[str] = []
    seen: set[int] = set()
    for name, p in named_params:
        if id(p) in seen:
            problems.append(f"{name}: the same tensor appears under two names (tied weights are not expected)")
            continue
        seen.add(id(p))
        try:
            kind = param_kind(name)
        except ValueError as e:
            problems.append(str(e))
            continue
        if kind not in ROUTES:
            problems.append(f"{name}: kind {kind!r} has no optimizer group")
            continue
        want = _NDIM.get(kind)
        if want is not None and p.ndim != want:
            problems.append(f"{name}: kind {kind!r} must be {want}-D, got shape {tuple(p.shape)}")
            continue
        family, group = ROUTES[kind]
        routed.append(Routed(name, p, kind, family, group, bool(p.requires_grad)))
    if problems:
        raise UserError("optimizer routing failed:\n  " + "\n  ".join(problems))
    return routed


def routing_table(routed: list[Routed], group_hparams: dict[str, dict]) -> str:
    """A fixed-width table: one row per kind (tensors, parameters, family, lr, weight decay, example name)."""
    rows = []
    kinds_in_order = list(ROUTES)
    for kind in kinds_in_order:
        items = [r for r in routed if r.kind == kind]
        if not items:
            continue
        train = [r for r in items if r.trainable]
        frozen = len(items) - len(train)
        family, group = ROUTES[kind]
        hp = group_hparams.get(group, {})
        rows.append((
            kind, family, group,
            str(len(train)) + (f" (+{frozen} frozen)" if frozen else ""),
            f"{sum(r.param.numel() for r in train):,}",
            f"{hp.get('lr', float('nan')):.3g}", f"{hp.get('weight_decay', 0.0):.3g}",
            items[0].name,
        ))
    header = ("kind", "family", "group", "tensors", "parameters", "peak_lr", "wd", "example")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:{'>' if i in (3, 4, 5, 6) else '<'}{w}}}" for i, w in enumerate(widths))
    lines = ["optimizer routing:", fmt.format(*header).rstrip(), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row).rstrip() for row in rows]
    total = sum(r.param.numel() for r in routed if r.trainable)
    by_family = {
        fam: sum(r.param.numel() for r in routed if r.trainable and r.family == fam) for fam in ("normuon", "adamw")
    }
    lines.append(
        f"trainable parameters: {total:,} (normuon {by_family['normuon']:,}, adamw {by_family['adamw']:,})"
    )
    return "\n".join(lines)
