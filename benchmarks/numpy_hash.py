"""NumPy N-gram hashing as DeepSeek's demo writes it: the speed baseline of the hash paths.

The implementation lives in :func:`engram.cli.bench.numpy_hash` (``engram bench`` needs it without
this folder); this module keeps the name the baseline measurement used.
"""

from __future__ import annotations

from engram.cli.bench import numpy_hash as numpy_hash_from_mapping  # noqa: F401
