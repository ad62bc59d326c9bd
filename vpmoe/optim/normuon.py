"""NorMuon (Li et al. 2025, arXiv:2510.05491) with Polar Express orthogonalization, plus AdamW, in one optimizer.

NorMuon, for every matrix W [m, n] (a 2-D hidden matrix, one expert of a 3-D bank [E, m, n], or one block of a
fused matrix), with gradient G, momentum M (fp32), per-row second moment v [m, 1] (fp32):

    M <- momentum * M + (1 - momentum) * G
    U  = (1 - momentum) * G + momentum * M          (Nesterov; U = M without it)
    O  = PolarExpress(U)                            (5 steps, vpmoe/optim/polar.py)
    v <- beta2 * v + (1 - beta2) * mean_j O[:, j]^2  (one statistic per row = output neuron)
    O' = O / (sqrt(v) + eps)                        (row-normalized)
    O' = O' * ||O||_F / (||O'||_F + eps)            (Frobenius norm of the orthogonalized update restored)
    W <- W * (1 - lr * weight_decay) - lr * update_scale * sqrt(max(m, n)) * O'

Update-scale convention (Moonlight, Liu et al. 2025): an orthogonal O [m, n] has ||O||_F^2 = min(m, n), so its RMS
is 1 / sqrt(max(m, n)); multiplying by update_scale * sqrt(max(m, n)) with update_scale = 0.2 gives an update of
RMS ~0.2, the typical RMS of an AdamW update. Hence lr_matrix takes AdamW-style values. m and n are the dimensions
of the matrix that was orthogonalized (the block, for fused parameters; one expert, for banks).

Expert banks [E, m, n] are E independent matrices: they go through one batched Polar Express call (torch.bmm over
the expert axis) and every norm / statistic above is per matrix or per row; nothing spans the expert axis. Matrices
of equal shape from different parameters are also concatenated into one batched call (up to a size budget), with
foreach kernels for their elementwise steps. Opt-in (OptimConfig.compile): the elementwise steps of large tensors
as torch.compile'd single kernels (momentum + Nesterov + cast; decay + row-scaled update); see OptimConfig.

AdamW (torch semantics, decoupled decay): m <- b1 m + (1-b1) g; v <- b2 v + (1-b2) g^2;
W <- W (1 - lr wd) - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps).

Distributed: parameters may be DTensors (FSDP2 `fully_shard`, expert parallel). Elementwise work runs on the local
shards. Orthogonalization needs whole matrices: when a parameter is sharded only along batch (expert) dims, its
local shard holds whole matrices and is processed as is (each rank orthogonalizes the experts it owns); otherwise
the update is gathered (`full_tensor`), the matrices of one shape from all such parameters are divided among the
ranks of their mesh (round robin over the step), each rank runs Polar Express on its share only, the results are
all-gathered, and each rank keeps its own shard of the update: every per-matrix result is the single-process one.
The momentum is a DTensor placed like the parameter, the second moment one placed like the parameter's rows, so
`state_dict()` / torch.distributed.checkpoint save global tensors and load into any other sharding.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from vpmoe.errors import RunError, UserError
from vpmoe.optim.config import OptimConfig
from vpmoe.optim.polar import polar_express
from vpmoe.optim.routing import GROUP_ORDER, Routed, route_parameters, routing_table

_EPS = 1e-10
_CHUNK_ELEMS = 1 << 25  # matrices of one shape are batched together up to this many elements per call


# ----------------------------------------------------------------------------------------------------------------
# Functional pieces (also used by the benchmark's per-matrix loop)
# ----------------------------------------------------------------------------------------------------------------

def _row_sq_eager(o: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(o, dim=-1, keepdim=True, dtype=torch.float32).square()


def normuon_row_scales(
    o: torch.Tensor, v: torch.Tensor, beta2: float, update_scale: float, row_sq: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-row factors c [B, m, 1] such that the NorMuon update of each matrix is c * O; updates v in place.

    o: orthogonalized updates [B, m, n] (any float dtype); v: second moments [B, m, 1] fp32; row_sq: the squared row
    norms of o if already computed. Uses only per-row and per-matrix reductions (no statistic over B).
    """
    m, n = o.shape[-2], o.shape[-1]
    if row_sq is None:
        row_sq = _row_sq_eager(o)  # [B, m, 1]
    v.lerp_(row_sq / n, 1.0 - beta2)
    inv = 1.0 / (v.sqrt() + _EPS)
    fro = row_sq.sum(dim=-2, keepdim=True).sqrt()  # ||O||_F per matrix
    fro_hat = (inv.square() * row_sq).sum(dim=-2, keepdim=True).sqrt()  # ||O / (sqrt(v) + eps)||_F per matrix
    return inv * (fro / (fro_hat + _EPS)) * (update_scale * math.sqrt(max(m, n)))


