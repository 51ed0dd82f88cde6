"""Training corpora, the BPE tokenizer and token-stream batching for ``engram study`` / ``train``.

Shapes: B batch, T context length (block size).

Where text comes from (:func:`load_corpus`):

- ``--data FILE ...``: plain-text files; the last 10% of each file is held out, unless
  ``--eval-data FILE ...`` names the evaluation text.
- ``--dataset NAME``: a Hugging Face ``datasets`` corpus (needs the package and a network).
- neither: the running interpreter's standard-library ``.py`` sources (real text that ships with
  Python, no network, no extra files); whole files at the end of the sorted list are held out.

Tokenizer (:func:`get_tokenizer`): ``--tokenizer PATH_OR_NAME`` loads a HF tokenizer, otherwise a
byte-level BPE is trained on the training text with ``tokenizers`` and cached under
``~/.cache/engram/tokenizers/<hash of text and vocab size>``. Encoded token arrays are cached next
to it, so a second run starts at once.

Batches (:class:`TokenBatcher`) are a pure function of ``(seed, step)``, so every variant in a
study sees the same token stream and ``--resume`` needs nothing but the step counter.

Prepared corpora (``engram prepare``, :mod:`engram.training.prepared`) are read by
:class:`MemmapBatcher`: the same windows as :class:`TokenBatcher` over a memory-mapped token file,
plus the document starts inside each window (:meth:`MemmapBatcher.batch_with_boundaries`), so
that packed rows can reset the n-gram history at each document (``EngramGPT(..., doc_starts=)``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import mmap
import os
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from engram.ops.paths import cache_dir

#: held-out share of each ``--data`` file (and of the default corpus) when no eval text is given.
HOLDOUT_FRACTION = 0.1
#: the default corpus is capped so tokenizer training and encoding stay fast on a laptop.
DEFAULT_CORPUS_CHARS = 4_000_000
EOS_TOKEN = "<|endoftext|>"


@dataclass
class Corpus:
    """Training and held-out text, with a human-readable description of where it came from."""

    train_text: str
    eval_text: str
    source: str


def _read_text(path: str | os.PathLike[str], what: str, encoding: str | None = None) -> str:
    """The file's text: UTF-8 unless ``encoding`` is given; undecodable or binary data is an error
    naming the byte offset (never silently replaced by U+FFFD)."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{what} {str(p)!r} does not exist")
    if not p.is_file():
        raise ValueError(f"{what} {str(p)!r} is not a file")
    raw = p.read_bytes()
    try:
        text = raw.decode(encoding or "utf-8")
    except LookupError:
        raise ValueError(f"--encoding {encoding!r} is not a text encoding Python knows") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {str(p)!r} is not {encoding or 'UTF-8'} text: byte {e.start} "
                         f"({raw[e.start:e.start + 4]!r}) cannot be decoded; convert it to UTF-8 or give its "
                         "encoding with --encoding (e.g. --encoding latin-1)") from None
    nul = text.find("\0")
    if nul >= 0 and encoding is None:
        raise ValueError(f"{what} {str(p)!r} looks binary (a NUL character at character {nul}); "
                         "give text files, or --encoding to read it anyway")
    if not text.strip():
        raise ValueError(f"{what} {str(p)!r} is empty")
    return text


def split_holdout(text: str, fraction: float = HOLDOUT_FRACTION) -> tuple[str, str]:
    """``(head, tail)`` with the tail about ``fraction`` of the text, cut at a line break if one is near."""
    if not 0 < fraction < 1:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction!r}")
    cut = int(len(text) * (1 - fraction))
    nl = text.rfind("\n", int(cut * 0.98), cut)
    cut = nl + 1 if nl > 0 else cut
    return text[:cut], text[cut:]


def files_corpus(paths: list[str], eval_paths: list[str] | None = None, encoding: str | None = None) -> Corpus:
    """Text of ``paths``; the eval text is ``eval_paths`` or the last 10% of every file."""
    if not paths:
        raise ValueError("--data needs at least one file")
    texts = [_read_text(p, "data file", encoding) for p in paths]
    if eval_paths:
        evals = [_read_text(p, "eval data file", encoding) for p in eval_paths]
        train, held = texts, evals
        source = f"files {', '.join(map(str, paths))} (eval: {', '.join(map(str, eval_paths))})"
    else:
        pairs = [split_holdout(t) for t in texts]
        train, held = [a for a, _ in pairs], [b for _, b in pairs]
        source = f"files {', '.join(map(str, paths))} (last {HOLDOUT_FRACTION:.0%} of each held out)"
    return Corpus("\n".join(train), "\n".join(held), source)


