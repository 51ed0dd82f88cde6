"""Engram tables outside the module: host RAM or a memory-mapped file, with a hot-row cache.

Shapes: B batch, T time, H heads per layer, d row width, N rows of the flat table,
U distinct rows of one lookup, C cache rows.

Offloading changes where rows live, never the numbers (DESIGN.md §4): every storage module here
has :class:`~engram.nn.memory.MultiHeadEmbedding`'s contract (``forward(hash_ids (B, T, H)) ->
(B, T, H, d)`` and the attributes ``sizes, offsets, embedding_dim, num_heads, num_rows,
check_hash_ids, flat_rows``) and is swapped in for ``engram_module.memory``:

- :class:`HostMultiHeadEmbedding`: the table in CPU RAM (pinned when CUDA is present).
- :class:`DiskMultiHeadEmbedding`: the table in a file (header + page-aligned parts), read
  through a read-only memory map so only touched rows are paged in; a table larger than RAM
  works. Writes go through ``os.pwrite`` (a full disk is an ``OSError``, not a SIGBUS) into a
  temporary file that replaces the target only when complete. Headers are validated field by
  field, rows are checksummed (verified on open unless ``verify=False``), in-place row writes
  mark the file dirty until it is sealed again, and the tables of one :func:`offload` are written
  as a set with a manifest (:mod:`engram.storage.tablefile` has the rules).
- :class:`HotRowCache`: optional on-device cache of ``cache_rows`` rows (LRU or LFU) with hit
  statistics; a lookup is served from cache hits plus storage misses, so outputs are
  bit-identical with or without it, even when one batch needs more rows than it holds.
- ``quantize="int8" | "fp8" | "fp8_e8m0"`` stores codes + scales (:mod:`engram.storage.quant`), dequantised on gather.
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
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engram.core.hashing import NgramHashMapping
from engram.storage import tablefile
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
            quantize: str | None = None, cache_policy: str = "lru", prefetch: bool = False,
            overwrite: bool = False, verify: bool = True) -> nn.Module:
    """Move every Engram table of ``model`` to host RAM or disk (in place; returns ``model``).

    Args:
        model: an ``EngramGPT`` or anything holding :class:`~engram.nn.module.Engram` modules.
        where: ``"host"`` (CPU RAM, pinned with CUDA) or ``"disk"`` (one file per layer under ``path``).
        path: directory for ``where="disk"``. A table still on the meta device (a model built on
            ``torch.device("meta")``) is *opened* from ``path`` and checked against the config;
            a materialised one is written there. The written tables are a set: all of them go to
            temporary files first, then a manifest (``engram_tables.json``) names them, then they
            are renamed into place, so an error (a full disk included) changes nothing in ``path``
            and an interrupted set is detected when opened (:mod:`engram.storage.tablefile`).
            Temporaries left by dead writers are removed.
        cache_rows: rows of the on-device hot-row cache per layer (0: none).
        quantize: ``None | "int8" | "fp8" | "fp8_e8m0"``: store codes + scales, dequantised on
            gather (``"fp8_e8m0"``: DeepSeek-V4.1's row format; row width a multiple of 32).
        cache_policy: ``"lru"`` or ``"lfu"``.
        prefetch: attach a :class:`engram.storage.prefetch.Prefetcher` (``model.engram_prefetcher``) that
            gathers every layer's rows as soon as the ids are hashed.
        overwrite: (disk) replace table files in ``path`` whose contents differ from the tables
            written (trained tables, another model's, damaged or dirty files). Without it that is
            a ``ValueError`` and nothing is written; writing the very same tables again (same rows,
            sizes, codec and fingerprint: same checksum) is always allowed.
        verify: (disk) check the checksum of every table *opened* (meta tables; it reads each file
            once) and refuse files marked dirty; ``False`` skips that for huge tables.

    The model is changed only when every layer succeeded.
    """
    if where not in ("host", "disk"):
        raise ValueError(f"where must be 'host' or 'disk', got {where!r}")
    if where == "disk" and path is None:
        raise ValueError("where='disk' needs path= (a directory for the table files)")
    if where == "host" and path is not None:
        raise ValueError("path= is only used with where='disk'")
    make_codec(quantize, 32)  # validates quantize early (32: a width every codec takes)
    engrams = engram_modules(model)
    if not engrams:
        raise ValueError(f"{type(model).__name__} has no Engram modules to offload")
    for e in engrams:
        if isinstance(e.memory, OffloadedMultiHeadEmbedding):
            raise ValueError(f"the Engram table of layer {e.layer_id} is already offloaded ({type(e.memory).__name__})")
    if where == "host":
        new = []
        for e in engrams:
            mem = e.memory
            device = torch.device("cpu") if mem.offsets.is_meta else mem.offsets.device
            new.append(HostMultiHeadEmbedding(mem.sizes, int(mem.embedding_dim), weight=mem.embedding.weight,
                                              quantize=quantize, sparse=mem.embedding.sparse, cache_rows=cache_rows,
                                              cache_policy=cache_policy, device=device))
    else:
        new = _disk_tables(model, engrams, Path(path), quantize, cache_rows, cache_policy, overwrite, verify)
    for e, mem in zip(engrams, new):
        mem.train(e.memory.training)
        e.memory = mem
    if prefetch:
        model.engram_prefetcher = Prefetcher(model)
    return model


def _disk_tables(model: nn.Module, engrams: list, directory: Path, quantize: str | None, cache_rows: int,
                 cache_policy: str, overwrite: bool, verify: bool) -> list[DiskMultiHeadEmbedding]:
    """Open (meta) or write (materialised) every layer's table in ``directory`` as one set."""
    hashing = next(iter(hash_mappings(model)), None)
    if not all(e.memory.embedding.weight.is_meta for e in engrams):  # writing: clear dead writers' leftovers
        directory.mkdir(parents=True, exist_ok=True)
        tablefile.remove_stale_temps(directory)
    plan = []
    for e in engrams:
        mem = e.memory
        sizes, dim = list(mem.sizes), int(mem.embedding_dim)
        device = torch.device("cpu") if mem.offsets.is_meta else mem.offsets.device
        plan.append(dict(weight=mem.embedding.weight, sizes=sizes, dim=dim, file=table_path(directory, e.layer_id),
                         fp=table_fingerprint(hashing, e.layer_id, sizes, dim),
                         common=dict(cache_rows=cache_rows, cache_policy=cache_policy, device=device)))
    out: dict[int, DiskMultiHeadEmbedding] = {}
    staged: dict[Path, tuple[Path, dict]] = {}
    try:
        for i, p in enumerate(plan):  # tables to open: checked before anything is written
            if p["weight"].is_meta:
                out[i] = DiskMultiHeadEmbedding(p["file"], p["sizes"], p["dim"], p["fp"], quantize, verify=verify,
                                                **p["common"])
        written = [p for p in plan if not p["weight"].is_meta]
        for k, p in enumerate(written):  # tables to write: temporaries first
            codec = make_codec(quantize, p["dim"], p["weight"].dtype)
            try:
                staged[p["file"]] = DiskRowStore.stage(p["file"], codec, p["sizes"], p["fp"],
                                                       source=p["weight"].detach())
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                raise OSError(exc.errno, f"{os.strerror(exc.errno)} while writing the Engram table {p['file'].name} "
                              f"(table {k + 1} of {len(written)}) into {directory}; nothing in {directory} was "
                              "changed: the tables are written to temporary files first, and those were removed"
                              ) from exc
        conflicts, kept = [], []
        for f, (tmp, header) in ([] if overwrite else staged.items()):
            state, why = _existing(f, header)
            if state == "same":  # the very same table is there: keep it (live maps of it stay valid)
                kept.append(f)
            elif state == "differs":
                conflicts.append(f"{f.name} ({why})")
        if conflicts:
            raise ValueError(
                f"{directory} already holds Engram tables that differ from this model's: {'; '.join(conflicts)}. "
                "Writing would replace them (trained tables would be lost), so nothing was written. Pass "
                "overwrite=True to replace them, choose another directory, or build the model on the meta "
                "device to open the tables that are there")
        for f in kept:
            staged.pop(f)[0].unlink()
        if staged or kept:
            _commit(directory, staged, [out[i] for i in sorted(out)], kept)
    except BaseException:
        for tmp, _ in staged.values():
            tmp.unlink(missing_ok=True)
        for m in out.values():
            m.close()
        raise
    for i, p in enumerate(plan):
        if i not in out:  # just written, from checksummed temporaries: nothing to verify
            out[i] = DiskMultiHeadEmbedding(p["file"], p["sizes"], p["dim"], p["fp"], quantize, verify=False,
                                            table_requires_grad=p["weight"].requires_grad, **p["common"])
    return [out[i] for i in range(len(plan))]


def _existing(file: Path, new_header: dict) -> tuple[str, str | None]:
    """What is at ``file`` compared with the table of ``new_header``: ``("absent" | "same" | "replace" |
    "differs", why)``. "same" is a sealed version-2 file with the same checksum whose rows verify;
    "replace" is one meant to hold the same table but damaged or of format version 1."""
    if not file.exists():
        return "absent", None
    try:
        fd = os.open(file, os.O_RDONLY)
    except OSError as exc:
        return "differs", f"unreadable: {exc.strerror}"
    try:
        header = tablefile.read_header(fd, file)
        if header.get("dirty") is not None:
            return "differs", "it is marked dirty: rows are being written into it, or a writer died half-way"
        stored = header.get("checksum")
        actual = tablefile.checksum(fd, header, file)  # raises ValueError if it is truncated
    except ValueError as exc:
        return "differs", f"not a valid Engram table: {exc}"
    finally:
        os.close(fd)
    if new_header["checksum"] not in (stored, actual):
        return "differs", "different rows, sizes, codec or fingerprint"
    return ("same", None) if stored == actual and header["version"] >= 2 else ("replace", None)


def _commit(directory: Path, staged: dict[Path, tuple[Path, dict]], opened: list[DiskMultiHeadEmbedding],
            kept: list[Path]) -> None:
    """Manifest first (naming the new tables), then rename each temporary into place.

    A crash between the two leaves files the manifest does not name: opening says so. Nothing
    is written when no table changes and the manifest already names them all.
    """
    try:
        man = tablefile.read_manifest(directory)
    except ValueError:
        man = None  # a damaged manifest is replaced (the caller may overwrite the set)
    tables = dict(man["tables"]) if man else {}
    for m in opened:
        if m.store.header.get("table_id"):  # (format version 1 files have none: they predate manifests)
            tables.setdefault(m.path.name, tablefile.manifest_entry(m.store.header))
    for file in kept:
        fd = os.open(file, os.O_RDONLY)
        try:
            tables[file.name] = tablefile.manifest_entry(tablefile.read_header(fd, file))
        finally:
            os.close(fd)
    for file, (_, header) in staged.items():
        tables[file.name] = tablefile.manifest_entry(header)
    if not staged and man is not None and tables == man["tables"]:
        return
    try:
        tablefile.write_manifest(directory, tables, int(man.get("generation", 0)) + 1 if man else 1)
    except OSError as exc:
        raise OSError(exc.errno, f"{exc.strerror or exc} while writing {tablefile.MANIFEST} in {directory}; nothing "
                      f"in {directory} was changed (the new tables' temporary files were removed)") from exc
    done = 0
    for file, (tmp, _) in staged.items():
        try:
            os.replace(tmp, file)
        except OSError as exc:
            raise OSError(exc.errno, f"could not rename {tmp.name} to {file.name} in {directory} ({exc.strerror}) "
                          f"after {done} of {len(staged)} tables were: the directory holds a mixed set now, which "
                          "opening it reports; offload the model again") from exc
        done += 1
    tablefile.fsync_dir(directory)


def cache_stats(model: nn.Module) -> dict[int, dict[str, float]]:
    """``{layer_id: hit statistics}`` of every cached offloaded table in ``model``."""
    out = {}
    for e in engram_modules(model):
        stats = e.memory.cache_stats()
        if stats is not None:
            out[e.layer_id] = stats
    return out
