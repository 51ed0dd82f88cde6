"""Row-sharded Engram tables: each rank owns about 1/N of every head's rows (docs/distributed.md).

Shapes: B batch (this rank's slice), T time, H heads, d row width, U distinct (owner, row) pairs this
rank looks up, R rows other ranks ask of this one, L rows this rank owns.

Layout: head j (``s_j`` rows) is cut as ``torch.chunk`` / DTensor ``Shard(0)`` cut it: ``c_j = ceil(s_j / N)``
rows per rank, rank r owning rows ``[r c_j, min((r+1) c_j, s_j))``. A rank stores its pieces of all
heads one after the other in one local parameter ``shard`` ``(L, d)``, so the optimizers
(:mod:`engram.training.optim`) see one table per layer, as in one process, and keep their lazy Adam
state for owned rows only.

A lookup (one Engram layer, one forward), all collectives ``all_to_all_single`` on the world group:

1. route: owner ``o = id // c_j``, row at the owner ``loff[o, j] + id - o c_j``;
2. deduplicate (owner, row) pairs and count them per owner: ``(U,)`` sorted by owner;
3. exchange counts (N ints), then row indices (U int64 out, R in);
4. each owner gathers its R rows and sends them back: ``(U, d)``;
5. ``rows[inverse]`` gives ``(B, T, H, d)``: the same values the single-device table gives.

The backward sends the ``(U, d)`` row gradients (duplicates summed) back to their owners, which
turn them into a row-sparse gradient of ``shard`` (or a dense one for dense-gradient tables),
scaled by ``1/N`` like DDP's averaging of the dense gradients: each rank's loss is the mean over its
slice, so ``1/N`` of the sum over ranks is the gradient of the mean over the global batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from engram.distributed.env import DistEnv, guarded
from engram.nn.memory import TableStorage


def shard_rows(sizes: list[int], world: int) -> list[list[tuple[int, int]]]:
    """``[rank][head] -> (lo, hi)``: the rows of each head each rank owns (``torch.chunk`` layout)."""
    out = []
    for r in range(world):
        row = []
        for s in sizes:
            c = math.ceil(s / world)
            row.append((min(r * c, s), min((r + 1) * c, s)))
        out.append(row)
    return out


def _a2a(out: torch.Tensor, inp: torch.Tensor, out_splits: list[int] | None, in_splits: list[int] | None,
         env: DistEnv) -> torch.Tensor:
    if env.world == 1:  # no process group: the one "peer" is this rank
        return out.copy_(inp)
    guarded(dist.all_to_all_single, out, inp, out_splits, in_splits, group=env.group)
    return out


class _ExchangeRows(torch.autograd.Function):
    """``shard (L, d), send_idx (U,) -> rows (U, d)``: the rows other ranks own, fetched by all-to-all;
    the backward returns each row's gradient to its owner as a gradient of ``shard``."""

    @staticmethod
    def forward(ctx: Any, shard: torch.Tensor, send_idx: torch.Tensor, send_counts: list[int],
                storage: "RowShardedEmbedding") -> torch.Tensor:
        env, dev = storage.env, shard.device
        counts = torch.tensor(send_counts, dtype=torch.long, device=dev)  # (N,)
        recv = _a2a(torch.empty_like(counts), counts, None, None, env)  # (N,) rows each rank asks of me
        recv_counts = recv.tolist()
        recv_idx = _a2a(torch.empty(sum(recv_counts), dtype=torch.long, device=dev), send_idx,
                        recv_counts, send_counts, env)  # (R,) my local rows
        asked = shard.detach().index_select(0, recv_idx)  # (R, d)
        rows = _a2a(shard.new_empty(send_idx.numel(), shard.shape[1]), asked, send_counts, recv_counts, env)  # (U, d)
        ctx.save_for_backward(recv_idx)
        ctx.send_counts, ctx.recv_counts, ctx.storage = send_counts, recv_counts, storage
        storage.note_exchange(send_counts, recv_counts, shard.shape[1], shard.element_size())
        return rows

    @staticmethod
    def backward(ctx: Any, grad_rows: torch.Tensor) -> tuple[Any, ...]:
        (recv_idx,) = ctx.saved_tensors
        st = ctx.storage
        grad_rows = grad_rows.contiguous()
        back = _a2a(grad_rows.new_empty(recv_idx.numel(), grad_rows.shape[1]), grad_rows,
                    ctx.recv_counts, ctx.send_counts, st.env)  # (R, d) gradients of my rows
        back.mul_(1.0 / st.env.world)
        st.note_exchange(ctx.send_counts, ctx.recv_counts, grad_rows.shape[1], grad_rows.element_size(), ids=False)
        shape = (st.shard.shape[0], grad_rows.shape[1])
        if st.sparse:  # uncoalesced, as nn.Embedding(sparse=True) gives it; the optimizer coalesces
            grad = torch.sparse_coo_tensor(recv_idx.unsqueeze(0), back, shape, check_invariants=False)
        else:
            grad = back.new_zeros(shape).index_add_(0, recv_idx, back)
        return grad, None, None, None