def ortho_dtype_for(cfg_value: str, device: torch.device) -> torch.dtype:
    if cfg_value == "bfloat16":
        return torch.bfloat16
    if cfg_value == "float32":
        return torch.float32
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _pre_eager(g, buf, beta, nesterov: bool, out_dtype: torch.dtype):
    """buf <- lerp(buf, g, 1 - beta); returns the update to orthogonalize (Nesterov or plain), in out_dtype."""
    buf.lerp_(g, 1.0 - beta)
    if not nesterov:
        return buf if out_dtype == buf.dtype else buf.to(out_dtype)
    if out_dtype == buf.dtype:
        return torch.lerp(g, buf, beta)
    return torch.lerp(g, buf, beta, out=torch.empty(buf.shape, dtype=out_dtype, device=buf.device))


def _post_eager(p, o, c, decay, neg_lr):
    """p <- p * decay + neg_lr * c * o (c: per-row factors broadcast over the last dim)."""
    if decay != 1.0:
        p.mul_(decay)
    p.addcmul_(o, c, value=neg_lr)


def _pre_fused(g, buf, beta, nesterov: bool, out_dtype: torch.dtype):
    buf.lerp_(g, 1.0 - beta)
    u = torch.lerp(g, buf, beta) if nesterov else buf
    return u.to(out_dtype)


def _post_fused(p, o, c, decay, neg_lr):
    p.copy_(p * decay + o.to(p.dtype) * (c * neg_lr))


_COMPILED: dict[str, object] = {}


_COMPILE_MIN = 1 << 20  # compiled kernels for tensors at least this large (smaller ones: foreach / eager ops)


def _compiled(name: str):
    """torch.compile'd single-kernel versions of the elementwise steps (scalars are 0-dim device tensors, so a
    changing learning rate does not recompile)."""
    if name not in _COMPILED:
        fn = {"pre": _pre_fused, "post": _post_fused}[name]
        _COMPILED[name] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _COMPILED[name]


def use_compile(mode: str, device: torch.device) -> bool:
    return mode == "on"


# ----------------------------------------------------------------------------------------------------------------
# DTensor helpers
# ----------------------------------------------------------------------------------------------------------------

def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _holds_whole_matrices(p: torch.Tensor) -> bool:
    """True when the local shard of p contains whole matrices (only batch dims are sharded)."""
    if not isinstance(p, DTensor):
        return True
    for pl in p.placements:
        if isinstance(pl, Replicate):
            continue
        if isinstance(pl, (Shard, _StridedShard)) and pl.dim % p.ndim < p.ndim - 2:
            continue
        return False
    return True


def _row_state_placements(p: DTensor) -> list:
    """Placements for a [..., m, 1] statistic of p: as p, except that a shard of the last dim becomes replicate."""
    out = []
    for pl in p.placements:
        if isinstance(pl, (Shard, _StridedShard)) and pl.dim % p.ndim == p.ndim - 1:
            out.append(Replicate())
        else:
            out.append(pl)
    return out


def _gather(local: torch.Tensor, like: DTensor) -> torch.Tensor:
    dt = DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                            stride=like.stride())
    return dt.full_tensor()


