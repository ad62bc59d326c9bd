"""The in-the-loop teacher of a training stage (`kd_online`, `opd`): a frozen causal LM that runs in the same step
as the student, on the same token rows, and gives its final hidden states, its output head and chosen block outputs.

    teacher = load_online_teacher(cfg.teacher, ranks)    # the [teacher] section of a train config
    states = teacher.forward(input_ids, position_ids, doc_ids, select, layers=(5, 11))
    states.hidden     [N, D_t]  final-normed hidden states at the N positions where `select` [B, S] is True
                                (row-major, the order of the student's `logits_at`)
    states.layers     [[N, D_t], ...] the outputs of blocks 5 and 11 (before the final norm) at those positions
    teacher.head_weight [V, D_t], teacher.head_bias [V] | None: the linear head (logits = hidden @ W^T + b)

`forward` runs under no_grad in the teacher's own dtype (autocast off): its states are fixed targets. No document
attends to another. A vpmoe teacher takes the packed rows whole and masks attention by `doc_ids`, as the student
does. A Hugging Face teacher gets each document alone, from position 0, right-padded (transformers' packed-sequence
masks are not built by every model, e.g. GPT-OSS): only the documents that hold a selected position, up to their
last selected position, longest first, in buckets of similar length (at most PAD_BUDGET fed tokens per real one, or
one document), one forward per bucket. Block outputs are captured with forward hooks (vpmoe.model.capture), never
read from a library's `hidden_states` tuple.

The teacher is a Hugging Face causal LM with the o200k Harmony vocabulary (e.g. GPT-OSS) or a vpmoe checkpoint
object / export; both go through the vocabulary checks of `vpmoe teacher score` (teacher/load.py). Placement:
- "device": the whole teacher on this rank's device (the student's), one replica per rank.
- "fsdp": FSDP2 over the same ranks as the student, forward only: each block is one unit, the body's root unit
  holds the embedding and final norm; the output head stays whole on every rank (the chunked losses read it).
  Every rank must call `forward` the same number of times (each forward gathers every block's shards), which
  holds when each rank runs one teacher forward per micro-batch; inside, the ranks agree on the number of buckets. Rank 0 alone reads the checkpoint (into host
  memory: the host needs the teacher's size once) and broadcasts it into the other ranks' shards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from vpmoe import tokenizer as tk
from vpmoe.artifacts.models import is_vpmoe_config, load_model, model_config
from vpmoe.distributed import Ranks
from vpmoe.errors import UserError
from vpmoe.model import build_model
from vpmoe.model.capture import capture_outputs, decoder_layers
from vpmoe.teacher import load


@dataclass
class OnlineTeacherSection:
    """[teacher] of a train config: the model that runs in the loop."""

    path: str  # a local Hugging Face causal LM directory (o200k vocabulary) or a vpmoe checkpoint object / export
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    placement: Literal["device", "fsdp"] = "device"  # see vpmoe/teacher/online.py
    attn_implementation: str | None = None  # passed to `from_pretrained` when set (Hugging Face teachers)
    experts_implementation: str | None = None

    def validate(self) -> None:
        if not self.path:
            raise ValueError("teacher.path is empty")


@dataclass
class TeacherStates:
    hidden: torch.Tensor  # [N, D_t], final-normed, at the selected positions
    layers: list[torch.Tensor]  # [N, D_t] per requested block, that block's output


class OnlineTeacher:
    def __init__(self, teacher: load.Teacher, vpmoe: bool, name: str, sharded: bool = False):
        self.model, self.body = teacher.model, teacher.body
        self.head_weight, self.head_bias = teacher.head_weight, teacher.head_bias
        self.placement = teacher.placement
        self.vpmoe = vpmoe
        self.sharded = sharded  # FSDP2 over the ranks: every rank runs the same number of forwards
        self.name = name
        self.blocks = decoder_layers(teacher.model)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def hidden_size(self) -> int:
        return self.head_weight.shape[1]

    @property
    def weight_bytes(self) -> int:
        """Bytes of the teacher's parameters held by this rank (its shards, and the whole head)."""
        total = 0
        for p in self.model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            total += local.numel() * local.element_size()
        return total

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, doc_ids: torch.Tensor,
                select: torch.Tensor, layers: Sequence[int] = ()) -> TeacherStates:
        """The teacher's states at the positions `select` [B, S] (bool) of packed rows; see the module doc."""
        bad = [i for i in layers if not 0 <= i < self.n_layers]
        if bad:
            raise ValueError(f"teacher block {bad[0]} is out of range 0..{self.n_layers - 1}")
        blocks = [self.blocks[i] for i in layers]
        with torch.autocast(input_ids.device.type, enabled=False):
            if self.vpmoe:
                with capture_outputs(blocks) as captured:
                    out = self.body(input_ids=input_ids, position_ids=position_ids, doc_ids=doc_ids)
                states = TeacherStates(out.last_hidden_state[select], [h[select] for h in captured])
            else:
                states = self.forward_documents(documents(input_ids, doc_ids, select), blocks)
        if hasattr(self.body, "reshard"):  # FSDP2 keeps its root unit gathered after a forward; free it
            self.body.reshard()
        return states

    def forward_documents(self, docs: Documents, blocks: list[torch.nn.Module]) -> TeacherStates:
        """One forward per bucket of documents of similar length; under FSDP the ranks agree on the number of
        forwards (the ranks with fewer buckets feed one EOD for the rest)."""
        device = docs.tokens.device
        count = torch.tensor([len(docs.buckets)], device=device)
        if self.sharded:
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
        hidden = torch.empty(len(docs.doc), self.hidden_size, dtype=self.head_weight.dtype, device=device)
        outputs = [torch.empty_like(hidden) for _ in blocks]
        for b in range(int(count)):
            first, last = docs.buckets[b] if b < len(docs.buckets) else (0, 0)
            tokens = docs.tokens[first:last, :docs.lengths[first]] if last > first else \
                torch.full((1, 1), tk.EOD, dtype=docs.tokens.dtype, device=device)
            with capture_outputs(blocks) as captured:
                out = self.body(input_ids=tokens, use_cache=False)
            mine = ((docs.doc >= first) & (docs.doc < last)).nonzero().squeeze(1)
            at = (docs.doc[mine] - first, docs.offset[mine])
            hidden[mine] = out.last_hidden_state[at].to(hidden.dtype)
            for target, h in zip(outputs, captured):
                target[mine] = h[at].to(target.dtype)
        return TeacherStates(hidden, outputs)


