"""The shipped model configs by name, with overrides."""

from __future__ import annotations

from vpmoe.model.config import ModelConfig, load_model_config


def model_config(name: str, *overrides: str) -> ModelConfig:
    """`model_config("tiny_moe", "model.vocab_size=512")` loads the shipped tiny_moe config with --set overrides."""
    return load_model_config(name, list(overrides))