def sharded_polar_express(x: torch.Tensor, mesh: DeviceMesh, steps: int, dtype: torch.dtype,
                          first_owner: int = 0) -> torch.Tensor:
    """polar_express of the matrices x [B, m, n], which every rank of `mesh` holds alike, with the work divided:
    matrix i is orthogonalized by rank (first_owner + i) % world only (round robin, so that consecutive small
    calls start where the last one stopped), then the results are all-gathered."""
    ranks = mesh if mesh.ndim == 1 else mesh._flatten()
    world, me = ranks.size(), ranks.get_local_rank()
    count = x.shape[0]
    share = -(-count // world)  # matrices per rank, at most
    picked = x[(me - first_owner) % world::world]
    mine = polar_express(picked, steps=steps, dtype=dtype) if picked.shape[0] else picked.to(dtype)
    padded = mine.new_zeros(share, *x.shape[1:])
    padded[: mine.shape[0]] = mine
    gathered = padded.new_empty(world * share, *x.shape[1:])
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the newer name
    all_gather(gathered, padded, group=ranks.get_group())
    index = torch.arange(count, device=x.device)
    owner = (index + first_owner) % world
    return gathered.view(world, share, *x.shape[1:])[owner, index // world]


def _my_shard(full: torch.Tensor, like: DTensor) -> torch.Tensor:
    """This rank's local piece of `full` under `like`'s placements (no communication)."""
    mesh = like.device_mesh
    rep = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return rep.redistribute(mesh, like.placements).to_local()


# ----------------------------------------------------------------------------------------------------------------
# The optimizer
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ParamInfo:
    name: str
    kind: str
    row_blocks: tuple[int, ...] | None = None


@dataclasses.dataclass
class _Item:
    p: torch.Tensor
    rows: int  # rows of one orthogonalized matrix
    count: int  # number of matrices (global)
    gather: bool


class VpmoeOptimizer(torch.optim.Optimizer):
    """One optimizer, two families. Param groups carry `family` ("normuon" or "adamw") and `group` (name).

    Group keys: normuon: lr, weight_decay, momentum, nesterov, beta2, ns_steps, update_scale, ortho_dtype;
    adamw: lr, weight_decay, betas, eps. Build it with `build_optimizer`.
    """

    def __init__(self, param_groups: list[dict], info: Mapping[torch.Tensor, ParamInfo] | None = None,
                 compile: str = "off"):
        super().__init__(param_groups, {})
        self.info: dict[torch.Tensor, ParamInfo] = dict(info or {})
        self.compile = compile  # "on" | "off": a runtime choice, not part of the state dict
        self._scalar_cache: dict[tuple, torch.Tensor] = {}
        self._next_owner = 0

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader, except that state tensors keep their (fp32) dtype: torch would cast them to the
        parameter's dtype (bf16 parameters would get bf16 moments)."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            for key, value in saved.items():
                if key != "step" and isinstance(value, torch.Tensor) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, copy=True)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._next_owner = 0  # the rank that orthogonalizes the next gathered matrix (round robin over the step)
        for group in self.param_groups:
            if group["family"] == "normuon":
                self._normuon_group(group)
            elif group["family"] == "adamw":
                self._adamw_group(group)
            else:
                raise ValueError(f"unknown optimizer family {group['family']!r}")
        return loss

    # ---- NorMuon -------------------------------------------------------------------------------------------------

    def _state_normuon(self, p: torch.Tensor) -> dict:
        st = self.state[p]
        if not st:
            st["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
            row_shape = (*p.shape[:-1], 1)
            if isinstance(p, DTensor):
                from torch.distributed.tensor import zeros as dt_zeros

                st["second_moment"] = dt_zeros(row_shape, dtype=torch.float32, device_mesh=p.device_mesh,
                                               placements=_row_state_placements(p))
            else:
                st["second_moment"] = torch.zeros(row_shape, dtype=torch.float32, device=p.device)
        return st

    def _grad_local(self, p: torch.Tensor) -> torch.Tensor:
        g = p.grad
        if isinstance(g, DTensor):
            if tuple(g.placements) != tuple(p.placements):
                g = g.redistribute(p.device_mesh, p.placements)
            g = g.to_local()
        return g

    def _normuon_group(self, group: dict) -> None:
        buckets: dict[tuple, list[_Item]] = {}
        irregular: list[torch.Tensor] = []
        for p in group["params"]:
            if p.grad is None:
                continue
            info = self.info.get(p)
            blocks = info.row_blocks if info is not None else None
            m, n = p.shape[-2], p.shape[-1]
            batch = math.prod(p.shape[:-2])
            if blocks is not None and len(set(blocks)) > 1:
                irregular.append(p)
                continue
            rows = blocks[0] if blocks else m
            count = batch * (m // rows)
            gather = not _holds_whole_matrices(p)
            mesh = p.device_mesh if gather else None  # gathered matrices are orthogonalized by the mesh's ranks
            buckets.setdefault((rows, n, p.device, mesh), []).append(_Item(p, rows, count, gather))
        for (rows, n, _, _), items in buckets.items():
            chunk: list[_Item] = []
            size = 0
            for it in items:  # chunking uses global sizes so that every rank issues the same collectives
                elems = it.count * rows * n
                if chunk and size + elems > _CHUNK_ELEMS:
                    self._normuon_chunk(group, chunk, rows, n)
                    chunk, size = [], 0
                chunk.append(it)
                size += elems
            if chunk:
                self._normuon_chunk(group, chunk, rows, n)
        for p in irregular:
            self._normuon_irregular(group, p)

    def _compile_on(self, device: torch.device) -> bool:
        return use_compile(self.compile, device)

    def _compile_failed(self, err: Exception) -> None:
        raise RunError(f"optimizer: torch.compile of the fused elementwise steps failed "
                       f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); set "
                       f"optim.compile = \"off\" to run them as eager ops") from err

    def _scalars(self, group: dict, device: torch.device) -> dict:
        """0-dim device tensors of this step's scalars for the compiled kernels (a changing LR does not recompile)."""
        key = (device, id(group))
        buf = self._scalar_cache.get(key)
        if buf is None:
            buf = self._scalar_cache[key] = torch.empty(3, dtype=torch.float32, device=device)
        vals = (group["momentum"], 1.0 - group["lr"] * group["weight_decay"], -group["lr"])
        for i, v in enumerate(vals):
            buf[i].fill_(v)
        return {"beta": buf[0], "decay": buf[1], "neg_lr": buf[2]}

    def _momentum_update(self, group: dict, p: torch.Tensor, out_dtype: torch.dtype, scalars: dict | None):
        """Momentum step on one parameter's local shard; returns the (Nesterov) update to orthogonalize."""
        st = self._state_normuon(p)
        g = self._grad_local(p)
        buf = _local(st["momentum_buffer"])
        if g.dtype != buf.dtype:
            g = g.to(buf.dtype)
        if scalars is not None and self.compile != "off" and buf.numel() >= _COMPILE_MIN:
            try:
                return _compiled("pre")(g, buf, scalars["beta"], group["nesterov"], out_dtype)
            except Exception as e:  # noqa: BLE001 - a compilation problem ends the run with what to do
                self._compile_failed(e)
        return _pre_eager(g, buf, group["momentum"], group["nesterov"], out_dtype)

    def _momentum_update_many(self, group: dict, ps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Momentum step on several parameters with foreach kernels; returns fp32 updates (local shards)."""
        bufs, gs = [], []
        for p in ps:
            bufs.append(_local(self._state_normuon(p)["momentum_buffer"]))
            g = self._grad_local(p)
            gs.append(g if g.dtype == torch.float32 else g.to(torch.float32))
        beta = group["momentum"]
        torch._foreach_lerp_(bufs, gs, 1.0 - beta)
        return list(torch._foreach_lerp(gs, bufs, beta)) if group["nesterov"] else bufs

    def _normuon_chunk(self, group: dict, chunk: list[_Item], rows: int, n: int) -> None:
        """Matrices of one shape [rows, n] from the parameters in `chunk`, orthogonalized in one batched call."""
        lr, wd = group["lr"], group["weight_decay"]
        device = chunk[0].p.device
        dtype = ortho_dtype_for(group["ortho_dtype"], device)
        single = len(chunk) == 1
        scalars = self._scalars(group, device) if self._compile_on(device) else None
        if single:
            us = [self._momentum_update(group, chunk[0].p, dtype, scalars)]
        else:
            us = self._momentum_update_many(group, [it.p for it in chunk])
        mats, vviews, vfulls = [], [], []
        for it, u in zip(chunk, us):
            v = self.state[it.p]["second_moment"]
            if it.gather:
                u = _gather(u, it.p)
                v = v.full_tensor()
            else:
                v = _local(v)
            vfulls.append(v)
            mats.append(u.reshape(-1, rows, n))
            vviews.append(v.reshape(-1, rows, 1))
        counts = [mat.shape[0] for mat in mats]
        x = mats[0] if single else torch.cat(mats)
        vv = vviews[0] if single else torch.cat(vviews)
        if chunk[0].gather:
            o = sharded_polar_express(x, chunk[0].p.device_mesh, group["ns_steps"], dtype, self._next_owner)
            self._next_owner += x.shape[0]
        else:
            o = polar_express(x, steps=group["ns_steps"], dtype=dtype)
        scale = normuon_row_scales(o, vv, group["beta2"], group["update_scale"])
        if not single:
            torch._foreach_copy_(vviews, list(vv.split(counts)))
        decay = 1.0 - lr * wd

        if single and not chunk[0].gather:  # one parameter (an expert bank): one fused kernel when compiled
            target = _local(chunk[0].p).view(-1, rows, n)
            if scalars is not None and self.compile != "off" and target.numel() >= _COMPILE_MIN:
                try:
                    _compiled("post")(target, o, scale, scalars["decay"], scalars["neg_lr"])
                    return
                except Exception as e:  # noqa: BLE001
                    self._compile_failed(e)
            _post_eager(target, o, scale, decay, -lr)
            return

        upd = (o.to(torch.float32) * scale).split(counts)
        targets, updates = [], []
        for it, u_i, vfull in zip(chunk, upd, vfulls):
            p_loc = _local(it.p)
            if it.gather:
                u_i = _my_shard(u_i.reshape(it.p.shape), it.p)
                st_v = self.state[it.p]["second_moment"]
                _local(st_v).copy_(_my_shard(vfull, st_v))
                targets.append(p_loc)
                updates.append(u_i if u_i.dtype == p_loc.dtype else u_i.to(p_loc.dtype))
            else:
                targets.append(p_loc.view(-1, rows, n))
                updates.append(u_i if p_loc.dtype == torch.float32 else u_i.to(p_loc.dtype))
        if decay != 1.0:
            torch._foreach_mul_(targets, decay)
        torch._foreach_add_(targets, updates, alpha=-lr)

    def _normuon_irregular(self, group: dict, p: torch.Tensor) -> None:
        """A fused matrix whose blocks differ in size: each block is orthogonalized on its own."""
        lr, wd = group["lr"], group["weight_decay"]
        dtype = ortho_dtype_for(group["ortho_dtype"], p.device)
        blocks = self.info[p].row_blocks
        u = self._momentum_update(group, p, torch.float32, None)
        st_v = self.state[p]["second_moment"]
        is_dt = isinstance(p, DTensor)
        u = _gather(u, p) if is_dt else u
        v = st_v.full_tensor() if is_dt else st_v
        upd = torch.empty(u.shape, dtype=torch.float32, device=u.device)
        start = 0
        for rows in blocks:
            sl = slice(start, start + rows)
            o = polar_express(u[..., sl, :], steps=group["ns_steps"], dtype=dtype)
            n = o.shape[-1]
            vb = v[..., sl, :].reshape(-1, rows, 1).clone()
            c = normuon_row_scales(o.reshape(-1, rows, n), vb, group["beta2"], group["update_scale"])
            v[..., sl, :] = vb.reshape(v[..., sl, :].shape)
            upd[..., sl, :] = (o.reshape(-1, rows, n).float() * c).reshape(o.shape)
            start += rows
        p_loc = _local(p)
        if is_dt:
            upd = _my_shard(upd, p)
            _local(st_v).copy_(_my_shard(v, st_v))
        if wd:
            p_loc.mul_(1.0 - lr * wd)
        p_loc.add_(upd.to(p_loc.dtype), alpha=-lr)

    # ---- AdamW ---------------------------------------------------------------------------------------------------

    def _adamw_group(self, group: dict) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        by_step: dict[float, tuple[list, list, list, list]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            st = self.state[p]
            if not st:
                st["step"] = torch.tensor(0.0)
                st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            st["step"] += 1
            g = self._grad_local(p)
            m = _local(st["exp_avg"])
            if g.dtype != m.dtype:
                g = g.to(m.dtype)
            lists = by_step.setdefault(float(st["step"]), ([], [], [], []))
            lists[0].append(_local(p))
            lists[1].append(g)
            lists[2].append(m)
            lists[3].append(_local(st["exp_avg_sq"]))
        for t, lists in by_step.items():
            bc1 = 1.0 - beta1**t
            bc2 = 1.0 - beta2**t
            for ps, gs, ms, vs in _size_chunks(*lists):
                if wd:
                    torch._foreach_mul_(ps, 1.0 - lr * wd)
                torch._foreach_lerp_(ms, gs, 1.0 - beta1)
                torch._foreach_mul_(vs, beta2)
                torch._foreach_addcmul_(vs, gs, gs, value=1.0 - beta2)
                denom = torch._foreach_sqrt(vs)
                torch._foreach_div_(denom, math.sqrt(bc2))
                torch._foreach_add_(denom, eps)
                torch._foreach_addcdiv_(ps, ms, denom, value=-lr / bc1)


def _size_chunks(ps: list, gs: list, ms: list, vs: list, budget: int = 1 << 27):
    """Split parallel lists so that each piece's temporaries stay near `budget` elements."""
    start, size = 0, 0
    for i, p in enumerate(ps):
        if i > start and size + p.numel() > budget:
            yield ps[start:i], gs[start:i], ms[start:i], vs[start:i]
            start, size = i, 0
        size += p.numel()
    if start < len(ps):
        yield ps[start:], gs[start:], ms[start:], vs[start:]


# ----------------------------------------------------------------------------------------------------------------
# Construction
# ----------------------------------------------------------------------------------------------------------------

def group_hparams(cfg: OptimConfig) -> dict[str, dict]:
    """The hyperparameters of each group (peak LR in `lr`)."""
    normuon = dict(
        family="normuon", lr=cfg.lr_matrix, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
        nesterov=cfg.nesterov, beta2=cfg.beta2, ns_steps=cfg.ns_steps, update_scale=cfg.update_scale,
        ortho_dtype=cfg.ortho_dtype,
    )
    adam = dict(family="adamw", lr=cfg.lr_adam, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    return {
        "normuon": normuon,
        "adamw_decay": dict(adam, weight_decay=cfg.adam_weight_decay),
        "adamw_no_decay": dict(adam, weight_decay=0.0),
    }


def build_optimizer(
    named_parameters: Iterable[tuple[str, torch.Tensor]],
    cfg: OptimConfig,
    row_blocks: Mapping[str, Sequence[int]] | None = None,
    extra_groups: Sequence[dict] = (),
) -> tuple[VpmoeOptimizer, str]:
    """Route the model's parameters (vpmoe.model.naming.param_kind) and build the optimizer.

    named_parameters: e.g. model.named_parameters() (names relative to the model, as naming.py documents).
    row_blocks: optional {name: (rows_0, rows_1, ...)} for matrices stored fused along dim -2 (e.g. q/k/v): each
        block is orthogonalized (and normalized) as its own matrix. naming.py's model stores no fused matrices.
    extra_groups: AdamW groups for parameters outside the model (a stage's own modules, e.g. hidden-state
        projections): dicts with `group` (a name), `params`, `lr` (peak) and `weight_decay`.
    Returns (optimizer, routing table text). Print the table at start-up (rank 0). Frozen parameters
    (requires_grad False) are routed and listed but not optimized; an unroutable parameter raises UserError.
    """
    cfg.validate()
    routed: list[Routed] = route_parameters(named_parameters)
    blocks = {k: tuple(int(x) for x in v) for k, v in (row_blocks or {}).items()}
    known = {r.name: r for r in routed}
    for name, bl in blocks.items():
        r = known.get(name)
        if r is None:
            raise UserError(f"optimizer: row_blocks names an unknown parameter {name!r}")
        if r.family != "normuon" or not bl or sum(bl) != r.param.shape[-2] or min(bl) <= 0:
            raise UserError(
                f"optimizer: row_blocks for {name!r} must split dim -2 of a NorMuon matrix (shape "
                f"{tuple(r.param.shape)}), got {bl}"
            )
    hp = group_hparams(cfg)
    groups = []
    info: dict[torch.Tensor, ParamInfo] = {}
    for gname in GROUP_ORDER:
        params = [r.param for r in routed if r.group == gname and r.trainable]
        for r in routed:
            if r.group == gname and r.trainable:
                info[r.param] = ParamInfo(r.name, r.kind, blocks.get(r.name))
        if params:
            groups.append(dict(hp[gname], params=params, group=gname))
    table = routing_table(routed, hp)
    for extra in extra_groups:
        params = [p for p in extra["params"] if p.requires_grad]
        if not params:
            continue
        groups.append(dict(hp["adamw_no_decay"], params=params, group=extra["group"], lr=extra["lr"],
                           weight_decay=extra["weight_decay"]))
        table += (f"\n{extra['group']}: {len(params)} tensors, {sum(p.numel() for p in params):,} parameters, "
                  f"adamw, peak_lr {extra['lr']:.3g}, wd {extra['weight_decay']:.3g} (the stage's own modules)")
    if not groups:
        raise UserError("optimizer: no trainable parameters")
    return VpmoeOptimizer(groups, info, compile=cfg.compile), table
