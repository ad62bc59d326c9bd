"""Load a teacher causal LM from a local Hugging Face directory, after checking that it speaks our vocabulary.

The check runs on the directory's files before any weight is read: `vocab_size` must be exactly 201088 (o200k
Harmony); the end-of-sequence ids the config and generation config name must be our `<|return|>`, `<|call|>`
or `<|endoftext|>`, a `bos_token_id` must be `<|startoftext|>` and a `pad_token_id` one of our special ids; a
tokenizer saved beside the weights must map the Harmony special tokens to our ids and encode ordinary text
exactly as our tokenizer does. A directory that names no special token at all is refused too: its ids could
not be checked.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from vpmoe import tokenizer as tk
from vpmoe.artifacts.files import read_json
from vpmoe.artifacts.models import config_json, is_vpmoe_config, load_model
from vpmoe.errors import UserError
from vpmoe.artifacts.files import file_sha256
from vpmoe.teacher.config import ScoreSection, TeacherSection

EOS_IDS = {tk.RETURN: "<|return|>", tk.CALL: "<|call|>", tk.ENDOFTEXT: "<|endoftext|>"}
HARMONY_REQUIRED = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>")
PROBE = "Ava has 12 apples.\nShe gives 5 away: 12 - 5 = 7.\n\nThe answer is 7. Café, naïve; résumé!  done"
# Config keys with which a causal LM post-processes its head's logits; scoring applies the plain linear head.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logit_scale")
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Teacher:
    model: torch.nn.Module  # the causal LM
    body: torch.nn.Module  # the model without its head: input_ids -> final (normed) hidden states
    head_weight: torch.Tensor  # [vocab, hidden]
    head_bias: torch.Tensor | None
    input_device: torch.device  # where input ids go (the embedding's device)
    placement: str  # human-readable, for the log


def read_config(path: str | Path) -> dict:
    """The teacher directory's raw config.json (a Hugging Face model, or a vpmoe checkpoint object or export)."""
    try:
        return config_json(path)
    except UserError as e:
        raise UserError(f"teacher.path: {e}") from None


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def check_vocabulary(path: str | Path) -> dict:
    """Refuse a teacher whose vocabulary or special-token ids differ from ours; return what was checked."""
    path = Path(path)
    cfg = read_config(path)
    if is_vpmoe_config(cfg):  # our own models speak our tokenizer by construction; only the size can differ
        vocab = cfg["model"]["vocab_size"]
        if vocab != tk.VOCAB_SIZE:
            raise UserError(f"teacher {path.name}: a vpmoe model with {vocab} ids, not {tk.VOCAB_SIZE}")
        return {"vocab_size": vocab, "format": "vpmoe"}
    vocab = cfg.get("vocab_size")
    if vocab != tk.VOCAB_SIZE:
        raise UserError(
            f"teacher {path.name}: its vocabulary has {vocab} ids, ours (o200k Harmony) has {tk.VOCAB_SIZE}; "
            f"a teacher must use the o200k Harmony vocabulary (e.g. GPT-OSS)"
        )
    generation = path / "generation_config.json"
    gen = read_json(generation, "the teacher's generation config") if generation.is_file() else {}
    eos = sorted(set(_ids(cfg.get("eos_token_id")) + _ids(gen.get("eos_token_id"))))
    bos = sorted(set(_ids(cfg.get("bos_token_id")) + _ids(gen.get("bos_token_id"))))
    pad = sorted(set(_ids(cfg.get("pad_token_id")) + _ids(gen.get("pad_token_id"))))
    wrong = [f"eos_token_id {i}" for i in eos if i not in EOS_IDS]
    wrong += [f"bos_token_id {i}" for i in bos if i != tk.STARTOFTEXT]
    wrong += [f"pad_token_id {i}" for i in pad if not tk.FIRST_SPECIAL <= i < tk.VOCAB_SIZE]
    if wrong:
        raise UserError(
            f"teacher {path.name}: special-token ids differ from ours ({', '.join(wrong)}); in o200k Harmony "
            f"end of sequence is one of {sorted(EOS_IDS)} ({', '.join(EOS_IDS.values())}), <|startoftext|> is "
            f"{tk.STARTOFTEXT} and special ids start at {tk.FIRST_SPECIAL}"
        )
    checked = {"vocab_size": vocab, "eos_token_ids": eos}
    if (path / "tokenizer.json").is_file():
        checked["tokenizer"] = _check_tokenizer(path)
    elif not eos:
        raise UserError(
            f"teacher {path.name}: neither its config nor a tokenizer.json names a special token, so its "
            f"special-token ids cannot be checked against ours; add eos_token_id ({tk.RETURN}) to config.json"
        )
    return checked


