"""engram: Engram conditional memory (DeepSeek, arXiv 2601.07372) for PyTorch.

Public API::

    EngramConfig            validated hyper-parameters
    CompressedTokenizer     raw ids -> canonical ids
    NgramHashMapping        bit-exact multi-head N-gram hashing
    MultiHeadEmbedding      flat multi-head table
    Engram                  the branch module (gate, value, short conv; variants by config)
    EngramGPT, GPTConfig    a small decoder-only LM with Engram at chosen blocks
    EngramTokenizer, EngramModule   the seed documents' names (aliases)
    offload, OffloadMultiHeadEmbedding   tables in host RAM or on disk, hot-row cache
"""

from .compat import EngramModule, EngramTokenizer
from .config import EngramConfig
from .hashing import NgramHashMapping
from .memory import MultiHeadEmbedding
from .model import EngramGPT, GPTCache, GPTConfig
from .module import Engram, EngramLayerState
from .offload import OffloadMultiHeadEmbedding, offload
from .tokenizer import CompressedTokenizer

__version__ = "0.1.0"

__all__ = [
    "CompressedTokenizer",
    "Engram",
    "EngramConfig",
    "EngramGPT",
    "EngramLayerState",
    "EngramModule",
    "EngramTokenizer",
    "GPTCache",
    "GPTConfig",
    "MultiHeadEmbedding",
    "NgramHashMapping",
    "OffloadMultiHeadEmbedding",
    "offload",
    "__version__",
]

try:  # transformers integration: registers EngramForCausalLM / PhiEngramForCausalLM with the Auto classes
    from . import hf  # noqa: F401
except ImportError as _e:  # the core works without transformers; say why the integration is off
    import warnings as _warnings

    _warnings.warn(f"engram.hf is unavailable (needs transformers>=5.23): {_e}", stacklevel=2)
