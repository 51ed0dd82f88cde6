"""Per-family adapters: where a transformers causal LM keeps its decoder layers.

:class:`~engram.hf.EngramForCausalLM` adds the Engram branch to the residual stream *before* a
decoder layer's attention. In every pre-norm decoder (GPT-2, Llama, Qwen2/3, Mistral, Phi) the
residual stream is exactly the ``hidden_states`` a decoder layer receives (first positional
argument), so "before the attention" is a forward pre-hook on that layer that replaces
``hidden_states`` with ``hidden_states + engram(hidden_states)``. What differs between families is
only where the layers live and how the config names its sizes, which is what an adapter records.

Adding a family
---------------
1. Find the decoder layers: ``AutoModelForCausalLM.from_config(cfg)`` of the family, then look for
   the ``nn.ModuleList`` of blocks (``model.layers``, ``transformer.h``, ...).
2. Check the layer is pre-norm and takes the residual as ``hidden_states`` (first positional
   argument or keyword). A post-norm family needs its own ``add_to_residual``.
3. Register it::

       from engram.hf.families import FamilyAdapter, register_family
       register_family(FamilyAdapter(model_types=("gemma",), layers_path="model.layers"))

4. Run ``tests/test_hf.py``'s identity and cached-generation checks on a tiny config of the family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn


@dataclass(frozen=True)
class FamilyAdapter:
    """How to reach the decoder layers of one model family.

    Args:
        model_types: ``config.model_type`` values this adapter covers.
        layers_path: dotted attribute path from the ``*ForCausalLM`` to its decoder ``ModuleList``.
        hidden_size_attr: config attribute holding the residual width D.
        num_layers_attr: config attribute holding the number of decoder layers.
    """

    model_types: tuple[str, ...]
    layers_path: str
    hidden_size_attr: str = "hidden_size"
    num_layers_attr: str = "num_hidden_layers"

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of ``model`` (a ``*ForCausalLM`` of this family)."""
        obj: Any = model
        for name in self.layers_path.split("."):
            if not hasattr(obj, name):
                raise ValueError(
                    f"{type(model).__name__} has no attribute path {self.layers_path!r} (stuck at {name!r}); "
                    f"is it a {self.model_types} causal LM?"
                )
            obj = getattr(obj, name)
        if not isinstance(obj, nn.ModuleList):
            raise ValueError(f"{self.layers_path!r} of {type(model).__name__} is a {type(obj).__name__}, not a ModuleList")
        return obj

    def hidden_size(self, config: Any) -> int:
        return int(getattr(config, self.hidden_size_attr))

    def num_layers(self, config: Any) -> int:
        return int(getattr(config, self.num_layers_attr))

    @staticmethod
    def add_to_residual(args: tuple, kwargs: dict, branch: Callable[[torch.Tensor], torch.Tensor]) -> tuple[tuple, dict]:
        """Pre-hook body: ``hidden_states <- hidden_states + branch(hidden_states)``.

        Pre-norm layers receive the residual stream as ``hidden_states``; adding to it is adding
        to the residual before the layer's attention (and, for Phi's parallel block, its MLP).
        """
        if args:
            return (args[0] + branch(args[0]),) + tuple(args[1:]), kwargs
        if "hidden_states" not in kwargs:
            raise ValueError("the decoder layer was called without hidden_states; this family needs its own adapter")
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = kwargs["hidden_states"] + branch(kwargs["hidden_states"])
        return args, kwargs


_FAMILIES: dict[str, FamilyAdapter] = {}


def register_family(adapter: FamilyAdapter) -> None:
    """Make :func:`adapter_for` return ``adapter`` for each of its ``model_types``."""
    for model_type in adapter.model_types:
        _FAMILIES[model_type] = adapter


register_family(FamilyAdapter(("gpt2",), "transformer.h", hidden_size_attr="n_embd", num_layers_attr="n_layer"))
register_family(FamilyAdapter(("llama", "qwen2", "qwen3", "mistral"), "model.layers"))
register_family(FamilyAdapter(("phi", "phi_engram"), "model.layers"))


def supported_model_types() -> list[str]:
    return sorted(_FAMILIES)


def adapter_for(config: Any) -> FamilyAdapter:
    """The adapter for a transformers config, or a ``ValueError`` saying how to add one."""
    model_type = getattr(config, "model_type", None)
    adapter = _FAMILIES.get(model_type)
    if adapter is None:
        raise ValueError(
            f"model_type={model_type!r} has no Engram adapter (supported: {supported_model_types()}); "
            "see engram/hf/families.py 'Adding a family' to register one"
        )
    return adapter
