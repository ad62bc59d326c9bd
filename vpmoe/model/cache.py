"""KV cache for incremental decoding. Windowed (local) layers keep at most `window` keys."""

from __future__ import annotations

import torch

from vpmoe.model.config import ModelConfig


class LayerCache:
    def __init__(self, window: int | None):
        self.window = window
        self.k = self.v = self.index = self.doc = None

    def update(self, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, doc: torch.Tensor):
        """Append this step's keys (k, v [B, Hkv, S, D], index [S], doc [B, S]); return all keys this step's
        queries may need, and keep only the last `window` of them for the next step."""
        if self.k is not None:
            k = torch.cat([self.k, k], dim=2)
            v = torch.cat([self.v, v], dim=2)
            index = torch.cat([self.index, index])
            doc = torch.cat([self.doc, doc], dim=1)
        keep = slice(-self.window, None) if self.window is not None else slice(None)
        self.k, self.v, self.index, self.doc = k[:, :, keep], v[:, :, keep], index[keep], doc[:, keep]
        return k, v, index, doc


class KVCache:
    """One LayerCache per layer plus the number of tokens of the stream already consumed."""

    def __init__(self, cfg: ModelConfig):
        self.layers = [
            LayerCache(cfg.attention.window if cfg.layer_kind(layer) == "local" else None)
            for layer in range(cfg.model.n_layers)
        ]
        self.length = 0

    def __getitem__(self, layer: int) -> LayerCache:
        return self.layers[layer]
