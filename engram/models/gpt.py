"""EngramGPT: a small decoder-only LM with Engram at chosen blocks (or none).

Shapes: B batch, T new tokens, S cached + new tokens, M residual branches (hc_mult), D width,
nh attention heads, hd head width, V vocabulary.

Block: ``h += Engram(h, hash)`` (if any), ``h += write * Attn(RMSNorm(read h))``,
``h += write * MLP(RMSNorm(read h))``. With M > 1 (simple static hyper-connections) the residual
is M copies after the embedding; each sub-layer reads a learned mix of the branches and writes its
output to every branch with learned weights; the branches are summed before the final norm.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from engram.config import EngramConfig
from engram.core.hashing import NgramHashMapping
from engram.nn.memory import table_parameters
from engram.nn.module import Engram, EngramLayerState, fuse_layer_projections
from engram.core.tokenizer import static_address
from engram.core.validation import assert_ids_in_vocab, check_ids, ids_checks_forced


@dataclass
class GPTConfig:
    """Backbone hyper-parameters. ``engram=None`` builds the same GPT without Engram."""

    vocab_size: int = 4096
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 256
    mlp_ratio: float = 4.0
    rope_theta: float = 10000.0
    hc_mult: int = 1
    tie_embeddings: bool = True
    engram: EngramConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.engram, dict):
            self.engram = EngramConfig.from_dict(self.engram)
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size", "hc_mult"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not isinstance(self.mlp_ratio, (int, float)) or not math.isfinite(self.mlp_ratio) or self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio={self.mlp_ratio!r} must be a finite number > 0")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd={self.n_embd} must split into n_head={self.n_head} heads of even width")
        if self.engram is not None:
            e = self.engram
            if e.hidden_size != self.n_embd:
                raise ValueError(f"engram.hidden_size={e.hidden_size} must equal n_embd={self.n_embd}")
            if e.hc_mult != self.hc_mult:
                raise ValueError(f"engram.hc_mult={e.hc_mult} must equal hc_mult={self.hc_mult}")
            bad = [i for i in e.layer_ids if i >= self.n_layer]
            if bad:
                raise ValueError(f"engram.layer_ids {bad} are past the last block (n_layer={self.n_layer}, 0-based)")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["engram"] = None if self.engram is None else self.engram.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
        return cls(**d)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(head_dim: int, positions: torch.Tensor, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``(T, hd/2)`` for integer positions ``(T,)``."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    ang = positions.float()[:, None] * inv[None, :]  # (T, hd/2)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate halves of ``x`` (B, nh, T, hd)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: list[torch.Tensor] | None, pad_mask: torch.Tensor | None,
                write_pos: torch.Tensor | None = None) -> torch.Tensor:
        """``write_pos`` (T,): a static cache's slots for the new tokens (``kv`` then holds two
        ``(B, nh, S_max, hd)`` buffers, written in place; queries attend over all S_max slots,
        masked causally by slot)."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if write_pos is not None:  # static cache: fixed shapes, updated in place
            kv[0].index_copy_(2, write_pos, k.to(kv[0].dtype))
            kv[1].index_copy_(2, write_pos, v.to(kv[1].dtype))
            k, v = kv  # (B, nh, S_max, hd)
        elif kv is not None:
            if kv:
                k = torch.cat([kv[0], k], dim=2)  # (B, nh, S, hd)
                v = torch.cat([kv[1], v], dim=2)
            kv[:] = [k.contiguous(), v.contiguous()]  # one stride pattern: a compiled step never recompiles for it
        S = k.shape[2]
        if S == T and pad_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # i: the queries' slots (T, 1)
            i = write_pos[:, None] if write_pos is not None else torch.arange(T, device=x.device)[:, None] + (S - T)
            mask = torch.arange(S, device=x.device)[None, :] <= i  # (T, S) causal
            if pad_mask is not None:
                # Every query sees itself, so padding rows stay finite (they are never attended).
                own = torch.arange(S, device=x.device)[None, :] == i
                mask = (mask[None, None] & pad_mask[:, None, None, :S]) | own  # (B, 1, T, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.n_embd)
        self.fc = nn.Linear(cfg.n_embd, hidden, bias=False)
        self.proj = nn.Linear(hidden, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class HyperConnection(nn.Module):
    """Static hyper-connection around one sub-layer: read a mix of M branches, write to all."""

    def __init__(self, hc_mult: int):
        super().__init__()
        self.read = nn.Parameter(torch.full((hc_mult,), 1.0 / hc_mult))
        self.write = nn.Parameter(torch.ones(hc_mult))

    def forward(self, h: torch.Tensor, fn) -> torch.Tensor:
        x = torch.einsum("btmd,m->btd", h, self.read)  # (B, T, D)
        return h + fn(x).unsqueeze(2) * self.write[:, None]  # (B, T, M, D)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_id: int, table_sizes: list[list[int]] | None,
                 table_device: torch.device | str | None = None):
        super().__init__()
        self.layer_id = layer_id
        self.ln1, self.ln2 = RMSNorm(cfg.n_embd), RMSNorm(cfg.n_embd)
        self.attn, self.mlp = Attention(cfg), MLP(cfg)
        self.hc_attn, self.hc_mlp = HyperConnection(cfg.hc_mult), HyperConnection(cfg.hc_mult)
        self.engram = (Engram(cfg.engram, layer_id, table_sizes, table_device=table_device)
                       if table_sizes is not None else None)

    def forward(self, h, hash_ids, cos, sin, kv, pad_mask, engram_state, token_mask, write_pos=None):
        # h: (B, T, M, D)
        if self.engram is not None:
            h = h + self.engram(h, hash_ids[self.layer_id], engram_state, token_mask)
        h = self.hc_attn(h, lambda x: self.attn(self.ln1(x), cos, sin, kv, pad_mask, write_pos))
        h = self.hc_mlp(h, lambda x: self.mlp(self.ln2(x)))
        return h


