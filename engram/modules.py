"""``engram.modules``: the seed code's module path of ``EngramModule`` and its table classes
(``from engram.modules import EngramModule``), re-exported from :mod:`engram.compat` and
:mod:`engram.storage`. The branch itself is :mod:`engram.nn.module`."""

from engram.compat import EngramModule, OffloadEmbedding
from engram.nn.memory import MultiHeadEmbedding
from engram.storage.tables import OffloadMultiHeadEmbedding

__all__ = ["EngramModule", "MultiHeadEmbedding", "OffloadEmbedding", "OffloadMultiHeadEmbedding"]
