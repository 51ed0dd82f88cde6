"""The single-process :class:`~engram.training.loop.Trainer`, run by N processes on one global batch.

Shapes: B global batch, B/N rows per rank, T context length.

What differs from one process, and only this:

- **data**: rank r trains on rows ``[r B/N, (r+1) B/N)`` of global batch ``step`` (:class:`RankSlice`), so
  N processes see exactly the batches one process sees;
- **dense weights**: ``DistributedDataParallel`` averages their gradients (all-reduce; skipped for all
  but the last micro-batch of a step); every rank keeps a full copy and the same AdamW state;
- **tables**: row-sharded (:class:`~engram.distributed.sharded.RowShardedEmbedding`); their gradients go
  to the owners inside the lookup's backward, and the lazy Adam state exists only on the owner;
- **clipping**: the table part of the global norm is summed over ranks (disjoint rows), the dense
  part counted once (:func:`engram.training.optim.clip_grad_norm_` with ``shard_sum``);
- **losses** read back are the mean over ranks; **stops** (SIGINT/SIGTERM) are agreed by all ranks
  at the same step (a max all-reduce each step), so every rank saves the same step;
- **evaluation** runs the whole held-out set on every rank (the lookups are collectives): the curve is
  the single-process one, computed N times.

Why DDP and not FSDP2 for the dense weights: docs/distributed.md (measured).
"""

from __future__ import annotations

import contextlib
import statistics
from typing import Any

import torch
import torch.distributed as dist

from engram.distributed.env import DistEnv, guarded
from engram.distributed.sharded import shard_tables, table_bytes
from engram.training.loop import Trainer, TrainConfig, clip_gradients
from engram.training.optim import clip_grad_norm_


class RankSlice:
    """Rank ``rank``'s rows of every global batch of ``batcher`` (any object with
    ``batch_with_boundaries(step)``); other attributes are the batcher's."""

    def __init__(self, batcher: Any, rank: int, world: int, batch_size: int) -> None:
        if batch_size % world:
            raise ValueError(f"--batch-size {batch_size} is the global batch and must be divisible by the "
                             f"{world} processes")
        self.batcher, self.rank, self.world = batcher, rank, world
        self.rows = slice(rank * batch_size // world, (rank + 1) * batch_size // world)

    def batch_with_boundaries(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        x, y, doc_starts = self.batcher.batch_with_boundaries(step)  # (B, T) each
        return x[self.rows], y[self.rows], None if doc_starts is None else doc_starts[self.rows]  # (B/N, T)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, _ = self.batch_with_boundaries(step)
        return x, y

    def __getattr__(self, name: str) -> Any:
        return getattr(self.batcher, name)


class DistributedTrainer(Trainer):
    """:class:`~engram.training.loop.Trainer` for one rank of a torchrun job (module docstring).

    Args:
        model: the whole model, the same on every rank (e.g. :func:`engram.training.loop.build_model`
            with the same seed), or one whose tables are on ``meta`` and are loaded afterwards
            (:func:`engram.distributed.checkpoint.load_shards`). Its tables are swapped for shards here.
        batcher: the global batches (``config.batch_size`` rows).
        env: this rank (:func:`engram.distributed.env.init_from_env`).
    """

    def __init__(self, model: torch.nn.Module, batcher: Any, config: TrainConfig, env: DistEnv,
                 eval_data: list[tuple[torch.Tensor, torch.Tensor]] | None = None, name: str = "model") -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: PLC0415

        if config.time_budget is not None and env.world > 1:
            raise ValueError("--time-budget is not supported with several processes (each has its own clock); "
                             "give --steps")
        if config.batch_size % (env.world * config.grad_accum):
            raise ValueError(f"--batch-size {config.batch_size} (the global batch) must be divisible by the "
                             f"{env.world} processes x --grad-accum {config.grad_accum}")
        self.env = env
        self.storages = shard_tables(model, env)
        super().__init__(model, RankSlice(batcher, env.rank, env.world, config.batch_size), config, eval_data,
                         name=name, device=env.device)
        self.world_size = env.world
        self.shard_ids = {id(m.shard) for m in self.storages}
        self.ddp = None
        if env.world > 1:
            shard_names = [n for n, p in model.named_parameters() if id(p) in self.shard_ids]
            DDP._set_params_and_buffers_to_ignore_for_model(model, shard_names)
            self.ddp = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                           forward_sync_buffers=False, process_group=env.group)
            self.forward = torch.compile(self.ddp) if config.compile else self.ddp
        self.exchange_bytes_per_step: list[int] = []

    # ------------------------------------------------------------------ hooks of Trainer
    def micro_batch(self, i: int, n: int) -> Any:
        return self.ddp.no_sync() if self.ddp is not None and i < n - 1 else contextlib.nullcontext()

    def clip_gradients(self) -> torch.Tensor:
        if self.config.grad_clip <= 0 or self.env.world == 1:
            return clip_gradients(self.params, self.config.grad_clip)
        return clip_grad_norm_(self.params, self.config.grad_clip, sharded=self.shard_ids, shard_sum=self._sum)

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        guarded(dist.all_reduce, t, op=dist.ReduceOp.SUM, group=self.env.group)
        return t

    def agreed_stop(self, signum: int | None) -> int | None:
        if self.env.world == 1:
            return signum
        t = torch.tensor([signum or 0], device=self.device)
        guarded(dist.all_reduce, t, op=dist.ReduceOp.MAX, group=self.env.group)
        return int(t) or None

    def train_step(self) -> float:
        before = self.exchange_bytes()
        loss = super().train_step()
        self.exchange_bytes_per_step.append(self.exchange_bytes() - before)
        return loss

    def sync(self) -> None:
        if self._pending and self.env.world > 1:  # the mean over ranks of each step's loss
            losses = torch.stack([p[0] for p in self._pending])
            guarded(dist.all_reduce, losses, op=dist.ReduceOp.SUM, group=self.env.group)
            losses /= self.env.world
            self._pending = [(v, *p[1:]) for v, p in zip(losses, self._pending)]
        super().sync()

    # ------------------------------------------------------------------ reporting
    def exchange_bytes(self) -> int:
        return sum(m.exchange_bytes for m in self.storages)

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        out.update(self.memory_report())
        steps = self.exchange_bytes_per_step
        out["lookup_bytes_per_step"] = statistics.median(steps) if steps else 0
        return out

    def memory_report(self) -> dict[str, Any]:
        """Per-rank table memory (all ranks' values; a collective)."""
        mine = table_bytes(self.model)
        state = sum(v.numel() * v.element_size() for opt in self.optimizers for p, st in opt.state.items()
                    if id(p) in self.shard_ids for v in st.values() if isinstance(v, torch.Tensor))
        every = self.env.all_gather_object((mine, state))
        return {"world_size": self.env.world, "table_bytes_per_rank": max(b for b, _ in every),
                "table_bytes_by_rank": [b for b, _ in every],
                "table_optimizer_bytes_by_rank": [s for _, s in every]}


def single_process_memory_report(model: torch.nn.Module) -> dict[str, Any]:
    """The same fields for a run in one process (its tables are whole)."""
    b = table_bytes(model)
    return {"world_size": 1, "table_bytes_per_rank": b, "table_bytes_by_rank": [b]}


__all__ = ["DistributedTrainer", "RankSlice", "single_process_memory_report"]
