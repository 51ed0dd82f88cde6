"""Engram tables outside the module: host RAM or a memory-mapped file, with a hot-row cache.

Shapes: B batch, T time, H heads per layer, d row width, N rows of the flat table,
U distinct rows of one lookup, C cache rows.

Offloading changes where rows live, never the numbers (DESIGN.md §4): every storage module here
has :class:`~engram.nn.memory.MultiHeadEmbedding`'s contract (``forward(hash_ids (B, T, H)) ->
(B, T, H, d)`` and the attributes ``sizes, offsets, embedding_dim, num_heads, num_rows,
check_hash_ids, flat_rows``) and is swapped in for ``engram_module.memory``:

- :class:`HostMultiHeadEmbedding`: the table in CPU RAM (pinned when CUDA is present).
- :class:`DiskMultiHeadEmbedding`: the table in a file (header + page-aligned parts), read
  through a read-only ``numpy.memmap`` so only touched rows are paged in; a table larger than
  RAM works. Writes go through ``os.pwrite`` (a full disk is an ``OSError``, not a SIGBUS) into
  a temporary file that replaces the target only when complete.
- :class:`HotRowCache`: optional on-device cache of ``cache_rows`` rows (LRU or LFU) with hit
  statistics; a lookup is served from cache hits plus storage misses, so outputs are
  bit-identical with or without it, even when one batch needs more rows than it holds.
- ``quantize="int8" | "fp8"`` stores codes + scales (:mod:`engram.storage.quant`), dequantised on gather.
- :func:`offload` swaps the storage of every Engram module of a model;
  ``OffloadMultiHeadEmbedding(sizes, dim, cache_size)`` + ``.preload(hash_ids)`` is the seed API.

Training: a host table without cache or quantisation stays an ``nn.Parameter``
(``memory.embedding.weight``, on the CPU) and is updated in place by the optimizer from its
(sparse, if the config says ``sparse_grad``) gradient. Disk, cached or quantised tables are
read-only: a forward with gradients in training mode raises ``RuntimeError``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engram.core.hashing import NgramHashMapping
from engram.storage.cache import HotRowCache
from engram.storage.prefetch import Prefetcher
from engram.storage.quant import make_codec
from engram.storage.stores import DiskRowStore, HostRowStore
from engram.storage.tables import (DiskMultiHeadEmbedding, HostMultiHeadEmbedding, OffloadedMultiHeadEmbedding,
                                   OffloadMultiHeadEmbedding, engram_modules, hash_mappings)

__all__ = [
    "DiskMultiHeadEmbedding", "DiskRowStore", "HostMultiHeadEmbedding", "HostRowStore", "HotRowCache",
    "OffloadMultiHeadEmbedding", "OffloadedMultiHeadEmbedding", "cache_stats", "engram_modules", "hash_mappings",
    "offload", "table_fingerprint", "table_path",
]


def table_fingerprint(hashing: NgramHashMapping | None, layer_id: int, sizes: list[int], dim: int) -> str:
    """Digest of what a layer's table rows mean: layer, seed, multipliers (tokenizer), sizes, width."""
    info: dict[str, Any] = {"layer_id": int(layer_id), "sizes": [int(s) for s in sizes], "dim": int(dim)}
    if hashing is not None:
        info["multipliers"] = hashing.multipliers.get(layer_id)
        info["max_ngram_size"] = hashing.config.max_ngram_size
        info["compressed_vocab"] = len(hashing.compressed)
    return hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]


def table_path(path: str | os.PathLike, layer_id: int) -> Path:
    """File of layer ``layer_id``'s table in an offload directory."""
    return Path(path) / f"engram_layer{int(layer_id)}.table"


def offload(model: nn.Module, where: str = "host", path: str | os.PathLike | None = None, cache_rows: int = 0,
            quantize: str | None = None, cache_policy: str = "lru", prefetch: bool = False) -> nn.Module:
    """Move every Engram table of ``model`` to host RAM or disk (in place; returns ``model``).

    Args:
        model: an ``EngramGPT`` or anything holding :class:`~engram.nn.module.Engram` modules.
        where: ``"host"`` (CPU RAM, pinned with CUDA) or ``"disk"`` (one file per layer under ``path``).
        path: directory for ``where="disk"``. A table still on the meta device (a model built on
            ``torch.device("meta")``) is *opened* from ``path`` and checked against the config;
            a materialised one is written there (atomically, replacing an older file).
        cache_rows: rows of the on-device hot-row cache per layer (0: none).
        quantize: ``None | "int8" | "fp8"``: store codes + scales, dequantised on gather.
        cache_policy: ``"lru"`` or ``"lfu"``.
        prefetch: attach a :class:`engram.storage.prefetch.Prefetcher` (``model.engram_prefetcher``) that
            gathers every layer's rows as soon as the ids are hashed.
    """
    if where not in ("host", "disk"):
        raise ValueError(f"where must be 'host' or 'disk', got {where!r}")
    if where == "disk" and path is None:
        raise ValueError("where='disk' needs path= (a directory for the table files)")
    if where == "host" and path is not None:
        raise ValueError("path= is only used with where='disk'")
    make_codec(quantize, 8)  # validates quantize early
    engrams = engram_modules(model)
    if not engrams:
        raise ValueError(f"{type(model).__name__} has no Engram modules to offload")
    hashing = next(iter(hash_mappings(model)), None)
    for e in engrams:
        mem = e.memory
        if isinstance(mem, OffloadedMultiHeadEmbedding):
            raise ValueError(f"the Engram table of layer {e.layer_id} is already offloaded ({type(mem).__name__})")
        weight = mem.embedding.weight
        sizes, dim = list(mem.sizes), int(mem.embedding_dim)
        device = torch.device("cpu") if mem.offsets.is_meta else mem.offsets.device
        common = dict(cache_rows=cache_rows, cache_policy=cache_policy, device=device)
        if where == "host":
            new: OffloadedMultiHeadEmbedding = HostMultiHeadEmbedding(
                sizes, dim, weight=weight, quantize=quantize, sparse=mem.embedding.sparse, **common)
        else:
            fp = table_fingerprint(hashing, e.layer_id, sizes, dim)
            file = table_path(path, e.layer_id)
            if weight.is_meta:
                new = DiskMultiHeadEmbedding(file, sizes, dim, fp, quantize, **common)
            else:
                new = DiskMultiHeadEmbedding.write(file, weight, sizes, quantize, fp,
                                                   table_requires_grad=weight.requires_grad, **common)
        new.train(mem.training)
        e.memory = new
    if prefetch:
        model.engram_prefetcher = Prefetcher(model)
    return model


def cache_stats(model: nn.Module) -> dict[int, dict[str, float]]:
    """``{layer_id: hit statistics}`` of every cached offloaded table in ``model``."""
    out = {}
    for e in engram_modules(model):
        stats = e.memory.cache_stats()
        if stats is not None:
            out[e.layer_id] = stats
    return out
