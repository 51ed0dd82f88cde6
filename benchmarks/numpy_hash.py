"""NumPy N-gram hashing as DeepSeek's demo writes it: the speed baseline of the hash paths.

The demo's ``NgramHashMapping._get_ngram_hashes`` statement for statement (``np.pad`` shifted
copies, each order's mix from scratch, one ``mix % int(mod)`` per head, ``np.stack``); its
compression step is the plain table gather, which is faster than the demo's masked copy, so the
baseline is at least as fast as the demo. Measured beside a verbatim copy of the demo's two
functions in one process: same outputs, 0.97x its time. Its speed depends on the allocator
state (page faults on fresh temporaries), which perf_targets.py's ``bench_hash`` pins.

Self-contained (only public attributes of a mapping), so perf_targets.py measures the code before
and after a change against the very same baseline; ``engram bench`` uses its own copy,
:func:`engram.cli.bench.numpy_hash`, written the same way.
"""

from __future__ import annotations

import numpy as np


def numpy_hash_from_mapping(mapping, raw_ids: np.ndarray) -> dict[int, np.ndarray]:
    """The demo's ``_get_ngram_hashes`` after the compression lookup: ``{layer: (B, T, H)}``."""
    x = np.asarray(mapping.compressed.lookup_table)[raw_ids]  # (B, T)
    T = x.shape[1]
    out = {}
    for lid in mapping.layer_ids:
        multipliers = np.asarray(mapping.multipliers[lid], dtype=np.int64)
        shifts = [x if k == 0 else np.pad(x, ((0, 0), (k, 0)), mode="constant", constant_values=mapping.pad_id)[:, :T]
                  for k in range(len(multipliers))]
        heads = []
        for n in range(2, len(multipliers) + 1):
            mix = shifts[0] * multipliers[0]
            for k in range(1, n):
                mix = np.bitwise_xor(mix, shifts[k] * multipliers[k])
            heads += [(mix % int(mod)).astype(np.int64, copy=False) for mod in mapping.table_sizes[lid][n - 2]]
        out[lid] = np.stack(heads, axis=2)  # (B, T, H)
    return out
