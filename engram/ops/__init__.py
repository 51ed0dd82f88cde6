"""Pure tensor functions and their fast backends (the bottom layer: imports nothing else of engram).

- :mod:`engram.ops.hash`: the reference N-gram hash (DESIGN.md §2.4) as tensor ops, any device.
- :mod:`engram.ops.cpu`: the C backend (bulk hash and decode hash step), built on first use.
- :mod:`engram.ops.threads`: the small thread pool the CPU hash splits its time axis over.

A fast path here takes tensors and returns tensors; which one runs is chosen in one place
(:func:`engram.ops.hash.hash_ngrams`), and tests/test_ops.py holds each equal to the formula.
"""
