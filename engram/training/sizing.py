"""Sizing Engram tables: rows per head for a parameter or memory budget, and what it costs.

The paper finds validation loss U-shaped in the share of sparse parameters given to Engram, with
the optimum near 20-25%. ``plan_tables`` turns a budget (an Engram share of a base model, a table
parameter count, or bytes of memory) into base rows per head, and reports table and projection
parameters and bytes per storage dtype. ``engram size`` is its command line.
"""

from __future__ import annotations

from dataclasses import dataclass

from engram.config import EngramConfig
from engram.core.hashing import head_table_sizes

BYTES_PER = {"fp32": 4, "bf16": 2, "int8": 1}


@dataclass
class SizingPlan:
    """Result of :func:`plan_tables` (all counts are totals over Engram layers)."""

    rows_per_head: int
    table_params: int
    projection_params: int
    table_bytes: dict[str, int]
    engram_share: float | None
    config: dict

    def summary(self) -> str:
        gib = {k: v / 2**30 for k, v in self.table_bytes.items()}
        share = "" if self.engram_share is None else f" ({100 * self.engram_share:.1f}% of all parameters)"
        return (
            f"base rows per head: {self.rows_per_head:,}\n"
            f"table parameters:   {self.table_params:,}{share}\n"
            f"dense Engram params: {self.projection_params:,} (projections, norms, conv)\n"
            "table memory:       " + ", ".join(f"{k} {v:.2f} GiB" for k, v in gib.items())
        )


@dataclass
class RankPlan:
    """Per-rank share of a :class:`SizingPlan` when the tables are row-sharded over ``world_size``
    processes (``engram.distributed``, docs/distributed.md): every head is cut in ``world_size`` pieces
    of ``ceil(rows / world_size)`` rows, so each rank holds about 1/N of every table."""

    world_size: int
    rows_per_rank: int
    table_bytes_per_rank: dict[str, int]
    adam_state_bytes_per_rank: int
    lookups_per_step_per_rank: int | None
    exchange_bytes_per_step_per_rank: int | None

    def summary(self) -> str:
        gib = ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in self.table_bytes_per_rank.items())
        out = (f"per rank ({self.world_size} ranks): {self.rows_per_rank:,} rows, table {gib}, "
               f"lazy-Adam state up to {self.adam_state_bytes_per_rank / 2**30:.2f} GiB (fp32 moments)")
        if self.exchange_bytes_per_step_per_rank is not None:
            out += (f"\nlookups per step per rank: {self.lookups_per_step_per_rank:,}; sent per step per rank "
                    f"(ids, rows, row gradients; at most): {self.exchange_bytes_per_step_per_rank / 2**20:,.1f} MiB")
        return out


