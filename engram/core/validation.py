"""Input checks shared by the tokenizer, the hashing and the modules.

Every public entry point that takes token ids calls :func:`check_ids`, so bad input fails early
with a message that names the argument and what was wrong.
"""

from __future__ import annotations

import os

import numpy as np
import torch

_INT_NP = (np.integer,)


def check_ids(ids: np.ndarray | torch.Tensor, vocab_size: int | None, name: str = "input_ids",
              ndim: int | None = None) -> None:
    """Raise ``TypeError`` for non-integer ids, ``ValueError`` for wrong rank or ids >= vocab."""
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got dtype {ids.dtype}")
        too_big = vocab_size is not None and ids.numel() > 0 and bool((ids >= vocab_size).any())
        top = int(ids.max()) if too_big else None
    else:
        if not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"{name} must hold integers, got dtype {ids.dtype}")
        too_big = vocab_size is not None and ids.size > 0 and bool((ids >= vocab_size).any())
        top = int(ids.max()) if too_big else None
    if ndim is not None and ids.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(ids.shape)}")
    if too_big:
        raise ValueError(f"{name} has id {top} >= the tokenizer's vocabulary size {vocab_size}")


def assert_ids_in_vocab(ids: torch.Tensor, n: int) -> None:
    """Inside a compiled graph: an assert that every id is in ``[0, n)``, raised as ``RuntimeError``
    when the graph runs; nothing is read back to the host, so the graph does not break (the eager
    checks read the range back and raise ``ValueError``)."""
    torch._assert_async(((ids >= 0) & (ids < n)).all(), f"input_ids must be in [0, {n}), the model's vocabulary size")


def ids_checks_forced() -> bool:
    """``ENGRAM_CHECK_IDS=1``: range-check ids on accelerators too, at the cost of a host sync per
    forward (on the CPU they are always checked; it costs nothing there)."""
    return os.environ.get("ENGRAM_CHECK_IDS", "0").strip().lower() in ("1", "true", "yes", "on")
