"""Plain NumPy N-gram hashing: the reference demo's algorithm, used as a speed baseline and oracle.

Shapes: B batch, T time, N max_ngram_size, K heads per order, H = (N-1)*K heads per layer.

This mirrors DeepSeek's ``engram_demo_v1.py`` (``NgramHashMapping._get_ngram_hashes``): compress
with a lookup table, left-pad shifted copies, XOR the multiplied shifts, one ``%`` per head.
It takes the constants (lookup table, multipliers, primes) from an ``engram`` mapping so it can
check it bit for bit, but does the arithmetic on its own.
"""

from __future__ import annotations

import numpy as np


def numpy_hash(raw_ids: np.ndarray, lookup_table: np.ndarray, pad_id: int,
               multipliers: dict[int, list[int]], table_sizes: dict[int, list[list[int]]]) -> dict[int, np.ndarray]:
    """Raw ids ``(B, T)`` -> ``{layer_id: (B, T, H) int64}`` (per-head rows, order-major)."""
    x = lookup_table[np.asarray(raw_ids, dtype=np.int64)]  # (B, T) compressed
    B, T = x.shape
    out: dict[int, np.ndarray] = {}
    for layer_id, mult in multipliers.items():
        N = len(mult)
        shifts = [x if k == 0 else np.pad(x, ((0, 0), (k, 0)), constant_values=pad_id)[:, :T] for k in range(N)]
        heads = []
        for n in range(2, N + 1):
            mix = shifts[0] * np.int64(mult[0])
            for k in range(1, n):
                mix = np.bitwise_xor(mix, shifts[k] * np.int64(mult[k]))
            for p in table_sizes[layer_id][n - 2]:
                heads.append(mix % np.int64(p))  # (B, T)
        out[layer_id] = np.stack(heads, axis=2)  # (B, T, H)
    return out


def numpy_hash_from_mapping(mapping, raw_ids: np.ndarray) -> dict[int, np.ndarray]:
    """:func:`numpy_hash` with the constants of an ``engram.hashing.NgramHashMapping``."""
    return numpy_hash(raw_ids, np.asarray(mapping.compressed.lookup_table), mapping.pad_id,
                      mapping.multipliers, mapping.table_sizes)