def _check_tokenizer(path: Path) -> str:
    """The saved tokenizer must map the Harmony special tokens to our ids and encode text as ours does."""
    name = path.name
    added = {t["content"]: int(t["id"]) for t in read_json(path / "tokenizer.json", "the teacher's tokenizer").get(
        "added_tokens", [])}
    config_file = path / "tokenizer_config.json"
    if config_file.is_file():
        decoder = read_json(config_file, "the teacher's tokenizer config").get("added_tokens_decoder", {})
        for token_id, entry in decoder.items():
            added.setdefault(entry.get("content"), int(token_id))
    missing = [t for t in HARMONY_REQUIRED if t not in added]
    if missing:
        raise UserError(f"teacher {name}: its tokenizer has no {', '.join(missing)}: not an o200k Harmony tokenizer")
    wrong = [f"{t} = {added[t]} (ours {i})" for t, i in tk.NAMED_SPECIALS.items() if t in added and added[t] != i]
    if wrong:
        raise UserError(f"teacher {name}: its tokenizer's special-token ids differ from ours: {', '.join(wrong)}")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UserError("checking a teacher's tokenizer needs the `tokenizers` package (it comes with transformers)")
    theirs = Tokenizer.from_file(str(path / "tokenizer.json")).encode(PROBE, add_special_tokens=False).ids
    if list(theirs) != tk.encode(PROBE):
        raise UserError(
            f"teacher {name}: its tokenizer encodes ordinary text differently from o200k ({PROBE[:30]!r}... -> "
            f"{list(theirs)[:8]}... vs {tk.encode(PROBE)[:8]}...)"
        )
    return "tokenizer.json: Harmony special ids and o200k text encoding match"


def model_files(path: str | Path) -> list[Path]:
    """The files that define the teacher: its top-level JSON files and weight files (sorted by name)."""
    path = Path(path)
    def defines(p: Path) -> bool:
        return p.suffix in (".json", ".safetensors", ".pt", ".pth") or (
            p.suffix == ".bin" and p.name.startswith("pytorch_model"))

    files = sorted(p for p in path.iterdir() if p.is_file() and defines(p))
    if not any(p.suffix != ".json" for p in files):
        raise UserError(f"teacher.path {path} holds no weight files (*.safetensors, pytorch_model*.bin)")
    return files


def identity(path: str | Path) -> dict:
    """A cheap identity of the teacher (names, sizes, config hash) for resume checks."""
    path = Path(path)
    cfg = read_config(path)
    return {
        "name": path.resolve().name,
        "model_type": cfg.get("model_type"),
        "architectures": cfg.get("architectures"),
        "config_sha256": hashlib.sha256((path / "config.json").read_bytes()).hexdigest(),
        "files": [{"name": p.name, "bytes": p.stat().st_size} for p in model_files(path)],
    }


def hash_files(path: str | Path, threads: int = 8) -> list[dict]:
    """sha256 of every file that defines the teacher (weights included), hashed in parallel."""
    files = model_files(path)
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(threads, len(files))) as pool:
        digests = list(pool.map(file_sha256, files))
    return [{"name": p.name, "bytes": p.stat().st_size, "sha256": d} for p, d in zip(files, digests)]


def _gpus(score: ScoreSection, local_rank: int) -> list[int]:
    if not torch.cuda.is_available():
        raise UserError("score.device = \"cuda\" but no CUDA device is visible; set score.device = \"cpu\"")
    first = local_rank * score.gpus_per_rank
    mine = list(range(first, first + score.gpus_per_rank))
    if mine[-1] >= torch.cuda.device_count():
        raise UserError(
            f"rank with LOCAL_RANK {local_rank} needs GPUs {mine} (score.gpus_per_rank = {score.gpus_per_rank}) but "
            f"only {torch.cuda.device_count()} are visible"
        )
    return mine