@dataclass
class GPTCache:
    """Decode state of one batch: KV per block, Engram n-gram history and conv state, length.

    Two forms (:meth:`EngramGPT.new_cache`): dynamic (default; the tensors grow by concatenation,
    as many tokens as seen) and static (``pos`` set: every tensor preallocated at its final
    shape, ``block_size`` slots of KV, and updated in place, so a compiled decode step has fixed
    shapes and fixed addresses and CUDA graphs can replay it).
    """

    kv: list[list[torch.Tensor]] = field(default_factory=list)
    history: torch.Tensor | None = None  # (B, N-1) compressed ids
    engram: dict[int, EngramLayerState] = field(default_factory=dict)
    pad_mask: torch.Tensor | None = None  # (B, S) True = real token; static: (B, S_max)
    length: int = 0  # tokens seen (dynamic caches; a static one counts on the device, in ``pos``)
    pos: torch.Tensor | None = None  # static: (1,) long, tokens seen = slots written
    pad_id: int = 0  # static: the compressed pad id the history restarts from

    @property
    def static(self) -> bool:
        return self.pos is not None

    def clear(self) -> None:
        """Back to an empty sequence (static caches: in place, keeping every address)."""
        if not self.static:
            self.kv, self.history, self.engram, self.pad_mask = [[] for _ in self.kv], None, {}, None
        else:
            for t in (*(t for pair in self.kv for t in pair), *(s.conv for s in self.engram.values()), self.pos):
                if t is not None:
                    t.zero_()
            self.pad_mask.fill_(True)
            if self.history is not None:
                self.history.fill_(self.pad_id)
        self.length = 0

    def reorder(self, index: torch.Tensor) -> None:
        if self.static:
            for t in (*(t for pair in self.kv for t in pair), self.history, self.pad_mask):
                if t is not None:
                    t.copy_(t.index_select(0, index))
            for s in self.engram.values():
                s.reorder(index)  # in place for a static state
            return
        self.kv = [[t.index_select(0, index) for t in pair] for pair in self.kv]
        if self.history is not None:
            self.history = self.history.index_select(0, index)
        if self.pad_mask is not None:
            self.pad_mask = self.pad_mask.index_select(0, index)
        for s in self.engram.values():
            s.reorder(index)


