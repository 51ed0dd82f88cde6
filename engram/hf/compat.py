"""Everything :mod:`engram.hf` relies on inside transformers, in one place.

The wrapper is ordinary transformers code (a ``PreTrainedModel`` + ``GenerationMixin`` with a
``Cache``), but a few things it needs are not a stable public API and have changed between
releases. Each one lives here, with the versions that need it, so that the next rename is a
change to this file only. ``tests/test_hf.py`` runs on the newest transformers and, in
``.ci/run``, again on the floor declared in ``pyproject.toml``.

=====================================  ===========================================================
what                                   versions
=====================================  ===========================================================
cache argument of ``forward`` /        ``past_key_values`` up to 5.23; ``cache`` from 5.24
``prepare_inputs_for_generation``,     (5.24 still accepts ``past_key_values`` with a
generation ``model_kwargs`` key and    ``FutureWarning``, removal announced for 5.40). Detected from
output field                           the signature of ``GenerationMixin.prepare_inputs_for_generation``.
``cache_utils.DummyLayer``             >= 5.23: a cache layer that attention bookkeeping skips
                                       (the base of :class:`~engram.hf.cache.EngramCacheLayer`).
``Cache.layers`` /                     >= 5.0: the per-layer list, and the class a lazily filled
``Cache.layer_class_to_replicate``     ``DynamicCache`` appends.
``configuration_utils.SubConfigSpec``  >= 5.23: a typed sub-config default (``text_config``).
``huggingface_hub.dataclasses.strict`` configs are strict dataclasses in transformers 5.
``transformers.initialization``        >= 5.0: the ``init.*`` helpers ``_init_weights`` must use
                                       (they respect ``_is_hf_initialized``).
``GenerationMixin._prepare_cache_for_generation``  the hook where generation creates the cache;
                                       we append the Engram entry there (assisted decoding then
                                       records its past too). Signature ``(generation_config,
                                       model_kwargs, ...)`` in 5.23 to 5.25.
``Cache.activate_past_recording``      5.25 passes ``recurrent_states_to_keep=`` to every layer
                                       object (assisted decoding); ``EngramCacheLayer`` takes
                                       and ignores keyword options.
=====================================  ===========================================================

Decoder-layer forward pre-hooks (:mod:`engram.hf.families`) touch only ``hidden_states``, the
first positional argument of every supported decoder layer, so they are version-independent.
"""

from __future__ import annotations

import inspect
from typing import Any

import transformers
from huggingface_hub.dataclasses import strict  # noqa: F401  (re-exported for engram.hf / engram.hf.phi)
from transformers import GenerationMixin
from transformers import initialization  # noqa: F401
from transformers.cache_utils import Cache, DummyLayer, DynamicCache  # noqa: F401
from transformers.configuration_utils import SubConfigSpec  # noqa: F401

__all__ = [
    "CACHE_KWARG", "Cache", "DummyLayer", "DynamicCache", "SubConfigSpec", "initialization", "strict",
    "generation_cache", "output_cache", "take_cache", "TRANSFORMERS_VERSION",
]

TRANSFORMERS_VERSION = transformers.__version__


def _cache_kwarg() -> str:
    params = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return "cache" if "cache" in params else "past_key_values"


#: The name under which the installed transformers passes the cache to ``forward`` (and keeps it
#: in generation's ``model_kwargs`` and in model outputs): ``"cache"`` (>= 5.24) or
#: ``"past_key_values"`` (<= 5.23).
CACHE_KWARG: str = _cache_kwarg()

_CACHE_NAMES = ("cache", "past_key_values")


def take_cache(cache: Any, past_key_values: Any) -> Any:
    """The one cache a caller meant, given either spelling (``cache=`` or ``past_key_values=``).

    Both set to different objects is a ``ValueError`` (transformers would silently drop one).
    """
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the cache once, as cache= or past_key_values=, not both")
    return cache if cache is not None else past_key_values


def generation_cache(model_kwargs: dict) -> Any:
    """The cache generation keeps in its ``model_kwargs`` (under the installed version's name)."""
    for name in (CACHE_KWARG,) + _CACHE_NAMES:
        if model_kwargs.get(name) is not None:
            return model_kwargs[name]
    return None


def output_cache(outputs: Any) -> Any:
    """The cache returned in a model output, under either name, without a deprecation warning."""
    if isinstance(outputs, dict):
        for name in (CACHE_KWARG,) + _CACHE_NAMES:
            if outputs.get(name) is not None:
                return outputs[name]
        return None
    return getattr(outputs, CACHE_KWARG, None)
