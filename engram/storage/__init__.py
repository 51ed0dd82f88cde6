"""Where tables live: host RAM, memory-mapped disk files, a hot-row cache, quantised rows and
prefetch (module swaps around :class:`engram.nn.memory.MultiHeadEmbedding`; DESIGN.md §4-5)."""
