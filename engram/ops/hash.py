"""The N-gram hash (DESIGN.md §2.4) as tensor functions, and the one place its backend is chosen.

Shapes: L Engram layers, B batch, T time, N max_ngram_size, O = N-1 orders, K heads per order,
H = O*K heads per layer (order-major).

With compressed ids ``x`` and ``x_k`` = x shifted right by k (left-filled with the pad id):
``mix_n = (x_0*m_0) XOR (x_1*m_1) XOR ... XOR (x_{n-1}*m_{n-1})`` in wrapping int64, and head j of
order n reads row ``mix_n mod p_{n,j}`` (non-negative). :func:`hash_ngrams_reference` is that
formula, line for line, on any device. :func:`hash_ngrams` runs the C kernel of
:mod:`engram.ops.cpu` instead where it applies (CPU int64 ids, kernels built): several times the
formula's speed on a CPU, and of ``torch.compile`` of it and of NumPy written as DeepSeek's demo
writes it (docs/performance.md), which matters because hashing runs on CPUs in real training
(data loader workers). Both are bit-identical (tests/test_ops.py).

Packed rows (several documents in one training row): ``doc_starts`` (B, T) bool marks the tokens
that begin a document. There the n-gram history resets exactly as at a sequence start: for
position t, every ``x_{t-k}`` before the latest document start at or before t reads as the pad
id, so no n-gram spans two documents and hashing a packed row equals hashing each document alone
(tests/test_prepare.py). Both backends take it.
"""

from __future__ import annotations

import torch

from engram.ops import cpu

__all__ = ["barrett_magic", "doc_starts_from_segments", "hash_ngrams", "hash_ngrams_reference", "ngram_mixes",
           "tokens_since_doc_start"]


def tokens_since_doc_start(doc_starts: torch.Tensor, horizon: int) -> torch.Tensor:
    """``(B, T)`` bool document starts -> ``(B, T)`` int64: t minus the latest start at or before t
    (``t + horizon`` where there is none, i.e. at least ``horizon``: the history before the row is
    read)."""
    T = doc_starts.shape[1]
    idx = torch.arange(T, device=doc_starts.device)  # (T,)
    last = torch.where(doc_starts.bool(), idx, -horizon).cummax(dim=1).values  # (B, T)
    return idx - last


def doc_starts_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` segment (document) ids of packed rows -> ``(B, T)`` bool document starts: True
    where the id changes. Position 0 is False (it continues whatever history is given; without
    one a row starts a sequence anyway)."""
    if segment_ids.ndim != 2:
        raise ValueError(f"segment_ids must have shape (B, T), got {tuple(segment_ids.shape)}")
    starts = torch.zeros(segment_ids.shape, dtype=torch.bool, device=segment_ids.device)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return starts


def ngram_mixes(full: torch.Tensor, multipliers: torch.Tensor, doc_starts: torch.Tensor | None = None,
                pad_id: int = 0) -> torch.Tensor:
    """``mix_n`` of every layer and order: ``full`` (B, N-1+T) compressed ids, history first;
    ``multipliers`` (L, N) int64 -> ``(L, B, T, O)`` int64 (wrapping products). ``doc_starts``
    (B, T) bool: ids before each position's latest document start read as ``pad_id``."""
    N = multipliers.shape[1]
    T = full.shape[1] - (N - 1)
    m = multipliers[:, :, None, None]  # (L, N, 1, 1)
    x = [full[:, N - 1 - k : N - 1 - k + T] for k in range(N)]  # x_k: (B, T), shifted right by k
    if doc_starts is not None:
        since = tokens_since_doc_start(doc_starts.to(full.device), N)  # (B, T)
        x = [x[0]] + [torch.where(since >= k, x[k], pad_id) for k in range(1, N)]
    mix = x[0] * m[:, 0]  # (L, B, T)
    mixes = []
    for k in range(1, N):  # order n = k+1
        mix = torch.bitwise_xor(mix, x[k] * m[:, k])
        mixes.append(mix)
    return torch.stack(mixes, dim=-1)  # (L, B, T, O)


def hash_ngrams_reference(full: torch.Tensor, multipliers: torch.Tensor, primes: torch.Tensor,
                          doc_starts: torch.Tensor | None = None, pad_id: int = 0) -> torch.Tensor:
    """The formula: ``full`` (B, N-1+T), ``multipliers`` (L, N), ``primes`` (L, H) -> rows (L, B, T, H);
    ``doc_starts`` (B, T) bool resets the history to ``pad_id`` at document starts."""
    L, H = primes.shape
    O = multipliers.shape[1] - 1
    mixes = ngram_mixes(full, multipliers, doc_starts, pad_id)  # (L, B, T, O)
    p = primes.view(L, 1, 1, O, H // O)  # (L, 1, 1, O, K)
    return torch.remainder(mixes.unsqueeze(-1), p).flatten(-2)  # (L, B, T, H)


def barrett_magic(primes: torch.Tensor) -> torch.Tensor:
    """``floor((2**64-1) / p)`` per prime as int64 bits: the C kernel's Barrett constants (its
    modulo for primes of 2^30 or more and for a decode step's few positions; the bulk path below
    2^30 works in doubles and sets up its own constants per call)."""
    rows = [[(m - 2**64 if m >= 2**63 else m) for m in ((2**64 - 1) // int(p) for p in row)] for row in primes.tolist()]
    return torch.tensor(rows, dtype=torch.long).view(primes.shape)


def hash_ngrams(full: torch.Tensor, multipliers: torch.Tensor, primes: torch.Tensor,
                magic: torch.Tensor | None = None, backend: str = "auto",
                doc_starts: torch.Tensor | None = None, pad_id: int = 0) -> torch.Tensor:
    """Rows ``(L, B, T, H)`` of :func:`hash_ngrams_reference`, by the fastest exact backend here.

    Args:
        full: ``(B, N-1+T)`` int64 compressed ids, history first.
        multipliers: ``(L, N)`` int64; primes: ``(L, H)`` int64 (on ``full``'s device).
        magic: :func:`barrett_magic` of ``primes`` (CPU), needed by the C kernel.
        backend: ``"auto"`` (the C kernel for CPU ids when available, else, and inside a
            ``torch.compile`` graph, the formula),
            ``"kernel"`` (the C kernel or a ``RuntimeError``) or ``"reference"``.
        doc_starts: ``(B, T)`` bool, True where a document starts inside the row (packed rows):
            the history resets to ``pad_id`` there (both backends).
        pad_id: the compressed pad id (read only with ``doc_starts``).
    """
    if backend not in ("auto", "kernel", "reference"):
        raise ValueError(f"backend={backend!r} must be 'auto', 'kernel' or 'reference'")
    if doc_starts is not None:
        want = (full.shape[0], full.shape[1] - (multipliers.shape[1] - 1))
        if doc_starts.ndim != 2 or tuple(doc_starts.shape) != want:
            raise ValueError(f"doc_starts must have shape (B, T) = {want}, got {tuple(doc_starts.shape)}")
    if backend != "reference" and full.device.type == "cpu" and magic is not None and cpu.available():
        return cpu.hash_ngrams(full, multipliers, primes, magic, doc_starts, pad_id)
    if backend == "kernel":
        raise RuntimeError("backend='kernel' needs CPU ids and the CPU kernels (a C compiler; see engram.ops.cpu)")
    return hash_ngrams_reference(full, multipliers, primes, doc_starts, pad_id)
