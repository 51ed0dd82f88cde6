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
``from_pretrained`` checks it compresses exactly like the saved table; Engram weights missing from
or unexpected in the checkpoint (a config.json edited after saving) are a ``ValueError``.

Vocabulary: every id the model embeds is valid, also past the tokenizer (a padded vocabulary):
those ids get canonical ids of their own (:func:`extend_lookup_table`), the tokenizer's keep
theirs. Ids outside ``0 .. num_valid_ids - 1`` are a ``ValueError`` (:meth:`EngramForCausalLM.check_input_ids`).
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
from engram.core.hashing import NgramHashMapping, check_same_compression, head_table_sizes
from engram.core.tokenizer import CompressedTokenizer
from engram.core.validation import assert_ids_in_vocab, check_ids, ids_checks_forced
from engram.hf.cache import EngramCacheLayer, engram_cache_layer
from engram.hf.compat import Cache, DynamicCache, SubConfigSpec, strict
from engram.hf.compat import initialization as init
from engram.hf.families import FamilyAdapter, adapter_for
from engram.nn.memory import MultiHeadEmbedding, table_parameters
from engram.nn.module import Engram, ShortConv, fuse_layer_projections

logger = logging.getLogger(__name__)

__all__ = ["EngramCausalLMConfig", "EngramForCausalLM", "build_hashing", "extend_lookup_table", "LOAD_HINT"]


