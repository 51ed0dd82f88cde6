"""Validated configuration of the Engram branch.

``EngramConfig`` holds every hyper-parameter of the addressing (DESIGN.md §2) and of the module
(DESIGN.md §3). Invalid values raise ``ValueError`` naming the field and the value; derived sizes
(``n_orders``, ``head_dim``, ``memory_dim``, ...) are properties so they can never go stale.

Layer ids are **0-based** block indices: ``layer_ids=[1, 15]`` is "the 2nd and 16th block", as in
the reference demo.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


def _as_int(value: Any, name: str) -> int:
    """``value`` as an int; a float with a fraction (or anything else) is a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{name}={value!r} must be an integer")
    return int(value)


@dataclass
class EngramConfig:
    """Hyper-parameters of Engram conditional memory.

    Args:
        hidden_size: width D of the residual stream the branch is added to.
        hc_mult: number M of parallel residual branches (hyper-connections); 1 for a plain model.
        layer_ids: 0-based indices of the blocks that get an Engram branch.
        max_ngram_size: largest N-gram order; orders 2..N are used.
        n_embed_per_ngram: width of the memory slice of one order (split over its heads).
        n_head_per_ngram: hash heads K per order.
        engram_vocab_size: base table size per order (2-gram first), as in the reference; each
            head's table is the next unused prime above it. An ``int`` here is read as the seed
            documents' spelling (the tokenizer size) and then ``engram_table_size`` gives the
            per-order sizes.
        engram_table_size: seed-document spelling of the per-order base table sizes.
        kernel_size: taps of the causal depthwise short convolution (dilation = max_ngram_size).
        pad_id: raw id used to fill history before the first token; a token string or ``None``
            (then the tokenizer's pad, else eos, else 0) are resolved against the tokenizer.
        seed: seed of the hash multipliers.
        use_short_conv: add ``SiLU(conv(RMSNorm(u)))`` (off = DeepSeek V4.1 production form).
        use_gate: context-aware gate; off means the value is added ungated.
        value_bias: bias on the key/value projections (the demo has one; V4.1 has none).
        lite: "engram-lite" baseline: one zero-initialised hashed table of width D per head,
            summed and scaled by a learned per-layer scalar; no projections, gate or conv.
        lite_scale_init: initial value of the lite scalar.
        zero_init_output: start with a zero value projection so the branch outputs exactly 0
            (used when attaching to a pretrained model).
        conv_norm_eps: epsilon of the RMSNorm in front of the conv (the reference's 1e-5).
        sparse_grad: tables produce sparse gradients (for ``torch.optim.SparseAdam``-style
            row-wise updates; see the training docs).
        tokenizer_vocab_size: raw ids of the tokenizer the config was made for (checked when
            hashing is built; set by the seed spelling ``engram_vocab_size=len(tok)``).
        use_offload, offload_cache_lines: seed API: ``EngramModule`` keeps its table in host
            memory with an on-device cache of this many rows (see ``engram.offload``).
    """

    hidden_size: int = 1024
    hc_mult: int = 1
    layer_ids: list[int] = field(default_factory=lambda: [1, 15])
    max_ngram_size: int = 3
    n_embed_per_ngram: int = 512
    n_head_per_ngram: int = 8
    engram_vocab_size: list[int] | int = field(default_factory=lambda: [129280 * 5, 129280 * 5])
    engram_table_size: list[int] | None = None
    kernel_size: int = 4
    pad_id: int | str | None = 2
    seed: int = 0
    use_short_conv: bool = True
    use_gate: bool = True
    value_bias: bool = True
    lite: bool = False
    lite_scale_init: float = 0.1
    zero_init_output: bool = False
    conv_norm_eps: float = 1e-5
    sparse_grad: bool = False
    tokenizer_vocab_size: int | None = None
    use_offload: bool = False
    offload_cache_lines: int | None = None

    def __post_init__(self) -> None:
        # Seed spelling: engram_vocab_size=len(tok) (an int) plus engram_table_size=[...].
        if isinstance(self.engram_vocab_size, int) and not isinstance(self.engram_vocab_size, bool):
            if self.engram_table_size is None:
                raise ValueError(
                    f"engram_vocab_size={self.engram_vocab_size!r} is an int (the tokenizer size); "
                    "then engram_table_size must give the base table size per n-gram order"
                )
            self.tokenizer_vocab_size = int(self.engram_vocab_size)
            self.engram_vocab_size = list(self.engram_table_size)
        elif self.engram_table_size is not None:
            if list(self.engram_table_size) != list(self.engram_vocab_size):
                raise ValueError(
                    f"engram_table_size={self.engram_table_size!r} disagrees with "
                    f"engram_vocab_size={self.engram_vocab_size!r}; give one of them"
                )
        self.engram_vocab_size = [_as_int(v, f"engram_vocab_size[{i}]") for i, v in enumerate(self.engram_vocab_size)]
        self.engram_table_size = None
        self.layer_ids = [_as_int(v, f"layer_ids[{i}]") for i, v in enumerate(self.layer_ids)]
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""

        def positive(name: str, minimum: int = 1) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")

        positive("hidden_size")
        positive("hc_mult")
        positive("max_ngram_size", 2)
        positive("n_head_per_ngram")
        positive("n_embed_per_ngram")
        positive("kernel_size")
        if self.n_embed_per_ngram % self.n_head_per_ngram:
            raise ValueError(
                f"n_embed_per_ngram={self.n_embed_per_ngram} is not divisible by "
                f"n_head_per_ngram={self.n_head_per_ngram}"
            )
        if len(self.engram_vocab_size) != self.max_ngram_size - 1:
            raise ValueError(
                f"engram_vocab_size={self.engram_vocab_size!r} must have max_ngram_size-1="
                f"{self.max_ngram_size - 1} entries (one per order 2..{self.max_ngram_size})"
            )
        for i, size in enumerate(self.engram_vocab_size):
            if size < 2:
                raise ValueError(f"engram_vocab_size[{i}]={size} must be >= 2 (a table size)")
        for i, size in enumerate(self.engram_vocab_size):
            if size >= 2**62:
                raise ValueError(f"engram_vocab_size[{i}]={size} is too large (rows of one head must be < 2**62)")
        if not self.layer_ids:
            raise ValueError("layer_ids is empty: give at least one 0-based block index for an Engram branch "
                             "(or build the model without an engram config)")
        if any(i < 0 for i in self.layer_ids):
            raise ValueError(f"layer_ids={self.layer_ids!r} must be non-negative")
        if len(set(self.layer_ids)) != len(self.layer_ids):
            raise ValueError(f"layer_ids={self.layer_ids!r} has duplicates")
        if self.tokenizer_vocab_size is not None and self.tokenizer_vocab_size < 1:
            raise ValueError(f"tokenizer_vocab_size={self.tokenizer_vocab_size!r} must be >= 1")
        if self.pad_id is not None and not isinstance(self.pad_id, (int, str)):
            raise ValueError(f"pad_id={self.pad_id!r} must be an int, a token string or None")
        if not self.conv_norm_eps > 0:
            raise ValueError(f"conv_norm_eps={self.conv_norm_eps!r} must be > 0")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r} must be an int >= 0 (it seeds numpy's default_rng)")
        if not isinstance(self.lite_scale_init, (int, float)) or not math.isfinite(self.lite_scale_init):
            raise ValueError(f"lite_scale_init={self.lite_scale_init!r} must be a finite number")

    # ------------------------------------------------------------------ derived sizes
    @property
    def n_orders(self) -> int:
        """Number of N-gram orders (2..max_ngram_size)."""
        return self.max_ngram_size - 1

    @property
    def n_heads_total(self) -> int:
        """Hash heads per layer over all orders."""
        return self.n_orders * self.n_head_per_ngram

    @property
    def head_dim(self) -> int:
        """Width of one head's table row (hidden_size for the lite variant)."""
        return self.hidden_size if self.lite else self.n_embed_per_ngram // self.n_head_per_ngram

    @property
    def memory_dim(self) -> int:
        """d_mem: width of the concatenated memory vector e_t."""
        return self.n_orders * self.n_embed_per_ngram

    @property
    def conv_dilation(self) -> int:
        return self.max_ngram_size

    @property
    def conv_state_len(self) -> int:
        """Past conv inputs a decode step needs: (kernel-1)*dilation."""
        return (self.kernel_size - 1) * self.conv_dilation if self.use_short_conv else 0

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("engram_table_size")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EngramConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown EngramConfig fields: {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "EngramConfig":
        """A validated copy with ``changes`` applied."""
        d = self.to_dict()
        d.update(changes)
        return EngramConfig.from_dict(d)