class EngramGPT(nn.Module):
    """Decoder-only LM with optional Engram branches.

    Args:
        config: :class:`GPTConfig`; ``config.engram`` selects Engram layers or ``None``.
        tokenizer: a HF tokenizer or :class:`CompressedTokenizer`; required with Engram.
        table_device: where the Engram tables are created (default: with the rest). ``"meta"``
            allocates nothing for them: use it for tables that :func:`engram.offload.offload`
            opens from an existing file, or that a checkpoint will fill.
    """

    def __init__(self, config: GPTConfig, tokenizer: Any = None, table_device: torch.device | str | None = None):
        super().__init__()
        self.config = config
        self.hashing: NgramHashMapping | None = None
        sizes: dict[int, list[list[int]]] = {}
        if config.engram is not None:
            if tokenizer is None:
                raise ValueError("an EngramGPT with Engram needs the tokenizer (or a CompressedTokenizer)")
            self.hashing = NgramHashMapping(config.engram, tokenizer)
            if self.hashing.compressed.raw_vocab_size > config.vocab_size:
                raise ValueError(
                    f"the tokenizer has {self.hashing.compressed.raw_vocab_size} ids but vocab_size={config.vocab_size}"
                )
            sizes = self.hashing.table_sizes
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, i, sizes.get(i), table_device) for i in range(config.n_layer))
        self.ln_f = RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self._init_weights()
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if ".engram." in name or p.ndim < 2:
                continue
            std = 0.02 / math.sqrt(2 * self.config.n_layer) if name.endswith("proj.weight") else 0.02
            nn.init.normal_(p, 0.0, std)

    # ------------------------------------------------------------------ parameter groups
    def engram_layers(self) -> list[Engram]:
        return [b.engram for b in self.blocks if b.engram is not None]

    def fuse_projections(self) -> "EngramGPT":
        """Each Engram layer's key and value projections as one matmul (:meth:`Engram.fuse_projections`),
        for decoding: one matmul fewer per Engram layer and step (docs/performance.md, "Eighth
        round"). ``config.engram`` becomes ``fused_kv=True``, so a checkpoint saved after this
        loads in the fused layout. Call it before ``compile``; returns the model."""
        cfg = fuse_layer_projections(self.engram_layers())
        if cfg is not None:
            self.config.engram = self.hashing.config = cfg  # (fused_kv does not change the hash)
        return self

    def table_parameters(self) -> list[nn.Parameter]:
        """Trainable Engram tables (own optimizer group: Adam, 5x lr, no weight decay).

        Tables moved to disk or quantised (``engram.offload``) are not parameters and are skipped.
        """
        return table_parameters(e.memory for e in self.engram_layers())

    def dense_parameters(self) -> list[nn.Parameter]:
        table_ids = {id(p) for p in self.table_parameters()}
        return [p for p in self.parameters() if id(p) not in table_ids]

    def num_params(self) -> dict[str, int]:
        """``{"dense": ..., "table": ...}`` parameter counts (tied weights counted once).

        Table counts are rows x width of every Engram table wherever it is stored.
        """
        table = sum(e.memory.num_rows * e.memory.embedding_dim for e in self.engram_layers())
        return {"dense": sum(p.numel() for p in self.dense_parameters()), "table": table}

    # ------------------------------------------------------------------ forward
    def new_cache(self, static: bool = False, batch_size: int = 1) -> GPTCache:
        """An empty decode cache for :meth:`forward`.

        ``static=True``: preallocated for ``batch_size`` sequences of up to ``block_size`` tokens
        on the model's device, updated in place (fixed shapes and addresses: what
        ``torch.compile(mode="reduce-overhead")``'s CUDA graphs need; :meth:`generate` with
        ``static_cache=True`` keeps one per batch size and clears it). It holds
        ``2 * n_layer * batch_size * block_size * n_embd`` KV values whatever the length.
        """
        if not static:
            return GPTCache(kv=[[] for _ in self.blocks])
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")
        p = self.lm_head.weight
        cfg, B = self.config, batch_size
        nh, hd = cfg.n_head, cfg.n_embd // cfg.n_head
        kv = [[p.new_zeros(B, nh, cfg.block_size, hd) for _ in range(2)] for _ in self.blocks]
        cache = GPTCache(kv=kv, pad_mask=torch.ones(B, cfg.block_size, dtype=torch.bool, device=p.device),
                         pos=torch.zeros(1, dtype=torch.long, device=p.device))
        if self.hashing is not None:
            cache.pad_id = self.hashing.pad_id
            cache.history = self.hashing.initial_history(B, p.device)
            for i, block in enumerate(self.blocks):
                if block.engram is not None:
                    conv = getattr(block.engram, "short_conv", None)  # absent without the conv (and lite)
                    cache.engram[i] = EngramLayerState(
                        conv=None if conv is None else p.new_zeros(B, conv.state_len, cfg.hc_mult * cfg.n_embd),
                        static=True)
        for t in (*(t for pair in kv for t in pair), cache.pad_mask, cache.pos, cache.history,
                  *(s.conv for s in cache.engram.values())):
            if t is not None:
                static_address(t)
        return cache

    def _prepare(self, input_ids: torch.Tensor, cache: GPTCache | None, attention_mask: torch.Tensor | None,
                 hash_ids: dict[int, torch.Tensor] | None,
                 doc_starts: torch.Tensor | None = None) -> tuple[Any, Any, Any]:
        """Check the ids, build the padding masks, hash; advance the cache's mask and n-gram history.

        Returns ``(pad_mask (B, S) | None, new_mask (B, T) | None, hash_ids | None)``. Compiled
        (``model.compile()``), all of it is traced into the step's one graph: the range check
        becomes an assert in the graph and the hash the tensor formula (no graph break).
        """
        check_ids(input_ids, None, "input_ids", ndim=2)
        input_ids = input_ids.long()  # any integer dtype in
        if self._checks_every_step(input_ids):
            self.check_id_range(input_ids)
        if cache is not None and cache.static:
            return self._prepare_static(input_ids, cache, attention_mask, hash_ids, doc_starts)
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence length {start + T} exceeds block_size={self.config.block_size}")
        pad_mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, start + T):
                raise ValueError(
                    f"attention_mask must cover past and new tokens, shape ({B}, {start + T}), got {tuple(attention_mask.shape)}"
                )
            pad_mask = attention_mask.bool()  # (B, S)
        elif cache is not None and cache.pad_mask is not None:
            pad_mask = torch.cat([cache.pad_mask, cache.pad_mask.new_ones(B, T)], 1)  # (B, S)
        if cache is not None:
            cache.pad_mask = pad_mask
        new_mask = None if pad_mask is None else pad_mask[:, start:]  # (B, T)
        if self.hashing is not None and hash_ids is None:
            # padding (new_mask False) reads as the pad history a sequence starts with
            # a document start (packed rows) resets the n-gram history exactly as a sequence start
            hash_ids, history = self.hashing.hash_step(input_ids, cache.history if cache is not None else None, new_mask,
                                                       doc_starts=doc_starts)
            if cache is not None:
                cache.history = history  # (B, N-1)
        return pad_mask, new_mask, hash_ids

    def _prepare_static(self, input_ids: torch.Tensor, cache: GPTCache, attention_mask: torch.Tensor | None,
                        hash_ids: dict[int, torch.Tensor] | None,
                        doc_starts: torch.Tensor | None) -> tuple[Any, Any, Any]:
        """:meth:`_prepare` for a static cache: the padding mask is the cache's (B, S_max) buffer,
        with the new tokens' columns written in place; the history is copied into its buffer.
        The token count lives on the device (``cache.pos``), so the host reads nothing: past
        ``block_size`` the step fails in the graph (an assert), and of ``attention_mask`` only
        the last T columns (the new tokens) are read."""
        B, T = input_ids.shape
        S_max = cache.pad_mask.shape[1]
        if cache.pad_mask.shape[0] != B:
            raise ValueError(f"the static cache holds {cache.pad_mask.shape[0]} sequences, input_ids {B}")
        if T > S_max:
            raise ValueError(f"sequence length {T} exceeds block_size={S_max}")
        torch._assert_async((cache.pos + T <= S_max).all(), f"the static cache is full: block_size={S_max}")
        write = cache.pos + torch.arange(T, device=cache.pos.device)  # (T,) the new tokens' slots
        if attention_mask is not None:
            if attention_mask.ndim != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < T:
                raise ValueError(f"attention_mask must be ({B}, S) with S >= {T} (its last {T} columns are the "
                                 f"new tokens), got {tuple(attention_mask.shape)}")
            cache.pad_mask.index_copy_(1, write, attention_mask[:, attention_mask.shape[1] - T:].bool())
        new_mask = cache.pad_mask.index_select(1, write)  # (B, T)
        if self.hashing is not None and hash_ids is None:
            hash_ids, history = self.hashing.hash_step(input_ids, cache.history, new_mask, doc_starts=doc_starts)
            cache.history.copy_(history)  # (B, N-1)
        return cache.pad_mask, new_mask, hash_ids

    @staticmethod
    def _checks_every_step(input_ids: torch.Tensor) -> bool:
        """Whether every forward range-checks its ids: free on the CPU; on a device it is a host
        sync, so only with ``ENGRAM_CHECK_IDS=1`` (:meth:`generate` checks its prompt there)."""
        return input_ids.device.type == "cpu" or ids_checks_forced()

    def check_id_range(self, input_ids: torch.Tensor) -> None:
        """``ValueError`` unless every id is in ``[0, vocab_size)`` (reads the ids back: a host sync
        on an accelerator, so :meth:`forward` does it there only for :meth:`generate`'s prompt or
        with ``ENGRAM_CHECK_IDS=1``). Inside a compiled graph it is an assert in the graph
        (``RuntimeError`` with the same message), which reads nothing back."""
        V = self.config.vocab_size
        if torch.compiler.is_compiling():  # in a graph: an assert there, no read-back (no graph break)
            assert_ids_in_vocab(input_ids, V)
        elif input_ids.numel():  # both bounds in one pass
            lo, hi = (int(v) for v in torch.aminmax(input_ids))
            if lo < 0:
                raise ValueError("input_ids must be non-negative")
            if hi >= V:
                raise ValueError(f"input_ids has id {hi} >= the model's vocabulary size {V}")

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                cache: GPTCache | None = None, attention_mask: torch.Tensor | None = None,
                hash_ids: dict[int, torch.Tensor] | None = None,
                doc_starts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``(B, T, V)`` and mean cross-entropy (if ``targets``; -100 is ignored).

        ``cache`` (from :meth:`new_cache`) makes this an incremental step: ``input_ids`` are the
        new tokens after everything the cache has seen. ``attention_mask`` (B, S) marks real
        tokens (left padding for batched prompts). ``hash_ids`` may be precomputed.
        ``doc_starts`` (B, T) bool marks document starts in packed training rows
        (``MemmapBatcher.batch_with_boundaries``): the Engram n-gram history resets there, so no
        n-gram spans two documents (attention and the short conv still see the whole row);
        ``None`` (default) changes nothing. Ignored when ``hash_ids`` are given.
        ``model.compile(dynamic=True)`` compiles the whole step, id checks and hash included, into
        one graph (docs/performance.md, "Compiling").
        """
        pad_mask, new_mask, hash_ids = self._prepare(input_ids, cache, attention_mask, hash_ids, doc_starts)
        input_ids = input_ids.long()  # any integer dtype (uint8, int32, ...) in, int64 indices
        if targets is not None and input_ids.shape[1] == 0:
            raise ValueError("forward with targets needs at least one token (T=0 has no loss)")
        B, T = input_ids.shape
        start = cache.length if cache is not None and not cache.static else 0
        write_pos = None  # a static cache's slots for the new tokens (T,)
        if cache is not None and cache.static:
            write_pos = cache.pos + torch.arange(T, device=cache.pos.device)
            positions = write_pos
        else:
            positions = torch.arange(start, start + T, device=input_ids.device)
        if pad_mask is not None:
            # Left padding: positions count real tokens only, so a padded row matches its unpadded run.
            pos_all = (pad_mask.long().cumsum(1) - 1).clamp_min(0)  # (B, S)
            positions = pos_all[:, start : start + T] if write_pos is None else pos_all.index_select(1, write_pos)  # (B, T)
        cos, sin = rope_tables(self.config.n_embd // self.config.n_head, positions.reshape(-1), self.config.rope_theta)
        if positions.ndim == 2:
            cos = cos.view(B, 1, T, -1)
            sin = sin.view(B, 1, T, -1)
        h = self.wte(input_ids).unsqueeze(2).expand(B, T, self.config.hc_mult, self.config.n_embd)  # (B, T, M, D)
        for i, block in enumerate(self.blocks):
            kv = cache.kv[i] if cache is not None else None
            est = None
            if cache is not None and block.engram is not None:
                est = cache.engram.get(i)
                if est is None:
                    est = cache.engram[i] = EngramLayerState()
            h = block(h, hash_ids, cos, sin, kv, pad_mask, est, new_mask, write_pos)
        if cache is not None and cache.static:
            cache.pos.add_(T)  # counted on the device: a host int would key a new CUDA graph per step
        elif cache is not None:
            cache.length = start + T
        logits = self.lm_head(self.ln_f(h.sum(2)))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    @torch.inference_mode()  # no autograd bookkeeping: cheaper per op than no_grad
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 static_cache: bool = False) -> torch.Tensor:
        """Sample ``max_new_tokens`` after ``input_ids`` (B, T) with a KV cache; temperature 0 = greedy.

        The prompt's ids are range-checked once here; the decode steps after it read no value
        back to the host (sampled ids are in range by construction). ``static_cache=True``
        decodes with a static cache (:meth:`new_cache`), kept per batch size and device and
        cleared in place for each call, and marks each step's start for CUDA graphs: with it a
        model compiled with ``mode="reduce-overhead"`` on CUDA records the prompt and the
        decode step once and replays them (with the default growing cache every step has new
        shapes, which CUDA graphs cannot replay).
        """
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"generate needs a prompt of shape (B, T) with T >= 1, got {tuple(input_ids.shape)}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 0")
        if not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0: greedy)")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k={top_k!r} must be an int >= 1 or None (no truncation)")
        if not self._checks_every_step(input_ids):  # else the first forward checks the prompt
            self.check_id_range(input_ids)
        if static_cache:
            cache = self._static_cache(input_ids.shape[0])
            step_begins = torch.compiler.cudagraph_mark_step_begin  # last step's outputs are dead
        else:
            cache, step_begins = self.new_cache(), (lambda: None)
        try:
            step_begins()
            logits, _ = self(input_ids, cache=cache)
            out, seen = [input_ids], input_ids.shape[1]
            for _ in range(max_new_tokens):
                nxt = sample_next(logits[:, -1], temperature, top_k, generator)  # (B, 1)
                out.append(nxt)
                if seen >= self.config.block_size:
                    break
                step_begins()
                logits, _ = self(nxt, cache=cache)
                seen += 1
        except RuntimeError as err:
            if static_cache or "CUDAGraphs" not in str(err):
                raise
            raise RuntimeError("a model compiled with mode=\"reduce-overhead\" (CUDA graphs) decodes with "
                               "generate(..., static_cache=True): the default cache grows every step, so each "
                               "step's inputs are the last graph's outputs") from err
        return torch.cat(out, dim=1)

    def _static_cache(self, batch_size: int) -> GPTCache:
        """:meth:`generate`'s static cache for ``batch_size`` on the model's device, cleared (one
        per batch size, device and dtype, reused so its addresses stay fixed)."""
        p = self.lm_head.weight
        key = (batch_size, p.device, p.dtype)
        caches = self.__dict__.setdefault("_static_caches", {})  # not state: no buffers, no checkpoint
        cache = caches.get(key)
        if cache is None:
            cache = caches[key] = self.new_cache(static=True, batch_size=batch_size)
        else:
            cache.clear()
        return cache


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """``(B, V)`` logits -> ``(B, 1)`` next ids."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, -1), 1, generator=generator)