class RowShardedEmbedding(TableStorage):
    """A multi-head table whose rows are split across the ranks of a process group.

    Same contract as :class:`~engram.nn.memory.MultiHeadEmbedding` (``forward(hash_ids (B, T, H)) ->
    (B, T, H, d)``, the same values), but this rank holds only ``shard`` ``(L, d)``, its rows of every head
    (module docstring). Every rank must call ``forward`` the same number of times (a collective).

    Args:
        sizes: rows of each head's table.
        dim: row width d.
        env: the process group (:func:`engram.distributed.env.init_from_env`).
        sparse: row-sparse gradients (lazy Adam on owned rows) or dense ones.
    """

    def __init__(self, sizes: list[int], dim: int, env: DistEnv, sparse: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__(sizes, device)
        self.env, self.sparse, self.dim = env, bool(sparse), int(dim)
        self.ranges = shard_rows(self.sizes, env.world)  # [rank][head] -> (lo, hi)
        owned = [[hi - lo for lo, hi in per] for per in self.ranges]  # [rank][head] rows
        self.local_rows = [sum(o) for o in owned]  # L of each rank
        loff = [[sum(o[:j]) for j in range(self.num_heads)] for o in owned]  # [rank][head] first local row
        self.chunk = [math.ceil(s / env.world) for s in self.sizes]  # c_j
        # Routing tables are per-rank facts, not state: plain tensors, never in a state dict.
        self._chunk_t = torch.tensor(self.chunk, dtype=torch.long)  # (H,)
        self._loff_t = torch.tensor(loff, dtype=torch.long)  # (N, H)
        self.shard = nn.Parameter(torch.empty(self.local_rows[env.rank], dim, device=device, dtype=dtype))
        self.exchange_bytes = 0  # bytes this rank sent to other ranks (ids, rows, row gradients)
        self.exchanges = 0

    # ---------------------------------------------------------------- contract
    @property
    def embedding_dim(self) -> int:
        return self.dim

    @property
    def table_weight(self) -> nn.Parameter:
        return self.shard

    @property
    def sparse_grad(self) -> bool:
        return self.sparse

    def head_slices(self, tensor: torch.Tensor | None = None) -> list[tuple[torch.Tensor, int, tuple[int, int]]]:
        """``[(view of head j's local rows (n_j, d), j, (lo, hi))]`` of ``tensor`` (default ``shard``)
        laid out like the shard (an optimizer moment, say)."""
        t = self.shard if tensor is None else tensor
        out, at = [], 0
        for j, (lo, hi) in enumerate(self.ranges[self.env.rank]):
            out.append((t[at: at + hi - lo], j, (lo, hi)))
            at += hi - lo
        return out

    @torch.no_grad()
    def load_full(self, flat_weight: torch.Tensor) -> None:
        """Copy this rank's rows from the whole flat table ``(sum(sizes), d)`` (as one process holds it)."""
        if tuple(flat_weight.shape) != (self.num_rows, self.dim):
            raise ValueError(f"the full table is {tuple(flat_weight.shape)}, this storage needs ({self.num_rows}, {self.dim})")
        self.shard.copy_(self.take_rows(flat_weight))

    def take_rows(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's rows ``(L, ...)`` of a tensor laid out like the whole flat table ``(sum(sizes), ...)``."""
        offs = self.offsets.tolist()
        parts = [flat[offs[j] + lo: offs[j] + hi] for _, j, (lo, hi) in self.head_slices()]
        return torch.cat(parts) if parts else flat[:0]

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        """The shard is saved per rank by :mod:`engram.distributed.checkpoint` (DCP), never in the
        model's state dict (whose other entries every rank holds alike)."""
        for name, buf in self._buffers.items():
            if buf is not None and name not in self._non_persistent_buffers_set:
                destination[prefix + name] = buf if keep_vars else buf.detach()

    # ---------------------------------------------------------------- lookup
    def route(self, hash_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(owner, row at the owner)`` of every per-head id, each ``(..., H)``."""
        dev = hash_ids.device
        c, loff = self._chunk_t.to(dev), self._loff_t.to(dev)
        owner = torch.div(hash_ids, c, rounding_mode="floor")  # (..., H)
        head = torch.arange(self.num_heads, device=dev).expand_as(hash_ids)  # (..., H)
        local = loff[owner, head] + hash_ids - owner * c  # (..., H)
        return owner, local

    @torch.compiler.disable  # collectives and a custom autograd Function: always eager
    def forward(self, hash_ids: torch.Tensor) -> torch.Tensor:
        """``(B, T, H)`` per-head rows -> ``(B, T, H, d)`` rows, wherever they live."""
        self.check_hash_ids(hash_ids)
        hash_ids = hash_ids.to(self.shard.device).long()
        owner, local = self.route(hash_ids)  # (B, T, H) each
        span = max(self.local_rows) + 1
        keys, inverse = torch.unique((owner * span + local).reshape(-1), return_inverse=True)  # (U,), (B*T*H,)
        send_idx = keys % span  # (U,) rows at their owners, grouped by owner
        send_counts = torch.bincount(keys // span, minlength=self.env.world).tolist()  # (N,)
        rows = _ExchangeRows.apply(self.shard, send_idx, send_counts, self)  # (U, d)
        return rows[inverse].view(*hash_ids.shape, self.dim)  # (B, T, H, d)

    def note_exchange(self, send_counts: list[int], recv_counts: list[int], d: int, itemsize: int,
                      ids: bool = True) -> None:
        """Count the bytes this rank sends to other ranks (its own part of an all-to-all stays local)."""
        me = self.env.rank
        if ids:  # forward: ids out, rows back out to the askers
            self.exchange_bytes += 8 * (sum(send_counts) - send_counts[me])
            self.exchange_bytes += d * itemsize * (sum(recv_counts) - recv_counts[me])
            self.exchanges += 1
        else:  # backward: row gradients back to their owners
            self.exchange_bytes += d * itemsize * (sum(send_counts) - send_counts[me])


def engram_storages(model: nn.Module) -> list[tuple[Any, TableStorage]]:
    """``[(engram module, its storage)]`` of a model with ``engram_layers()`` (EngramGPT) or an
    ``engram`` module dict (the transformers wrapper)."""
    layers = model.engram_layers() if hasattr(model, "engram_layers") else list(model.engram.values())
    return [(e, e.memory) for e in layers]


def shard_tables(model: nn.Module, env: DistEnv) -> list[RowShardedEmbedding]:
    """Swap every Engram table of ``model`` for a :class:`RowShardedEmbedding` holding this rank's rows.

    A table with values (on any real device) gives its rows to the shard, then is dropped; a table
    on ``meta`` (a model built with ``table_device="meta"`` to be filled from a checkpoint) gives only
    its shape (the shard is then uninitialised until loaded). The Engram math is unchanged: only
    ``engram.memory`` is swapped.
    """
    out = []
    for eng, mem in engram_storages(model):
        if isinstance(mem, RowShardedEmbedding):
            out.append(mem)
            continue
        w = mem.table_weight
        if w is None:
            raise ValueError(f"the table of Engram layer {eng.layer_id} is a {type(mem).__name__} without a trainable "
                             "weight (offloaded or quantised); only in-memory tables can be sharded")
        dev = env.device if env.device.type != "cpu" else None
        new = RowShardedEmbedding(mem.sizes, mem.embedding_dim, env, sparse=mem.sparse_grad, device=dev, dtype=w.dtype)
        if not w.is_meta:
            new.load_full(w.detach())
        eng.memory = new
        out.append(new)
    return out


def sharded_storages(model: nn.Module) -> list[RowShardedEmbedding]:
    return [m for _, m in engram_storages(model) if isinstance(m, RowShardedEmbedding)]


def table_bytes(model: nn.Module) -> int:
    """Bytes of the table rows this process holds (its shards, or the whole tables in one process)."""
    total = 0
    for _, mem in engram_storages(model):
        w = mem.table_weight
        if w is not None and not w.is_meta:
            total += w.numel() * w.element_size()
    return total
