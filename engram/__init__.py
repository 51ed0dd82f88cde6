"""engram: Engram conditional memory (DeepSeek, arXiv 2601.07372) for PyTorch.

Public API::

    EngramConfig            validated hyper-parameters
    CompressedTokenizer     raw ids -> canonical ids
    NgramHashMapping        bit-exact multi-head N-gram hashing
    MultiHeadEmbedding      flat multi-head table
    Engram                  the branch module (gate, value, short conv; variants by config)
    EngramGPT, GPTConfig    a small decoder-only LM with Engram at chosen blocks
    EngramTokenizer, EngramModule   the seed documents' names (aliases; also engram.tokenizer,
                                    engram.modules, OffloadEmbedding, AdapterTokenizer)
    offload, OffloadMultiHeadEmbedding   tables in host RAM or on disk, hot-row cache

Subpackages, each importing only those above it in this list (docs/architecture.md)::

    engram.ops        pure tensor functions and their C backend
    engram.core       compression tokenizer, N-gram hash mapping
    engram.nn         memory (table storage contract), the Engram branch
    engram.models     the small GPT
    engram.storage    host / disk tables, hot-row cache, quantised rows, prefetch, offload()
    engram.hf         transformers causal LMs with Engram (imports transformers)
    engram.training   optimizers, training loop, data, checkpoints, sizing, study
    engram.cli        the ``engram`` command, one module per subcommand
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from engram import hf_autoload

__version__ = "0.1.0"

# Public names and the module that defines each: imported on first use (PEP 562), so that
# `import engram` and `engram --help` stay light; `from engram import X` works as usual.
_EXPORTS = {
    "AdapterTokenizer": "engram.compat",
    "CompressedTokenizer": "engram.core.tokenizer",
    "Engram": "engram.nn.module",
    "EngramConfig": "engram.config",
    "EngramGPT": "engram.models.gpt",
    "EngramLayerState": "engram.nn.module",
    "EngramModule": "engram.compat",
    "EngramTokenizer": "engram.compat",
    "GPTCache": "engram.models.gpt",
    "GPTConfig": "engram.models.gpt",
    "MultiHeadEmbedding": "engram.nn.memory",
    "NgramHashMapping": "engram.core.hashing",
    "OffloadEmbedding": "engram.compat",
    "OffloadMultiHeadEmbedding": "engram.storage.offload",
    "offload": "engram.storage.offload",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engram' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from engram.compat import AdapterTokenizer, EngramModule, EngramTokenizer, OffloadEmbedding
    from engram.config import EngramConfig
    from engram.core.hashing import NgramHashMapping
    from engram.core.tokenizer import CompressedTokenizer
    from engram.models.gpt import EngramGPT, GPTCache, GPTConfig
    from engram.nn.memory import MultiHeadEmbedding
    from engram.nn.module import Engram, EngramLayerState
    from engram.storage.offload import OffloadMultiHeadEmbedding, offload

# transformers is imported only when engram.hf is: Engram checkpoints still load through
# AutoModelForCausalLM after `import engram` (engram/hf_autoload.py).
hf_autoload.install()
