"""Compressed tokenizer: raw tokenizer ids -> canonical ids (DESIGN.md §2.1).

Raw ids whose decoded text is the same after NFKC/NFD/accent-strip/lower-case/whitespace folding
share one canonical id, so ``"Apple"``, ``" apple"`` and ``"APPLE"`` hit the same N-gram rows.
The table is built once from a Hugging Face tokenizer and can be serialised (``state_dict`` /
``from_state_dict``) so that a saved model never rebuilds it differently.
"""

from __future__ import annotations

import hashlib
import sys
from typing import Any

import numpy as np
import torch

from engram.ops.threads import single_thread
from engram.core.validation import check_ids

_SENTINEL = "\ue000"
# Up to this many CPU ids (a decode step), a Python-int lookup beats the tensor gather's set-up.
_SCALAR_MAX_IDS = 16


def _normalizer():
    from tokenizers import Regex, normalizers

    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), _SENTINEL),
            normalizers.Strip(),
            normalizers.Replace(_SENTINEL, " "),
        ]
    )


def _decode_all(tok: Any, n: int) -> list[str]:
    """``tok.decode([i], skip_special_tokens=False)`` for every id, batched when possible."""
    ids = [[i] for i in range(n)]
    if hasattr(tok, "batch_decode"):  # transformers tokenizer: one call into Rust
        return list(tok.batch_decode(ids, skip_special_tokens=False))
    if hasattr(tok, "decode_batch"):  # a bare tokenizers.Tokenizer
        return list(tok.decode_batch(ids, skip_special_tokens=False))
    return [tok.decode(i, skip_special_tokens=False) for i in ids]


def _id_to_token(tok: Any, i: int) -> str:
    if hasattr(tok, "convert_ids_to_tokens"):
        return tok.convert_ids_to_tokens(i)
    return tok.id_to_token(i)


def _vocab_len(tok: Any) -> int:
    if hasattr(tok, "get_vocab_size"):  # tokenizers.Tokenizer
        return int(tok.get_vocab_size(with_added_tokens=True))
    return len(tok)


def build_lookup_table(tok: Any) -> tuple[np.ndarray, int]:
    """Return ``(lookup_table, compressed_vocab_size)`` for a HF tokenizer (DESIGN.md §2.1)."""
    normalizer = _normalizer()
    n = _vocab_len(tok)
    texts = _decode_all(tok, n)
    key_to_new: dict[str, int] = {}
    lookup = np.empty(n, dtype=np.int64)
    for tid, text in enumerate(texts):
        if "\ufffd" in text:
            key = _id_to_token(tok, tid)
        else:
            norm = normalizer.normalize_str(text)
            key = norm if norm else text
        lookup[tid] = key_to_new.setdefault(key, len(key_to_new))
    return lookup, len(key_to_new)


def static_in_graphs(t: torch.Tensor) -> torch.Tensor:
    """Mark a constant tensor static for ``torch.compile``: a graph then takes it with its fixed
    shape instead of checking symbolic sizes at every call (~7 µs of a decode step's guards for
    the hash's constants). What ``torch._dynamo.mark_static(t)`` does, without importing dynamo
    (1.5 s) in a process that never compiles."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.mark_static(t)
    else:
        t._dynamo_static_indices = set(range(t.dim()))  # type: ignore[attr-defined]
    return t


def static_address(t: torch.Tensor) -> torch.Tensor:
    """Mark a buffer that is updated in place and reused across calls (a static decode cache) as
    a fixed address for ``torch.compile``: CUDA graphs then read and write it where it is instead
    of copying it in at every replay. What ``torch._dynamo.mark_static_address(t)`` does (not
    guarded: a new buffer re-records the graphs rather than recompiling), without importing dynamo."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.mark_static_address(t)
    else:
        t._dynamo_static_input_type = "unguarded"  # type: ignore[attr-defined]
    return t