def stdlib_files() -> list[Path]:
    """The interpreter's standard-library ``.py`` files, sorted (tests and site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        out.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return sorted(out)


def stdlib_corpus(max_chars: int = DEFAULT_CORPUS_CHARS) -> Corpus:
    """Up to ``max_chars`` of standard-library source, files spread evenly over the sorted list.

    The last ~10% of the chosen files (whole files) is held out.
    """
    files = stdlib_files()
    if not files:
        raise ValueError(f"no .py files found under {sysconfig.get_paths()['stdlib']!r} for the default corpus")
    sizes = [f.stat().st_size for f in files]
    stride = max(1, round(sum(sizes) / max_chars))  # every k-th file keeps the mix of all packages
    chosen = files[::stride]
    texts, total = [], 0
    for f in chosen:
        if total >= max_chars:
            break
        t = f.read_text(encoding="utf-8", errors="replace")
        texts.append(t)
        total += len(t)
    n_eval = max(1, len(texts) // 10)
    if len(texts) < 2:
        raise ValueError("the default corpus needs at least two standard-library files")
    return Corpus("\n".join(texts[:-n_eval]), "\n".join(texts[-n_eval:]),
                  f"Python {sysconfig.get_python_version()} standard library ({len(texts)} files, "
                  f"{total / 1e6:.1f} MB, last {n_eval} files held out)")


def dataset_corpus(name: str, config: str | None = None, text_field: str = "text") -> Corpus:
    """A Hugging Face ``datasets`` corpus (train split; validation or test split held out)."""
    try:
        import datasets  # noqa: PLC0415 - optional dependency
    except ImportError as e:
        raise ValueError(f"--dataset {name!r} needs the 'datasets' package (pip install datasets) "
                         "and a network; use --data FILE for local text") from e
    try:
        ds = datasets.load_dataset(name, config)
    except Exception as e:  # noqa: BLE001 - no network, unknown name, ...: say so plainly
        raise ValueError(f"could not load dataset {name!r}: {e}") from e
    split_eval = next((s for s in ("validation", "test") if s in ds), None)

    def join(split: Any) -> str:
        if text_field not in split.column_names:
            raise ValueError(f"dataset {name!r} has no {text_field!r} column (has {split.column_names})")
        return "\n".join(split[text_field])

    train = join(ds["train"])
    if split_eval is None:
        train, held = split_holdout(train)
    else:
        held = join(ds[split_eval])
    return Corpus(train, held, f"dataset {name}" + (f"/{config}" if config else ""))


def load_corpus(data: list[str] | None = None, eval_data: list[str] | None = None,
                dataset: str | None = None, max_chars: int = DEFAULT_CORPUS_CHARS,
                encoding: str | None = None) -> Corpus:
    """Pick the corpus from the CLI arguments (see the module docstring)."""
    if data and dataset:
        raise ValueError("give --data or --dataset, not both")
    if eval_data and not data:
        raise ValueError("--eval-data needs --data")
    if encoding and not data:
        raise ValueError("--encoding applies to --data files only")
    if data:
        return files_corpus(list(data), list(eval_data) if eval_data else None, encoding)
    if dataset:
        return dataset_corpus(dataset)
    return stdlib_corpus(max_chars)


# ---------------------------------------------------------------------- tokenizer
def _text_chunks(text: str, size: int = 1 << 16) -> Iterator[str]:
    """Pieces of about ``size`` characters, cut after a newline so words stay whole."""
    i = 0
    while i < len(text):
        j = min(len(text), i + size)
        if j < len(text):
            nl = text.find("\n", j)
            j = len(text) if nl < 0 else nl + 1
        yield text[i:j]
        i = j


def text_digest(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8", errors="surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:20]


def train_bpe_tokenizer(text: str, vocab_size: int = 4096, cache: bool = True) -> Any:
    """A byte-level BPE (HF fast tokenizer) trained on ``text``; cached by hash of text and size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: PLC0415

    if vocab_size < 257:
        raise ValueError(f"tokenizer vocab_size={vocab_size} must be >= 257 (256 bytes + end-of-text)")
    if not text.strip():
        raise ValueError("cannot train a tokenizer on empty text")
    path = cache_dir() / "tokenizers" / f"bpe{vocab_size}-{text_digest(text, str(vocab_size))}"
    if cache and (path / "tokenizer.json").exists():
        try:
            return AutoTokenizer.from_pretrained(str(path))
        except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt, whatever the error
            pass
        warnings.warn(f"the cached tokenizer {str(path)!r} is damaged; training it again", stacklevel=2)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_text_chunks(text), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    if cache:
        import shutil  # noqa: PLC0415

        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            hf.save_pretrained(str(tmp))
            if path.exists():  # a damaged entry (or another process's copy): the new one replaces it
                shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
        except OSError as e:  # the cache is optional: an unwritable one costs time, nothing else
            shutil.rmtree(tmp, ignore_errors=True)
            _cache_warning(path, e)
    return hf


