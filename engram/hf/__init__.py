"""Engram on transformers causal LMs: ``EngramForCausalLM.from_base(model, engram_config, tokenizer)``.

Importing this package registers ``EngramForCausalLM`` and ``PhiEngramForCausalLM`` with the
transformers Auto classes. Modules: :mod:`~engram.hf.modeling` (the wrapper and its config),
:mod:`~engram.hf.cache` (the Engram decode state inside a transformers ``Cache``),
:mod:`~engram.hf.families` (where each model family keeps its decoder layers),
:mod:`~engram.hf.phi` (the seed-004 Phi spelling), :mod:`~engram.hf.trainer` (``EngramTrainer``),
and :mod:`~engram.hf.compat`, the one place that knows transformers' internals and versions.
"""

from engram.hf.modeling import EngramCausalLMConfig, EngramForCausalLM, build_hashing
from engram.hf.phi import PhiEngramConfig, PhiEngramForCausalLM

__all__ = ["EngramCausalLMConfig", "EngramForCausalLM", "PhiEngramConfig", "PhiEngramForCausalLM", "build_hashing"]
