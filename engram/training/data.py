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
"""

from __future__ import annotations

import hashlib
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
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size={batch_size} and seq_len={seq_len} must be >= 1")
        if len(tokens) < seq_len + 2:
            raise ValueError(
                f"the training text has {len(tokens)} tokens, too short for a context of {seq_len} "
                f"(needs at least {seq_len + 2}); give more text or a smaller --seq-len"
            )
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


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping held-out windows (about ``max_tokens`` targets), as ``(B, T)`` input/target pairs.

    Windows are spread evenly over the whole eval text so a small budget still samples all of it.
    """
    tokens = np.asarray(tokens)
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows < 1:
        raise ValueError(
            f"the held-out text has {len(tokens)} tokens, too short for a context of {seq_len}; "
            "give more eval text or a smaller --seq-len"
        )
    want = max(1, min(n_windows, max_tokens // seq_len))
    picks = np.linspace(0, n_windows - 1, want).round().astype(np.int64)
    t = torch.from_numpy(tokens.astype(np.int64))
    idx = torch.from_numpy(picks)[:, None] * seq_len + torch.arange(seq_len + 1)  # (W, T+1)
    windows = t[idx]  # (W, T+1)
    return [(w[:, :-1], w[:, 1:]) for w in windows.split(batch_size)]