def _cache_warning(path: Path, e: OSError) -> None:
    warnings.warn(f"cannot write the engram cache at {str(path.parent)!r} ({e.strerror or e}); continuing "
                  "without it (set ENGRAM_CACHE_DIR to a writable directory to keep tokenizers and token arrays)",
                  stacklevel=3)


def get_tokenizer(name_or_path: str | None, train_text: str, vocab_size: int = 4096) -> Any:
    """``--tokenizer`` (a local HF tokenizer path or name) or a BPE trained on ``train_text``."""
    if name_or_path is None:
        return train_bpe_tokenizer(train_text, vocab_size)
    from transformers import AutoTokenizer  # noqa: PLC0415

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:  # noqa: BLE001 - HF raises many kinds; name the argument
        raise ValueError(f"could not load --tokenizer {name_or_path!r}: {e}") from e


def encode(tokenizer: Any, text: str, cache: bool = True) -> np.ndarray:
    """Token ids of ``text`` as a 1-D int32 array (cached by hash of text and tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    key = text_digest(text, backend.to_str() if backend is not None else repr(tokenizer))
    path = cache_dir() / "tokens" / f"{key}.npy"
    if cache and path.exists():
        cached = _load_token_cache(path)
        if cached is not None:
            return cached
        if path.with_suffix(".sha256").exists():  # (entries from before digests are simply rebuilt)
            warnings.warn(f"the cached token array {str(path)!r} is damaged or was changed; encoding again",
                          stacklevel=2)
    chunks = list(_text_chunks(text))
    if backend is not None:  # one batched call into Rust, no special tokens added
        ids = [e.ids for e in backend.encode_batch(chunks, add_special_tokens=False)]
    else:
        ids = [tokenizer.encode(c, add_special_tokens=False) for c in chunks]
    arr = np.fromiter((i for piece in ids for i in piece), dtype=np.int32)
    if cache:
        tmp = path.with_name(path.stem + f".tmp{os.getpid()}.npy")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(tmp, arr)
            digest = path.with_suffix(".sha256")
            digest.write_text(array_sha256(arr))  # written first: an array without its digest is never trusted
            os.replace(tmp, path)
        except OSError as e:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            _cache_warning(path, e)
    return arr


#: the parts of a tokenizer's backend JSON that decide the ids of ``encode(text, add_special_tokens=False)``
_ENCODING_KEYS = ("added_tokens", "normalizer", "pre_tokenizer", "model")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of what makes a (fast, Rust-backed) tokenizer's ids: its backend JSON's added tokens,
    normaliser, pre-tokeniser and model, canonically serialised, and its length. Padding,
    truncation, post-processor and decoder settings do not change encoded ids and are left out,
    so a tokenizer saved and loaded again keeps its fingerprint."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None and hasattr(tokenizer, "to_str"):
        backend = tokenizer  # a bare tokenizers.Tokenizer
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast (Rust-backed) tokenizer; engram prepare "
                         "and prepared data need one (AutoTokenizer.from_pretrained(..., use_fast=True))")
    spec = json.loads(backend.to_str())
    canon = {k: spec.get(k) for k in _ENCODING_KEYS}
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else backend.get_vocab_size(with_added_tokens=True)
    h = hashlib.sha256(json.dumps(canon, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())
    h.update(f"|{size}".encode())
    return h.hexdigest()


def array_sha256(arr: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and bytes (the fingerprint of a token stream)."""
    h = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _load_token_cache(path: Path) -> np.ndarray | None:
    """The cached array if it is readable and matches its recorded SHA-256, else ``None``."""
    try:
        arr = np.load(path, allow_pickle=False)
        want = path.with_suffix(".sha256").read_text().strip()
    except (OSError, ValueError, EOFError):
        return None
    if arr.ndim != 1 or arr.dtype != np.int32 or array_sha256(arr) != want:
        return None
    return arr


