"""Hashing ahead of the training step: the next batch and its Engram row ids are made on the CPU
in a background thread while the current step runs.

Hashing is integer work on token ids that needs no weights, so real training does it where the
data is, ahead of the accelerator (the paper's point about prefetching rows from host memory
rests on it). :class:`HashAhead` wraps a batcher (anything with ``batch_with_boundaries(step)``)
and a model's :class:`~engram.core.hashing.NgramHashMapping`: ``get(step)`` returns
``(x, y, doc_starts, hash_ids)`` for batch ``step`` and starts making batch ``step + 1``. The
hash is the model's own (the C kernel on a CPU, bit-identical to the formula), so a step given
these ids computes exactly what it computes when it hashes itself (tests/test_prehash.py).
With ``pin=True`` (a CUDA model) every tensor is page-locked in the background too, so the
step's copies to the device are asynchronous.

Batches are a pure function of the step, so the look-ahead never changes what is trained on: a
request for another step (after a resume, say) discards the prepared one and makes the asked one.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

Prepared = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None", "dict[int, torch.Tensor]"]


class HashAhead:
    """``get(step) -> (x (B, T), y (B, T), doc_starts (B, T) | None, {layer: hash ids (B, T, H)})``.

    Args:
        batcher: gives ``batch_with_boundaries(step) -> (x, y, doc_starts | None)`` on the CPU.
        hashing: the model's ``NgramHashMapping``.
        pin: page-lock the tensors (for non-blocking copies to a CUDA device).
    """

    def __init__(self, batcher: Any, hashing: Any, pin: bool = False):
        self.batcher, self.hashing, self.pin = batcher, hashing, pin
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engram-hash-ahead")
        self._next: tuple[int, Future] | None = None

    def make(self, step: int) -> Prepared:
        """Batch ``step`` and its hash ids, in the calling thread."""
        x, y, doc_starts = self.batcher.batch_with_boundaries(step)
        hash_ids = self.hashing.hash(x, doc_starts=doc_starts)  # {layer: (B, T, H)}, the model's own hash
        if self.pin:
            x, y = x.pin_memory(), y.pin_memory()
            doc_starts = doc_starts.pin_memory() if doc_starts is not None else None
            hash_ids = {k: v.pin_memory() for k, v in hash_ids.items()}
        return x, y, doc_starts, hash_ids

    def get(self, step: int) -> Prepared:
        if self._next is not None and self._next[0] == step:
            out = self._next[1].result()
        else:
            if self._next is not None:
                self._next[1].cancel()
            out = self.make(step)
        self._next = (step + 1, self._pool.submit(self.make, step + 1))
        return out

    def close(self) -> None:
        if self._next is not None:
            self._next[1].cancel()
            self._next = None
        self._pool.shutdown(wait=True)
