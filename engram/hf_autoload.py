"""Let ``AutoConfig`` / ``AutoModelForCausalLM`` find Engram models after a plain ``import engram``
without ``import engram`` importing transformers (which takes seconds).

``import engram`` calls :func:`install`. When transformers' ``configuration_auto`` module is
loaded (already, or later by anyone), a lazy placeholder for each Engram ``model_type`` goes into
its ``CONFIG_MAPPING``. The first time transformers asks for one (``from_pretrained`` of an
Engram checkpoint), the placeholder imports :mod:`engram.hf`, whose registration replaces it with
the real classes, and hands the config over. The placeholder is a dict entry, set while
transformers may still be importing itself, so it imports nothing there.

This is the one place besides :mod:`engram.hf.compat` that knows a transformers internal: the
``_extra_content`` dict of ``CONFIG_MAPPING`` (transformers 5.x), where ``AutoConfig.register``
puts registered model types.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any

MODEL_TYPES = ("engram_causal_lm", "phi_engram")
_TARGET = "transformers.models.auto.configuration_auto"


class _LazyEngramConfig:
    """Stands in for an Engram config class until :mod:`engram.hf` is imported."""

    model_type = "engram_causal_lm"

    @classmethod
    def _real(cls, model_type: str) -> Any:
        import engram.hf  # noqa: F401,PLC0415 - registers the real classes over this placeholder
        from transformers import CONFIG_MAPPING  # noqa: PLC0415

        return CONFIG_MAPPING[model_type]

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:  # AutoConfig.for_model(model_type, ...)
        return cls._real(cls.model_type)(*args, **kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs: Any) -> Any:
        return cls._real(config_dict.get("model_type", cls.model_type)).from_dict(config_dict, **kwargs)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        return cls._real(cls.model_type).from_pretrained(*args, **kwargs)


def _add_placeholders(module: Any) -> None:
    extra = getattr(getattr(module, "CONFIG_MAPPING", None), "_extra_content", None)
    if isinstance(extra, dict):
        for model_type in MODEL_TYPES:
            extra.setdefault(model_type, type(f"LazyEngramConfig[{model_type}]", (_LazyEngramConfig,),
                                               {"model_type": model_type}))


class _Finder(importlib.abc.MetaPathFinder):
    """Runs :func:`_add_placeholders` right after transformers' ``configuration_auto`` loads."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)  # once; and find the real spec without ourselves
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_register(module: Any) -> None:
            exec_module(module)
            _add_placeholders(module)

        loader.exec_module = exec_and_register  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Make Engram checkpoints loadable through the transformers Auto classes (see module doc)."""
    if _TARGET in sys.modules:
        _add_placeholders(sys.modules[_TARGET])
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