# ---------------------------------------------------------------------- batching
def reseeded(batcher: Any, seed: int) -> Any:
    """A copy of ``batcher`` (either kind) drawing the stream of ``seed``; the tokens are shared."""
    other = copy.copy(batcher)
    other.seed = seed
    return other


def check_windows(tokens: np.ndarray, batch_size: int, seq_len: int, what: str, advice: str) -> None:
    """``ValueError`` unless ``tokens`` is 1-D and long enough for windows of ``seq_len + 1``."""
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size={batch_size} and seq_len={seq_len} must be >= 1")
    if len(tokens) < seq_len + 2:
        raise ValueError(f"{what} has {len(tokens)} tokens, too short for a context of {seq_len} "
                         f"(needs at least {seq_len + 2}); {advice} or give a smaller --seq-len")


class TokenBatcher:
    """Random contiguous windows of a token array; batch ``step`` is a pure function of ``(seed, step)``.

    Args:
        tokens: 1-D token ids (the training stream).
        batch_size: B.
        seq_len: T (inputs; targets are the next T tokens).
        seed: stream seed (all study variants share it, so they see the same batches).
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0):
        tokens = np.asarray(tokens)
        check_windows(tokens, batch_size, seq_len, "the training text", "give more text")
        self.tokens = torch.from_numpy(tokens.astype(np.int64))
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)``, each ``(B, T)`` int64, for training step ``step``."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.tokens) - self.seq_len - 1, (self.batch_size,), generator=g)  # (B,)
        idx = starts[:, None] + torch.arange(self.seq_len + 1)  # (B, T+1)
        window = self.tokens[idx]  # (B, T+1)
        return window[:, :-1], window[:, 1:]

    def batch_with_boundaries(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(inputs, targets, None)``: a text corpus joined in memory has no document starts
        (the same call as :meth:`MemmapBatcher.batch_with_boundaries`)."""
        x, y = self.batch(step)
        return x, y, None


