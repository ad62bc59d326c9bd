"""Step 1: `qwen3-0_6B` -> `qwen3-0_6B-o200k`: vocabulary transplant with mergekit's tokensurgeon.

mergekit (the `upcycle` optional dependency group, pinned) runs as a subprocess: mergekit-tokensurgeon MODEL DONOR
OUT --approximation-method omp -k 64, started through `vpmoe.upcycle.tokensurgeon_cli`, which only registers a
GPT-OSS architecture definition that mergekit 0.1.5 lacks (the real donor is gpt-oss-20b). Tokens of the donor's
vocabulary that the model's tokenizer also has keep the model's rows; every other row is an orthogonal matching
pursuit over k shared tokens, fitted in the donor's embedding space and applied in the model's. The output takes
the donor's tokenizer. Afterwards it must have exactly the registry's rows (201088 for o200k Harmony; rows that no
token uses are padded with zeros when the tokenizer stops short, `transplant.pad_to_vocab`) and the registry's
special tokens at their ids.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vpmoe.errors import RunError, UserError
from vpmoe.upcycle import hf

MERGEKIT_VERSION = "0.1.5"  # pinned in pyproject.toml's `upcycle` group


def check_mergekit() -> str:
    try:
        version = metadata.version("mergekit")
    except metadata.PackageNotFoundError:
        raise UserError("step 'transplant' needs mergekit: pip install -e '.[upcycle]'") from None
    if version != MERGEKIT_VERSION:
        raise UserError(f"mergekit {version} is installed; this step is pinned to {MERGEKIT_VERSION} "
                        f"(pip install -e '.[upcycle]')")
    return version


def tokensurgeon_command(model: Path, donor: Path, out: Path, method: str, k: int, batch_size: int,
                         seed: int, device: str = "cpu") -> list[str]:
    return [
        sys.executable, "-m", "vpmoe.upcycle.tokensurgeon_cli", str(model), str(donor), str(out),
        "--approximation-method", method, "-k", str(k), "--batch-size", str(batch_size),
        "--device", device, "--random-seed", str(seed), "--no-write-model-card", "--quiet",
    ]


def run(model_dir: Path, donor_dir: Path, out: Path, method: str, k: int, batch_size: int, seed: int,
        vocab: int, pad_to_vocab: bool, device: str = "cpu") -> dict:
    version = check_mergekit()
    cmd = tokensurgeon_command(model_dir, donor_dir, out, method, k, batch_size, seed, device)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONHASHSEED="0")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-3000:]
        raise RunError(f"mergekit-tokensurgeon failed (exit {proc.returncode}):\n{tail}")
    rows = hf.facts(out)["vocab"]
    padded = 0
    if rows < vocab and pad_to_vocab:
        padded = pad_rows(out, vocab)
    rows = hf.facts(out)["vocab"]
    if rows != vocab:
        raise RunError(f"tokensurgeon wrote {rows} embedding rows; the registry expects {vocab}")
    return {
        "tool": f"mergekit {version} tokensurgeon",
        "method": method,
        "k": k,
        "command": ["mergekit-tokensurgeon", "MODEL", "DONOR", "OUT", *cmd[6:]],
        "rows": rows,
        "padded_rows": padded,
        **vocabulary_overlap(model_dir, donor_dir),
    }


def vocabulary_overlap(model_dir: Path, donor_dir: Path) -> dict:
    """Rows tokensurgeon copies (tokens both tokenizers have, by token string) and rows it approximates."""
    source, donor = hf.load_tokenizer(model_dir).get_vocab(), hf.load_tokenizer(donor_dir).get_vocab()
    shared = len(set(source) & set(donor))
    return {"rows_copied": shared, "rows_approximated": len(donor) - shared}


@torch.no_grad()
def pad_rows(directory: Path, vocab: int) -> int:
    """Append zero rows to the embedding (and untied head) up to `vocab`; config.json's vocab_size follows."""
    padded = 0
    for path in hf.weight_files(directory):
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
            meta = f.metadata()
        changed = False
        for name in (hf.EMBED, hf.HEAD):
            if name in tensors and tensors[name].shape[0] < vocab:
                t = tensors[name]
                padded = vocab - t.shape[0]
                tensors[name] = torch.cat([t, t.new_zeros(padded, t.shape[1])])
                changed = True
        if changed:
            save_file(tensors, str(path), metadata=meta)
    cfg_path = directory / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["vocab_size"] = vocab
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return padded
