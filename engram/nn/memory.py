"""Multi-head hashed memory: one flat embedding table with per-head row offsets (DESIGN.md §2.5).

Shapes: B batch, T time, H heads per layer, d head row width.

Storage is swappable: :class:`TableStorage` is the contract every table module keeps (this
in-memory one, and the host / disk / cached / quantised ones of :mod:`engram.storage`), and the
optimizers, offload and the models use only what it declares (DESIGN.md §5).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from engram.core.validation import ids_checks_forced


def head_offsets(sizes: list[int]) -> list[int]:
    """First row of each head in the flat table: ``[0, s_0, s_0+s_1, ...]`` (DESIGN.md §2.5)."""
    offsets = [0]
    for s in sizes[:-1]:
        offsets.append(offsets[-1] + int(s))
    return offsets


def _physical_ram() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system: no check
        return None


def _check_fits_in_ram(rows: int, dim: int, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
    """A clear error, before the allocator's, for a CPU table larger than this machine's RAM."""
    where = torch.device(device) if device is not None else torch.empty(0).device
    if where.type != "cpu":
        return
    nbytes, ram = rows * dim * (dtype or torch.get_default_dtype()).itemsize, _physical_ram()
    if ram is not None and nbytes > ram:
        raise ValueError(
            f"the Engram tables need {nbytes / 2**30:,.1f} GiB ({rows:,} rows x {dim}) but this machine has "
            f"{ram / 2**30:,.1f} GiB of RAM: use smaller engram_vocab_size, or build the tables on 'meta' "
            "(table_device='meta') and put them on disk with engram.offload(model, 'disk', path=...)"
        )


class TableStorage(nn.Module):
    """The contract of a multi-head table, whatever holds its rows.

    ``TableStorage.__init__(sizes, device)`` sets ``sizes`` (rows of each head), ``num_heads`` and the
    buffer ``offsets`` ``(H,)`` (first row of each head in the flat table; it moves with ``.to()``).
    Subclasses provide ``forward(hash_ids (B, T, H)) -> rows (B, T, H, d)``, ``embedding_dim`` and
    may override :attr:`table_weight` (the table as a trainable parameter, if it is one),
    :attr:`sparse_grad` and :meth:`cache_stats`.
    """

    def __init__(self, sizes: list[int], device: torch.device | str | None = None) -> None:
        super().__init__()
        if not sizes or min(int(s) for s in sizes) < 1:
            raise ValueError(f"sizes must be a non-empty list of positive table sizes, got {sizes!r}")
        self.sizes = [int(s) for s in sizes]
        self.num_heads = len(self.sizes)
        # Offsets are tiny and always real, even when the table itself is only planned on "meta".
        on_meta = device is not None and torch.device(device).type == "meta"
        self.register_buffer("offsets", torch.tensor(head_offsets(self.sizes), dtype=torch.long,
                                                     device=None if on_meta else device))

    @property
    def embedding_dim(self) -> int:
        raise NotImplementedError

    @property
    def num_rows(self) -> int:
        return sum(self.sizes)

    @property
    def table_weight(self) -> nn.Parameter | None:
        """The table as an ``nn.Parameter`` ``(N, d)``, or ``None`` where the storage holds none
        (disk or quantised tables)."""
        return None

    @property
    def sparse_grad(self) -> bool:
        """Whether :attr:`table_weight` receives sparse (row) gradients."""
        return False

    def cache_stats(self) -> dict[str, float] | None:
        """Hit statistics of a hot-row cache, if the storage has one."""
        return None

    def check_hash_ids(self, hash_ids: torch.Tensor) -> None:
        """Raise if ``hash_ids`` (..., H) does not fit these tables: dtype, head count, and each
        head's rows in ``[0, sizes[j])`` (a row past a head's table would read the next head's
        rows). The range is read back, so it is checked on CPU tensors (free there), on
        accelerators only with ``ENGRAM_CHECK_IDS=1``, and never inside a compiled graph (the
        models' own hash is in range by construction: ``mix mod p``)."""
        if hash_ids.dtype.is_floating_point or hash_ids.dtype == torch.bool:
            raise TypeError(f"hash_ids must be an integer tensor, got dtype {hash_ids.dtype}")
        if hash_ids.shape[-1] != self.num_heads:
            raise ValueError(
                f"hash_ids has {hash_ids.shape[-1]} heads in its last dim but the memory has {self.num_heads}"
            )
        if hash_ids.numel() == 0 or torch.compiler.is_compiling():
            return
        if hash_ids.device.type == "cpu" or ids_checks_forced():
            sizes = torch.tensor(self.sizes, device=hash_ids.device)  # (H,)
            bad = (hash_ids < 0) | (hash_ids >= sizes)  # (..., H)
            if bool(bad.any()):
                j = int(bad.reshape(-1, self.num_heads).any(0).nonzero()[0])
                col = hash_ids[..., j]
                raise ValueError(
                    f"hash_ids of head {j} must be in [0, {self.sizes[j]}), got values in "
                    f"[{int(col.min())}, {int(col.max())}]"
                )


class MultiHeadEmbedding(TableStorage):
    """Flat table of ``sum(sizes)`` rows; head ``j`` owns rows ``offsets[j] .. offsets[j]+sizes[j]``.

    Args:
        sizes: rows of each head's table (order-major, as the hash emits them).
        dim: width d of one row.
        sparse: produce a sparse gradient (row-wise optimisers; see training docs).
        init_std: std of the normal init; 0 gives a zero table.
    """

    def __init__(self, sizes: list[int], dim: int, sparse: bool = False, init_std: float = 1.0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__(sizes, device)
        self.init_std = float(init_std)
        _check_fits_in_ram(sum(self.sizes), dim, device, dtype)
        # Named like the reference (`multi_head_embedding.embedding.weight`).
        self.embedding = nn.Embedding(sum(self.sizes), dim, sparse=sparse, device=device, dtype=dtype)
        self.reset_parameters()

    @property
    def embedding_dim(self) -> int:
        return self.embedding.embedding_dim

    @property
    def table_weight(self) -> nn.Parameter:
        return self.embedding.weight

    @property
    def sparse_grad(self) -> bool:
        return self.embedding.sparse

    def reset_parameters(self, init: Any = nn.init) -> None:
        """Table ~ N(0, init_std) (zeros for 0) and the head offsets. ``init``: a namespace of
        ``torch.nn.init``-named functions (transformers passes ``transformers.initialization``)."""
        if self.embedding.weight.is_meta:
            return
        if self.init_std == 0:
            init.zeros_(self.embedding.weight)
        else:
            init.normal_(self.embedding.weight, 0.0, self.init_std)
        if not self.offsets.is_meta:
            with torch.no_grad():
                self.offsets.copy_(torch.tensor(head_offsets(self.sizes), dtype=torch.long))

    def flat_rows(self, hash_ids: torch.Tensor) -> torch.Tensor:
        """Per-head row index -> row of the flat table, ``(..., H)``."""
        return hash_ids + self.offsets  # (..., H)

    def forward(self, hash_ids: torch.Tensor) -> torch.Tensor:
        """``(B, T, H)`` per-head rows -> ``(B, T, H, d)`` looked-up rows."""
        self.check_hash_ids(hash_ids)
        if self.embedding.sparse and torch.is_grad_enabled():
            return sparse_lookup(self.flat_rows(hash_ids), self.embedding.weight)
        return F.embedding(self.flat_rows(hash_ids), self.embedding.weight)


@torch.compiler.disable
def sparse_lookup(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.embedding`` with a sparse (row) gradient, kept out of ``torch.compile`` graphs: inductor
    cannot build a backward that produces a sparse tensor, so a compiled training step runs this
    lookup (and its backward) eagerly and compiles around it."""
    return F.embedding(rows, weight, sparse=True)


def table_parameters(memories: Iterable[TableStorage]) -> list[nn.Parameter]:
    """The table parameters of these storage modules (``engram.nn.memory`` of each Engram layer),
    skipping storage that holds no parameter (disk, quantised). The one implementation behind
    ``EngramGPT.table_parameters`` and ``EngramForCausalLM.table_parameters``."""
    return [w for w in (m.table_weight for m in memories) if w is not None]