def window_starts(n_tokens: int, batch_size: int, seq_len: int, seed: int, step: int) -> np.ndarray:
    """The ``(B,)`` window starts of batch ``step``: :class:`TokenBatcher`'s draw, exactly."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, n_tokens - seq_len - 1, (batch_size,), generator=g).numpy()


def _mapped_file(arr: Any) -> tuple[str, int] | None:
    """``(path, byte offset of element 0)`` of a 1-D ``np.memmap`` that maps a file itself (not a
    view of one), where windows can be read with ``os.pread`` instead of through the mapping;
    else ``None``."""
    if (isinstance(arr, np.memmap) and isinstance(getattr(arr, "base", None), mmap.mmap) and arr.ndim == 1
            and getattr(arr, "filename", None) and hasattr(os, "pread") and arr.flags.c_contiguous):
        return str(arr.filename), int(arr.offset)
    return None


class DocIndex:
    """Sorted document start offsets, searched window by window.

    A whole-file ``np.memmap`` is searched with ``os.pread``: an in-memory sample of every
    :attr:`BLOCK`-th offset, then one block read per lookup. Touching a mapping page by page
    would not keep memory small: Linux maps whole large page-cache folios (up to 2 MB) per fault,
    so random lookups leave most of the file resident. Any other array is searched in memory.
    """

    BLOCK = 4096

    def __init__(self, offsets: np.ndarray):
        self._fd = -1
        self.n = len(offsets)
        src = _mapped_file(offsets)
        self._array = None if src is not None else np.asarray(offsets, dtype=np.int64)
        if src is not None:
            self._dtype = offsets.dtype
            self._fd = os.open(src[0], os.O_RDONLY)
            self._pos = src[1]
            item = self._dtype.itemsize
            self._sample = np.array([int(np.frombuffer(os.pread(self._fd, item, self._pos + i * self.BLOCK * item),
                                                       dtype=self._dtype)[0])
                                     for i in range(math.ceil(self.n / self.BLOCK))], dtype=np.int64)

    def _block(self, i: int) -> np.ndarray:
        item = self._dtype.itemsize
        count = min(self.BLOCK, self.n - i * self.BLOCK)
        raw = os.pread(self._fd, count * item, self._pos + i * self.BLOCK * item)
        if len(raw) != count * item:
            raise ValueError("the document offsets file is shorter than when it was opened (it changed)")
        return np.frombuffer(raw, dtype=self._dtype).astype(np.int64)

    def between(self, lo: int, hi: int) -> np.ndarray:
        """The offsets ``o`` with ``lo <= o < hi``, ascending (int64)."""
        if self._array is not None:
            a, b = np.searchsorted(self._array, [lo, hi], side="left")
            return self._array[a:b]
        out = []
        i = max(0, int(np.searchsorted(self._sample, lo, side="right")) - 1)
        while i * self.BLOCK < self.n:
            blk = self._block(i)
            out.append(blk[(blk >= lo) & (blk < hi)])
            if int(blk[-1]) >= hi:
                break
            i += 1
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


def doc_start_mask(doc_offsets: np.ndarray | DocIndex | None, starts: np.ndarray, length: int) -> torch.Tensor | None:
    """``(W, length)`` bool: True where a document (offsets sorted, ascending) starts inside each
    window ``[start, start+length)``; ``None`` without offsets."""
    if doc_offsets is None:
        return None
    index = doc_offsets if isinstance(doc_offsets, DocIndex) else DocIndex(doc_offsets)
    out = np.zeros((len(starts), length), dtype=bool)
    for r, s in enumerate(starts.tolist()):
        found = index.between(int(s), int(s) + length)
        out[r, found - int(s)] = True
    return torch.from_numpy(out)


def read_windows(tokens: np.ndarray, starts: np.ndarray, length: int, vocab_size: int | None = None,
                 fd: int | None = None) -> torch.Tensor:
    """``(W, length)`` int64 windows ``tokens[s : s+length]``; with ``vocab_size``, ids >= it are a
    ``ValueError`` naming the offset. A whole-file ``np.memmap`` is read with ``os.pread`` (on
    ``fd`` if given), never through the mapping (see :class:`DocIndex`: page faults would leave
    large folios of the file resident)."""
    src = _mapped_file(tokens)
    if src is not None:
        item, own = tokens.dtype.itemsize, fd is None
        fd = os.open(src[0], os.O_RDONLY) if own else fd
        try:
            raw = [os.pread(fd, length * item, src[1] + s * item) for s in starts.tolist()]
        finally:
            if own:
                os.close(fd)
        if any(len(r) != length * item for r in raw):
            raise ValueError(f"the token file {src[0]!r} is shorter than when it was opened (it was truncated "
                             "or replaced); run engram prepare again")
        window = np.stack([np.frombuffer(r, dtype=tokens.dtype) for r in raw]).astype(np.int64)
    else:
        window = np.stack([np.asarray(tokens[s : s + length]) for s in starts.tolist()]).astype(np.int64)
    if vocab_size is not None and window.size and int(window.max()) >= vocab_size:
        r, c = np.argwhere(window >= vocab_size)[0]
        raise ValueError(f"the token file holds id {int(window[r, c])} >= the vocabulary size {vocab_size} at token "
                         f"{int(starts[r]) + int(c)}; it changed after it was verified - run engram prepare again")
    return torch.from_numpy(window)


class Batch(tuple):
    """``(inputs, targets)`` (so ``x, y = batch`` works) that also carries ``doc_starts``: ``(B, T)``
    bool document starts of the inputs, or ``None``; pass it to ``EngramGPT(x, y, doc_starts=...)``."""

    doc_starts: torch.Tensor | None

    def __new__(cls, inputs: torch.Tensor, targets: torch.Tensor, doc_starts: torch.Tensor | None = None) -> "Batch":
        self = super().__new__(cls, (inputs, targets))
        self.doc_starts = doc_starts
        return self


class MemmapBatcher:
    """:class:`TokenBatcher` over a token array that stays on disk (a memory-mapped prepared corpus).

    Batch ``step`` is the same pure function of ``(seed, step)`` and draws the same windows as
    :class:`TokenBatcher` over the same tokens; only the ``B`` windows of a batch are read (with
    ``os.pread`` from a memory-mapped file, see :func:`read_windows`), so a corpus far larger than
    memory trains with a small resident set.

    Args:
        tokens: 1-D unsigned ids (``np.memmap`` of uint16 / uint32, or any 1-D integer array).
        batch_size: B.
        seq_len: T (inputs; targets are the next T tokens).
        seed: stream seed.
        doc_offsets: sorted token offsets where documents start (from ``engram prepare``), or ``None``.
        vocab_size: if given, every batch is checked to hold ids below it (``ValueError`` naming the
            offset: a file changed after it was verified).
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0,
                 doc_offsets: np.ndarray | None = None, vocab_size: int | None = None):
        if not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be integer ids, got {tokens.dtype}")
        check_windows(tokens, batch_size, seq_len, "the training data", "prepare more text")
        self.tokens, self.doc_offsets, self.vocab_size = tokens, doc_offsets, vocab_size
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        src = _mapped_file(tokens)
        self._fd = os.open(src[0], os.O_RDONLY) if src is not None else None  # (the file the map holds)
        self._docs = DocIndex(doc_offsets) if doc_offsets is not None else None

    def close(self) -> None:
        """Close the token file (the batcher is unusable after)."""
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None
        if getattr(self, "_docs", None) is not None:
            self._docs.close()

    def __del__(self) -> None:
        self.close()

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, targets)``, each ``(B, T)`` int64, for training step ``step``."""
        starts = window_starts(len(self.tokens), self.batch_size, self.seq_len, self.seed, step)
        window = read_windows(self.tokens, starts, self.seq_len + 1, self.vocab_size, self._fd)  # (B, T+1)
        return window[:, :-1], window[:, 1:]

    def batch_with_boundaries(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(inputs, targets, doc_starts)`` for step ``step``: the batch of :meth:`batch` and its
        ``(B, T)`` bool document starts (True where a document begins at that input position;
        ``None`` without document offsets). Give it to ``model(x, y, doc_starts=doc_starts)``."""
        starts = window_starts(len(self.tokens), self.batch_size, self.seq_len, self.seed, step)
        window = read_windows(self.tokens, starts, self.seq_len + 1, self.vocab_size, self._fd)  # (B, T+1)
        return window[:, :-1], window[:, 1:], doc_start_mask(self._docs, starts, self.seq_len)


