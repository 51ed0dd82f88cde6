"""N-gram hash addressing (DESIGN.md §2.2-§2.4), bit-exact with DeepSeek's reference demo.

Shapes: B batch, T time, N max_ngram_size, K heads per order, H = (N-1)*K heads per layer.

``NgramHashMapping.hash(ids)`` compresses raw ids and returns, per Engram layer, the per-head row
index ``(B, T, H)`` (order-major, no head offset) computed in torch on the ids' device.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .config import EngramConfig
from .tokenizer import CompressedTokenizer
from .validation import check_ids

_INT64_MAX = np.iinfo(np.int64).max


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


def layer_multipliers(seed: int, layer_id: int, max_ngram_size: int, compressed_vocab: int) -> list[int]:
    """Odd int64 multipliers of one layer (DESIGN.md §2.2)."""
    half = max(1, (_INT64_MAX // compressed_vocab) // 2)
    rng = np.random.default_rng(int(seed + 10007 * int(layer_id)))
    r = rng.integers(0, half, size=(max_ngram_size,), dtype=np.int64)
    return [int(v) for v in r * 2 + 1]


def head_table_sizes(config: EngramConfig, layer_ids: list[int] | None = None) -> dict[int, list[list[int]]]:
    """Prime table size of every head: ``{layer_id: [[p per head] per order]}`` (DESIGN.md §2.3)."""
    taken: set[int] = set()
    out: dict[int, list[list[int]]] = {}
    for layer_id in config.layer_ids if layer_ids is None else layer_ids:
        per_order = []
        for n in range(2, config.max_ngram_size + 1):
            start = config.engram_vocab_size[n - 2] - 1
            heads = []
            for _ in range(config.n_head_per_ngram):
                p = next_unused_prime(start, taken)
                taken.add(p)
                heads.append(p)
                start = p
            per_order.append(heads)
        out[layer_id] = per_order
    return out


def resolve_pad_id(pad_id: int | str | None, tokenizer: Any) -> int:
    """Raw pad id from an int, a token string or ``None`` (tokenizer's pad, else eos, else 0)."""
    if isinstance(pad_id, int):
        return pad_id
    if isinstance(pad_id, str):
        if tokenizer is None:
            raise ValueError(f"pad_id={pad_id!r} is a token string but no tokenizer was given")
        conv = getattr(tokenizer, "convert_tokens_to_ids", None) or tokenizer.token_to_id
        pid = conv(pad_id)
        if pid is None:
            raise ValueError(f"pad_id={pad_id!r} is not a token of the tokenizer")
        return int(pid)
    for attr in ("pad_token_id", "eos_token_id"):
        pid = getattr(tokenizer, attr, None) if tokenizer is not None else None
        if isinstance(pid, int):
            return pid
    return 0


class NgramHashMapping(nn.Module):
    """Compression + multi-head N-gram hashing for every Engram layer.

    Args:
        config: the Engram config (``layer_ids``, ``max_ngram_size``, heads, table sizes, seed).
        tokenizer: a HF tokenizer or an already built :class:`CompressedTokenizer`.
        layer_ids: overrides ``config.layer_ids``.

    Attributes:
        compressed: the :class:`CompressedTokenizer`.
        pad_id: the compressed pad id.
        multipliers: ``{layer_id: [N odd ints]}``.
        table_sizes: ``{layer_id: [[prime per head] per order]}``.

    It is an ``nn.Module`` only so that ``.to(device)`` moves its constant buffers with the model;
    it has no parameters and its buffers are not saved in state dicts.
    """

    def __init__(self, config: EngramConfig, tokenizer: Any, layer_ids: list[int] | None = None):
        super().__init__()
        self.config = config
        self.layer_ids = list(config.layer_ids if layer_ids is None else layer_ids)
        self.compressed = tokenizer if isinstance(tokenizer, CompressedTokenizer) else CompressedTokenizer(tokenizer)
        if config.tokenizer_vocab_size is not None and config.tokenizer_vocab_size != self.compressed.raw_vocab_size:
            raise ValueError(
                f"config says the tokenizer has {config.tokenizer_vocab_size} ids but it has "
                f"{self.compressed.raw_vocab_size}"
            )
        raw_pad = resolve_pad_id(config.pad_id, None if isinstance(tokenizer, CompressedTokenizer) else tokenizer)
        if not 0 <= raw_pad < self.compressed.raw_vocab_size:
            raise ValueError(f"pad_id={raw_pad} is outside the tokenizer's {self.compressed.raw_vocab_size} ids")
        self.raw_pad_id = raw_pad
        self.pad_id = int(self.compressed.lookup_table[raw_pad])
        n_comp = len(self.compressed)
        self.multipliers = {
            lid: layer_multipliers(config.seed, lid, config.max_ngram_size, n_comp) for lid in self.layer_ids
        }
        self.table_sizes = head_table_sizes(config, self.layer_ids)
        self.register_buffer("lookup_table", torch.from_numpy(self.compressed.lookup_table.copy()), persistent=False)
        # (L, N) multipliers and (L, H) primes, in layer order.
        self.register_buffer(
            "_mult", torch.tensor([self.multipliers[l] for l in self.layer_ids], dtype=torch.long).reshape(-1, config.max_ngram_size),
            persistent=False,
        )
        self.register_buffer(
            "_primes",
            torch.tensor([[p for order in self.table_sizes[l] for p in order] for l in self.layer_ids], dtype=torch.long)
            .reshape(-1, config.n_heads_total),
            persistent=False,
        )

    @property
    def history_len(self) -> int:
        """Compressed ids of history a decode step needs (N-1)."""
        return self.config.max_ngram_size - 1

    def compress(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Raw ids (any shape, integer) -> compressed ids, on the same device."""
        check_ids(input_ids, self.compressed.raw_vocab_size, "input_ids")
        table = self.lookup_table if self.lookup_table.device == input_ids.device else self.compressed.table_on(input_ids.device)
        ids = input_ids.long()
        return torch.where(ids >= 0, table[ids.clamp_min(0)], ids)

    def initial_history(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Pad-filled history ``(B, N-1)`` of compressed ids for the start of a sequence."""
        return torch.full((batch_size, self.history_len), self.pad_id, dtype=torch.long, device=device)

    def hash_compressed(self, x: torch.Tensor, history: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """Hash already compressed ids ``x`` (B, T); ``history`` (B, N-1) precedes them."""
        B, T = x.shape
        N = self.config.max_ngram_size
        if history is None:
            history = self.initial_history(B, x.device)
        full = torch.cat([history.to(x.device, torch.long), x], dim=1)  # (B, N-1+T)
        # shifts[k][:, t] = id at t-k; the pad-filled history plays the reference's left padding.
        shifts = [full[:, N - 1 - k : N - 1 - k + T] for k in range(N)]  # N x (B, T)
        mult = self._mult.to(x.device)
        primes = self._primes.to(x.device)
        K = self.config.n_head_per_ngram
        out: dict[int, torch.Tensor] = {}
        for li, lid in enumerate(self.layer_ids):
            m = mult[li]
            mix = shifts[0] * m[0]  # (B, T) int64, wrapping
            per_order = []
            for n in range(2, N + 1):
                mix = torch.bitwise_xor(mix, shifts[n - 1] * m[n - 1])
                p = primes[li, (n - 2) * K : (n - 1) * K]  # (K,)
                per_order.append(torch.remainder(mix.unsqueeze(-1), p))  # (B, T, K), non-negative
            out[lid] = torch.cat(per_order, dim=-1)  # (B, T, H)
        return out

    def hash(self, input_ids: torch.Tensor | np.ndarray, history: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """Raw ids ``(B, T)`` -> ``{layer_id: LongTensor (B, T, H)}`` on the ids' device.

        ``history`` is the compressed ids ``(B, N-1)`` that precede ``input_ids`` (decoding);
        ``None`` means the sequence starts here (pad-filled history, as in the reference).
        """
        if isinstance(input_ids, np.ndarray):
            check_ids(input_ids, None, "input_ids")
            input_ids = torch.from_numpy(np.ascontiguousarray(input_ids))
        elif not isinstance(input_ids, torch.Tensor):
            input_ids = torch.as_tensor(input_ids)
            check_ids(input_ids, None, "input_ids")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
        return self.hash_compressed(self.compress(input_ids), history)

    def next_history(self, history: torch.Tensor | None, compressed: torch.Tensor) -> torch.Tensor:
        """History after appending compressed ids ``(B, T)``: the last N-1 ids."""
        if history is None:
            history = self.initial_history(compressed.shape[0], compressed.device)
        return torch.cat([history, compressed], dim=1)[:, -self.history_len :]

    def state_dict_extra(self) -> dict[str, Any]:
        """Everything needed to rebuild this mapping without the tokenizer."""
        return {
            "compressed": self.compressed.state_dict(),
            "raw_pad_id": self.raw_pad_id,
            "multipliers": {str(k): v for k, v in self.multipliers.items()},
            "table_sizes": {str(k): v for k, v in self.table_sizes.items()},
        }