class VpmoeBody(torch.nn.Module):
    """A vpmoe Transformer seen as a Hugging Face body: input_ids -> .last_hidden_state (final-normed)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, use_cache: bool = False) -> SimpleNamespace:
        return SimpleNamespace(last_hidden_state=self.model.body(input_ids, position_ids, doc_ids).hidden)


def _load_vpmoe(path: Path, teacher: TeacherSection, score: ScoreSection, local_rank: int) -> Teacher:
    if score.device_map != "none":
        raise UserError("a vpmoe teacher runs on one device: set score.device_map = \"none\"")
    device = "cpu" if score.device == "cpu" else f"cuda:{_gpus(score, local_rank)[0]}"
    model = load_model(path, device=device, dtype=TORCH_DTYPES[teacher.dtype])
    model.eval().requires_grad_(False)
    return Teacher(model=model, body=VpmoeBody(model), head_weight=model.head.weight, head_bias=None,
                   input_device=torch.device(device), placement=device)


def load_teacher(teacher: TeacherSection, score: ScoreSection, local_rank: int = 0) -> Teacher:
    """Check the vocabulary, then load the teacher for inference with the configured precision and placement.

    The teacher is a Hugging Face causal LM, or a vpmoe checkpoint object / export (e.g. an earlier student)."""
    path = Path(teacher.path)
    check_vocabulary(path)
    if is_vpmoe_config(read_config(path)):
        return _load_vpmoe(path, teacher, score, local_rank)
    if score.device == "cpu":
        placement, device_kwargs = "cpu", {}
    else:
        gpus = _gpus(score, local_rank)
        if score.device_map == "auto":
            device_kwargs = {"device_map": "auto", "max_memory": {
                i: int(torch.cuda.get_device_properties(i).total_memory * score.max_gpu_memory) for i in gpus}}
            placement = f"cuda:{gpus[0]}..cuda:{gpus[-1]} (device_map auto)"
        else:
            device_kwargs = {"device_map": {"": f"cuda:{gpus[0]}"}}
            placement = f"cuda:{gpus[0]}"
    model = load_causal_lm(path, teacher.dtype, teacher.attn_implementation, teacher.experts_implementation,
                           **device_kwargs)
    device_map = getattr(model, "hf_device_map", None) or {}
    off_gpu = sorted({str(d) for d in device_map.values() if not isinstance(d, int) and not str(d).startswith("cuda")})
    if score.device == "cuda" and off_gpu:
        raise UserError(
            f"teacher {path.name} does not fit on its {score.gpus_per_rank} GPU(s) at max_gpu_memory "
            f"{score.max_gpu_memory}: some layers went to {off_gpu}; raise score.gpus_per_rank"
        )

    return wrap_model(model, placement, name=path.name)


def load_causal_lm(path: Path, dtype: str, attn_implementation: str | None = None,
                   experts_implementation: str | None = None, **placement) -> torch.nn.Module:
    """A Hugging Face causal LM from a local directory for inference (eval mode, no gradients), refused when it
    post-processes its logits; `placement` goes to `from_pretrained` (device_map, max_memory)."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise UserError("a Hugging Face teacher needs `transformers` (pip install 'transformers>=4.56')") from None
    cfg = read_config(path)
    transforms = [k for k in LOGIT_TRANSFORMS if cfg.get(k) not in (None, 1, 1.0)]
    if transforms:
        raise UserError(
            f"teacher {path.name} post-processes its logits ({', '.join(transforms)}); a teacher's distribution is "
            f"the plain linear head's, which would differ"
        )
    kwargs = {"dtype": TORCH_DTYPES[dtype], "local_files_only": True, **placement}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise UserError(f"cannot load teacher {path.name} with transformers: {e}") from None
    return model.eval().requires_grad_(False)


def causal_lm_structure(path: Path, dtype: str, attn_implementation: str | None = None,
                        experts_implementation: str | None = None) -> torch.nn.Module:
    """The causal LM of a local directory built on the meta device from its config (no weights read), as
    `load_causal_lm` would load it: for ranks that receive the weights from another."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    kwargs = {"dtype": TORCH_DTYPES[dtype]}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    return model.eval().requires_grad_(False)


def wrap_model(model: torch.nn.Module, placement: str, name: str = "teacher") -> Teacher:
    """Split a loaded Hugging Face causal LM into its body and its linear output head."""
    head = model.get_output_embeddings()
    body = getattr(model, model.base_model_prefix, None)
    if head is None or body is None or body is model or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise UserError(f"teacher {name}: cannot separate the model body from its linear output head")
    if tuple(head.weight.shape)[0] != tk.VOCAB_SIZE:
        raise UserError(f"teacher {name}: its output head has {head.weight.shape[0]} rows, not {tk.VOCAB_SIZE}")
    embed = model.get_input_embeddings()
    return Teacher(
        model=model, body=body, head_weight=head.weight, head_bias=getattr(head, "bias", None),
        input_device=embed.weight.device, placement=placement,
    )
