"""N-gram hash addressing (DESIGN.md §2.2-§2.4), bit-exact with DeepSeek's reference demo.

Shapes: B batch, T time, L Engram layers, N max_ngram_size, K heads per order,
H = (N-1)*K heads per layer.

``NgramHashMapping(config, tokenizer)`` holds what the reference's ``NgramHashMapping`` does:
the compression table, each layer's multipliers (§2.2) and every head's prime table size (§2.3).
``hash(ids)`` compresses raw ids and returns, per Engram layer, the per-head row index
``(B, T, H)`` (order-major, no head offset), computed by :func:`engram.ops.hash.hash_ngrams`
(the formula of §2.4, or its C kernel on a CPU) on the ids' device.

Packed rows: ``hash``, ``hash_compressed`` and ``hash_step`` take ``doc_starts`` (B, T) bool,
True where a document begins inside the row; the n-gram history resets there exactly as at a
sequence start, so a packed row hashes as its documents would alone
(:func:`engram.ops.hash.hash_ngrams`; :func:`engram.ops.hash.doc_starts_from_segments` turns
segment ids into it).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from engram.config import EngramConfig, prime_table_sizes
from engram.core.tokenizer import CompressedTokenizer, static_in_graphs
from engram.core.validation import check_ids
from engram.ops import cpu
from engram.ops.hash import barrett_magic, hash_ngrams, tokens_since_doc_start

_INT64_MAX = np.iinfo(np.int64).max


def layer_multipliers(seed: int, layer_id: int, max_ngram_size: int, compressed_vocab: int) -> list[int]:
    """Odd int64 multipliers of one layer (DESIGN.md §2.2)."""
    half = max(1, (_INT64_MAX // compressed_vocab) // 2)
    rng = np.random.default_rng(int(seed + 10007 * int(layer_id)))
    r = rng.integers(0, half, size=(max_ngram_size,), dtype=np.int64)
    return [int(v) for v in r * 2 + 1]


def head_table_sizes(config: EngramConfig, layer_ids: list[int] | None = None) -> dict[int, list[list[int]]]:
    """Prime table size of every head: ``{layer_id: [[p per head] per order]}`` (DESIGN.md §2.3;
    the walk is :func:`engram.config.prime_table_sizes`, so the config can check row counts)."""
    return prime_table_sizes(config.engram_vocab_size, config.n_head_per_ngram,
                             config.layer_ids if layer_ids is None else layer_ids)


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


def check_same_compression(saved: CompressedTokenizer, tokenizer: Any, where: str = "the model") -> None:
    """``ValueError`` unless ``tokenizer`` (HF or :class:`CompressedTokenizer`) compresses exactly like
    ``saved``, the table a model was built with (Engram would otherwise hash different n-grams)."""
    given = tokenizer if isinstance(tokenizer, CompressedTokenizer) else CompressedTokenizer(tokenizer)
    if given.raw_vocab_size != saved.raw_vocab_size or given.fingerprint() != saved.fingerprint():
        raise ValueError(
            f"the tokenizer does not match the compression table of {where} (tokenizer: {given.raw_vocab_size} ids, "
            f"fingerprint {given.fingerprint()}; saved: {saved.raw_vocab_size} ids, fingerprint {saved.fingerprint()}); "
            "Engram would hash different n-grams - use the tokenizer the model was built with"
        )


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

    It is an ``nn.Module`` so that models can hold it as a submodule; it has no parameters and no
    buffers (its constants follow the ids' device, copied once per device).
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
        want = config.compressed_vocab_size  # DeepSeek's engram_compressed_vocab_size, when a config names it
        if want is not None and n_comp != want:
            raise ValueError(f"the tokenizer compresses to {n_comp} ids but the config's tables were hashed over "
                             f"compressed_vocab_size={want}: use the tokenizer the tables were made with")
        if multiplier_vocab is None:
            multiplier_vocab = want
        if multiplier_vocab is not None and not 1 <= int(multiplier_vocab) <= n_comp:
            raise ValueError(f"multiplier_vocab={multiplier_vocab} must be in 1..{n_comp} (the compressed vocabulary)")
        self.multiplier_vocab = n_comp if multiplier_vocab is None else int(multiplier_vocab)
        self.multipliers = {
            lid: layer_multipliers(config.seed, lid, config.max_ngram_size, self.multiplier_vocab)
            for lid in self.layer_ids
        }
        self.table_sizes = head_table_sizes(config, self.layer_ids)
        # The hash constants as tensors, in layer order: (L, N) multipliers, (L, H) primes and, for
        # the C kernel, the primes' Barrett constants; copied once to each other device ids come on.
        mult = torch.tensor([self.multipliers[l] for l in self.layer_ids], dtype=torch.long)
        mult = mult.reshape(-1, config.max_ngram_size)  # (L, N)
        primes = torch.tensor([[p for order in self.table_sizes[l] for p in order] for l in self.layer_ids],
                              dtype=torch.long).reshape(-1, config.n_heads_total)  # (L, H)
        # Each with its own storage (a view would make a compiled graph guard on its base every call),
        # and of fixed shape in compiled graphs (no symbolic-shape guards).
        self._cpu = tuple(t.clone() for t in (mult, primes, barrett_magic(primes)))
        for t in self._cpu:
            static_in_graphs(t)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor, None]] = {}
        # Called with every hash_step's {layer_id: (B, T, H)} (engram.storage.prefetch's Prefetcher). A
        # mapping rebuilt for a grown vocabulary takes this list over, so listeners follow it.
        self.step_listeners: list[Callable[[dict[int, torch.Tensor]], None]] = []

    def __getstate__(self) -> dict[str, Any]:
        # Listeners are runtime attachments (a Prefetcher and its worker thread): a copy or a
        # pickle of the mapping starts without them.
        state = self.__dict__.copy()
        state["step_listeners"] = []
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

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(multipliers (L, N), primes (L, H), Barrett constants or None)`` for ids on ``device``."""
        if device.type == "cpu":
            return self._cpu
        if device not in self._on_device:
            mult, primes, _ = self._cpu
            self._on_device[device] = (static_in_graphs(mult.to(device)), static_in_graphs(primes.to(device)), None)
        return self._on_device[device]

    def _apply(self, fn, recurse: bool = True):
        # Moving the model (``model.to("cuda")``) copies the constants to that device now, so that
        # a compiled first step finds them instead of creating them inside its graph.
        out = super()._apply(fn, recurse)
        device = fn(self._cpu[0]).device
        if device.type not in ("cpu", "meta"):
            self._tables(device)
            self.compressed.table_on(device)
        return out

    def _split(self, rows: torch.Tensor) -> dict[int, torch.Tensor]:
        return {lid: rows[i] for i, lid in enumerate(self.layer_ids)}  # {layer: (B, T, H)}

    def hash_compressed(self, x: torch.Tensor, history: torch.Tensor | None = None,
                        method: str = "auto", doc_starts: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """Hash already compressed ids ``x`` (B, T); ``history`` (B, N-1) precedes them.

        Returns ``{layer_id: (B, T, H)}``. ``method``: ``"plain"`` (the formula,
        :func:`engram.ops.hash.hash_ngrams_reference`), ``"kernel"`` (the C kernel; CPU ids) or
        ``"auto"`` (the kernel where it applies, else the formula); all give the same rows.
        ``doc_starts`` (B, T) bool: document starts inside packed rows, where the history resets
        to the pad id as at a sequence start (a start at position 0 discards ``history``).
        """
        backend = {"auto": "auto", "kernel": "kernel", "plain": "reference"}.get(method)
        if backend is None:
            raise ValueError(f"method={method!r} must be 'auto', 'kernel' or 'plain'")
        B = x.shape[0]
        if history is None:
            history = self.initial_history(B, x.device)
        full = torch.cat([history.to(x.device, torch.long), x.long()], dim=1)  # (B, N-1+T)
        mult, primes, magic = self._tables(full.device)
        starts = self._check_starts(doc_starts, x)
        return self._split(hash_ngrams(full, mult, primes, magic, backend, starts, self.pad_id))

    @staticmethod
    def _check_starts(doc_starts: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
        """``doc_starts`` as a bool ``(B, T)`` tensor on ``x``'s device (``ValueError`` if the shape differs)."""
        if doc_starts is None:
            return None
        if not isinstance(doc_starts, torch.Tensor):
            doc_starts = torch.as_tensor(np.asarray(doc_starts))
        if tuple(doc_starts.shape) != tuple(x.shape[:2]) or doc_starts.ndim != 2:
            raise ValueError(f"doc_starts must have the ids' shape (B, T) = {tuple(x.shape[:2])}, "
                             f"got {tuple(doc_starts.shape)}")
        if doc_starts.dtype.is_floating_point or doc_starts.dtype.is_complex:
            raise ValueError(f"doc_starts must be bool (True where a document starts), got {doc_starts.dtype}")
        return doc_starts.to(x.device, torch.bool)

    def hash(self, input_ids: torch.Tensor | np.ndarray, history: torch.Tensor | None = None,
             method: str = "auto", doc_starts: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """Raw ids ``(B, T)`` -> ``{layer_id: LongTensor (B, T, H)}`` on the ids' device.

        ``history`` is the compressed ids ``(B, N-1)`` that precede ``input_ids`` (decoding);
        ``None`` means the sequence starts here (pad-filled history, as in the reference).
        ``method`` selects the backend (see :meth:`hash_compressed`); all are bit-identical.
        ``doc_starts`` (B, T) bool: document starts in packed rows (see :meth:`hash_compressed`).
        """
        if isinstance(input_ids, np.ndarray):
            check_ids(input_ids, None, "input_ids")
            input_ids = torch.from_numpy(np.ascontiguousarray(input_ids))
        elif not isinstance(input_ids, torch.Tensor):
            input_ids = torch.as_tensor(input_ids)
            check_ids(input_ids, None, "input_ids")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
        if method == "auto" and input_ids.device.type == "cpu":  # compression and hash in one C call
            mult, primes, magic = self._cpu
            fused = cpu.hash_step(input_ids, self.compressed.table_on("cpu"), history, None, self.pad_id,
                                  mult, primes, magic, self._check_starts(doc_starts, input_ids))
            if fused is not None:  # else no kernel here, or ids it leaves to the formula (which raises)
                return self._split(fused[0])
        return self.hash_compressed(self.compress(input_ids), history, method, doc_starts)

    def hash_step(self, input_ids: torch.Tensor, history: torch.Tensor | None = None,
                  token_mask: torch.Tensor | None = None, keep_history: bool = False,
                  doc_starts: torch.Tensor | None = None) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """What a model forward needs: compress, hash and advance the history in one call.

        Args:
            input_ids: raw ids ``(B, T)``.
            history: compressed ids ``(B, >= N-1)`` before them (the last N-1 are used), or
                ``None`` at the start of a sequence.
            token_mask: ``(B, T)`` bool, False at padding (padding reads as the pad id, the
                history a sequence starts with).
            keep_history: return the whole history plus the new ids ``(B, L+T)`` instead of the
                last N-1 (a cache recording its past so it can be cropped back).
            doc_starts: ``(B, T)`` bool, True where a document starts (packed training rows): the
                n-gram history resets to the pad id there, exactly as at a sequence start, and
                the next history holds pad before the last start. ``None``: no boundaries.

        Returns ``({layer_id: (B, T, H)}, next history)``. On the CPU the C kernel does all of
        it in one call (:func:`engram.ops.cpu.hash_step`); elsewhere, without the kernels, or
        traced into a ``torch.compile`` graph (a compiled model's step hashes inside its graph,
        where inductor fuses the formula with the row lookup), the same in tensor ops. Every
        function in :attr:`step_listeners` is then called with the hash ids (eagerly: with
        listeners attached, a compiled model's graph breaks there).
        """
        check_ids(input_ids, None, "input_ids", ndim=2)
        starts = self._check_starts(doc_starts, input_ids)
        if starts is not None and keep_history:
            raise ValueError("doc_starts cannot be combined with keep_history (a cropped-back history would "
                             "lose the boundaries); hash packed training rows without keep_history")
        out = None
        if input_ids.device.type == "cpu" and not keep_history:
            mult, primes, magic = self._cpu
            fused = cpu.hash_step(input_ids, self.compressed.table_on("cpu"), history, token_mask, self.pad_id,
                                  mult, primes, magic, starts)
            if fused is not None:
                out = self._split(fused[0]), fused[1]
        if out is None:  # no kernel here (or an id it leaves to the tensor path, which raises)
            out = self._step_tensor(input_ids, history, token_mask, keep_history, starts)
        if self.step_listeners:
            self._notify(out[0])
        return out

    @torch.compiler.disable  # listeners are Python callbacks (a prefetch thread's queue): always eager
    def _notify(self, hashed: dict[int, torch.Tensor]) -> None:
        for listener in self.step_listeners:
            listener(hashed)

    def _step_tensor(self, input_ids: torch.Tensor, history: torch.Tensor | None, token_mask: torch.Tensor | None,
                     keep_history: bool = False,
                     doc_starts: torch.Tensor | None = None) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """:meth:`hash_step` as tensor ops (any device, any length)."""
        comp = self.compress(input_ids)  # (B, T)
        if token_mask is not None:
            comp = torch.where(token_mask.to(comp.device), comp, self.pad_id)
        h = self.history_len
        recent = history if history is None or history.shape[1] == h else history[:, history.shape[1] - h :]
        hashed = self.hash_compressed(comp, recent, doc_starts=doc_starts)
        if keep_history:
            start = history if history is not None else self.initial_history(comp.shape[0], comp.device)
            return hashed, torch.cat([start.to(comp.device), comp], dim=1)  # (B, L+T)
        return hashed, self.next_history(recent, comp, doc_starts)

    def next_history(self, history: torch.Tensor | None, compressed: torch.Tensor,
                     doc_starts: torch.Tensor | None = None) -> torch.Tensor:
        """History after appending compressed ids ``(B, T)``: the last N-1 ids (pad before the
        last document start of ``doc_starts`` (B, T), as a sequence starting there would have)."""
        if history is None:
            history = self.initial_history(compressed.shape[0], compressed.device)
        h = self.history_len
        nxt = torch.cat([history.to(compressed.device), compressed], dim=1)[:, -h:]  # (B, N-1)
        if doc_starts is not None and compressed.shape[1] > 0 and h > 0:
            since = tokens_since_doc_start(doc_starts.to(compressed.device), h + 1)[:, -1:]  # (B, 1), last position
            keep = torch.arange(h, device=compressed.device) >= h - 1 - since  # (B, N-1)
            nxt = torch.where(keep, nxt, self.pad_id)
        return nxt

    def check_same_as_saved(self, saved: dict[str, Any], where: str = "the model") -> None:
        """``ValueError`` unless the multipliers and table sizes equal a saved
        :meth:`state_dict_extra` (a model saved by a version that hashed differently)."""
        for what in ("multipliers", "table_sizes"):
            now = {str(k): v for k, v in getattr(self, what).items()}
            if now != saved.get(what):
                raise ValueError(f"{where} was hashed differently from this engram version: saved {what} "
                                 f"{saved.get(what)} vs {now}")

    def state_dict_extra(self) -> dict[str, Any]:
        """Everything needed to rebuild this mapping without the tokenizer."""
        return {
            "compressed": self.compressed.state_dict(),
            "raw_pad_id": self.raw_pad_id,
            "multipliers": {str(k): v for k, v in self.multipliers.items()},
            "table_sizes": {str(k): v for k, v in self.table_sizes.items()},
            "multiplier_vocab": self.multiplier_vocab,
        }
