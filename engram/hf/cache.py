"""Engram decode state inside a transformers 5.x ``Cache``.

Shapes: B batch (beams included), N max_ngram_size, W = (kernel-1)*dilation conv history,
C = hc_mult*D conv channels.

A transformers ``Cache`` is a list of per-layer objects, and everything generation does to a cache
(beam reordering, ``batch_repeat_interleave``, ``batch_select_indices``, ``reset``, ``crop``,
``activate_past_recording``) is forwarded to every layer object. Engram keeps its decode state in one extra such object,
:class:`EngramCacheLayer`, appended after the decoder layers' own entries: the last N-1 compressed
ids (the n-gram history, shared by all Engram layers) and, per Engram layer, the last W conv
inputs (:class:`~engram.nn.module.EngramLayerState`). So the state travels with the cache object,
reorders with beams and never lives in module attributes (compare
``models/qwen4_exp/modeling_qwen4_exp.py``, which keeps n-gram ids and conv state as
``conv_states`` of its hybrid cache layers). It is a ``DummyLayer`` subclass, so the cache's
attention bookkeeping (mask sizes, offloading, ``is_sliding``) skips it.
"""

from __future__ import annotations

import torch

from engram.hf.compat import Cache, DummyLayer
from engram.nn.module import EngramLayerState


class EngramCacheLayer(DummyLayer):
    """Engram's decode state for one batch of sequences.

    Args:
        history_len: N-1, the compressed ids the next token's n-grams read.
        conv_len: W, the conv inputs the next token's short conv reads.

    Attributes:
        history: ``(B, N-1)`` compressed ids preceding the next token (``(B, >= N-1)`` while
            recording), or ``None`` before prefill.
        layers: ``{layer_id: EngramLayerState}``; ``state.conv`` is ``(B, W, C)`` (``>= W`` rows
            while recording).
        seen: tokens consumed so far (padding included).
        record_past: set by generation (:meth:`activate_past_recording`) before it may
            :meth:`crop`: history and conv rows are then kept until the next crop.
    """

    is_croppable = True  # with past recording on, a crop restores the state exactly

    def __init__(self, history_len: int = 0, conv_len: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.history_len, self.conv_len = history_len, conv_len
        self.history: torch.Tensor | None = None
        self.layers: dict[int, EngramLayerState] = {}
        self.seen = 0
        self._record = False

    def __repr__(self) -> str:
        return f"EngramCacheLayer(seen={self.seen}, layers={sorted(self.layers)}, record_past={self._record})"

    @property
    def record_past(self) -> bool:
        return self._record

    @record_past.setter
    def record_past(self, value: bool) -> None:  # generation also resets the attribute directly
        self._record = bool(value)
        for state in self.layers.values():
            state.keep = self._record

    def activate_past_recording(self, **kwargs) -> None:
        """Keep every history id and conv row until the next :meth:`crop` (transformers protocol).

        Keyword arguments are the protocol's options for other layer kinds, ignored here (5.25
        passes ``recurrent_states_to_keep`` for linear-attention layers; Engram keeps all it needs)."""
        self.record_past = True

    def layer(self, layer_id: int) -> EngramLayerState:
        """The (possibly new) state of Engram layer ``layer_id``."""
        state = self.layers.get(layer_id)
        if state is None:
            state = self.layers[layer_id] = EngramLayerState(keep=self._record)
        return state

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
        """Drop the last ``-tokens_to_remove`` tokens (a negative count, as transformers passes),
        then trim the state to what the next token reads (``crop(0)`` only trims).

        Needs the rows recorded since :meth:`activate_past_recording`; asking for more is a
        ``ValueError``, as is a positive count (the legacy absolute-length form).
        """
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        k = -tokens_to_remove
        if k:
            spare = [self.history.shape[1] - self.history_len if self.history is not None else 0]
            spare += [s.conv.shape[1] - self.conv_len for s in self.layers.values() if s.conv is not None]
            have = min(spare)  # tokens recorded beyond what the next step reads, in every part
            if k > have or k > self.seen:
                raise ValueError(
                    f"cannot crop {k} tokens from the Engram cache: only {max(have, 0)} were recorded since "
                    "activate_past_recording()"
                )
            self._map(lambda t: t[:, : t.shape[1] - k])
            self.seen -= k
        if self.history is not None:
            self.history = self.history[:, self.history.shape[1] - self.history_len :]
        for state in self.layers.values():
            if state.conv is not None:
                state.conv = state.conv[:, state.conv.shape[1] - self.conv_len :]


def engram_cache_layer(cache: Cache, num_decoder_layers: int, history_len: int = 0,
                       conv_len: int = 0) -> EngramCacheLayer:
    """The :class:`EngramCacheLayer` of ``cache``, appended after its decoder layers if absent.

    ``history_len`` (N-1) and ``conv_len`` (W) are what a new layer trims to after a crop.

    A lazily filled ``DynamicCache`` (no config) gets its decoder entries created first, so the
    Engram entry never takes the index of a decoder layer.
    """
    if not isinstance(cache, Cache):
        raise TypeError(
            f"the cache must be a transformers Cache (e.g. DynamicCache), got {type(cache).__name__}"
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
    state = EngramCacheLayer(history_len, conv_len)
    cache.layers.append(state)
    return state
