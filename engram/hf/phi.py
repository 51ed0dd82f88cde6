"""Phi-1 with Engram, in the seed-004 spelling: ``PhiEngramConfig`` / ``PhiEngramForCausalLM``.

``PhiEngramConfig`` is a ``PhiConfig`` plus ``engram_layer_ids`` (0-based decoder layers) and
``engram_config`` (any other :class:`~engram.config.EngramConfig` field; ``hidden_size`` comes
from Phi). ``PhiEngramForCausalLM`` is :class:`~engram.hf.EngramForCausalLM` around a
``PhiForCausalLM`` built from that config: same hooks, cache state, save/load and checks.

A plain Phi checkpoint directory loads directly (Engram weights freshly initialised, output
branch zero so the model starts as the checkpoint)::

    model = PhiEngramForCausalLM.from_pretrained(phi_dir, engram_layer_ids=[1, 15], tokenizer=tok)

The Phi weights are found under ``backbone.`` by transformers' base-model-prefix loading.
Without ``tokenizer`` (and no saved table) Engram hashes raw ids uncompressed, with a warning.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, AutoModelForCausalLM, PhiConfig, PhiForCausalLM, PreTrainedConfig, PreTrainedModel

from engram.config import EngramConfig
from engram.hf.modeling import LOAD_HINT, EngramForCausalLM
from engram.hf.compat import strict

__all__ = ["PhiEngramConfig", "PhiEngramForCausalLM"]

# The reference demo's placement ("2nd and 16th block"), kept where the model is deep enough.
DEFAULT_ENGRAM_LAYER_IDS = (1, 15)


@strict
class PhiEngramConfig(PhiConfig):
    """``PhiConfig`` + Engram.

    Args:
        engram_layer_ids: 0-based decoder layers with an Engram branch; ``None`` means the
            reference's ``[1, 15]`` restricted to layers that exist. An id past the last layer is
            a ``ValueError``.
        engram_config: other :class:`EngramConfig` fields (``max_ngram_size``,
            ``n_embed_per_ngram``, ``engram_vocab_size``, ...). ``hidden_size`` and ``layer_ids``
            are taken from this config.
        engram_hashing: the saved compression table and hashing constants (filled in when the
            model is built; do not set by hand).
        engram_about: how to load the checkpoint (:data:`engram.hf.modeling.LOAD_HINT`), for
            whoever reads ``config.json``; always set to the current text.
        (all ``PhiConfig`` fields)
    """

    model_type = "phi_engram"

    engram_layer_ids: list[int] | None = None
    engram_config: dict | None = None
    engram_hashing: dict | None = None
    engram_about: str | None = None  # LOAD_HINT, written into every config.json (set below, never read)

    def __post_init__(self, **kwargs: Any) -> None:
        kwargs.pop("model_type", None)  # the seed spells PhiEngramConfig(**phi_config.to_dict(), ...)
        super().__post_init__(**kwargs)
        self.engram_about = LOAD_HINT
        if self.engram_layer_ids is None:
            self.engram_layer_ids = [i for i in DEFAULT_ENGRAM_LAYER_IDS if i < self.num_hidden_layers]
        self.engram_layer_ids = [int(i) for i in self.engram_layer_ids]
        bad = [i for i in self.engram_layer_ids if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(
                f"engram_layer_ids {bad} are outside the {self.num_hidden_layers} decoder layers "
                f"(0-based ids 0..{self.num_hidden_layers - 1})"
            )
        self.to_engram_config()  # validate the Engram fields now

    def to_engram_config(self) -> EngramConfig:
        """The :class:`EngramConfig` this Phi config describes."""
        fields = dict(self.engram_config or {})
        for key in ("hidden_size", "layer_ids", "hc_mult"):
            if key in fields:
                raise ValueError(f"engram_config[{key!r}] is taken from the Phi config; do not set it there")
        fields.setdefault("zero_init_output", True)  # a loaded Phi checkpoint starts undamaged
        return EngramConfig.from_dict({**fields, "hidden_size": self.hidden_size, "layer_ids": list(self.engram_layer_ids)})


class PhiEngramForCausalLM(EngramForCausalLM):
    """Phi-1 causal LM with Engram (seed 004); see the module docstring.

    Args:
        config: :class:`PhiEngramConfig`.
        tokenizer: the Phi tokenizer (builds the compression table; checked against a saved one).
    """

    config_class = PhiEngramConfig
    _allow_uncompressed = True

    def __init__(self, config: PhiEngramConfig, tokenizer: Any = None, backbone: PreTrainedModel | None = None):
        if not isinstance(config, PhiEngramConfig):
            raise TypeError(f"config must be a PhiEngramConfig, got {type(config).__name__}")
        super().__init__(config, backbone=backbone, tokenizer=tokenizer)

    @staticmethod
    def _text_config(config: PreTrainedConfig) -> PreTrainedConfig:
        return config

    def _build_backbone(self, config: PreTrainedConfig) -> PreTrainedModel:
        # The Phi model reads only Phi fields, so it shares this config (one attention setting).
        return PhiForCausalLM(config)

    @staticmethod
    def _engram_config(config: PreTrainedConfig) -> EngramConfig:
        return config.to_engram_config()

    @staticmethod
    def _store_engram(config: PreTrainedConfig, engram_cfg: EngramConfig, hashing: dict) -> None:
        fields = engram_cfg.to_dict()
        for key in ("hidden_size", "layer_ids", "hc_mult"):
            fields.pop(key)
        config.engram_config = fields
        config.engram_hashing = hashing


AutoConfig.register(PhiEngramConfig.model_type, PhiEngramConfig)
AutoModelForCausalLM.register(PhiEngramConfig, PhiEngramForCausalLM)
