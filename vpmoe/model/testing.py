"""Helpers for tests and examples: the repository's model configs by name, with overrides."""

from __future__ import annotations

from pathlib import Path

from vpmoe.model.config import ModelConfig, load_model_config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"


def model_config(name: str, *overrides: str) -> ModelConfig:
    """`model_config("tiny_moe", "model.vocab_size=512")` loads configs/model/tiny_moe.toml with --set overrides."""
    return load_model_config(CONFIG_DIR / f"{name}.toml", list(overrides))
