"""Evaluating Engram models with lm-evaluation-harness (the ``eval`` extra: ``pip install 'engram-torch[eval]'``).

:mod:`engram.evaluation.harness` (imports lm-eval): the lm-eval model ``engram`` (``EngramLM``) for
``engram train`` checkpoints, :func:`~engram.evaluation.harness.evaluate` and ``make_lm``.
:mod:`engram.evaluation.task_data` (no lm-eval import): ``TASKS_DIR``, the shipped tasks
``engram_ppl`` and ``engram_mc``, and the loaders their YAMLs name. ``python -m engram.evaluation``
is lm-eval's own command line with the ``engram`` model registered. docs/eval.md has the walk-through.
"""

from __future__ import annotations

from engram.evaluation.task_data import TASKS_DIR

__all__ = ["TASKS_DIR"]