PAD_BUDGET = 1.25  # a bucket of documents computes at most this many tokens per real one (or holds one document)


@dataclass
class Documents:
    """The documents of packed rows that hold a selected position, longest first, each from its start to its last
    selected position, right-padded: `tokens` [D, W]; `lengths` [D] (a list); `buckets`: (first, last) ranges of
    documents fed together; `doc`, `offset` [N]: where each selected position (row-major) lies."""

    tokens: torch.Tensor
    lengths: list[int]
    buckets: list[tuple[int, int]]
    doc: torch.Tensor
    offset: torch.Tensor

    @property
    def fed_tokens(self) -> int:
        """Tokens the forwards compute, padding included."""
        return sum((last - first) * self.lengths[first] for first, last in self.buckets)


def documents(input_ids: torch.Tensor, doc_ids: torch.Tensor, select: torch.Tensor) -> Documents:
    starts = torch.ones_like(select)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    starts = starts.flatten()
    segment = starts.cumsum(0) - 1  # [B*S], the document of each position
    first = starts.nonzero().squeeze(1)  # flat index of each document's first token
    selected = select.flatten().nonzero().squeeze(1)
    used, doc = torch.unique(segment[selected], return_inverse=True)
    offset = selected - first[segment[selected]]
    length = torch.zeros(len(used), dtype=torch.long, device=select.device).scatter_reduce(
        0, doc, offset + 1, "amax")
    order = torch.argsort(length, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device)
    lengths = length[order].tolist()
    width = lengths[0] if lengths else 0
    columns = torch.arange(width, device=select.device)
    index = (first[used[order]][:, None] + columns).clamp(max=max(select.numel() - 1, 0))
    tokens = torch.where(columns < length[order][:, None], input_ids.flatten()[index], tk.EOD)
    return Documents(tokens, lengths, buckets(lengths), rank[doc], offset)


