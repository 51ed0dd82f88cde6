"""Engram on a transformers causal LM: ``EngramForCausalLM.from_base(model, engram_config, tokenizer)``.

Shapes: B batch, T new tokens, S = past + new tokens, D hidden size, H hash heads per layer.

The wrapper keeps the base ``*ForCausalLM`` untouched as ``self.backbone`` and adds one
:class:`~engram.nn.module.Engram` per chosen decoder layer (0-based ids) in ``self.engram``. Each
forward hashes the token ids once (all Engram layers), then runs the backbone; a forward pre-hook
on each chosen decoder layer adds ``engram(hidden_states, hash_ids)`` to the residual before the
layer's attention (see :mod:`engram.hf.families`). The per-call hash ids live in a step context
that exists only during :meth:`EngramForCausalLM.forward`; the decode state (n-gram history, conv
tails) lives in the transformers ``Cache`` (:mod:`engram.hf.cache`).

Left padding: padded positions read as the Engram pad id in the n-gram history and are kept out of
the conv history (``token_mask``). ``position_ids`` go to the backbone exactly as given, so the
wrapper computes what the base model computes for every call form; ``generate`` passes positions
that count real tokens only, so a padded row generates what it generates alone.

transformers internals the wrapper relies on (the cache argument's name, cache layer classes,
generation hooks) are reached through :mod:`engram.hf.compat` only.

Save/load: the config (:class:`EngramCausalLMConfig`) holds the base config, the Engram config and
the compression table + hashing constants, so ``AutoModelForCausalLM.from_pretrained(dir)`` (after
``import engram``) needs no tokenizer and never rehashes. Passing ``tokenizer=`` to
``from_pretrained`` checks it compresses exactly like the saved table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel

import engram.hf.compat as hf_compat
from engram.config import EngramConfig
from engram.core.hashing import NgramHashMapping, check_same_compression
from engram.core.tokenizer import CompressedTokenizer
from engram.hf.cache import EngramCacheLayer, engram_cache_layer
from engram.hf.compat import Cache, DynamicCache, SubConfigSpec, strict
from engram.hf.compat import initialization as init
from engram.hf.families import FamilyAdapter, adapter_for
from engram.nn.memory import MultiHeadEmbedding, table_parameters
from engram.nn.module import Engram, ShortConv

logger = logging.getLogger(__name__)

__all__ = ["EngramCausalLMConfig", "EngramForCausalLM", "build_hashing"]


# ---------------------------------------------------------------------------------------------- config
@strict
class EngramCausalLMConfig(PreTrainedConfig):
    """Config of an :class:`EngramForCausalLM`.

    Args:
        text_config: the base causal LM's config (any supported family).
        engram: :meth:`EngramConfig.to_dict` of the branch (``pad_id`` resolved to a raw id).
        engram_hashing: :meth:`NgramHashMapping.state_dict_extra` (compression table, raw pad id,
            multipliers, table sizes): the model hashes exactly as when it was built, with no
            tokenizer at hand.
    """

    model_type = "engram_causal_lm"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="gpt2")}

    text_config: dict | PreTrainedConfig | None = None
    engram: dict | None = None
    engram_hashing: dict | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.engram is not None:
            EngramConfig.from_dict(self.engram)  # fail at config time, naming the bad field


# ---------------------------------------------------------------------------------------------- hashing
def build_hashing(engram_config: EngramConfig, saved: dict | None, tokenizer: Any,
                  vocab_size: int | None = None) -> tuple[NgramHashMapping, EngramConfig]:
    """The hash mapping of a model and its Engram config with ``pad_id`` resolved to a raw id.

    Args:
        engram_config: the branch config.
        saved: a saved :meth:`NgramHashMapping.state_dict_extra`, or ``None``.
        tokenizer: a HF tokenizer / :class:`CompressedTokenizer`, or ``None``.
        vocab_size: when neither ``saved`` nor ``tokenizer`` is given, build an identity
            (uncompressed) table over this many ids; otherwise that case is a ``ValueError``.

    With both ``saved`` and ``tokenizer`` the tokenizer must compress exactly like the saved table.
    """
    if saved is not None:
        compressed = CompressedTokenizer.from_state_dict(saved["compressed"])
        if tokenizer is not None:
            check_same_compression(compressed, tokenizer, "the saved model")
        cfg = engram_config.replace(pad_id=int(saved["raw_pad_id"]))
        with torch.device("cpu"):  # never on meta: the hashing constants are not weights
            mapping = NgramHashMapping(cfg, compressed, multiplier_vocab=saved.get("multiplier_vocab"))
        mapping.check_same_as_saved(saved, "the saved model")
        return mapping, cfg
    if tokenizer is None:
        if vocab_size is None:
            raise ValueError("Engram needs the tokenizer (to build its compression table) or a saved engram_hashing")
        logger.warning(
            "no tokenizer given: Engram hashes raw ids uncompressed (identity table over %d ids); "
            "pass tokenizer= to use the compressed tokenizer", vocab_size,
        )
        tokenizer = CompressedTokenizer(lookup_table=np.arange(vocab_size, dtype=np.int64))
    with torch.device("cpu"):
        mapping = NgramHashMapping(engram_config, tokenizer)
    return mapping, engram_config.replace(pad_id=mapping.raw_pad_id)


@dataclass
class _Step:
    """What the decoder-layer hooks need during one forward: hash ids, padding mask, decode state."""

    hash_ids: dict[int, torch.Tensor]  # {layer_id: (B, T, H)}
    token_mask: torch.Tensor | None  # (B, T) bool, False at padding
    cache: EngramCacheLayer | None


# ---------------------------------------------------------------------------------------------- model
class EngramForCausalLM(PreTrainedModel, GenerationMixin):
    """A transformers causal LM with Engram branches at chosen decoder layers.

    Build one with :meth:`from_base`; load a saved one with ``from_pretrained`` (or
    ``AutoModelForCausalLM.from_pretrained`` after ``import engram``).

    Args:
        config: :class:`EngramCausalLMConfig`.
        backbone: an existing base model to wrap (used as is, not copied); built from
            ``config.text_config`` when ``None``.
        tokenizer: checked against (or, when the config has none yet, used to build) the
            compression table.
    """

    config_class = EngramCausalLMConfig
    base_model_prefix = "backbone"
    main_input_name = "input_ids"
    # Activation checkpointing covers every decoder layer except those hosting Engram (see
    # _set_gradient_checkpointing): their hooks need the forward's step context.
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _allow_uncompressed = False  # no tokenizer and no saved table -> error (Phi's seed API relaxes this)

    def __init__(self, config: PreTrainedConfig, backbone: PreTrainedModel | None = None, tokenizer: Any = None):
        super().__init__(config)
        text_config = self._text_config(config)
        self.family: FamilyAdapter = adapter_for(text_config)
        if backbone is None:
            backbone = self._build_backbone(config)
        else:
            for module in backbone.modules():  # post_init must not re-initialise a given base model
                module._is_hf_initialized = True
        self.backbone = backbone
        engram_cfg = self._engram_config(config)
        D = self.family.hidden_size(text_config)
        if engram_cfg.hidden_size != D:
            raise ValueError(
                f"engram_config.hidden_size={engram_cfg.hidden_size} does not match the base model's hidden size {D}"
            )
        if engram_cfg.hc_mult != 1:
            raise ValueError(f"engram_config.hc_mult={engram_cfg.hc_mult}: a transformers model has one residual stream (1)")
        n_layers = self.family.num_layers(text_config)
        bad = [i for i in engram_cfg.layer_ids if i >= n_layers]
        if bad:
            raise ValueError(
                f"engram layer_ids {bad} are past the last decoder layer: the base model has {n_layers} layers "
                f"(valid ids 0..{n_layers - 1}, 0-based)"
            )
        embed_rows = self.backbone.get_input_embeddings().num_embeddings
        saved = self._saved_hashing(config)
        hashing, engram_cfg = build_hashing(engram_cfg, saved, tokenizer,
                                            embed_rows if self._allow_uncompressed else None)
        if hashing.compressed.raw_vocab_size > embed_rows:
            raise ValueError(
                f"the tokenizer has {hashing.compressed.raw_vocab_size} ids but the base model embeds only "
                f"{embed_rows}: a tokenizer of another vocabulary?"
            )
        if saved is None:
            self._store_engram(config, engram_cfg, hashing.state_dict_extra())
        # Not a submodule: its buffers are constants rebuilt from the config, not weights to load.
        object.__setattr__(self, "hashing", hashing)
        self.engram_config = engram_cfg
        self.num_decoder_layers = n_layers
        self.engram = nn.ModuleDict(
            {str(i): Engram(engram_cfg, i, hashing.table_sizes[i]) for i in engram_cfg.layer_ids}
        )
        self._step: _Step | None = None
        layers = self.family.decoder_layers(self.backbone)
        for i in engram_cfg.layer_ids:
            layers[i].register_forward_pre_hook(partial(self._engram_hook, i), with_kwargs=True)
        self.post_init()

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func: Any = checkpoint,
                                    every_n_layers: int = 1) -> None:
        """Checkpoint the backbone's decoder layers as transformers does, except the Engram ones.

        A checkpointed layer re-runs its forward during backward, after
        :meth:`forward` has returned; the Engram pre-hook needs that forward's hash ids, so
        the (few) layers hosting Engram keep their activations instead of being recomputed.
        """
        super()._set_gradient_checkpointing(enable=enable, gradient_checkpointing_func=gradient_checkpointing_func,
                                            every_n_layers=every_n_layers)
        layers = self.family.decoder_layers(self.backbone)
        for i in self.engram_config.layer_ids:
            if hasattr(layers[i], "gradient_checkpointing"):
                layers[i].gradient_checkpointing = False

    # ------------------------------------------------------------------ config plumbing (overridden by PhiEngram)
    @staticmethod
    def _text_config(config: PreTrainedConfig) -> PreTrainedConfig:
        return config.text_config

    def _build_backbone(self, config: PreTrainedConfig) -> PreTrainedModel:
        return AutoModelForCausalLM.from_config(config.text_config)

    @staticmethod
    def _engram_config(config: PreTrainedConfig) -> EngramConfig:
        if config.engram is None:
            raise ValueError("config.engram is empty: build the model with EngramForCausalLM.from_base")
        return EngramConfig.from_dict(config.engram)

    @staticmethod
    def _saved_hashing(config: PreTrainedConfig) -> dict | None:
        return config.engram_hashing

    @staticmethod
    def _store_engram(config: PreTrainedConfig, engram_cfg: EngramConfig, hashing: dict) -> None:
        config.engram = engram_cfg.to_dict()
        config.engram_hashing = hashing

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_base(cls, base_model: PreTrainedModel, engram_config: EngramConfig, tokenizer: Any) -> "EngramForCausalLM":
        """Wrap ``base_model`` (GPT-2, Llama/Qwen2/Qwen3/Mistral or Phi causal LM) with Engram.

        Args:
            base_model: the causal LM; used in place (its weights are shared, not copied).
            engram_config: branch hyper-parameters; ``layer_ids`` are 0-based decoder layer
                indices. ``zero_init_output`` is forced on so the model starts as the base model.
            tokenizer: the base model's tokenizer (builds the compression table).

        Returns:
            The wrapped model, on the base model's device and dtype, whose logits equal the base
            model's until the Engram weights are trained.
        """
        if not isinstance(base_model, PreTrainedModel):
            raise TypeError(f"base_model must be a transformers PreTrainedModel, got {type(base_model).__name__}")
        if not isinstance(engram_config, EngramConfig):
            raise TypeError(f"engram_config must be an EngramConfig, got {type(engram_config).__name__}")
        if tokenizer is None:
            raise ValueError("from_base needs the base model's tokenizer (Engram hashes canonical token ids)")
        text_config = base_model.config.get_text_config(decoder=True)
        adapter_for(text_config)  # unsupported families fail before anything is built
        attn = text_config._attn_implementation
        config = EngramCausalLMConfig(text_config=text_config, engram=engram_config.replace(zero_init_output=True).to_dict())
        # The new config's attention setting propagates to its sub-config; keep the base model's.
        config._attn_implementation_internal = text_config._attn_implementation_internal = attn
        model = cls(config, backbone=base_model, tokenizer=tokenizer)
        param = next(base_model.parameters())
        model.engram.to(device=param.device, dtype=param.dtype)
        model.generation_config = base_model.generation_config
        return model

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Only Engram modules (the backbone's are dispatched to its own _init_weights), each by its
        # own reset_parameters, through transformers' init functions (they skip loaded weights).
        if isinstance(module, (MultiHeadEmbedding, ShortConv, Engram)):
            module.reset_parameters(init)

    # ------------------------------------------------------------------ parameters
    def engram_parameters(self) -> list[nn.Parameter]:
        """Every Engram parameter (tables, projections, norms, conv)."""
        return list(self.engram.parameters())

    def table_parameters(self) -> list[nn.Parameter]:
        """Engram embedding tables (their own optimizer group; see :func:`engram.training.optim.build_optimizer`)."""
        return table_parameters(m.memory for m in self.engram.values())

    def dense_parameters(self) -> list[nn.Parameter]:
        table_ids = {id(p) for p in self.table_parameters()}
        return [p for p in self.parameters() if id(p) not in table_ids]

    def freeze_backbone(self, frozen: bool = True) -> "EngramForCausalLM":
        """Train only Engram (``frozen=True``, seed 004's strategy A) or everything (``False``)."""
        for p in self.backbone.parameters():
            p.requires_grad_(not frozen)
        for p in self.engram.parameters():
            p.requires_grad_(True)
        return self

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise ``ValueError`` unless ``tokenizer`` compresses exactly like this model's table."""
        build_hashing(self.engram_config, self.hashing.state_dict_extra(), tokenizer)

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.backbone.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_output_embeddings(value)

    def _engram_cache(self, cache: Cache) -> EngramCacheLayer:
        """The Engram entry of a transformers ``Cache`` (appended on first use)."""
        cfg = self.engram_config
        return engram_cache_layer(cache, self.num_decoder_layers, cfg.max_ngram_size - 1, cfg.conv_state_len)

    def _prepare_cache_for_generation(self, generation_config: Any, model_kwargs: dict, *args: Any, **kwargs: Any) -> Any:
        # Add the Engram entry as soon as generate makes the cache, before the prefill: assisted
        # decoding then asks every layer to record its past (activate_past_recording), ours included.
        out = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = hf_compat.generation_cache(model_kwargs)
        if isinstance(cache, Cache):
            self._engram_cache(cache)
        return out

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True, tokenizer: Any = None) -> nn.Embedding:
        """The backbone's ``resize_token_embeddings``, then the compression table grown to match.

        Existing ids keep their canonical ids and the multipliers keep the original compressed
        vocabulary size, so every n-gram of old tokens keeps its rows (and the model its
        outputs on them). New ids get canonical ids from ``tokenizer`` (the resized tokenizer:
        new tokens fold with existing ones exactly as a fresh build would) or, without one, one
        new canonical id each. A tokenizer that compresses the existing ids differently is a
        ``ValueError``. Shrinking leaves the table as it is.
        """
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        n_new, old = embeddings.num_embeddings, self.hashing.compressed
        n_old = old.raw_vocab_size
        if tokenizer is not None:
            given = tokenizer if isinstance(tokenizer, CompressedTokenizer) else CompressedTokenizer(tokenizer)
            table = given.lookup_table
            if table.shape[0] < n_old or not np.array_equal(table[:n_old], old.lookup_table):
                raise ValueError(
                    "the tokenizer compresses the model's existing ids differently from its table; "
                    "pass the model's own tokenizer with the new tokens added"
                )
            if table.shape[0] > n_new:
                raise ValueError(f"the tokenizer has {table.shape[0]} ids but the embeddings now have {n_new}")
        else:
            table = old.lookup_table
        if n_new > table.shape[0]:  # ids beyond the tokenizer (or all new ids): one canonical id each
            start = int(table.max()) + 1
            table = np.concatenate([table, np.arange(start, start + n_new - table.shape[0], dtype=np.int64)])
        if table.shape[0] == n_old:
            return embeddings
        cfg = self.engram_config
        if cfg.tokenizer_vocab_size is not None:
            cfg = cfg.replace(tokenizer_vocab_size=int(table.shape[0]))
        with torch.device("cpu"):
            # cfg.pad_id is already the resolved raw id (build_hashing), so the pad keeps its id
            hashing = NgramHashMapping(cfg, CompressedTokenizer(lookup_table=table),
                                       multiplier_vocab=self.hashing.multiplier_vocab)
        hashing.step_listeners = self.hashing.step_listeners  # an attached Prefetcher follows
        object.__setattr__(self, "hashing", hashing)
        self.engram_config = cfg
        self._store_engram(self.config, cfg, hashing.state_dict_extra())
        return embeddings

    # ------------------------------------------------------------------ forward
    def _engram_hook(self, layer_id: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        step = self._step
        if step is None:
            raise RuntimeError(
                "an Engram decoder layer ran outside EngramForCausalLM.forward; call the EngramForCausalLM, "
                "not its backbone"
            )
        state = step.cache.layer(layer_id) if step.cache is not None else None
        branch = self.engram[str(layer_id)]
        return self.family.add_to_residual(
            args, kwargs, lambda h: branch(h, step.hash_ids[layer_id], state, step.token_mask)  # (B, T, D)
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ):
        """The backbone's forward with Engram added; returns the backbone's ``CausalLMOutputWithPast``.

        Args:
            input_ids: ``(B, T)`` new token ids (required: Engram addresses memory by ids).
            attention_mask: ``(B, S)`` 1 for real tokens, 0 for (left) padding, past included.
            position_ids: ``(B, T)``, handed to the backbone as given (``None`` lets the backbone
                choose, exactly as without Engram; ``generate`` passes mask-derived positions).
            cache: a transformers ``Cache``; the Engram decode state is kept inside it.
                ``past_key_values=`` is the same argument under its pre-5.24 name; either is
                accepted on every supported transformers (:mod:`engram.hf.compat`).
            inputs_embeds: optional ``(B, T, D)`` embeddings of ``input_ids`` (never alone).
            labels, use_cache, logits_to_keep, kwargs: as for the backbone.
        """
        cache = hf_compat.take_cache(cache, past_key_values)
        if input_ids is None:
            raise ValueError(
                "EngramForCausalLM needs input_ids: Engram looks its memory up by token ids, so "
                "inputs_embeds alone cannot be used"
            )
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if inputs_embeds is not None and tuple(inputs_embeds.shape[:2]) != (B, T):
            raise ValueError(
                f"inputs_embeds {tuple(inputs_embeds.shape)} does not match input_ids {tuple(input_ids.shape)}"
            )
        if use_cache is None:
            use_cache = getattr(self._text_config(self.config), "use_cache", True)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config.get_text_config(decoder=True))
        state = self._engram_cache(cache) if cache is not None else None
        past = state.seen if state is not None else 0

        token_mask = None
        if attention_mask is not None:
            if attention_mask.ndim != 2 or tuple(attention_mask.shape) != (B, past + T):
                raise ValueError(
                    f"attention_mask must be 2-D (B, past+new)=({B}, {past + T}), got {tuple(attention_mask.shape)}"
                )
            token_mask = attention_mask[:, past:].bool()  # (B, T)

        # {layer: (B, T, H)}; padding reads as the pad history a sequence starts with
        hash_ids, history = self.hashing.hash_step(input_ids, state.history if state is not None else None, token_mask,
                                                   keep_history=state is not None and state.record_past)
        if state is not None:
            state.history = history  # (B, N-1)
            state.seen = past + T

        self._step = _Step(hash_ids, token_mask, state)
        try:
            return self.backbone(
                input_ids=None if inputs_embeds is not None else input_ids,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                labels=labels,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **{hf_compat.CACHE_KWARG: cache},
                **kwargs,
            )
        finally:
            self._step = None


AutoConfig.register(EngramCausalLMConfig.model_type, EngramCausalLMConfig)
AutoModelForCausalLM.register(EngramCausalLMConfig, EngramForCausalLM)
