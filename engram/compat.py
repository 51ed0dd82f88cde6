"""The seed documents' API, as thin aliases over the library's classes.

``EngramTokenizer`` is :class:`~engram.core.hashing.NgramHashMapping` with the seed spelling
(``vocab_distributions``, ``compress_and_hash``); ``EngramModule`` is
:class:`~engram.nn.module.Engram` built from a layer's table sizes (``vocab_sizes``) and callable as
``module(hidden_states, hash_ids)`` where ``hash_ids`` may be the per-layer dict.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from engram.config import EngramConfig
from engram.core.hashing import NgramHashMapping
from engram.nn.module import Engram, EngramLayerState


class LayerHashes(dict):
    """``{layer_id: hash ids}`` that also remembers each layer's table sizes.

    The seed documents pass this whole dict to every ``EngramModule``; since every head's prime is
    unique across layers, a module finds its own entry by its table sizes.
    """

    table_sizes: dict[int, list[int]]


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
