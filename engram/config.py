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


# Base table size per n-gram order by default: 5x DeepSeek-V3's 129,280-id vocabulary, as the reference
# demo (engram_vocab_size) and the seed documents (engram_table_size).
DEFAULT_TABLE_SIZE = 129280 * 5


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for n < 3.3e24 (covers every int64)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in small:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def next_unused_prime(start: int, taken: set[int]) -> int:
    """Smallest prime > ``start`` not in ``taken`` (the reference's ``find_next_prime``)."""
    candidate = start + 1
    while not is_prime(candidate) or candidate in taken:
        candidate += 1
    return candidate


def prime_table_sizes(engram_vocab_size: list[int], n_head_per_ngram: int,
                      layer_ids: list[int]) -> dict[int, list[list[int]]]:
    """Prime table size of every head, ``{layer_id: [[p per head] per order]}`` (DESIGN.md §2.3).

    Walked in (layer, order, head) order: each head takes the smallest prime above the previous
    head's (above ``engram_vocab_size[order] - 1`` for an order's first head) that no earlier head
    of any layer took. Pure Python, so the config can check row counts without torch.
    """
    taken: set[int] = set()
    out: dict[int, list[list[int]]] = {}
    for layer_id in layer_ids:
        per_order = []
        for base in engram_vocab_size:
            start, heads = int(base) - 1, []
            for _ in range(n_head_per_ngram):
                p = next_unused_prime(start, taken)
                taken.add(p)
                heads.append(p)
                start = p
            per_order.append(heads)
        out[int(layer_id)] = per_order
    return out


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
        engram_table_size: seed-document spelling of the per-order base table sizes; with an
            ``int`` ``engram_vocab_size`` and no ``engram_table_size`` it defaults to
            ``DEFAULT_TABLE_SIZE`` (129280 * 5) per order, the seed's default.
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
        gate_eps: epsilon of the gate's two RMSNorms; ``None`` (default) is ``finfo(dtype).eps``
            of the dtype they run in, as the demo's ``nn.RMSNorm()``; DeepSeek-V4.1 uses its
            ``rms_norm_eps`` (1e-6).
        gate_fp32: compute the gate (norms, dot, signed sqrt, sigmoid) and ``a * v`` in float32
            and round once to the hidden dtype at the end, as DeepSeek-V4.1's gate kernel (whose
            signed sqrt is ``copysign``: a logit of exactly 0 gives ``+sqrt(1e-6)``, where the
            demo's ``sign`` gives 0). Off (default): everything in the hidden dtype.
        fused_kv: one projection ``wkv`` ``E -> (M+1)*D`` (the M keys, then the shared value)
            instead of ``key_proj`` + ``value_proj``, as DeepSeek-V4.1 stores it; needs ``use_gate``.
        compressed_vocab_size: compressed vocabulary the hash multipliers were drawn for
            (DeepSeek's ``engram_compressed_vocab_size``); ``None``: the tokenizer's. Checked
            against the tokenizer by :func:`engram.interop.deepseek.build_hashing`.
        layer_num_rows: total table rows of each Engram layer (DeepSeek's
            ``engram_num_embeddings``), checked against the sum of the layer's prime head sizes.
    """

    hidden_size: int = 1024
    hc_mult: int = 1
    layer_ids: list[int] = field(default_factory=lambda: [1, 15])
    max_ngram_size: int = 3
    n_embed_per_ngram: int = 512
    n_head_per_ngram: int = 8
    engram_vocab_size: list[int] | int = field(default_factory=lambda: [DEFAULT_TABLE_SIZE] * 2)
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
    gate_eps: float | None = None
    gate_fp32: bool = False
    fused_kv: bool = False
    compressed_vocab_size: int | None = None
    layer_num_rows: list[int] | None = None

    def __post_init__(self) -> None:
        # Seed spelling: engram_vocab_size=len(tok) (an int) plus engram_table_size=[...].
        if isinstance(self.engram_vocab_size, int) and not isinstance(self.engram_vocab_size, bool):
            if self.engram_table_size is None:  # the seed's default (its [129280 * 5] * 2 for N = 3)
                n_orders = self.max_ngram_size - 1 if isinstance(self.max_ngram_size, int) else 2
                self.engram_table_size = [DEFAULT_TABLE_SIZE] * max(n_orders, 1)
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
        if self.layer_num_rows is not None:
            self.layer_num_rows = [_as_int(v, f"layer_num_rows[{i}]") for i, v in enumerate(self.layer_num_rows)]
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
        if self.gate_eps is not None and (isinstance(self.gate_eps, bool) or not isinstance(self.gate_eps, (int, float))
                                          or not math.isfinite(self.gate_eps) or self.gate_eps <= 0):
            raise ValueError(f"gate_eps={self.gate_eps!r} must be a finite number > 0 (or None: finfo(dtype).eps)")
        for name in ("gate_fp32", "fused_kv"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a bool")
        if self.fused_kv and (self.lite or not self.use_gate):
            raise ValueError("fused_kv=True fuses the keys with the value: it needs use_gate=True and lite=False")
        if self.compressed_vocab_size is not None and (
                isinstance(self.compressed_vocab_size, bool) or not isinstance(self.compressed_vocab_size, int)
                or self.compressed_vocab_size < 1):
            raise ValueError(f"compressed_vocab_size={self.compressed_vocab_size!r} must be an int >= 1 or None")
        if self.layer_num_rows is not None:
            self._check_layer_num_rows()

    def _check_layer_num_rows(self) -> None:
        """``layer_num_rows`` must give one count per layer, each the sum of its heads' primes."""
        if len(self.layer_num_rows) != len(self.layer_ids):
            raise ValueError(f"layer_num_rows={self.layer_num_rows!r} must have one entry per layer of "
                             f"layer_ids={self.layer_ids!r}")
        sizes = prime_table_sizes(self.engram_vocab_size, self.n_head_per_ngram, self.layer_ids)
        derived = [sum(sum(order) for order in sizes[lid]) for lid in self.layer_ids]
        if derived != self.layer_num_rows:
            raise ValueError(
                f"layer_num_rows={self.layer_num_rows!r} disagrees with the rows the addressing derives for "
                f"layer_ids={self.layer_ids!r} (engram_vocab_size={self.engram_vocab_size}, "
                f"n_head_per_ngram={self.n_head_per_ngram}): {derived}"
            )

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

    @classmethod
    def from_deepseek_config(cls, d: dict[str, Any]) -> "EngramConfig":
        """The Engram config of a DeepSeek ``config.json`` (DeepSeek-V4.1's Engram fields).

        ``d`` is the parsed ``config.json``: the text config, or the whole dict with it under
        ``text_config``. Read: ``hidden_size``, ``hc_mult`` (default 1), ``rms_norm_eps`` (the gate
        epsilon), ``engram_layer_ids`` (0-based, as ours), ``engram_max_ngram_size``,
        ``engram_n_heads`` (heads per order), ``engram_head_dim``, ``engram_vocab_size`` (an int:
        the base table size of every head, per order here), ``engram_pad_token_id``,
        ``engram_compressed_vocab_size`` and ``engram_num_embeddings`` (rows per layer, checked
        against the primes the addressing derives). The module takes V4.1's form: no short conv,
        no biases, one fused key+value projection, the gate in float32 with ``rms_norm_eps``.
        Missing or inconsistent fields raise ``ValueError`` naming DeepSeek's field.
        """
        if not isinstance(d, dict):
            raise ValueError(f"from_deepseek_config takes the parsed config.json dict, got {type(d).__name__}")
        text = d.get("text_config") if "engram_layer_ids" not in d else d
        if not isinstance(text, dict) or "engram_layer_ids" not in text:
            raise ValueError("the DeepSeek config has no engram_layer_ids (in it or in its text_config): "
                             "not a config with Engram layers")
        need = ("hidden_size", "rms_norm_eps", "engram_layer_ids", "engram_num_embeddings", "engram_max_ngram_size",
                "engram_vocab_size", "engram_n_heads", "engram_head_dim", "engram_pad_token_id",
                "engram_compressed_vocab_size")
        missing = [k for k in need if k not in text]
        if missing:
            raise ValueError(f"the DeepSeek config lacks {missing} (needed for its Engram layers)")
        base = text["engram_vocab_size"]
        if isinstance(base, bool) or not isinstance(base, int):
            raise ValueError(f"engram_vocab_size={base!r}: DeepSeek's is one int, the base table size of every head")
        layers, rows = list(text["engram_layer_ids"]), list(text["engram_num_embeddings"])
        if len(rows) != len(layers):
            raise ValueError(f"engram_num_embeddings={rows!r} must have one entry per engram_layer_ids={layers!r}")
        n_heads, head_dim, n = text["engram_n_heads"], text["engram_head_dim"], text["engram_max_ngram_size"]
        for name, value in (("engram_n_heads", n_heads), ("engram_head_dim", head_dim), ("engram_max_ngram_size", n)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        try:
            config = cls(
                hidden_size=text["hidden_size"], hc_mult=text.get("hc_mult", 1), layer_ids=layers,
                max_ngram_size=n, n_head_per_ngram=n_heads, n_embed_per_ngram=n_heads * head_dim,
                engram_vocab_size=[base] * (n - 1), pad_id=text["engram_pad_token_id"], seed=0,
                use_short_conv=False, value_bias=False, fused_kv=True, gate_fp32=True,
                gate_eps=text["rms_norm_eps"], compressed_vocab_size=text["engram_compressed_vocab_size"],
            )
        except ValueError as exc:
            raise ValueError(f"the DeepSeek config's Engram fields are invalid: {exc}") from exc
        try:
            return config.replace(layer_num_rows=rows)
        except ValueError as exc:
            raise ValueError(f"engram_num_embeddings={rows!r} does not match the tables the Engram fields "
                             f"derive ({exc})") from exc

    def replace(self, **changes: Any) -> "EngramConfig":
        """A validated copy with ``changes`` applied."""
        d = self.to_dict()
        d.update(changes)
        return EngramConfig.from_dict(d)
