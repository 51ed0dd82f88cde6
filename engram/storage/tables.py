"""Storage modules with :class:`~engram.nn.memory.MultiHeadEmbedding`'s contract, for tables that live
outside the module: in host RAM (:class:`HostMultiHeadEmbedding`) or in a memory-mapped file
(:class:`DiskMultiHeadEmbedding`), with an optional hot-row cache and quantised rows.

Shapes: B batch, T time, H heads per layer, d row width, N rows of the flat table,
U distinct rows of one lookup.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from engram.core.hashing import NgramHashMapping
from engram.nn.memory import MultiHeadEmbedding, TableStorage
from engram.nn.module import Engram
from engram.storage.cache import HotRowCache
from engram.storage.quant import RowCodec, make_codec
from engram.storage.stores import DiskRowStore, HostRowStore, _cuda_present


class OffloadedMultiHeadEmbedding(TableStorage):
    """Base of the storage modules: flat-row addressing, cache, prefetch hand-off, training guard.

    Subclasses set ``self.store`` (``fetch(rows) -> parts``, ``put``) and ``self.codec``. Output
    rows are on the device of the ``offsets`` buffer (it moves with ``model.to(...)``; the
    stored table does not).
    """

    def __init__(self, sizes: list[int], codec: RowCodec, cache_rows: int = 0, cache_policy: str = "lru",
                 device: torch.device | str | None = None, table_requires_grad: bool = False):
        super().__init__(sizes, device)
        if not isinstance(cache_rows, int) or isinstance(cache_rows, bool) or cache_rows < 0:
            raise ValueError(f"cache_rows must be an int >= 0, got {cache_rows!r}")
        self.codec = codec
        self.cache = (HotRowCache(cache_rows, codec.dim, codec.dtype, cache_policy, device)
                      if cache_rows else None)
        self.table_requires_grad = table_requires_grad
        self._pending: tuple[torch.Tensor, Any] | None = None  # (hash_ids, future) from a Prefetcher
        self.prefetch_used = 0  # forwards served by a prefetched gather

    # ---------------------------------------------------------------- MultiHeadEmbedding contract
    @property
    def embedding_dim(self) -> int:
        return self.codec.dim

    @property
    def device(self) -> torch.device:
        return self.offsets.device

    def flat_rows(self, hash_ids: torch.Tensor) -> torch.Tensor:
        """Per-head row index -> row of the flat table, ``(..., H)``."""
        return hash_ids.to(self.device) + self.offsets  # (..., H)

    @property
    def trainable(self) -> bool:
        """Whether gradients reach the stored table (only plain host tables without cache)."""
        return False

    @property
    def table_weight(self) -> nn.Parameter | None:
        """The host table as an ``nn.Parameter`` (plain host storage only), else ``None``."""
        emb = self._modules.get("embedding")
        return emb.weight if emb is not None else None

    def forward(self, hash_ids: torch.Tensor) -> torch.Tensor:
        """``(B, T, H)`` per-head rows -> ``(B, T, H, d)`` rows, equal to the in-memory module's."""
        self.check_hash_ids(hash_ids)
        prefetched = self._take_prefetched(hash_ids)
        if torch.is_grad_enabled() and self.table_requires_grad:
            if self.trainable:
                return self._grad_forward(hash_ids)
            if self.training:
                raise RuntimeError(
                    f"{type(self).__name__} (cache_rows={self.cache.capacity if self.cache else 0}, "
                    f"quantize={self.codec.name}) is read-only and cannot train its table; use model.eval() "
                    "or torch.no_grad() for inference, or offload(where='host') without cache_rows/quantize "
                    "to train the table in place with (sparse) gradients"
                )
        if prefetched is None:
            return self.gather(hash_ids)
        self.prefetch_used += 1
        return prefetched

    def _grad_forward(self, hash_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ---------------------------------------------------------------- gathering
    def fetch(self, rows: torch.Tensor) -> torch.Tensor:
        """Flat rows ``(U,)`` -> decoded rows ``(U, d)`` on :attr:`device`, from storage."""
        parts = self.store.fetch(rows.to("cpu"))
        if self.device.type != "cpu":  # move codes, not dequantised floats: less to transfer
            parts = {k: v.to(self.device, non_blocking=True) for k, v in parts.items()}
        return self.codec.decode(parts)

    @torch.no_grad()
    def gather(self, hash_ids: torch.Tensor) -> torch.Tensor:
        """``(B, T, H)`` -> ``(B, T, H, d)`` through the cache (if any) and storage."""
        flat = self.flat_rows(hash_ids)  # (B, T, H)
        d = self.embedding_dim
        if self.cache is None:
            return self.fetch(flat.reshape(-1)).view(*flat.shape, d)  # (B, T, H, d)
        uniq, inv, counts = torch.unique(flat.reshape(-1), return_inverse=True, return_counts=True)  # (U,)
        slot = self.cache.lookup(uniq)  # (U,)
        hit = slot >= 0
        out = torch.empty(uniq.numel(), d, dtype=self.codec.dtype, device=self.device)  # (U, d)
        out[hit] = self.cache.data[slot[hit]]
        miss = (~hit).nonzero().squeeze(1)
        values = self.fetch(uniq[miss]) if miss.numel() else out[:0]  # (n_miss, d)
        out[miss] = values
        self.cache.admit(uniq, slot, counts, values)
        return out[inv].view(*flat.shape, d)  # (B, T, H, d)

    def preload(self, hash_ids: Any) -> None:
        """Bring the rows of ``hash_ids`` ((B, T, H) tensor/array, or a one-layer dict) into the cache."""
        if isinstance(hash_ids, dict):
            if len(hash_ids) != 1:
                raise ValueError(f"preload got hash ids of layers {sorted(hash_ids)}; pass one layer's (B, T, H)")
            hash_ids = next(iter(hash_ids.values()))
        if isinstance(hash_ids, np.ndarray):
            hash_ids = torch.from_numpy(hash_ids)
        self.check_hash_ids(hash_ids)
        if self.cache is not None:
            self.gather(hash_ids)

    # ---------------------------------------------------------------- prefetch hand-off
    def start_prefetch(self, hash_ids: torch.Tensor, prefetcher: Any) -> None:
        """Begin gathering ``hash_ids`` in the background (called by :class:`engram.storage.prefetch.Prefetcher`)."""
        self._wait_pending()
        if torch.is_grad_enabled() and self.trainable and self.table_requires_grad:
            return  # the forward must build a graph; nothing to fetch ahead
        self._pending = (hash_ids, prefetcher.submit(self.gather, hash_ids))

    def _wait_pending(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._pending is None:
            return None
        key, fut = self._pending
        self._pending = None
        return key, fut.result()  # result() joins the stream/event (see Prefetcher.submit)

    def _take_prefetched(self, hash_ids: torch.Tensor) -> torch.Tensor | None:
        got = self._wait_pending()  # always wait: the cache must be idle before anything else
        if got is None:
            return None
        key, rows = got
        same = key is hash_ids or (key.shape == hash_ids.shape and key.device == hash_ids.device
                                   and torch.equal(key, hash_ids))
        return rows if same else None

    # ---------------------------------------------------------------- updates / export
    @torch.no_grad()
    def write_rows(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite flat rows ``(U,)`` with ``values`` ``(U, d)`` (encoded); cached rows are refreshed."""
        rows = rows.to("cpu", torch.long)
        self.store.put(rows, self.codec.encode(values))
        if self.cache is not None:
            self.cache.invalidate()

    @torch.no_grad()
    def to_memory(self, chunk_rows: int = 1 << 16) -> MultiHeadEmbedding:
        """An in-memory :class:`MultiHeadEmbedding` with the stored (dequantised) rows."""
        mem = MultiHeadEmbedding(self.sizes, self.embedding_dim, init_std=0.0, device=self.device,
                                 dtype=self.codec.dtype)
        for start in range(0, self.num_rows, chunk_rows):
            rows = torch.arange(start, min(start + chunk_rows, self.num_rows))
            mem.embedding.weight[start : start + rows.numel()] = self.fetch(rows)
        return mem

    def storage_bytes(self) -> int:
        """Bytes the stored table takes (codes + scales; file size for disk)."""
        return self.store.nbytes()

    def cache_stats(self) -> dict[str, float] | None:
        return None if self.cache is None else self.cache.stats()

    def extra_repr(self) -> str:
        cache = f", cache_rows={self.cache.capacity} ({self.cache.policy})" if self.cache else ""
        return f"sizes={self.sizes}, dim={self.embedding_dim}, quantize={self.codec.name}{cache}"


class HostMultiHeadEmbedding(OffloadedMultiHeadEmbedding):
    """The table in CPU RAM (pinned when CUDA is present); rows are sent to ``device`` on gather.

    Args:
        sizes: rows of each head's table.
        dim: row width d.
        weight: the table ``(N, d)`` to take over (copied to host; ``None``: zeros).
        quantize: ``None | "int8" | "fp8" | "fp8_e8m0"``.
        cache_rows: rows of the on-device hot-row cache (0: none).
        cache_policy: ``"lru"`` or ``"lfu"``.
        device: where outputs (and the cache) live; ``model.to()`` moves it.
        sparse: sparse gradients, as the in-memory table's ``sparse_grad``.
        requires_grad: train the table (only without cache and quantisation; see module doc).
    """

    def __init__(self, sizes: list[int], dim: int, weight: torch.Tensor | None = None, quantize: str | None = None,
                 cache_rows: int = 0, cache_policy: str = "lru", device: torch.device | str | None = None,
                 sparse: bool = False, requires_grad: bool | None = None):
        n = sum(int(s) for s in sizes)
        if weight is not None and tuple(weight.shape) != (n, dim):
            raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({n}, {dim}) for sizes {sizes}")
        if weight is not None and weight.is_meta:
            raise ValueError("the table is on the meta device (not materialised); nothing to move to host")
        dtype = weight.dtype if weight is not None else torch.float32
        codec = make_codec(quantize, dim, dtype)
        wants_grad = bool(weight.requires_grad if weight is not None else False) if requires_grad is None else requires_grad
        super().__init__(sizes, codec, cache_rows, cache_policy, device, table_requires_grad=wants_grad)
        self.sparse = sparse
        src = weight.detach() if weight is not None else torch.zeros(n, dim, dtype=dtype)
        if codec.name == "none":
            host = src.to("cpu", copy=True)
            if _cuda_present():
                host = host.pin_memory()
            # Same name as MultiHeadEmbedding's table, so table_parameters()/state_dict keep working.
            self.embedding = nn.Embedding(n, dim, _weight=host, _freeze=not (wants_grad and self.trainable),
                                          sparse=sparse)
            self.store = HostRowStore({"weight": self.embedding.weight.data})
        else:
            parts = codec.encode(src)
            if _cuda_present():
                parts = {k: v.pin_memory() for k, v in parts.items()}
            self.store = HostRowStore(parts)

    @property
    def trainable(self) -> bool:
        return self.codec.name == "none" and self.cache is None

    @property
    def sparse_grad(self) -> bool:
        return self.sparse

    def _grad_forward(self, hash_ids: torch.Tensor) -> torch.Tensor:
        flat = (hash_ids.to("cpu") + self.offsets.to("cpu"))  # (B, T, H)
        return F.embedding(flat, self.embedding.weight, sparse=self.sparse).to(self.device)  # (B, T, H, d)

    def _apply(self, fn, recurse=True):
        # model.to()/cuda()/half() move offsets and cache, never the host table.
        host = self._modules.pop("embedding", None)
        try:
            return super()._apply(fn, recurse)
        finally:
            if host is not None:
                self._modules["embedding"] = host


class DiskMultiHeadEmbedding(OffloadedMultiHeadEmbedding):
    """The table in a memory-mapped file; only the rows a lookup touches are read.

    ``DiskMultiHeadEmbedding(path, ...)`` opens an existing file and checks it against the given
    expectations (``sizes``, ``dim``, ``fingerprint``, ``quantize``) and, with ``verify=True``
    (default), against the checksum of its rows (the whole file is read once; ``verify=False``
    skips it for huge tables); :meth:`write` makes one from a tensor and :meth:`create_empty` a
    sparse all-zero one (for tables larger than RAM). Read-only for training (see the module doc);
    :meth:`write_rows` updates rows in place and marks the file dirty until :meth:`flush` /
    :meth:`close` (or garbage collection, or interpreter exit) re-seals it with a fresh checksum
    (:mod:`engram.storage.tablefile`).
    """

    def __init__(self, path: str | os.PathLike, sizes: list[int] | None = None, dim: int | None = None,
                 fingerprint: str | None = None, quantize: str | None = None, cache_rows: int = 0,
                 cache_policy: str = "lru", device: torch.device | str | None = None,
                 table_requires_grad: bool = False, verify: bool = True, _store: DiskRowStore | None = None):
        codec_name = None if quantize is None else str(quantize)
        store = _store or DiskRowStore.open(path, sizes, dim, fingerprint,
                                            "none" if codec_name is None else codec_name, verify=verify)
        super().__init__(store.header["sizes"], store.codec(), cache_rows, cache_policy, device,
                         table_requires_grad=table_requires_grad)
        self.store = store
        self.path = Path(path)

    @classmethod
    def write(cls, path: str | os.PathLike, weight: torch.Tensor, sizes: list[int], quantize: str | None = None,
              fingerprint: str | None = None, **kwargs: Any) -> "DiskMultiHeadEmbedding":
        """Write ``weight`` ``(N, d)`` to ``path`` (atomically) and open it; ``kwargs`` as the constructor."""
        codec = make_codec(quantize, weight.shape[1], weight.dtype)
        store = DiskRowStore.create(path, codec, sizes, fingerprint, source=weight.detach())
        return cls(path, quantize=quantize, _store=store, **kwargs)

    @classmethod
    def create_empty(cls, path: str | os.PathLike, sizes: list[int], dim: int, quantize: str | None = None,
                     fingerprint: str | None = None, dtype: torch.dtype = torch.float32,
                     **kwargs: Any) -> "DiskMultiHeadEmbedding":
        """A sparse all-zero table file (no disk used until rows are written with :meth:`write_rows`)."""
        store = DiskRowStore.create(path, make_codec(quantize, dim, dtype), sizes, fingerprint)
        return cls(path, quantize=quantize, _store=store, **kwargs)

    def drop_page_cache(self) -> None:
        """Evict the file from the OS page cache (for cold-cache measurements)."""
        self.store.drop_page_cache()

    def flush(self) -> None:
        """After :meth:`write_rows`: fsync and re-seal the file (fresh checksum, clean header)."""
        self.store.flush()

    def close(self) -> None:
        """Flush, unmap and close the file; the module cannot gather afterwards."""
        self.store.close()


class OffloadMultiHeadEmbedding(HostMultiHeadEmbedding):
    """Seed API: ``OffloadMultiHeadEmbedding(sizes, dim, cache_size)``, a host table + on-device LRU cache.

    The table is freshly initialised like :class:`MultiHeadEmbedding` (normal, std ``init_std``).
    ``cache_size`` rows are cached on ``device`` (``None``/0: no cache; then the table is a
    trainable host parameter). Use :meth:`preload` to warm the cache from hash ids.
    """

    def __init__(self, sizes: list[int], dim: int, cache_size: int | None = None,
                 device: torch.device | str | None = None, init_std: float = 1.0, sparse: bool = False):
        n = sum(int(s) for s in sizes)
        weight = torch.randn(n, dim) * init_std if init_std else torch.zeros(n, dim)
        super().__init__(sizes, dim, weight=weight, cache_rows=int(cache_size or 0), device=device,
                         sparse=sparse, requires_grad=not cache_size)


# ====================================================================================== model-level


def engram_modules(model: nn.Module) -> list[Engram]:
    """Every :class:`~engram.nn.module.Engram` inside ``model`` (EngramGPT, the HF wrapper, ...)."""
    return [m for m in model.modules() if isinstance(m, Engram)]


def hash_mappings(model: nn.Module) -> list[NgramHashMapping]:
    """The :class:`NgramHashMapping` objects of ``model``: submodules, or a plain ``.hashing``
    attribute (the transformers wrapper keeps it outside the module tree)."""
    found: dict[int, NgramHashMapping] = {}
    for m in model.modules():
        for h in (m, getattr(m, "hashing", None)):
            if isinstance(h, NgramHashMapping):
                found.setdefault(id(h), h)
    return list(found.values())
