"""Where engram keeps files it can rebuild: compiled kernels, trained tokenizers, token arrays."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$ENGRAM_CACHE_DIR`` (``$ENGRAM_CACHE``, its older name, is read too), else
    ``$XDG_CACHE_HOME/engram``, else ``~/.cache/engram``. Not created here."""
    for var in ("ENGRAM_CACHE_DIR", "ENGRAM_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "engram"
