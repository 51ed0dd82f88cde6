"""Prefetch: gather every Engram layer's rows as soon as the ids are hashed (DESIGN.md §4).

Shapes: B batch, T time, H heads per layer, d row width.

Engram addresses depend on token ids only, so the rows a layer will need are known before the
forward pass reaches it. A :class:`Prefetcher` listens to the model's hashing
(``NgramHashMapping.hash_step``, which ``EngramGPT.forward`` and ``EngramForCausalLM.forward``
call once per prefill and once per decode step) and, the moment the hash ids exist, queues one
gather per offloaded Engram layer, in layer order, on a background worker:

- CPU: a single worker thread (torch releases the GIL in gathers and page faults), so the rows
  of layer L are read while layers < L compute.
- CUDA: the same thread issues the host gather into pinned staging and the host-to-device copy
  on a side stream; the consumer's stream waits on an event before using the rows, so the copy
  overlaps the preceding layers' kernels.

The forward of a storage module takes the prefetched rows only if they were gathered for the
very ids it is given (same tensor, or equal values); otherwise it gathers them itself, so
prefetch can change speed, never outputs.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch
from torch import nn

from engram.storage.tables import OffloadedMultiHeadEmbedding, engram_modules, hash_mappings


class _StreamFuture:
    """A worker's future whose ``result()`` also makes the current CUDA stream wait for the copy."""

    def __init__(self, fut: Future):
        self._fut = fut

    def result(self) -> Any:
        rows, event = self._fut.result()
        if event is not None:
            stream = torch.cuda.current_stream(rows.device)
            stream.wait_event(event)
            rows.record_stream(stream)  # the side stream allocated it; keep it alive for this one
        return rows


class Prefetcher:
    """Gathers offloaded Engram rows ahead of the layers that need them.

    ``Prefetcher(model)`` attaches to every ``NgramHashMapping`` of ``model``; use
    :meth:`close` (or ``with Prefetcher(model): ...``) to detach. Only storage modules from
    :mod:`engram.offload` are prefetched; in-memory tables are left alone.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.hashings = hash_mappings(model)
        if not self.hashings:
            raise ValueError(f"{type(model).__name__} has no NgramHashMapping to prefetch from")
        self.engrams = engram_modules(model)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engram-prefetch")
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self.submitted = 0
        for h in self.hashings:  # a mapping rebuilt later (resize_token_embeddings) keeps the listener
            h.step_listeners.append(self.prefetch)

    def prefetch(self, hash_ids: dict[int, torch.Tensor]) -> None:
        """Queue the gathers of ``{layer_id: (B, T, H)}`` for every offloaded layer, in layer order."""
        for e in self.engrams:
            mem = e.memory
            if isinstance(mem, OffloadedMultiHeadEmbedding) and e.layer_id in hash_ids:
                mem.start_prefetch(hash_ids[e.layer_id], self)

    def submit(self, fn: Callable[[torch.Tensor], torch.Tensor], hash_ids: torch.Tensor) -> Any:
        """Run ``fn(hash_ids)`` on the worker; returns an object whose ``result()`` gives the rows."""
        self.submitted += 1
        device = hash_ids.device
        if device.type != "cuda":
            return self._pool.submit(fn, hash_ids)
        side = self._streams.setdefault(device, torch.cuda.Stream(device))
        side.wait_stream(torch.cuda.current_stream(device))  # the hash ids are made on the main stream

        def task() -> tuple[torch.Tensor, Any]:
            with torch.cuda.stream(side):
                rows = fn(hash_ids)
                event = torch.cuda.Event()
                event.record(side)
            return rows, event

        return _StreamFuture(self._pool.submit(task))

    def close(self) -> None:
        """Detach from the model and stop the worker (pending gathers finish first)."""
        for e in self.engrams:
            if isinstance(e.memory, OffloadedMultiHeadEmbedding):
                e.memory._wait_pending()
        for h in self.hashings:
            if self.prefetch in h.step_listeners:
                h.step_listeners.remove(self.prefetch)
        self._pool.shutdown(wait=True)
        if getattr(self.model, "engram_prefetcher", None) is self:
            del self.model.engram_prefetcher

    def __reduce__(self) -> tuple:
        # A copied or pickled model does not take the prefetcher (a worker thread) along:
        # ``copy.deepcopy(model)`` gives ``engram_prefetcher = None``; attach a new one to the copy.
        return (_detached, ())

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _detached() -> None:
    """What a copied or unpickled :class:`Prefetcher` becomes."""
    return None
