"""`vpmoe doctor`: environment, asset and device checks, each with what to do when it fails."""

from __future__ import annotations

import platform
import sys

from vpmoe import tokenizer as tk
from vpmoe.errors import UserError


def doctor(config: str | None = None, overrides: list[str] | None = None, world_size: int = 1) -> None:
    """With a training config: also the device mesh that `world_size` ranks would build for it."""
    problems = []

    def check(name: str, fn) -> None:
        try:
            detail = fn()
            print(f"ok    {name}: {detail}")
        except UserError as e:
            problems.append(str(e))
            print(f"FAIL  {name}: {e}")

    check("python", lambda: _python())
    check("torch", lambda: _torch())
    check("tokenizer ranks", lambda: f"sha256 {tk.O200K_SHA256[:12]}… in the local cache ({tk.ranks_path().name})")
    check("tokenizer", lambda: f"{tk.encoding().n_vocab} ids, <|start|> = {tk.encoding().encode('<|start|>', allowed_special='all')[0]}")
    check("openai-harmony", lambda: f"renders with the local ranks ({len(tk.harmony().special_tokens_set)} special tokens)")
    check("device", lambda: _device())
    if config is not None:
        check("mesh", lambda: _mesh(config, overrides or [], world_size))
    if problems:
        raise UserError(f"{len(problems)} check(s) failed; see above")


def _python() -> str:
    if sys.version_info < (3, 11):
        raise UserError(f"Python {platform.python_version()} is too old: use 3.11 or newer")
    return platform.python_version()


def _torch() -> str:
    try:
        import torch
    except ImportError:
        raise UserError("PyTorch is not installed: run `make env`") from None
    return torch.__version__


def _mesh(config: str, overrides: list[str], world_size: int) -> str:
    from vpmoe.model.config import load_model_config
    from vpmoe.train.config import load_train_config
    from vpmoe.train.mesh import resolve_layout

    cfg = load_train_config(config, overrides)
    moe = load_model_config(cfg.model.config).moe
    return resolve_layout(cfg.parallel, world_size, moe.n_experts if moe.enabled else None).describe()


def _device() -> str:
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device: CPU only (tests, the demo and tiny configs run here)"
    props = torch.cuda.get_device_properties(0)
    bf16 = "bf16" if torch.cuda.is_bf16_supported() else "no bf16"
    return f"{torch.cuda.device_count()} x {props.name}, {props.total_memory / 2**30:.0f} GiB, {bf16}"