class CompressedTokenizer:
    """Maps raw token ids to canonical (compressed) ids.

    Args:
        tokenizer: a ``transformers`` tokenizer or a ``tokenizers.Tokenizer``; or ``None`` with
            ``lookup_table`` given (a saved table).
        lookup_table: raw id -> canonical id, 1-D int64 (skips the build).

    Calling it on ids (numpy array or torch tensor on any device, any shape) returns canonical
    ids of the same type, shape and device. Negative ids pass through unchanged.
    """

    def __init__(self, tokenizer: Any = None, lookup_table: np.ndarray | torch.Tensor | None = None):
        if lookup_table is None:
            if tokenizer is None:
                raise ValueError("CompressedTokenizer needs a tokenizer or a lookup_table")
            table, _ = build_lookup_table(tokenizer)
        else:
            table = np.asarray(
                lookup_table.cpu().numpy() if isinstance(lookup_table, torch.Tensor) else lookup_table,
                dtype=np.int64,
            )
            if table.ndim != 1 or table.size == 0 or table.min() < 0:
                raise ValueError("lookup_table must be a non-empty 1-D array of non-negative ids")
        self.lookup_table: np.ndarray = table  # (V_raw,) int64
        self.num_new_token = int(table.max()) + 1
        self._raw_vocab_size = int(table.shape[0])  # an int, not the array: a compiled graph specialises on it
        self._torch_tables: dict[torch.device, torch.Tensor] = {}
        self.table_on("cpu")  # exists from the start: a compiled graph reads it as a constant
        self._table_list: list[int] | None = None

    def __len__(self) -> int:
        return self.num_new_token

    @property
    def raw_vocab_size(self) -> int:
        return self._raw_vocab_size

    def fingerprint(self) -> str:
        """A short digest of the table; two tokenizers compress alike iff it matches."""
        return hashlib.sha256(self.lookup_table.astype("<i8").tobytes()).hexdigest()[:16]

    def table_on(self, device: torch.device | str) -> torch.Tensor:
        """The lookup table as a LongTensor on ``device`` (cached)."""
        device = torch.device(device)
        t = self._torch_tables.get(device)
        if t is None:
            t = torch.from_numpy(self.lookup_table).to(device)
            static_in_graphs(t)
            self._torch_tables[device] = t
        return t

    @property
    def table_list(self) -> list[int]:
        """The lookup table as Python ints (for the few-ids path; built once)."""
        if self._table_list is None:
            self._table_list = self.lookup_table.tolist()
        return self._table_list

    def compress_rows(self, rows: list[list[int]]) -> list[list[int]]:
        """:meth:`compress` on Python ints (a decode step's few ids), with the same range check."""
        n, table = self.raw_vocab_size, self.table_list
        top = max((max(r) for r in rows if r), default=-1)
        if top >= n:
            raise ValueError(f"input_ids has id {top} >= the tokenizer's vocabulary size {n}")
        return [[table[v] if v >= 0 else v for v in r] for r in rows]  # negative ids pass through

    def compress(self, input_ids: torch.Tensor, check: bool = False) -> torch.Tensor:
        """Raw ids (integer tensor, any shape and device) -> canonical ids, same shape and device.

        Negative ids (padding conventions) pass through, as in the reference. Ids >= the
        raw vocabulary raise ``ValueError``: always for CPU tensors; on an accelerator only with
        ``check=True``, since reading the maximum back stalls the host (unchecked, the gather
        fails on the device instead). Traced into a ``torch.compile`` graph, an assert in the graph
        checks them (``RuntimeError``), reading nothing back.
        """
        check_ids(input_ids, None, "input_ids")
        n = self.raw_vocab_size
        if torch.compiler.is_compiling():  # traced into a graph: checked by an assert in it, no read-back
            ids = input_ids.long()
            torch._assert_async((ids < n).all(), f"input_ids has an id >= the tokenizer's vocabulary size {n}")
            return torch.where(ids >= 0, self.table_on(ids.device)[ids.clamp_min(0)], ids)
        if input_ids.device.type == "cpu" and input_ids.numel() <= _SCALAR_MAX_IDS:
            (vals,) = self.compress_rows([input_ids.reshape(-1).tolist()])
            return torch.tensor(vals, dtype=torch.long).view(input_ids.shape)
        table = self.table_on(input_ids.device)
        ids = input_ids.long()
        # A (B, T) gather: on a small shared CPU, waking threads costs more than it saves.
        with single_thread(ids.device, ids.numel()):
            if ids.numel() and (check or ids.device.type == "cpu"):
                lo, hi = (int(v) for v in torch.aminmax(ids))  # both bounds in one pass
                if hi >= n:
                    raise ValueError(f"input_ids has id {hi} >= the tokenizer's vocabulary size {n}")
                if lo >= 0:  # the common case: no negative ids to pass through
                    return table[ids]
            return torch.where(ids >= 0, table[ids.clamp_min(0)], ids)

    def __call__(self, input_ids: np.ndarray | torch.Tensor | list) -> np.ndarray | torch.Tensor:
        if isinstance(input_ids, torch.Tensor):
            return self.compress(input_ids, check=True)
        arr = np.asarray(input_ids)
        check_ids(arr, self.raw_vocab_size, "input_ids")
        arr = arr.astype(np.int64, copy=False)
        return np.where(arr >= 0, self.lookup_table[np.maximum(arr, 0)], arr)

    # ------------------------------------------------------------------ serialisation
    def state_dict(self) -> dict[str, Any]:
        return {"lookup_table": self.lookup_table.tolist(), "fingerprint": self.fingerprint()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "CompressedTokenizer":
        ct = cls(lookup_table=np.asarray(state["lookup_table"], dtype=np.int64))
        if "fingerprint" in state and state["fingerprint"] != ct.fingerprint():
            raise ValueError("compressed tokenizer state is corrupt: fingerprint does not match table")
        return ct
