"""KV caches for incremental decoding.

KVCache: grows by concatenation, any number of new tokens per forward (the plain `generate` loop). Windowed (local)
layers keep at most `window` keys.
StaticKVCache: preallocated for one batch shape, written in place one token per step (the Sampler; CUDA graphs
replay at fixed addresses, so nothing may be allocated or moved after construction).
"""

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


class StaticKVCache:
    """Keys and values of `batch` left-padded rows sharing one stream of at most `capacity` tokens.

    Stream index j of row b holds a real token when j >= pads[b]. A layer keeps `slots` entries: every token for
    full/global layers (slots = capacity), a ring of `window` for local ones; token j lives in slot j % slots.
    `t` (a device scalar) is the stream index of the token that the next decode step writes. Zero-initialized:
    slots that no token wrote are masked out, and a masked slot must hold finite values (0 * NaN is NaN)."""

    def __init__(self, cfg: ModelConfig, batch: int, capacity: int, device: torch.device, dtype: torch.dtype):
        a = cfg.attention
        self.capacity = capacity
        self.slots = [min(a.window, capacity) if cfg.layer_kind(layer) == "local" else capacity
                      for layer in range(cfg.model.n_layers)]
        self.k = [torch.zeros(batch, a.n_kv_heads, slots, a.head_dim, device=device, dtype=dtype)
                  for slots in self.slots]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.pads = torch.zeros(batch, dtype=torch.long, device=device)
        self.t = torch.zeros((), dtype=torch.long, device=device)

    def prefill(self, layer: int, rows: slice, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the keys of stream indices 0..P-1 of some rows, k and v [rows, Hkv, P, D]."""
        slots, length = self.slots[layer], k.shape[2]
        kept = torch.arange(max(0, length - slots), length, device=k.device)
        self.k[layer][rows].index_copy_(2, kept % slots, k.index_select(2, kept))
        self.v[layer][rows].index_copy_(2, kept % slots, v.index_select(2, kept))

    def span(self, layer: int, span: int) -> int:
        """The slots of `layer` that a step at stream index t < span reads: the first `span` of a layer that keeps
        every token (later slots hold no token yet), the whole ring of a windowed one."""
        return span if self.slots[layer] == self.capacity else self.slots[layer]

    def visibility(self, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For a query at stream index t over the first `slots` slots of a layer whose ring is `slots` long, or of a
        full layer with t < slots: (visible [B, slots], distance [B, slots]). Slot s holds the latest token
        j <= t with j % slots == s (j < 0: never written); the query sees it when it is a real token of the row.
        A local ring never holds more than its window, so no window test is needed."""
        index = torch.arange(slots, device=self.t.device)
        token = self.t - (self.t - index).remainder(slots)
        visible = token[None, :] >= self.pads[:, None]
        return visible, (self.t - token)[None, :].expand_as(visible)
