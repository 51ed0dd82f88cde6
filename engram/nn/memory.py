"""Multi-head hashed memory: one flat embedding table with per-head row offsets (DESIGN.md §2.5).

Shapes: B batch, T time, H heads per layer, d head row width.

Storage is swappable: offloaded or quantised tables replace this module with one that has the
same ``forward(hash_ids) -> (B, T, H, d)`` contract (DESIGN.md §5).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn import functional as F


class MultiHeadEmbedding(nn.Module):
    """Flat table of ``sum(sizes)`` rows; head ``j`` owns rows ``offsets[j] .. offsets[j]+sizes[j]``.

    Args:
        sizes: rows of each head's table (order-major, as the hash emits them).
        dim: width d of one row.
        sparse: produce a sparse gradient (row-wise optimisers; see training docs).
        init_std: std of the normal init; 0 gives a zero table.
    """

    def __init__(self, sizes: list[int], dim: int, sparse: bool = False, init_std: float = 1.0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if not sizes or min(sizes) < 1:
            raise ValueError(f"sizes must be a non-empty list of positive table sizes, got {sizes!r}")
        self.sizes = [int(s) for s in sizes]
        self.num_heads = len(self.sizes)
        self.init_std = float(init_std)
        offsets = [0]
        for s in self.sizes[:-1]:
            offsets.append(offsets[-1] + s)
        # Offsets are tiny and always real, even when the table itself is only planned on "meta".
        on_meta = device is not None and torch.device(device).type == "meta"
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.long, device=None if on_meta else device))
        # Named like the reference (`multi_head_embedding.embedding.weight`).
        self.embedding = nn.Embedding(sum(self.sizes), dim, sparse=sparse, device=device, dtype=dtype)
        self.reset_parameters()

    @property
    def embedding_dim(self) -> int:
        return self.embedding.embedding_dim

    @property
    def num_rows(self) -> int:
        return self.embedding.num_embeddings

    @property
    def table_weight(self) -> nn.Parameter | None:
        """The table as an ``nn.Parameter`` ``(N, d)``, or ``None`` where the storage has none
        (disk or quantised tables; storage-protocol attribute, see :func:`table_parameters`)."""
        return self.embedding.weight

    def reset_parameters(self) -> None:
        if self.embedding.weight.is_meta:
            return
        with torch.no_grad():
            if self.init_std == 0:
                self.embedding.weight.zero_()
            else:
                self.embedding.weight.normal_(0.0, self.init_std)

    def check_hash_ids(self, hash_ids: torch.Tensor) -> None:
        """Raise if ``hash_ids`` (..., H) does not fit these tables."""
        if hash_ids.dtype.is_floating_point or hash_ids.dtype == torch.bool:
            raise TypeError(f"hash_ids must be an integer tensor, got dtype {hash_ids.dtype}")
        if hash_ids.shape[-1] != self.num_heads:
            raise ValueError(
                f"hash_ids has {hash_ids.shape[-1]} heads in its last dim but the memory has {self.num_heads}"
            )

    def flat_rows(self, hash_ids: torch.Tensor) -> torch.Tensor:
        """Per-head row index -> row of the flat table, ``(..., H)``."""
        return hash_ids + self.offsets  # (..., H)

    def forward(self, hash_ids: torch.Tensor) -> torch.Tensor:
        """``(B, T, H)`` per-head rows -> ``(B, T, H, d)`` looked-up rows."""
        self.check_hash_ids(hash_ids)
        return F.embedding(self.flat_rows(hash_ids), self.embedding.weight, sparse=self.embedding.sparse)


def table_parameters(memories: Iterable[nn.Module]) -> list[nn.Parameter]:
    """The table parameters of these storage modules (``engram.nn.memory`` of each Engram layer),
    skipping storage that holds no parameter (disk, quantised). The one implementation behind
    ``EngramGPT.table_parameters`` and ``EngramForCausalLM.table_parameters``."""
    return [w for w in (m.table_weight for m in memories) if w is not None]