def memmap_eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_tokens: int,
                        doc_offsets: np.ndarray | None = None, vocab_size: int | None = None) -> list[Batch]:
    """:func:`eval_batches`' windows (the same ones) read from a mapped token file window by
    window (never the whole array in memory), each batch a :class:`Batch` carrying its
    document starts (``None`` without ``doc_offsets``)."""
    starts = eval_window_starts(len(tokens), seq_len, max_tokens, "the held-out data",
                                "prepare more held-out text")  # (W,)
    windows = read_windows(tokens, starts, seq_len + 1, vocab_size)  # (W, T+1)
    marks = doc_start_mask(doc_offsets, starts, seq_len)  # (W, T) or None
    return [Batch(w[:, :-1], w[:, 1:], None if marks is None else marks[i : i + batch_size])
            for i, w in zip(range(0, len(starts), batch_size), windows.split(batch_size))]


def eval_window_starts(n_tokens: int, seq_len: int, max_tokens: int, what: str, advice: str) -> np.ndarray:
    """Start offsets of the non-overlapping held-out windows: about ``max_tokens`` targets, spread
    evenly over the whole text so a small budget still samples all of it."""
    n_windows = (n_tokens - 1) // seq_len
    if n_windows < 1:
        raise ValueError(f"{what} has {n_tokens} tokens, too short for a context of {seq_len}; "
                         f"{advice} or a smaller --seq-len")
    want = max(1, min(n_windows, max_tokens // seq_len))
    return np.linspace(0, n_windows - 1, want).round().astype(np.int64) * seq_len  # (W,)


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping held-out windows (about ``max_tokens`` targets), as ``(B, T)`` input/target pairs.

    Windows are spread evenly over the whole eval text so a small budget still samples all of it.
    """
    tokens = np.asarray(tokens)
    picks = eval_window_starts(len(tokens), seq_len, max_tokens, "the held-out text", "give more eval text") // seq_len
    t = torch.from_numpy(tokens.astype(np.int64))
    idx = torch.from_numpy(picks)[:, None] * seq_len + torch.arange(seq_len + 1)  # (W, T+1)
    windows = t[idx]  # (W, T+1)
    return [(w[:, :-1], w[:, 1:]) for w in windows.split(batch_size)]