def plan_per_rank(plan: SizingPlan, world_size: int, tokens_per_step: int | None = None,
                  dtype: str = "fp32") -> RankPlan:
    """Split ``plan`` over ``world_size`` ranks. With ``tokens_per_step`` (the global batch in tokens),
    also the lookups and the bytes each rank sends per step, before de-duplication:
    ``lookups = tokens / N * heads * layers``; ``bytes = lookups * (N-1)/N * (8 + 2 * d * itemsize)``
    (an int64 id out, a row back, its gradient back to the owner)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if dtype not in BYTES_PER:
        raise ValueError(f"dtype must be one of {sorted(BYTES_PER)}, got {dtype!r}")
    cfg = EngramConfig.from_dict(plan.config)
    layers, heads, d = len(cfg.layer_ids), cfg.n_heads_total, cfg.head_dim
    rows_per_rank = layers * heads * -(-plan.rows_per_head // world_size)
    lookups = exchange = None
    if tokens_per_step is not None:
        if tokens_per_step < 1:
            raise ValueError(f"tokens_per_step must be >= 1, got {tokens_per_step}")
        lookups = -(-tokens_per_step // world_size) * heads * layers
        exchange = int(lookups * (world_size - 1) / world_size * (8 + 2 * d * BYTES_PER[dtype]))
    return RankPlan(world_size=world_size, rows_per_rank=rows_per_rank,
                    table_bytes_per_rank={k: rows_per_rank * d * b for k, b in BYTES_PER.items()},
                    adam_state_bytes_per_rank=rows_per_rank * d * 8, lookups_per_step_per_rank=lookups,
                    exchange_bytes_per_step_per_rank=exchange)


def projection_params(cfg: EngramConfig) -> int:
    """Dense parameters of one Engram layer (value/key projections, norms, conv)."""
    D, M, E = cfg.hidden_size, cfg.hc_mult, cfg.memory_dim
    if cfg.lite:
        return 1
    bias = D if cfg.value_bias else 0
    n = E * D + bias
    if cfg.use_gate:
        n += M * (E * D + bias) + 2 * M * D
    if cfg.use_short_conv:
        n += M * D * cfg.kernel_size + M * D
    return n


def plan_tables(cfg: EngramConfig, *, base_params: int | None = None, engram_share: float | None = None,
                table_params: int | None = None, memory_bytes: int | None = None, dtype: str = "fp32",
                exact_primes: bool = False) -> SizingPlan:
    """Choose base rows per head so the tables of ``cfg.layer_ids`` fit one budget.

    Give exactly one budget: ``engram_share`` of all parameters (with ``base_params``, the dense
    model's size: tables = share/(1-share) * (base + Engram dense)), ``table_params``, or
    ``memory_bytes`` in ``dtype``. With ``exact_primes`` the real prime sizes are computed (slow
    for huge tables); otherwise rows are the base size times heads (primes are within a few
    hundred rows of it, under 1% for a 20k-row base).
    """
    budgets = [b is not None for b in (engram_share, table_params, memory_bytes)]
    if sum(budgets) != 1:
        raise ValueError("give exactly one of engram_share, table_params, memory_bytes")
    if dtype not in BYTES_PER:
        raise ValueError(f"dtype must be one of {sorted(BYTES_PER)}, got {dtype!r}")
    layers = len(cfg.layer_ids)
    dense = projection_params(cfg) * layers
    if engram_share is not None:
        if not 0 < engram_share < 1:
            raise ValueError(f"engram_share must be in (0, 1), got {engram_share}")
        if base_params is None or base_params <= 0:
            raise ValueError("engram_share needs base_params (the model's parameter count without Engram)")
        table_params = int(engram_share / (1 - engram_share) * (base_params + dense))
    elif memory_bytes is not None:
        table_params = int(memory_bytes // BYTES_PER[dtype])
    width = cfg.head_dim
    rows_per_head = int(table_params // (layers * cfg.n_heads_total * width))
    if rows_per_head < 2:
        raise ValueError(f"the budget gives {rows_per_head} rows per head; it must allow at least 2")
    sized = cfg.replace(engram_vocab_size=[rows_per_head] * cfg.n_orders)
    if exact_primes:
        rows = sum(p for per in head_table_sizes(sized).values() for order in per for p in order)
    else:
        rows = rows_per_head * cfg.n_heads_total * layers
    total_table = rows * width
    share = None if base_params is None else total_table / (total_table + base_params + dense)
    return SizingPlan(
        rows_per_head=rows_per_head, table_params=total_table, projection_params=dense,
        table_bytes={k: total_table * b for k, b in BYTES_PER.items()}, engram_share=share,
        config=sized.to_dict(),
    )


def count_hf_params(model_name_or_path: str) -> tuple[int, int]:
    """``(parameters, hidden_size)`` of a transformers causal LM, built on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_name_or_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters()), int(config.hidden_size)


#: The table-size rule's constant: training token positions per table row (each head of each order
#: hashes every position, so this is the mean number of lookups a row gets per pass over the
#: training text). Measured on three corpora (docs/science.md, "How big a table").
TOKENS_PER_ROW = 60
#: Smallest table the rule gives (rows per head): below it, collisions dominate any corpus.
MIN_ROWS_PER_HEAD = 1000


def rows_per_head_for(train_tokens: int, tokens_per_row: float = TOKENS_PER_ROW,
                      minimum: int = MIN_ROWS_PER_HEAD) -> int:
    """Base rows per hash head for a training text of ``train_tokens`` tokens (the rule used when
    ``--table-size`` is not given): ``train_tokens / tokens_per_row``, at least ``minimum``,
    rounded to two significant digits (each head then takes the next unused prime)."""
    if train_tokens < 0 or not tokens_per_row > 0:
        raise ValueError(f"train_tokens={train_tokens} must be >= 0 and tokens_per_row={tokens_per_row} > 0")
    rows = max(minimum, train_tokens / tokens_per_row)
    digits = len(str(int(rows))) - 2
    return int(round(rows, -digits)) if digits > 0 else int(round(rows))


def table_size_rule_text(tokens_per_row: float = TOKENS_PER_ROW) -> str:
    return f"training tokens / {tokens_per_row:g}, at least {MIN_ROWS_PER_HEAD:,} (docs/science.md)"
