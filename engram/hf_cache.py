"""Engram decode state inside a transformers 5.x ``Cache``.

Shapes: B batch (beams included), N max_ngram_size, W = (kernel-1)*dilation conv history,
C = hc_mult*D conv channels.

A transformers ``Cache`` is a list of per-layer objects, and everything generation does to a cache
(beam reordering, ``batch_repeat_interleave``, ``batch_select_indices``, ``reset``, ``crop``) is
forwarded to every layer object. Engram keeps its decode state in one extra such object,
:class:`EngramCacheLayer`, appended after the decoder layers' own entries: the last N-1 compressed
ids (the n-gram history, shared by all Engram layers) and, per Engram layer, the last W conv
inputs (:class:`~engram.module.EngramLayerState`). So the state travels with the cache object,
reorders with beams and never lives in module attributes (compare
``models/qwen4_exp/modeling_qwen4_exp.py``, which keeps n-gram ids and conv state as
``conv_states`` of its hybrid cache layers). It is a ``DummyLayer`` subclass, so the cache's
attention bookkeeping (mask sizes, offloading, ``is_sliding``) skips it.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DummyLayer

from .module import EngramLayerState


class EngramCacheLayer(DummyLayer):
    """Engram's decode state for one batch of sequences.

    Attributes:
        history: ``(B, N-1)`` compressed ids preceding the next token, or ``None`` before prefill.
        layers: ``{layer_id: EngramLayerState}``; ``state.conv`` is ``(B, W, C)``.
        seen: tokens consumed so far (padding included).
    """

    # Cropping would need the conv inputs of the dropped tokens; assisted decoding must not try.
    is_croppable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.history: torch.Tensor | None = None
        self.layers: dict[int, EngramLayerState] = {}
        self.seen = 0

    def __repr__(self) -> str:
        return f"EngramCacheLayer(seen={self.seen}, layers={sorted(self.layers)})"

    def layer(self, layer_id: int) -> EngramLayerState:
        """The (possibly new) state of Engram layer ``layer_id``."""
        return self.layers.setdefault(layer_id, EngramLayerState())

    def _map(self, fn) -> None:
        if self.history is not None:
            self.history = fn(self.history)
        for state in self.layers.values():
            if state.conv is not None:
                state.conv = fn(state.conv)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def reset(self) -> None:
        self.history, self.layers, self.seen = None, {}, 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise ValueError(
                "an Engram cache cannot be cropped (its conv history of dropped tokens is gone); "
                "assisted/speculative decoding is not supported with Engram"
            )


def engram_cache_layer(cache: Cache, num_decoder_layers: int) -> EngramCacheLayer:
    """The :class:`EngramCacheLayer` of ``cache``, appended after its decoder layers if absent.

    A lazily filled ``DynamicCache`` (no config) gets its decoder entries created first, so the
    Engram entry never takes the index of a decoder layer.
    """
    if not isinstance(cache, Cache):
        raise TypeError(
            f"past_key_values must be a transformers Cache (e.g. DynamicCache), got {type(cache).__name__}"
        )
    for layer in cache.layers:
        if isinstance(layer, EngramCacheLayer):
            return layer
    replicate = getattr(cache, "layer_class_to_replicate", None)
    if len(cache.layers) < num_decoder_layers:
        if replicate is None:
            raise ValueError(
                f"the cache has {len(cache.layers)} layers but the model has {num_decoder_layers} decoder layers"
            )
        while len(cache.layers) < num_decoder_layers:
            cache.layers.append(replicate())
    if len(cache.layers) > num_decoder_layers:
        raise ValueError(
            f"the cache has {len(cache.layers)} layers for {num_decoder_layers} decoder layers and no Engram state; "
            "pass a fresh cache (or none) for an EngramForCausalLM"
        )
    state = EngramCacheLayer()
    cache.layers.append(state)
    return state
