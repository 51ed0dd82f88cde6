"""The on-device hot-row cache of offloaded tables (LRU or LFU), with hit statistics.

Shapes: U rows of one lookup, C cache rows, d row width.
"""

from __future__ import annotations


import torch
from torch import nn


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
