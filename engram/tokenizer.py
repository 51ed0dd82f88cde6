"""``engram.tokenizer``: the seed code's module path of ``EngramTokenizer`` (``from engram.tokenizer
import EngramTokenizer``), re-exported from :mod:`engram.compat`. The compression tokenizer itself
is :mod:`engram.core.tokenizer`."""

from engram.compat import AdapterTokenizer, EngramTokenizer

__all__ = ["AdapterTokenizer", "EngramTokenizer"]