def buckets(lengths: list[int]) -> list[tuple[int, int]]:
    """Consecutive ranges of documents (lengths descending) fed as one right-padded batch: a range grows while its
    padded tokens stay within PAD_BUDGET times its real ones."""
    ranges, first, real = [], 0, 0
    for i, length in enumerate(lengths):
        if i > first and (i - first + 1) * lengths[first] > PAD_BUDGET * (real + length):
            ranges.append((first, i))
            first, real = i, 0
        real += length
    if lengths:
        ranges.append((first, len(lengths)))
    return ranges


def load_online_teacher(section: OnlineTeacherSection, ranks: Ranks) -> OnlineTeacher:
    """Check the vocabulary, load the teacher frozen in eval mode and place it (see the module doc)."""
    path = Path(section.path)
    if not path.is_dir():
        raise UserError(f"teacher.path {path} {'is not a directory' if path.exists() else 'does not exist'}")
    load.check_vocabulary(path)
    vpmoe = is_vpmoe_config(load.read_config(path))
    if section.placement == "fsdp" and ranks.distributed:
        return OnlineTeacher(load_sharded(path, section, vpmoe, ranks), vpmoe, path.name, sharded=True)
    return OnlineTeacher(load_whole(path, section, vpmoe, ranks.device), vpmoe, path.name)


def load_whole(path: Path, section: OnlineTeacherSection, vpmoe: bool, device: torch.device) -> load.Teacher:
    """The whole teacher on `device` ("meta": its structure only, no weights read)."""
    dtype = load.TORCH_DTYPES[section.dtype]
    if vpmoe:
        if device.type == "meta":
            model = build_model(model_config(path), device=device, init=False).cast_(dtype)
        else:
            model = load_model(path, device=device, dtype=dtype)
        model.eval().requires_grad_(False)
        return load.Teacher(model=model, body=load.VpmoeBody(model), head_weight=model.head.weight, head_bias=None,
                            input_device=device, placement=str(device))
    if device.type == "meta":
        model = load.causal_lm_structure(path, section.dtype, section.attn_implementation,
                                         section.experts_implementation)
    else:
        placement = {} if device.type == "cpu" else {"device_map": {"": str(device)}}
        model = load.load_causal_lm(path, section.dtype, section.attn_implementation,
                                    section.experts_implementation, **placement)
    return load.wrap_model(model, str(device), name=path.name)


def load_sharded(path: Path, section: OnlineTeacherSection, vpmoe: bool, ranks: Ranks) -> load.Teacher:
    """Rank 0 reads the teacher into host memory, the other ranks build its structure on the meta device; all
    shard it (FSDP2 over the ranks: one unit per block, the body as root, the head whole on every rank), allocate
    their part on their device and receive rank 0's values (parameters and buffers). The host holds one copy of
    the teacher, not one per rank."""
    teacher = load_whole(path, section, vpmoe, torch.device("cpu" if ranks.is_main else "meta"))
    full = dict(teacher.model.state_dict()) if ranks.is_main else {}
    mesh = init_device_mesh(ranks.device.type, (ranks.world_size,), mesh_dim_names=("teacher",))
    for block in decoder_layers(teacher.model):
        fully_shard(block, mesh=mesh)
    head = {p for p in (teacher.head_weight, teacher.head_bias) if p is not None}
    inside = {id(p) for p in teacher.body.parameters()}
    fully_shard(teacher.body, mesh=mesh, ignored_params={p for p in head if id(p) in inside} or None)
    if ranks.is_main:
        teacher.model.to(ranks.device)  # what FSDP does not own: the head and the buffers
    else:
        teacher.model.to_empty(device=ranks.device)  # new parameter objects for what FSDP does not own
        head = teacher.model.head if vpmoe else teacher.model.get_output_embeddings()
        teacher.head_weight, teacher.head_bias = head.weight, getattr(head, "bias", None)
    set_model_state_dict(teacher.model, full, options=StateDictOptions(full_state_dict=True,
                                                                       broadcast_from_rank0=True, strict=True))
    del full
    for buffer in teacher.model.buffers():  # non-persistent buffers (rotary tables) are in no state dict
        dist.broadcast(buffer, src=0)
    teacher.placement = f"FSDP2 over {ranks.world_size} ranks ({ranks.device.type})"
    teacher.input_device = ranks.device
    return teacher