#: Written into every saved Engram ``config.json`` (key ``engram_about``, sorted near the top), for
#: whoever opens it after transformers refused the checkpoint: transformers has no way to find a
#: model type from an installed package unless that package was imported (docs/transformers.md,
#: "Loading without import engram"), and its own error advises upgrading transformers.
LOAD_HINT = (
    "Engram checkpoint (Python package engram-torch). transformers "
    "alone does not know this model_type: pip install engram-torch, then run `import engram` before "
    "AutoConfig/AutoModelForCausalLM.from_pretrained(...), or load it with "
    "engram.hf.EngramForCausalLM.from_pretrained(...). Upgrading transformers does not help; no "
    "trust_remote_code is needed (no code is loaded from this directory)."
)


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
        engram_about: how to load the checkpoint (:data:`LOAD_HINT`), for whoever reads
            ``config.json``; always set to the current text.
    """

    model_type = "engram_causal_lm"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="gpt2")}

    text_config: dict | PreTrainedConfig | None = None
    engram: dict | None = None
    engram_hashing: dict | None = None
    engram_about: str | None = None  # LOAD_HINT, written into every config.json (set below, never read)

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self.engram_about = LOAD_HINT
        if self.engram is not None:
            EngramConfig.from_dict(self.engram)  # fail at config time, naming the bad field


# ---------------------------------------------------------------------------------------------- hashing
def extend_lookup_table(table: np.ndarray, n: int) -> np.ndarray:
    """``table`` (raw id -> canonical id) grown to ``n`` raw ids: each raw id past its end gets its
    own new canonical id, counting on from the largest one (distinct and deterministic). Ids already
    in ``table`` keep theirs; ``n`` <= its length returns it unchanged.

    This is what ids a model embeds but its tokenizer never produces (a vocabulary padded to a
    multiple of 64/128, Qwen style) and ids added without a tokenizer hash as.
    """
    table = np.asarray(table, dtype=np.int64)
    if n <= table.shape[0]:
        return table
    start = int(table.max()) + 1
    return np.concatenate([table, np.arange(start, start + n - table.shape[0], dtype=np.int64)])


def _grown_hashing(hashing: NgramHashMapping, engram_config: EngramConfig,
                   table: np.ndarray) -> tuple[NgramHashMapping, EngramConfig]:
    """``hashing`` over the longer lookup ``table`` (whose head is ``hashing``'s table): the
    multipliers keep the original compressed vocabulary size, so every n-gram of existing ids
    keeps its rows bit for bit."""
    cfg = engram_config
    if cfg.tokenizer_vocab_size is not None:
        cfg = cfg.replace(tokenizer_vocab_size=int(table.shape[0]))
    with torch.device("cpu"):
        # cfg.pad_id is already the resolved raw id (build_hashing), so the pad keeps its id
        grown = NgramHashMapping(cfg, CompressedTokenizer(lookup_table=table),
                                 multiplier_vocab=hashing.multiplier_vocab)
    grown.step_listeners = hashing.step_listeners  # an attached Prefetcher follows
    return grown, cfg


def _check_tokenizer(saved: CompressedTokenizer, tokenizer: Any, where: str) -> None:
    """:func:`check_same_compression`, except that a saved table grown past the tokenizer by
    :func:`extend_lookup_table` (a padded model vocabulary) matches the tokenizer it grew from."""
    given = tokenizer if isinstance(tokenizer, CompressedTokenizer) else CompressedTokenizer(tokenizer)
    if given.raw_vocab_size < saved.raw_vocab_size and np.array_equal(
        extend_lookup_table(given.lookup_table, saved.raw_vocab_size), saved.lookup_table
    ):
        return
    check_same_compression(saved, given, where)


def _check_config_matches_saved(engram_config: EngramConfig, saved: dict) -> None:
    """``ValueError`` when ``config.engram`` (layers, orders, heads, table sizes) no longer describes
    the saved hashing constants: a hand-edited config.json, which would otherwise load as a
    different model."""
    want = {str(k): v for k, v in head_table_sizes(engram_config).items()}
    have = saved.get("table_sizes")
    if have is not None and want != have:
        raise ValueError(
            f"the saved model's Engram config (layer_ids={engram_config.layer_ids}, "
            f"max_ngram_size={engram_config.max_ngram_size}, n_head_per_ngram={engram_config.n_head_per_ngram}, "
            f"engram_vocab_size={engram_config.engram_vocab_size}) gives table sizes {want}, but its saved "
            f"engram_hashing has {have}: config.json was edited after saving (restore the config the weights "
            "were saved with), or the model was saved by an engram version that sized tables differently"
        )


def build_hashing(engram_config: EngramConfig, saved: dict | None, tokenizer: Any,
                  vocab_size: int | None = None) -> tuple[NgramHashMapping, EngramConfig]:
    """The hash mapping of a model and its Engram config with ``pad_id`` resolved to a raw id.

    Args:
        engram_config: the branch config.
        saved: a saved :meth:`NgramHashMapping.state_dict_extra`, or ``None``.
        tokenizer: a HF tokenizer / :class:`CompressedTokenizer`, or ``None``.
        vocab_size: when neither ``saved`` nor ``tokenizer`` is given, build an identity
            (uncompressed) table over this many ids; otherwise that case is a ``ValueError``.

    With both ``saved`` and ``tokenizer`` the tokenizer must compress exactly like the saved table
    (a saved table grown past the tokenizer by :func:`extend_lookup_table` matches it).
    """
    if saved is not None:
        _check_config_matches_saved(engram_config, saved)
        compressed = CompressedTokenizer.from_state_dict(saved["compressed"])
        if tokenizer is not None:
            _check_tokenizer(compressed, tokenizer, "the saved model")
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


def _num_rows(embeddings: nn.Module) -> int:
    """Rows of an input embedding module (``nn.Embedding`` or a subclass / look-alike)."""
    rows = getattr(embeddings, "num_embeddings", None)
    return int(rows) if rows is not None else int(embeddings.weight.shape[0])


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
        embed_rows = _num_rows(self.backbone.get_input_embeddings())
        saved = self._saved_hashing(config)
        hashing, engram_cfg = build_hashing(engram_cfg, saved, tokenizer,
                                            embed_rows if self._allow_uncompressed else None)
        n_table = hashing.compressed.raw_vocab_size
        if n_table > embed_rows and saved is None:
            raise ValueError(
                f"the tokenizer has {n_table} ids but the base model embeds only "
                f"{embed_rows}: a tokenizer of another vocabulary?"
            )
        if n_table < embed_rows:
            # A vocabulary padded past the tokenizer (Qwen style): sampling can still pick those ids,
            # so each gets its own canonical id; the tokenizer's ids hash exactly as before.
            hashing, engram_cfg = _grown_hashing(hashing, engram_cfg,
                                                 extend_lookup_table(hashing.compressed.lookup_table, embed_rows))
        if saved is None or n_table < embed_rows:
            self._store_engram(config, engram_cfg, hashing.state_dict_extra())
        # Set while loading a saved model: from_pretrained then insists on its Engram weights.
        self._engram_weights_saved = saved is not None
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

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> Any:
        """``PreTrainedModel.from_pretrained``, then a ``ValueError`` when the checkpoint's Engram
        weights do not fit the model its config describes (also through ``AutoModelForCausalLM``).

        transformers only logs missing / unexpected weights; for Engram that means a
        ``config.json`` edited after saving (``use_short_conv``, ``use_gate``, ``value_bias``,
        ``lite``, ``layer_ids``, ...) would load and run with freshly initialised or dropped
        weights, and silently different outputs. Engram weights the checkpoint lacks entirely are
        fine only where the Engram part is new (a plain base checkpoint, e.g. Phi's; the config
        then has no saved hashing). Shape mismatches stay transformers' (an error unless
        ``ignore_mismatched_sizes=True``). ``output_loading_info=True`` works as usual.
        """
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args,
                                              output_loading_info=True, **kwargs)
        model._check_loaded_engram_weights(info, pretrained_model_name_or_path)
        return (model, info) if want_info else model

    def _check_loaded_engram_weights(self, info: dict, where: Any) -> None:
        """The check of :meth:`from_pretrained`, on its ``loading_info``."""
        prefix = "engram."
        missing = sorted(k for k in info.get("missing_keys", ()) if k.startswith(prefix))
        unexpected = sorted(k for k in info.get("unexpected_keys", ()) if k.startswith(prefix))
        if not missing and not unexpected:
            return
        own = [k for k in self.state_dict() if k.startswith(prefix)]
        if not unexpected and len(missing) == len(own) and not self._engram_weights_saved:
            return  # a base checkpoint: the Engram branch is new here (zero output at start)

        def names(keys: list[str]) -> str:
            return ", ".join(keys[:6]) + (f" (and {len(keys) - 6} more)" if len(keys) > 6 else "")

        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {names(missing)}")
        if unexpected:
            parts.append(f"in the checkpoint but not in the model: {names(unexpected)}")
        raise ValueError(
            f"{str(where)!r}: the checkpoint's Engram weights do not fit the model its config describes "
            f"({'; '.join(parts)}). Loading it would run with initialised or dropped Engram weights and "
            "silently different outputs. Was config.json edited after saving (Engram fields such as "
            "use_short_conv, use_gate, value_bias, lite, layer_ids)? Restore the config the weights were "
            "saved with."
        )

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

    def fuse_projections(self) -> "EngramForCausalLM":
        """Each Engram layer's key and value projections as one matmul, for decoding
        (:meth:`engram.nn.module.Engram.fuse_projections`); ``config.engram`` becomes
        ``fused_kv=True``, so ``save_pretrained`` after this writes the fused layout. Returns the model."""
        cfg = fuse_layer_projections(list(self.engram.values()))
        if cfg is not None:
            self.engram_config = cfg
            self._store_engram(self.config, cfg, self.hashing.state_dict_extra())
        return self

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
        self.__dict__.pop("_input_embeddings", None)  # num_valid_ids looks it up again

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
        new canonical id each (:func:`extend_lookup_table`). A tokenizer that compresses the
        existing ids differently is a ``ValueError``. Shrinking leaves the table as it is (ids
        past the embeddings are refused by :meth:`forward`).
        """
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        self.__dict__.pop("_input_embeddings", None)  # num_valid_ids looks it up again
        n_new, old = embeddings.num_embeddings, self.hashing.compressed
        n_old = old.raw_vocab_size
        if tokenizer is not None:
            given = tokenizer if isinstance(tokenizer, CompressedTokenizer) else CompressedTokenizer(tokenizer)
            # Ids of the table the tokenizer does not have (a padded vocabulary's spare ids) compare as
            # extend_lookup_table numbered them: tokens added into those spare ids fit if they are new.
            table = extend_lookup_table(given.lookup_table, n_old)
            if not np.array_equal(table[:n_old], old.lookup_table):
                raise ValueError(
                    "the tokenizer compresses the model's existing ids differently from its table; "
                    "pass the model's own tokenizer with the new tokens added"
                )
            if given.raw_vocab_size > n_new:
                raise ValueError(f"the tokenizer has {given.raw_vocab_size} ids but the embeddings now have {n_new}")
        else:
            table = old.lookup_table
        table = extend_lookup_table(table, n_new)  # ids beyond the tokenizer (or all new ids): one canonical id each
        if table.shape[0] == n_old:
            return embeddings
        hashing, cfg = _grown_hashing(self.hashing, self.engram_config, table)
        object.__setattr__(self, "hashing", hashing)
        self.engram_config = cfg
        self._store_engram(self.config, cfg, hashing.state_dict_extra())
        return embeddings

    # ------------------------------------------------------------------ input checks
    @property
    def num_valid_ids(self) -> int:
        """Token ids the model takes: ``0 .. num_valid_ids - 1`` (its embedding rows; every one of
        them has a canonical id in the compression table)."""
        embeddings = self.__dict__.get("_input_embeddings")  # get_input_embeddings costs ~10 us a call
        if embeddings is None:
            embeddings = self.get_input_embeddings()
            object.__setattr__(self, "_input_embeddings", embeddings)  # not a submodule
        return min(_num_rows(embeddings), self.hashing.compressed.raw_vocab_size)

    @torch.compiler.disable  # reads the ids' range back to the host
    def check_input_ids(self, input_ids: torch.Tensor) -> None:
        """``TypeError`` for non-integer ids; ``ValueError`` naming the first bad value and the
        valid range when an id is negative or past the model's vocabulary (:attr:`num_valid_ids`).

        :meth:`forward` runs it on CPU ids (on an accelerator only with ``ENGRAM_CHECK_IDS=1``:
        it costs a host sync); :meth:`generate` runs it on the prompt on every device.
        """
        check_ids(input_ids, None, "input_ids")
        if input_ids.numel() == 0:
            return
        if input_ids.device.type == "cpu" and input_ids.numel() <= 16:  # a decode step: Python ints are cheaper
            vals = input_ids.reshape(-1).tolist()
            lo, hi = min(vals), max(vals)
        else:
            lo, hi = (int(v) for v in torch.aminmax(input_ids.long()))
        n = self.num_valid_ids
        if lo < 0 or hi >= n:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"input_ids has id {bad}, outside the model's vocabulary: valid ids are 0..{n - 1} "
                f"(vocabulary size {n})" + (" - negative ids are not tokens (pad with the pad token id and "
                                            "mask with attention_mask)" if bad < 0 else "")
            )

    def generate(self, inputs: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        """``GenerationMixin.generate``, with the prompt's ids checked first (:meth:`check_input_ids`,
        on every device: once per call). Sampled ids are always in range: every id the model
        embeds has a canonical id (a vocabulary padded past its tokenizer included)."""
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        if isinstance(prompt, torch.Tensor) and not prompt.is_floating_point():
            self.check_input_ids(prompt)
        return super().generate(inputs, *args, **kwargs)

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
        if input_ids.device.type == "cpu" or ids_checks_forced():  # elsewhere it would stall the host
            if torch.compiler.is_compiling():  # in a graph: an assert there, no read-back (no graph break)
                assert_ids_in_vocab(input_ids, self.num_valid_ids)
            else:
                self.check_input_ids(input_ids)
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
