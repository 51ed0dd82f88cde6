"""The seed documents' API, as thin aliases over the library's classes.

``EngramTokenizer`` is :class:`~engram.core.hashing.NgramHashMapping` with the seed spelling
(``vocab_distributions``, ``compress_and_hash``); ``EngramModule`` is
:class:`~engram.nn.module.Engram` built from a layer's table sizes (``vocab_sizes``) and callable as
``module(hidden_states, hash_ids)`` where ``hash_ids`` may be the per-layer dict.

The seed's own code (``lenML/engram_torch_unofficial``) also imports ``engram.tokenizer``
(``EngramTokenizer``, ``AdapterTokenizer``), ``engram.modules`` (``EngramModule`` and the table
classes) and ``engram.OffloadEmbedding``; those modules re-export the names defined here.
``OffloadEmbedding`` is :class:`~engram.storage.tables.HostMultiHeadEmbedding` with one head: an
``nn.Embedding`` whose table stays in host RAM behind an on-device LRU cache.

Only the names are the seed's: the addressing stays the official one (DESIGN.md §2), so hash ids
differ from the seed's (it hashes raw ids without the compression table and starts each head's
prime search at ``engram_table_size[i] // n_head_per_ngram``; here every head's prime is the next
unused one above ``engram_table_size[i]``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from engram.config import EngramConfig
from engram.core.hashing import NgramHashMapping
from engram.nn.module import Engram, EngramLayerState
from engram.storage.tables import HostMultiHeadEmbedding


class LayerHashes(dict):
    """``{layer_id: hash ids}`` that also remembers each layer's table sizes.

    The seed documents pass this whole dict to every ``EngramModule``; since every head's prime is
    unique across layers, a module finds its own entry by its table sizes.
    """

    table_sizes: dict[int, list[int]]


class AdapterTokenizer:
    """Seed interface for a tokenizer that is not a transformers one: subclass it and implement
    ``decode([id])``, ``convert_ids_to_tokens(id)`` and ``__len__``; that is all
    :class:`~engram.core.tokenizer.CompressedTokenizer` reads to build its table.
    """

    def decode(self, tokens: list[int], *args: Any, **kwargs: Any) -> str:
        raise NotImplementedError(f"{type(self).__name__} must implement decode(ids) -> str")

    def convert_ids_to_tokens(self, ids: list[int] | int, *args: Any, **kwargs: Any) -> str:
        raise NotImplementedError(f"{type(self).__name__} must implement convert_ids_to_tokens(id) -> str")

    def __len__(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} must implement __len__ (the number of ids)")


class EngramTokenizer(NgramHashMapping):
    """Seed alias of :class:`NgramHashMapping`: ``EngramTokenizer(config, hf_tokenizer, layer_ids=[...])``."""

    @property
    def vocab_distributions(self) -> dict[int, list[list[int]]]:
        """``{layer_id: [[prime table size per head] per order]}`` (= ``table_sizes``)."""
        return self.table_sizes

    def compress_and_hash(self, input_ids: Any, layer_id: int | None = None,
                          return_tensors: str | None = None) -> Any:
        """Hash raw ids ``(B, T)``; one layer's ``(B, T, H)`` if ``layer_id`` else a dict.

        ``return_tensors`` is ``"pt"`` or ``"np"`` (default: the kind of ``input_ids``).
        """
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
        as_np = return_tensors == "np" or (return_tensors is None and not isinstance(input_ids, torch.Tensor))
        if not isinstance(input_ids, (torch.Tensor, np.ndarray)):
            input_ids = np.asarray(input_ids)
        if layer_id is not None and layer_id not in self.table_sizes:
            raise ValueError(f"layer_id={layer_id} is not one of this tokenizer's layers {self.layer_ids}")
        out = LayerHashes(self.hash(input_ids))
        if as_np:
            out = LayerHashes({k: v.cpu().numpy() for k, v in out.items()})
        out.table_sizes = {k: [p for order in v for p in order] for k, v in self.table_sizes.items()}
        return out[layer_id] if layer_id is not None else out


class EngramModule(Engram):
    """Seed alias of :class:`Engram`: ``EngramModule(config, vocab_sizes)``.

    ``vocab_sizes`` is ``EngramTokenizer.vocab_distributions[layer_id]`` (or one int used for
    every head). ``layer_id`` is needed only to pick this layer out of a dict of hash ids.
    """

    def __init__(self, config: EngramConfig | None = None, layer_vocab_sizes: Any = None,
                 layer_id: int | None = None, **kwargs: Any):
        config = EngramConfig() if config is None else config
        if "vocab_sizes" in kwargs:
            layer_vocab_sizes = kwargs.pop("vocab_sizes")
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}")
        if layer_vocab_sizes is None:
            raise ValueError("EngramModule needs the layer's table sizes (vocab_sizes)")
        if isinstance(layer_vocab_sizes, int):
            layer_vocab_sizes = [[layer_vocab_sizes] * config.n_head_per_ngram] * config.n_orders
        # An offloaded table is created once, on the host: the in-module one is never allocated.
        super().__init__(config, -1 if layer_id is None else layer_id, layer_vocab_sizes,
                         table_device="meta" if config.use_offload else None)
        self.cfg = config
        if config.use_offload:
            from engram.storage.offload import OffloadMultiHeadEmbedding  # noqa: PLC0415 - optional storage layer

            self.memory = OffloadMultiHeadEmbedding(self.memory.sizes, self.memory.embedding_dim,
                                                    cache_size=config.offload_cache_lines,
                                                    init_std=0.0 if config.lite else 1.0, sparse=config.sparse_grad)

    @property
    def conv(self) -> nn.Conv1d:
        """The seed's name of the short conv's depthwise ``nn.Conv1d`` (zero-initialised; here it
        has no bias and dilation ``max_ngram_size``, as the reference)."""
        return self.short_conv.conv  # (an AttributeError without one: use_short_conv=False or lite=True)

    def lookup(self, hash_ids: torch.Tensor) -> torch.Tensor:
        """As :meth:`Engram.lookup`, also when the table sits on another device than the rest of the
        module (the seed's ``module.to("cuda"); module.memory.cpu()``): the ids go to the table's
        device and the rows come back, gradients included."""
        where = self.memory.offsets.device  # the table's device (offsets move with it)
        return super().lookup(hash_ids.to(where)).to(hash_ids.device)  # (B, T, E)

    def forward(self, hidden_states: torch.Tensor, hash_ids: Any, state: EngramLayerState | None = None,
                token_mask: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(hash_ids, dict):
            mine = [k for k, v in getattr(hash_ids, "table_sizes", {}).items() if v == self.memory.sizes]
            if self.layer_id in hash_ids:
                hash_ids = hash_ids[self.layer_id]
            elif len(mine) == 1:
                hash_ids = hash_ids[mine[0]]
            elif len(hash_ids) == 1:
                hash_ids = next(iter(hash_ids.values()))
            else:
                raise ValueError(
                    f"hash_ids holds layers {sorted(hash_ids)}; build EngramModule(..., layer_id=L) to pick one"
                )
        if isinstance(hash_ids, np.ndarray):
            hash_ids = torch.from_numpy(hash_ids)
        return super().forward(hidden_states, hash_ids.to(hidden_states.device), state, token_mask)


class OffloadEmbedding(HostMultiHeadEmbedding):
    """Seed API: an ``nn.Embedding`` whose table stays in host RAM behind an on-device LRU cache.

    It is :class:`~engram.storage.tables.HostMultiHeadEmbedding` with one head:
    ``forward(ids (*S)) -> rows (*S, d)`` on ``device``, bit-identical to ``nn.Embedding`` with the
    same weight, however many distinct ids a call needs (misses are read from the host table).
    The table is read-only (no gradient), as the seed's.

    Args:
        num_embeddings, embedding_dim, padding_idx, sparse, _weight, dtype: as ``nn.Embedding``
            (a fresh table is initialised as ``nn.Embedding`` does: N(0, 1), padding row zero).
        cache_lines: rows cached on ``device``; default ``int(0.1 * num_embeddings)`` (the seed's),
            at most ``num_embeddings``; 0 means no cache.
        device: where outputs and the cache live; default CUDA when available, else CPU.
        max_norm, norm_type, scale_grad_by_freq: accepted for the ``nn.Embedding`` signature; a
            read-only table cannot renormalise rows in place, so ``max_norm`` must be ``None``.

    Attributes: ``weight`` (the host table, ``(num_embeddings, d)`` on CPU) and ``cache_weight``
    (the cache rows on ``device``, or ``None`` without a cache).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, cache_lines: int | None = None,
                 padding_idx: int | None = None, max_norm: float | None = None, norm_type: float = 2.0,
                 scale_grad_by_freq: bool = False, sparse: bool = False, _weight: torch.Tensor | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        if max_norm is not None:
            raise ValueError(f"OffloadEmbedding(max_norm={max_norm!r}): its host table is read-only and cannot be "
                             "renormalised in place; use max_norm=None")
        # nn.Embedding validates the sizes, _weight and padding_idx and initialises a fresh table.
        spec = nn.Embedding(num_embeddings, embedding_dim, padding_idx, _weight=_weight, dtype=dtype,
                            device="cpu" if _weight is None else None)
        if cache_lines is None:
            cache_lines = int(num_embeddings * 0.1)
        if isinstance(cache_lines, bool) or not isinstance(cache_lines, int) or cache_lines < 0:
            raise ValueError(f"cache_lines must be an int >= 0 or None, got {cache_lines!r}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        super().__init__([num_embeddings], embedding_dim, weight=spec.weight, cache_rows=min(cache_lines, num_embeddings),
                         device=device, sparse=sparse, requires_grad=False)
        self.num_embeddings, self.padding_idx = num_embeddings, spec.padding_idx
        self.max_norm, self.norm_type, self.scale_grad_by_freq = None, norm_type, scale_grad_by_freq

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, cache_lines: int | None = None) -> "OffloadEmbedding":
        """An ``OffloadEmbedding`` holding a copy of ``emb``'s table; outputs on ``emb``'s device if that
        is a CUDA one, else on the default device (as the seed's)."""
        device = emb.weight.device if emb.weight.device.type == "cuda" else None
        return cls(emb.num_embeddings, emb.embedding_dim, cache_lines, padding_idx=emb.padding_idx,
                   max_norm=emb.max_norm, norm_type=emb.norm_type, scale_grad_by_freq=emb.scale_grad_by_freq,
                   sparse=emb.sparse, _weight=emb.weight.detach(), device=device)

    @property
    def weight(self) -> torch.Tensor:
        """The host table ``(num_embeddings, d)`` (CPU; pinned when CUDA is present)."""
        return self.embedding.weight

    @property
    def cache_weight(self) -> torch.Tensor | None:
        """The cached rows ``(cache_lines, d)`` on the output device (``None`` without a cache)."""
        return None if self.cache is None else self.cache.data

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Embedding's name
        """ids ``(*S)`` -> rows ``(*S, d)``."""
        if isinstance(input, np.ndarray):
            input = torch.from_numpy(input)
        return super().forward(input.unsqueeze(-1)).squeeze(-2)  # (*S, 1) -> (*S, 1, d) -> (*S, d)

    def extra_repr(self) -> str:
        cache = self.cache.capacity if self.cache is not None else 0
        return f"{self.num_embeddings}, {self.embedding_dim}, cache_lines={cache}, padding_idx={self.padding_idx}"
