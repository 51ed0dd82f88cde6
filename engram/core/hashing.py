"""N-gram hash addressing (DESIGN.md §2.2-§2.4), bit-exact with DeepSeek's reference demo.

Shapes: B batch, T time, N max_ngram_size, K heads per order, H = (N-1)*K heads per layer.

``NgramHashMapping.hash(ids)`` compresses raw ids and returns, per Engram layer, the per-head row
index ``(B, T, H)`` (order-major, no head offset) computed in torch on the ids' device.

Two exact paths compute ``mix mod p`` (``method=``): ``"plain"`` is ``torch.remainder`` on int64
(a scalar 64-bit division per element on x86), ``"fast"`` (see :func:`split_plan`) reduces the
64-bit mix to a small float64 sum of its bit chunks times ``2**shift mod p`` and divides by a
reciprocal multiply. Both give identical rows (tests/test_perf_paths.py checks random and
adversarial int64 values); ``"auto"`` picks fast for big inputs, plain for decode-sized ones.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from engram.ops import cpu as cpu_kernels
from engram.config import EngramConfig
from engram.ops.threads import pool, single_thread
from engram.core.tokenizer import CompressedTokenizer
from engram.core.validation import check_ids

_INT64_MAX = np.iinfo(np.int64).max

# The fast modulo is exact while |S| (a float64 sum of integers, plus 0.5) stays below 2**50:
# then the relative error of S * fl(1/p) (<= 2**-52) is below the 0.5/p gap to an integer.
_FAST_SUM_LIMIT = 2**50
# Chunk widths (top chunk first) tried in order. The lowest chunk is added as is (its factor
# 2**0 mod p is 1), so it can be wide; every other chunk costs one pass over (B, T, H).
_CHUNK_WIDTHS = ((20, 44), (12, 12, 40))
# Elements per CPU op in the fast path: cache-resident pieces, run on one thread (see residues).
_CPU_CHUNK_ELEMENTS = 131072
# Below this many tokens (decode steps) the plain path, with fewer ops, is faster.
_FAST_MIN_TOKENS = 512
# Up to this many tokens on the CPU (decode steps), Python integers beat a dozen tiny torch ops.
_SCALAR_MAX_TOKENS = 16
_METHODS = ("auto", "kernel", "fast", "plain", "scalar")
# From this many CPU tokens the hash is split along time over torch's intra-op thread count, each
# slice on one Python thread with single-threaded ops (the ops release the GIL).
_PARALLEL_MIN_TOKENS = 8192
_MASK64 = (1 << 64) - 1
_TWO52_BITS = 0x4330000000000000  # bit pattern of float64 2**52


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


def split_plan(max_prime: int) -> tuple[int, ...] | None:
    """Bit widths (top chunk first) of the fast modulo's split of an int64, or ``None``.

    ``x = t * 2**s_0 + sum_j c_j * 2**s_j + c_last`` with ``t`` the signed top chunk (arithmetic
    shift) and ``c_j`` unsigned chunks; modulo ``p`` this is ``S = t*R_0 + sum_j c_j*R_j + c_last``
    with ``R_j = 2**s_j mod p``: a sum of exact float64 integers, ``|S| < 2**50``. Then
    ``q = floor(S * fl(1/p) + 0.5 * fl(1/p))`` is exactly ``floor(S / p)``: ``(S + 0.5) / p`` lies
    at least ``0.5 / p`` from every integer, and three roundings err by at most
    ``3 * 2**-53 * |S| / p < 0.375 / p``. ``S - q*p`` is then the exact residue in ``[0, p)``. The
    fewest chunks that keep ``|S| < 2**50``
    win; ``None`` when none does (primes >= 2**37: use the plain path).
    """
    for widths in _CHUNK_WIDTHS:
        bound = (2 ** (widths[0] - 1) + sum(2**w for w in widths[1:-1])) * max_prime + 2 ** widths[-1] + 1
        if bound < _FAST_SUM_LIMIT:
            return widths
    return None


def fast_mod_constants(primes: list[int], widths: tuple[int, ...]) -> dict[str, list]:
    """Per-prime constants of the fast modulo: ``R`` (one list per non-lowest chunk), ``inv``, ``negp``."""
    shifts = [64 - sum(widths[: j + 1]) for j in range(len(widths))]  # last is 0
    return {
        "R": [[float(pow(2, s, p)) for p in primes] for s in shifts[:-1]],
        "inv": [1.0 / p for p in primes],  # correctly rounded (Python int true division)
        "negp": [-float(p) for p in primes],
        "shifts": shifts,
    }


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
        multiplier_vocab: the compressed vocabulary size the multipliers are drawn for (default:
            this tokenizer's). A vocabulary grown after training (added tokens) keeps the
            original size here, so every existing n-gram keeps its rows.

    Attributes:
        compressed: the :class:`CompressedTokenizer`.
        pad_id: the compressed pad id.
        multipliers: ``{layer_id: [N odd ints]}``.
        table_sizes: ``{layer_id: [[prime per head] per order]}``.

    It is an ``nn.Module`` only so that ``.to(device)`` moves its constant buffers with the model;
    it has no parameters and its buffers are not saved in state dicts.
    """

    def __init__(self, config: EngramConfig, tokenizer: Any, layer_ids: list[int] | None = None,
                 multiplier_vocab: int | None = None):
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
        if multiplier_vocab is not None and not 1 <= int(multiplier_vocab) <= n_comp:
            raise ValueError(f"multiplier_vocab={multiplier_vocab} must be in 1..{n_comp} (the compressed vocabulary)")
        self.multiplier_vocab = n_comp if multiplier_vocab is None else int(multiplier_vocab)
        self.multipliers = {
            lid: layer_multipliers(config.seed, lid, config.max_ngram_size, self.multiplier_vocab)
            for lid in self.layer_ids
        }
        self.table_sizes = head_table_sizes(config, self.layer_ids)
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
        max_prime = max(p for l in self.layer_ids for order in self.table_sizes[l] for p in order)
        self.fast_widths = split_plan(max_prime)  # None: primes too big, "fast" falls back to plain
        self._fast_cache: dict[torch.device, dict[str, Any]] = {}
        # Called with every hash_step's {layer_id: (B, T, H)} (engram.storage.prefetch's Prefetcher). A
        # mapping rebuilt for a grown vocabulary takes this list over, so listeners follow it.
        self.step_listeners: list[Callable[[dict[int, torch.Tensor]], None]] = []

    def __getstate__(self) -> dict[str, Any]:
        # Listeners are runtime attachments (a Prefetcher and its worker thread): a copy or a
        # pickle of the mapping starts without them.
        state = self.__dict__.copy()
        state["step_listeners"] = []
        state.pop("_kernel_plan", None)  # engram.ops.cpu' constants, rebuilt on first use
        return state

    @property
    def history_len(self) -> int:
        """Compressed ids of history a decode step needs (N-1)."""
        return self.config.max_ngram_size - 1

    def compress(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Raw ids (any shape, integer) -> compressed ids, on the same device.

        :meth:`CompressedTokenizer.compress`: ids >= the tokenizer's size raise ``ValueError``
        on the CPU; on an accelerator the check is skipped, since it would stall the host on
        every call (the gather then fails on the device instead).
        """
        return self.compressed.compress(input_ids)

    def initial_history(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Pad-filled history ``(B, N-1)`` of compressed ids for the start of a sequence."""
        return torch.full((batch_size, self.history_len), self.pad_id, dtype=torch.long, device=device)

    def hash_compressed(self, x: torch.Tensor, history: torch.Tensor | None = None,
                        method: str = "auto") -> dict[int, torch.Tensor]:
        """Hash already compressed ids ``x`` (B, T); ``history`` (B, N-1) precedes them.

        ``method``: ``"kernel"`` (the C kernel of :mod:`engram.ops.cpu`, CPU), ``"fast"``,
        ``"plain"``, ``"scalar"`` (Python ints) or ``"auto"`` (on the CPU the kernel when it is
        available; else scalar up to 16 CPU tokens, fast from 512 tokens up, plain otherwise);
        all give the same rows.
        """
        if method not in _METHODS:
            raise ValueError(f"method={method!r} must be one of {_METHODS}")
        B, T = x.shape
        if history is None:
            history = self.initial_history(B, x.device)
        full = torch.cat([history.to(x.device, torch.long), x.long()], dim=1)  # (B, N-1+T)
        if method in ("auto", "kernel") and full.device.type == "cpu":
            workers = torch.get_num_threads() if B * T >= _PARALLEL_MIN_TOKENS else 1
            rows = cpu_kernels.hash_compressed(self, full, T, workers)  # (L, B, T, H)
            if rows is not None:
                return {lid: rows[i] for i, lid in enumerate(self.layer_ids)}
        if method == "kernel":
            raise RuntimeError(
                "method='kernel' needs CPU ids and the CPU kernels (a C compiler; see engram.ops.cpu)"
            )
        if method == "auto":
            if full.device.type == "cpu" and B * T <= _SCALAR_MAX_TOKENS:
                method = "scalar"
            else:
                method = "fast" if self.fast_widths is not None and B * T >= _FAST_MIN_TOKENS else "plain"
        elif method == "fast" and self.fast_widths is None:
            method = "plain"  # primes too big for the float split
        if method == "scalar":
            return self._hash_scalar(full, B, T)
        rows = self._hash_rows(full, B, T, method)  # (L, B, T, O, K)
        return {lid: rows[i].reshape(B, T, self.config.n_heads_total) for i, lid in enumerate(self.layer_ids)}  # (B, T, H)

    def _hash_rows(self, full: torch.Tensor, B: int, T: int, method: str) -> torch.Tensor:
        """:meth:`_hash_tensor` over ``full`` (B, N-1+T), split along time over CPU threads when large.

        Slice ``[s, e)`` of the output needs ``full[:, s : e+N-1]`` (its own N-1 ids of history),
        so the slices are independent and their concatenation is the unsplit result.
        """
        workers = torch.get_num_threads() if full.device.type == "cpu" else 1
        if workers < 2 or B * T < _PARALLEL_MIN_TOKENS:
            with single_thread(full.device):  # also keeps MKL's bmm from waking threads for small inputs
                return self._hash_tensor(full, B, T, method)
        h = self.history_len
        cuts = [T * i // workers for i in range(workers + 1)]

        def run(i: int) -> torch.Tensor:
            s, e = cuts[i], cuts[i + 1]
            return self._hash_tensor(full[:, s : e + h], B, e - s, method)  # (L, B, e-s, O, K), single-threaded worker

        return torch.cat(list(pool(workers).map(run, range(workers))), dim=2)  # (L, B, T, O, K)

    def _hash_scalar(self, full: torch.Tensor, B: int, T: int) -> dict[int, torch.Tensor]:
        """Python-int path for a few tokens (decode): DESIGN.md §2.4 with explicit int64 wrapping."""
        return self._hash_lists(full.tolist(), B, T, full.device)

    def _hash_lists(self, rows_ids: list[list[int]], B: int, T: int,
                    device: torch.device | str = "cpu") -> dict[int, torch.Tensor]:
        """:meth:`_hash_scalar` on Python lists: ``rows_ids`` is B rows of N-1+T compressed ids."""
        N = self.config.max_ngram_size
        out: dict[int, torch.Tensor] = {}
        for lid in self.layer_ids:
            mult, primes = self.multipliers[lid], self.table_sizes[lid]
            res = []
            for row in rows_ids:
                for t in range(N - 1, N - 1 + T):
                    mix = 0
                    heads = []
                    for k in range(N):
                        mix ^= (row[t - k] * mult[k]) & _MASK64  # unsigned image of the int64 product
                        if k >= 1:
                            signed = mix - (1 << 64) if mix >> 63 else mix
                            heads.extend(signed % p for p in primes[k - 1])  # Python % is non-negative
                    res.append(heads)
            t = torch.tensor(res, dtype=torch.long).view(B, T, self.config.n_heads_total)
            out[lid] = t if torch.device(device).type == "cpu" else t.to(device)
        return out

    def _constants(self, device: torch.device) -> dict[str, Any]:
        """Per-device constants of both paths, built once per device.

        Kept out of the buffers on purpose: ``model.to(torch.bfloat16)`` must not round the
        float64 constants of the fast path.
        """
        if device not in self._fast_cache:
            L, N, K = len(self.layer_ids), self.config.max_ngram_size, self.config.n_head_per_ngram
            O = N - 1
            primes = [p for l in self.layer_ids for order in self.table_sizes[l] for p in order]  # L*O*K
            consts: dict[str, Any] = {
                "mult": self._mult.to(device).T.reshape(N, L, 1, 1),  # (N, L, 1, 1)
                "primes": torch.tensor(primes, dtype=torch.long, device=device).view(L, 1, 1, O, K),
            }
            if self.fast_widths is not None:
                c = fast_mod_constants(primes, self.fast_widths)
                # W maps the per-order chunk columns [c_last, t, c_1, ...] (each O wide) to the S of
                # every head: S = A @ W with A (L, BT, n_chunks*O), one exact float64 matmul.
                n = len(self.fast_widths)
                coef = [[1.0] * len(primes)] + c["R"]  # chunk order: lowest (factor 1), top, middle...
                w = torch.zeros(L, n * O, O * K, dtype=torch.float64)
                for j, col in enumerate(coef):
                    col_t = torch.tensor(col, dtype=torch.float64).view(L, O, K)
                    for o in range(O):
                        w[:, j * O + o, o * K : (o + 1) * K] = col_t[:, o]
                consts.update({
                    "W": w.to(device),
                    "inv": torch.tensor(c["inv"], dtype=torch.float64, device=device).view(L, 1, O * K),
                    "negp": torch.tensor(c["negp"], dtype=torch.float64, device=device).view(L, 1, O * K),
                    "half_inv": torch.tensor(c["inv"], dtype=torch.float64, device=device).view(L, 1, O * K) * 0.5,
                    "shifts": c["shifts"],
                })
            self._fast_cache[device] = consts
        return self._fast_cache[device]

    def _mixes(self, full: torch.Tensor, T: int) -> torch.Tensor:
        """``(B, N-1+T)`` padded ids -> ``mix_n`` of every layer and order ``(L, B, T, O)`` (int64, wrapping)."""
        N = self.config.max_ngram_size
        mult = self._constants(full.device)["mult"]
        # full[:, N-1-k : N-1-k+T] is x shifted right by k; the pad-filled history is the left padding.
        mix = full[:, N - 1 : N - 1 + T] * mult[0]  # (L, B, T)
        mixes = []
        for k in range(1, N):  # orders 2..N
            mix = torch.bitwise_xor(mix, full[:, N - 1 - k : N - 1 - k + T] * mult[k])
            mixes.append(mix)
        return torch.stack(mixes, dim=-1)  # (L, B, T, O)

    def _hash_tensor(self, full: torch.Tensor, B: int, T: int, method: str) -> torch.Tensor:
        """Tensor path (``"plain"`` or ``"fast"``, see :meth:`residues`) -> rows ``(L, B, T, O, K)``."""
        L, O = len(self.layer_ids), self.config.n_orders
        return self.residues(self._mixes(full, T).view(L, B * T, O), method).view(L, B, T, O, self.config.n_head_per_ngram)

    def residues(self, mixes: torch.Tensor, method: str = "fast") -> torch.Tensor:
        """``mix mod p`` for every head: mixes ``(L, n, O)`` int64 -> rows ``(L, n, O, K)``, non-negative.

        ``"plain"`` is int64 ``torch.remainder`` (DESIGN.md §2.4 verbatim). ``"fast"`` splits
        each mix into bit chunks (A), one batched float64 matmul gives every head's exact ``S``
        in the output layout, then a reciprocal multiply-add, floor and multiply-subtract give
        the residues (see :func:`split_plan`); it needs :attr:`fast_widths`.
        """
        L, n, O = mixes.shape
        K = self.config.n_head_per_ngram
        c = self._constants(mixes.device)
        if method == "plain":
            return torch.remainder(mixes.unsqueeze(-1), c["primes"].view(L, 1, O, K))
        if method != "fast" or self.fast_widths is None:
            raise ValueError(f"method={method!r} must be 'plain' or 'fast' (fast needs primes < 2**37)")
        widths, shifts = self.fast_widths, c["shifts"]
        # A = [c_last, t, c_1, ...] per order: the chunk columns, exact small integers.
        n_chunks = len(widths)
        a = torch.empty(L, n, n_chunks * O, dtype=torch.float64, device=mixes.device)
        a[..., :O] = torch.bitwise_and(mixes, (1 << widths[-1]) - 1)
        a[..., O : 2 * O] = mixes >> shifts[0]  # arithmetic shift: the signed top chunk
        for j in range(1, n_chunks - 1):
            a[..., (j + 1) * O : (j + 2) * O] = torch.bitwise_and(mixes >> shifts[j], (1 << widths[j]) - 1)
        out = torch.empty(L, n, O * K, dtype=torch.long, device=mixes.device)
        # CPU: token chunks of ~128K outputs (cache-resident); GPU: one chunk.
        step = max(1, _CPU_CHUNK_ELEMENTS // (L * O * K)) if mixes.device.type == "cpu" else max(n, 1)
        # Two scratch buffers reused by every chunk: fresh large allocations page-fault each call.
        s_buf = torch.empty(L, min(step, n), O * K, dtype=torch.float64, device=mixes.device)
        q_buf = torch.empty_like(s_buf)
        for c0 in range(0, n, step):
            n_c = min(step, n - c0)
            s, q = s_buf[:, :n_c], q_buf[:, :n_c]
            torch.bmm(a[:, c0 : c0 + n_c], c["W"], out=s)  # (L, c, H): S, exact
            torch.addcmul(c["half_inv"], s, c["inv"], out=q).floor_()  # exactly floor(S / p), see split_plan
            s.addcmul_(q, c["negp"]).add_(2.0**52)  # 2**52 + (x mod p): the residue is the low mantissa bits
            torch.sub(s.view(torch.long), _TWO52_BITS, out=out[:, c0 : c0 + n_c])  # exact, vectorised "cast"
        return out.view(L, n, O, K)

    def hash(self, input_ids: torch.Tensor | np.ndarray, history: torch.Tensor | None = None,
             method: str = "auto") -> dict[int, torch.Tensor]:
        """Raw ids ``(B, T)`` -> ``{layer_id: LongTensor (B, T, H)}`` on the ids' device.

        ``history`` is the compressed ids ``(B, N-1)`` that precede ``input_ids`` (decoding);
        ``None`` means the sequence starts here (pad-filled history, as in the reference).
        ``method`` selects the modulo path (see :meth:`hash_compressed`); all are bit-identical.
        """
        if isinstance(input_ids, np.ndarray):
            check_ids(input_ids, None, "input_ids")
            input_ids = torch.from_numpy(np.ascontiguousarray(input_ids))
        elif not isinstance(input_ids, torch.Tensor):
            input_ids = torch.as_tensor(input_ids)
            check_ids(input_ids, None, "input_ids")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
        return self.hash_compressed(self.compress(input_ids), history, method)

    @torch.compiler.disable  # C kernel / Python-int hashing: compiled models (torch.compile) run it eagerly
    def hash_step(self, input_ids: torch.Tensor, history: torch.Tensor | None = None,
                  token_mask: torch.Tensor | None = None,
                  keep_history: bool = False) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """What a model forward needs: compress, hash and advance the history in one call.

        Args:
            input_ids: raw ids ``(B, T)``.
            history: compressed ids ``(B, >= N-1)`` before them (the last N-1 are used), or
                ``None`` at the start of a sequence.
            token_mask: ``(B, T)`` bool, False at padding (padding reads as the pad id, the
                history a sequence starts with).
            keep_history: return the whole history plus the new ids ``(B, L+T)`` instead of the
                last N-1 (a cache recording its past so it can be cropped back).

        Returns ``({layer_id: (B, T, H)}, next history)``. A few CPU tokens (a decode step)
        take one call of the C kernel (:mod:`engram.ops.cpu`), or one Python-int pass where
        it is unavailable, instead of ~10 small tensor ops; the result is the same.
        Every function in :attr:`step_listeners` is then called with the hash ids.
        """
        check_ids(input_ids, None, "input_ids", ndim=2)
        if input_ids.device.type == "cpu" and input_ids.numel() <= _SCALAR_MAX_TOKENS:
            out = None if keep_history else cpu_kernels.hash_step(self, input_ids, history, token_mask)
            if out is None:  # no kernels here, or a case they leave to the plain path (it raises on bad ids)
                out = self._step_scalar(input_ids, history, token_mask, keep_history)
        else:
            out = self._step_tensor(input_ids, history, token_mask, keep_history)
        for listener in self.step_listeners:
            listener(out[0])
        return out

    def _step_tensor(self, input_ids: torch.Tensor, history: torch.Tensor | None, token_mask: torch.Tensor | None,
                     keep_history: bool = False) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """:meth:`hash_step` as tensor ops (any device, any length)."""
        comp = self.compress(input_ids)  # (B, T)
        if token_mask is not None:
            comp = torch.where(token_mask.to(comp.device), comp, self.pad_id)
        h = self.history_len
        recent = history if history is None or history.shape[1] == h else history[:, history.shape[1] - h :]
        hashed = self.hash_compressed(comp, recent)
        if keep_history:
            start = history if history is not None else self.initial_history(comp.shape[0], comp.device)
            return hashed, torch.cat([start.to(comp.device), comp], dim=1)  # (B, L+T)
        return hashed, self.next_history(recent, comp)

    def _step_scalar(self, input_ids: torch.Tensor, history: torch.Tensor | None, token_mask: torch.Tensor | None,
                     keep_history: bool = False) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """:meth:`hash_step` for a few CPU tokens, on Python ints."""
        B, T = input_ids.shape
        h, pad = self.history_len, self.pad_id
        comp = self.compressed.compress_rows(input_ids.tolist())  # B x T
        past = history.tolist() if history is not None else [[pad] * h] * B
        keep = token_mask.tolist() if token_mask is not None else None
        full = []
        for b in range(B):
            row = comp[b] if keep is None else [c if k else pad for c, k in zip(comp[b], keep[b])]
            full.append(past[b] + row)  # L+T, L >= N-1
        cut = len(full[0]) - T - h if full else 0  # rows before the N-1 ids the hash reads
        hashed = self._hash_lists([row[cut:] for row in full] if cut else full, B, T)
        rows = full if keep_history else [row[len(row) - h :] for row in full]
        nxt = torch.tensor(rows, dtype=torch.long).view(B, len(rows[0]) if rows else h)  # (B, N-1) or (B, L+T)
        return hashed, nxt

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
            "multiplier_vocab": self.multiplier_vocab,
        }
