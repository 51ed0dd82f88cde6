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

import errno
import hashlib
import json
import mmap
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from engram.core.hashing import NgramHashMapping
from engram.nn.memory import MultiHeadEmbedding
from engram.nn.module import Engram
from engram.storage.quant import RowCodec, make_codec

_MAGIC = b"ENGRAMTB"
_VERSION = 1
_ALIGN = 4096
_NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64,
              torch.int8: np.int8, torch.uint8: np.uint8}


def _cuda_present() -> bool:
    return torch.cuda.is_available()


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


# ====================================================================================== stores
class HostRowStore:
    """Parts ``{name: (N, n)}`` of a table as CPU tensors (pinned when CUDA is present)."""

    def __init__(self, parts: dict[str, torch.Tensor]):
        self.parts = parts

    def fetch(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """CPU row ids ``(U,)`` -> parts of those rows (in pinned staging when CUDA is present).

        ``index_select`` runs in C++ without the GIL, so a prefetch thread overlaps the model.
        """
        out = {}
        for name, src in self.parts.items():
            if _cuda_present():
                buf = torch.empty((rows.numel(), src.shape[1]), dtype=src.dtype, pin_memory=True)
                out[name] = torch.index_select(src, 0, rows, out=buf)  # (U, n)
            else:
                out[name] = src.index_select(0, rows)  # (U, n)
        return out

    def put(self, rows: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        """Overwrite rows ``(U,)`` in place."""
        with torch.no_grad():
            for name, src in self.parts.items():
                src.index_copy_(0, rows, parts[name].to(src.dtype))

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parts.values())


class DiskRowStore(HostRowStore):
    """A table file: a JSON header, then each part's rows at a page-aligned offset.

    Reads gather from tensors over read-only memory maps (only touched pages are read); writes go
    through ``os.pwrite``. Open with :meth:`open`, make with :meth:`create`.
    """

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path, self.header = path, header
        self.num_rows = int(header["num_rows"])
        self._map()

    # ---------------------------------------------------------------- file format
    @staticmethod
    def layout(codec: RowCodec, num_rows: int) -> tuple[dict[str, dict[str, Any]], int]:
        """``({part: {dtype, cols, offset}}, file_size)`` of a table of ``num_rows`` rows."""
        parts, off = {}, _ALIGN  # the header owns the first page (more if it is long)
        for name, (dtype, cols) in codec.parts().items():
            if dtype not in _NP_DTYPES:
                raise TypeError(f"{dtype} tables cannot be stored on disk; use float32/float16 or quantize")
            parts[name] = {"dtype": str(dtype).removeprefix("torch."), "cols": cols, "offset": off}
            off = _align(off + num_rows * cols * dtype.itemsize)
        return parts, off

    @classmethod
    def create(cls, path: str | os.PathLike, codec: RowCodec, sizes: list[int], fingerprint: str | None,
               source: torch.Tensor | None = None, chunk_rows: int = 1 << 16) -> "DiskRowStore":
        """Write a table file atomically and open it.

        ``source`` ``(N, d)`` is encoded chunk by chunk; ``None`` leaves a sparse all-zero file
        (``ftruncate``; no disk space used until rows are written). The file is built as
        ``<path>.tmp-<pid>`` and renamed over ``path`` only when complete, so an error (a full
        disk included) leaves any previous file untouched.
        """
        path = Path(path)
        num_rows = sum(sizes)
        if source is not None and tuple(source.shape) != (num_rows, codec.dim):
            raise ValueError(f"source has shape {tuple(source.shape)}, expected ({num_rows}, {codec.dim})")
        parts, file_size = cls.layout(codec, num_rows)
        header = {"format": "engram-table", "version": _VERSION, "sizes": [int(s) for s in sizes],
                  "dim": codec.dim, "num_rows": num_rows, "codec": codec.config(), "fingerprint": fingerprint,
                  "parts": parts, "file_size": file_size}
        blob = json.dumps(header).encode()
        head = _MAGIC + len(blob).to_bytes(8, "little") + blob
        if len(head) > _ALIGN:  # huge size lists: move the data back by whole pages
            shift = _align(len(head)) - _ALIGN
            for p in parts.values():
                p["offset"] += shift
            header["file_size"] = file_size = file_size + shift
            blob = json.dumps(header).encode()
            head = _MAGIC + len(blob).to_bytes(8, "little") + blob
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, file_size)  # sparse: holes read as zeros
            if source is not None:
                for start in range(0, num_rows, chunk_rows):
                    enc = codec.encode(source[start : start + chunk_rows])
                    for name, p in parts.items():
                        row_bytes = p["cols"] * enc[name].element_size()
                        _pwrite_all(fd, enc[name].numpy().tobytes(), p["offset"] + start * row_bytes)
            _pwrite_all(fd, head, 0)  # header last: a half-written file never looks valid
            os.fsync(fd)
        except BaseException as exc:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise OSError(errno.ENOSPC, f"no space left on device while writing the Engram table {path} "
                              f"({file_size} bytes); the previous file, if any, is untouched") from exc
            raise
        os.close(fd)
        os.replace(tmp, path)
        return cls.open(path)

    @classmethod
    def open(cls, path: str | os.PathLike, sizes: list[int] | None = None, dim: int | None = None,
             fingerprint: str | None = None, codec: str | None = None) -> "DiskRowStore":
        """Open and validate a table file; the expectations given must match its header."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no Engram table file at {path}")
        actual = path.stat().st_size
        with open(path, "rb") as f:
            pre = f.read(16)
            if len(pre) < 16 or pre[:8] != _MAGIC:
                raise ValueError(f"{path} is not an Engram table file (bad magic)")
            n = int.from_bytes(pre[8:], "little")
            try:
                header = json.loads(f.read(n))
            except ValueError as exc:
                raise ValueError(f"{path} has a corrupt header ({exc})") from exc
        if header.get("version") != _VERSION:
            raise ValueError(f"{path} has table format version {header.get('version')}, this code reads {_VERSION}")
        if actual != header["file_size"]:
            raise ValueError(f"{path} is truncated or damaged: its header says {header['file_size']} bytes, "
                             f"the file has {actual}")
        where = f"{path} was written for another config"
        if sizes is not None and [int(s) for s in sizes] != header["sizes"]:
            raise ValueError(f"{where}: per-head table sizes {header['sizes']} != expected {list(sizes)}")
        if dim is not None and dim != header["dim"]:
            raise ValueError(f"{where}: row width {header['dim']} != expected {dim}")
        if fingerprint is not None and header.get("fingerprint") not in (None, fingerprint):
            raise ValueError(f"{where}: fingerprint {header.get('fingerprint')} != expected {fingerprint} "
                             "(different seed, layer, tokenizer or table sizes)")
        if codec is not None and header["codec"]["codec"] != codec:
            raise ValueError(f"{path} stores quantize={header['codec']['codec']!r} rows, not {codec!r}")
        return cls(path, header)

    def codec(self) -> RowCodec:
        """The codec the file was written with."""
        c = self.header["codec"]
        q = None if c["codec"] == "none" else c["codec"]
        return make_codec(q, self.header["dim"], getattr(torch, c["dtype"]), c.get("block", 32))

    # ---------------------------------------------------------------- rows
    def _map(self) -> None:
        parts = {}
        for name, p in self.header["parts"].items():
            mm = np.memmap(self.path, dtype=_NP_DTYPES[getattr(torch, p["dtype"])], mode="r",
                           offset=p["offset"], shape=(self.num_rows, p["cols"]))
            raw = getattr(mm, "_mmap", None)
            if raw is not None and hasattr(mmap, "MADV_RANDOM"):
                raw.madvise(mmap.MADV_RANDOM)  # hashed rows are random: no readahead per page fault
            with warnings.catch_warnings():  # read-only on purpose: writes go through pwrite
                warnings.simplefilter("ignore", UserWarning)
                parts[name] = torch.from_numpy(mm)  # (N, n), a view of the mapping: nothing read yet
        self.parts = parts

    def put(self, rows: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        """Overwrite rows in place with ``pwrite`` (not atomic: for updates, not for creation)."""
        fd = os.open(self.path, os.O_WRONLY)
        try:
            for name, p in self.header["parts"].items():
                data = parts[name].contiguous().numpy()
                row_bytes = data.shape[1] * data.itemsize
                for i, r in enumerate(rows.tolist()):
                    _pwrite_all(fd, data[i].tobytes(), p["offset"] + r * row_bytes)
        finally:
            os.close(fd)

    def drop_page_cache(self) -> None:
        """Evict this file from the OS page cache (cold-cache benchmarks); Linux/POSIX only."""
        self.parts = {}  # unmap first: mapped pages are not dropped
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        self._map()

    def nbytes(self) -> int:
        return int(self.header["file_size"])

    def close(self) -> None:
        """Unmap the file."""
        self.parts = {}


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


# ====================================================================================== cache
class HotRowCache(nn.Module):
    """On-device cache of ``capacity`` rows of one table, LRU or LFU (N-gram use is Zipfian).

    The cache never changes values: a lookup is split into hits (copied from here) and misses
    (fetched from storage), and at most ``capacity`` of the misses are then admitted, evicting the
    rows with the lowest score that this lookup did not use. Statistics count distinct rows per
    lookup (``hits + misses`` = rows asked for, each once per forward).
    """

    def __init__(self, capacity: int, dim: int, dtype: torch.dtype = torch.float32, policy: str = "lru",
                 device: torch.device | str | None = None):
        super().__init__()
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"cache capacity must be a positive int, got {capacity!r}")
        if policy not in ("lru", "lfu"):
            raise ValueError(f"cache policy must be 'lru' or 'lfu', got {policy!r}")
        self.capacity, self.policy = capacity, policy
        self.register_buffer("data", torch.zeros(capacity, dim, dtype=dtype, device=device), persistent=False)
        self.register_buffer("rows", torch.full((capacity,), -1, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("score", torch.zeros(capacity, dtype=torch.long, device=device), persistent=False)
        # rows sorted, and the slot of each: a lookup is one searchsorted.
        self.register_buffer("keys", torch.full((capacity,), -1, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("slots", torch.arange(capacity, device=device), persistent=False)
        self.tick = 0
        self.hits = self.misses = 0

    def lookup(self, uniq: torch.Tensor) -> torch.Tensor:
        """Sorted distinct rows ``(U,)`` -> slot of each, -1 where not cached."""
        pos = torch.searchsorted(self.keys, uniq).clamp_max_(self.capacity - 1)  # (U,)
        found = self.keys[pos] == uniq
        return torch.where(found, self.slots[pos], torch.full_like(pos, -1))

    def admit(self, uniq: torch.Tensor, slot: torch.Tensor, counts: torch.Tensor, values: torch.Tensor) -> None:
        """Record a lookup: refresh hit slots, insert misses ``values`` (n_miss, d), update stats."""
        self.tick += 1
        hit = slot >= 0
        hit_slots = slot[hit]
        n_hit = hit_slots.numel()
        self.hits += n_hit
        self.misses += uniq.numel() - n_hit
        if self.policy == "lru":
            self.score[hit_slots] = self.tick
        else:
            self.score[hit_slots] += counts[hit]
        miss = (~hit).nonzero().squeeze(1)  # (n_miss,) positions in uniq
        k = min(miss.numel(), self.capacity - n_hit)
        if k <= 0:
            return
        if k < miss.numel():  # admit the most used misses of this lookup
            order = torch.argsort(counts[miss], descending=True, stable=True)[:k]
        else:
            order = torch.arange(k, device=miss.device)
        s = self.score.clone()
        s[hit_slots] = torch.iinfo(torch.long).max  # rows this lookup uses stay
        s[self.rows < 0] = -1  # fill empty slots first
        victims = torch.topk(s, k, largest=False).indices  # (k,)
        self.data[victims] = values[order].to(self.data.dtype)
        self.rows[victims] = uniq[miss[order]]
        self.score[victims] = self.tick if self.policy == "lru" else counts[miss[order]]
        self.keys, self.slots = torch.sort(self.rows)

    def invalidate(self) -> None:
        """Forget every cached row (after the stored table changed)."""
        self.rows.fill_(-1)
        self.keys.fill_(-1)
        self.slots.copy_(torch.arange(self.capacity, device=self.slots.device))
        self.score.zero_()

    def stats(self) -> dict[str, float]:
        total = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "hit_rate": self.hits / total if total else 0.0,
                "capacity": self.capacity, "filled": int((self.rows >= 0).sum())}

    def reset_stats(self) -> None:
        self.hits = self.misses = 0


# ====================================================================================== modules
class OffloadedMultiHeadEmbedding(nn.Module):
    """Base of the storage modules: flat-row addressing, cache, prefetch hand-off, training guard.

    Subclasses set ``self.store`` (``fetch(rows) -> parts``, ``put``) and ``self.codec``. Output
    rows are on the device of the ``offsets`` buffer (it moves with ``model.to(...)``; the
    stored table does not).
    """

    def __init__(self, sizes: list[int], codec: RowCodec, cache_rows: int = 0, cache_policy: str = "lru",
                 device: torch.device | str | None = None, table_requires_grad: bool = False):
        super().__init__()
        if not sizes or min(int(s) for s in sizes) < 1:
            raise ValueError(f"sizes must be a non-empty list of positive table sizes, got {sizes!r}")
        if not isinstance(cache_rows, int) or isinstance(cache_rows, bool) or cache_rows < 0:
            raise ValueError(f"cache_rows must be an int >= 0, got {cache_rows!r}")
        self.sizes = [int(s) for s in sizes]
        self.num_heads = len(self.sizes)
        self.codec = codec
        offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).tolist()
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.long, device=device))
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
    def num_rows(self) -> int:
        return sum(self.sizes)

    @property
    def device(self) -> torch.device:
        return self.offsets.device

    check_hash_ids = MultiHeadEmbedding.check_hash_ids

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
        quantize: ``None | "int8" | "fp8"``.
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
    expectations (``sizes``, ``dim``, ``fingerprint``, ``quantize``); :meth:`write` makes one
    from a tensor and :meth:`create_empty` a sparse all-zero one (for tables larger than RAM).
    Read-only for training (see the module doc); :meth:`write_rows` updates rows in place.
    """

    def __init__(self, path: str | os.PathLike, sizes: list[int] | None = None, dim: int | None = None,
                 fingerprint: str | None = None, quantize: str | None = None, cache_rows: int = 0,
                 cache_policy: str = "lru", device: torch.device | str | None = None,
                 table_requires_grad: bool = False, _store: DiskRowStore | None = None):
        codec_name = None if quantize is None else str(quantize)
        store = _store or DiskRowStore.open(path, sizes, dim, fingerprint,
                                            "none" if codec_name is None else codec_name)
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
def table_fingerprint(hashing: NgramHashMapping | None, layer_id: int, sizes: list[int], dim: int) -> str:
    """Digest of what a layer's table rows mean: layer, seed, multipliers (tokenizer), sizes, width."""
    info: dict[str, Any] = {"layer_id": int(layer_id), "sizes": [int(s) for s in sizes], "dim": int(dim)}
    if hashing is not None:
        info["multipliers"] = hashing.multipliers.get(layer_id)
        info["max_ngram_size"] = hashing.config.max_ngram_size
        info["compressed_vocab"] = len(hashing.compressed)
    return hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]


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
        from engram.storage.prefetch import Prefetcher  # noqa: PLC0415 - prefetch imports this module

        model.engram_prefetcher = Prefetcher(model)
    return model


def cache_stats(model: nn.Module) -> dict[int, dict[str, float]]:
    """``{layer_id: hit statistics}`` of every cached offloaded table in ``model``."""
    out = {}
    for e in engram_modules(model):
        stats = getattr(e.memory, "cache_stats", lambda: None)()
        if stats is not None:
            out[e.layer_id] = stats
    return out
