"""Helpers for dispatch-bound CPU steps on a few tokens (decode).

A decode step on a small CPU model costs what its Python and per-op dispatches cost, not its
arithmetic; these helpers do the same work with fewer or cheaper calls.
"""

from __future__ import annotations

import numpy as np
import torch

_NP_DTYPES = {torch.long: np.int64, torch.float32: np.float32, torch.float64: np.float64}


def tensor_from_list(values: list, dtype: torch.dtype) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype)`` on CPU for a (nested) list of Python numbers.

    Goes through NumPy, which builds a small array in ~2.5 us where ``torch.tensor`` takes ~6 us
    on a 2-core CPU. ``dtype`` must be int64, float32 or float64; the values are the same.
    """
    return torch.from_numpy(np.array(values, dtype=_NP_DTYPES[dtype]))
