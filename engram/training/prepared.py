"""Prepared token corpora: ``engram prepare`` writes them, ``engram train --data DIR`` reads them.

A corpus too large for memory is tokenised once, in parallel worker processes, into a token file
that training maps into memory (``np.memmap``) and reads window by window
(:class:`engram.training.data.MemmapBatcher`), so a 10 GB corpus trains with a small resident set.

Directory layout (format ``engram-prepared-tokens``, version 1)::

    DIR/meta.json       the header (below); written last inside a temporary directory that is
                        then renamed to DIR, so DIR is complete or absent
    DIR/train.tokens    training tokens, raw little-endian uint16 (vocabulary <= 65536 ids) or uint32
    DIR/train.docs      int64 token offsets where each training document starts (ascending, first 0)
    DIR/eval.tokens     the held-out split, same layout (eval.docs beside it)
    DIR/tokenizer/      the tokenizer (``save_pretrained``): ``--tokenizer DIR/tokenizer`` or nothing

``meta.json``: ``format``, ``version``, ``dtype``, ``vocab_size``, ``eos_id``, ``tokenizer``
(``fingerprint``: :func:`engram.training.data.tokenizer_fingerprint`, SHA-256 of the parts of the
tokenizer's backend JSON that decide ids; ``name_or_path``), how the text was read
(``input_formats``, ``doc_sep``, ``text_field``, ``encoding``, ``eval_fraction``, ``eos``,
``segment_chars``), ``sources`` (path, bytes, format and role of every input file) and per split
``tokens``, ``documents``, ``max_id``, ``sha256`` (of the token file's bytes) and file names.

Documents (each gets the tokenizer's end-of-text id appended unless ``--no-eos``):

- plain text, ``--doc-sep file`` (default): each file is one document.
- plain text, ``--doc-sep blank-line``: documents are separated by one or more blank lines
  (lines holding only whitespace); the separating lines belong to no document, each document
  keeps its lines and their line breaks.
- JSONL (``.jsonl``, ``.ndjson`` or ``--format jsonl``): one JSON object per line, the document
  is its ``--text-field`` (default ``text``); blank lines and empty texts are skipped.
- parquet (``.parquet``): rows read by the optional ``datasets`` package, the document is the
  ``--text-field`` column.

Whitespace-only documents are skipped. Inputs are read as a stream (blocks of a few MB); a
document longer than 64K characters is tokenised in segments cut after a line break between two
non-space characters (else before a single space between two), where byte-level BPE (GPT-2
style) gives the same ids as uncut; other tokenizers may differ at those rare cut points. The
cut points depend on the text only, so any ``--workers`` count writes identical files.

Held-out split: ``--eval FILE ...`` names it; otherwise ``--eval-fraction F`` (default 0.01)
holds out, for plain text with one document per file, the last F of each file (from a line
start; as ``engram train --data FILE`` holds out its last 10%), and for every other kind, each
document i with floor((i+1)F) > floor(iF) (every 1/F-th document, spread over the corpus).

This module imports no torch at import time: worker processes (``spawn``) load only numpy and
``tokenizers``.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import math
import os
import re
import shutil
import signal
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

FORMAT = "engram-prepared-tokens"
VERSION = 1
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "eval")
INPUT_FORMATS = ("auto", "text", "jsonl", "parquet")
DOC_SEPS = ("file", "blank-line")
DEFAULT_EVAL_FRACTION = 0.01
#: a document is tokenised in segments of at least this many characters (see the module docstring)
SEGMENT_CHARS = 1 << 16
#: ... and at most this many (a cut anywhere when the text has no usable line break)
SEGMENT_CAP = 1 << 20
#: characters of text per task sent to a worker
TASK_CHARS = 1 << 20
#: bytes read from an input file at a time
READ_BYTES = 1 << 22
#: bytes read at a time when verifying a token file
VERIFY_BYTES = 1 << 24

# Reader events: (_DOC, split | None), (_TEXT, str), (_END, eos: bool), and a whole document in
# one event, (_FULL, split | None, text, eos).
_DOC, _TEXT, _END, _FULL = 0, 1, 2, 3
_BLANK_RUN = re.compile(r"\n(?:[^\S\n]*\n)+")  # a line break, then one or more blank lines
_BLANK_LEAD = re.compile(r"(?:[^\S\n]*\n)+")  # blank lines at the start of a block
# Where a long document's segment may end, in order of preference: after a line break between two
# non-space characters, else before a single space between two non-space characters. Byte-level
# BPE (GPT-2 style pre-tokenisation) gives the same ids cut there as uncut.
_CUTS = ((re.compile(r"(?<=\S)\n(?=\S)"), 1), (re.compile(r"(?<=\S) (?=\S)"), 0))


# ---------------------------------------------------------------------- reading inputs
def input_format(path: str | os.PathLike[str], fmt: str = "auto") -> str:
    """``text``, ``jsonl`` or ``parquet``: ``fmt`` unless ``auto``, else from the file name."""
    if fmt != "auto":
        if fmt not in INPUT_FORMATS:
            raise ValueError(f"--format {fmt!r} must be one of {', '.join(INPUT_FORMATS)}")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    return "text"


def _check_encoding(encoding: str | None) -> None:
    enc = encoding or "utf-8"
    try:
        codecs.lookup(enc)
    except LookupError:
        raise ValueError(f"--encoding {encoding!r} is not a text encoding Python knows") from None
    if "\n".encode(enc) != b"\n" or "a".encode(enc) != b"a":
        raise ValueError(f"engram prepare reads ASCII-compatible encodings (UTF-8, latin-1, cp1252, ...); "
                         f"--encoding {enc} is not one: convert the files to UTF-8")


def _require_datasets() -> Any:
    try:
        import datasets  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise ValueError("reading parquet files needs the optional 'datasets' package (pip install datasets); "
                         "or convert them to JSONL (one {\"text\": ...} object per line)") from None
    return datasets


def _byte_blocks(path: Path, progress: Callable[[int], None] | None) -> Iterator[bytes]:
    """The file's bytes in blocks of about :data:`READ_BYTES` that end after a ``\\n`` (the last
    block, and a block of a line longer than :data:`SEGMENT_CAP` x 4, may not)."""
    with open(path, "rb") as f:
        carry = b""
        while True:
            data = f.read(READ_BYTES)
            if not data:
                break
            if progress is not None:
                progress(len(data))
            data = carry + data if carry else data
            nl = data.rfind(b"\n")
            if nl < 0 and len(data) < 4 * SEGMENT_CAP:
                carry = data
                continue
            cut = len(data) if nl < 0 else nl + 1
            carry = data[cut:]
            yield data[:cut]
        if carry:
            yield carry


class _Decoder:
    """Strict incremental decoding of one file; errors name the file and the byte."""

    def __init__(self, path: Path, encoding: str | None, what: str):
        self.dec = codecs.getincrementaldecoder(encoding or "utf-8")("strict")
        self.path, self.encoding, self.what, self.pos = path, encoding, what, 0

    def __call__(self, data: bytes, final: bool = False) -> str:
        try:
            text = self.dec.decode(data, final)
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.what} {str(self.path)!r} is not {self.encoding or 'UTF-8'} text: byte "
                             f"{self.pos + e.start} ({data[e.start:e.start + 4]!r}) cannot be decoded; convert it to "
                             "UTF-8 or give its encoding with --encoding (e.g. --encoding latin-1)") from None
        if self.encoding is None and "\0" in text:
            raise ValueError(f"{self.what} {str(self.path)!r} looks binary (a NUL character after byte {self.pos}); "
                             "give text files, or --encoding to read it anyway")
        self.pos += len(data)
        return text


def _text_file_events(path: Path, encoding: str | None, split: str, tail_fraction: float,
                      progress: Callable[[int], None] | None) -> Iterator[tuple]:
    """One document per file; with ``tail_fraction`` the file's tail from the first line start at
    or after byte ``size * (1 - tail_fraction)`` is a second, held-out document."""
    decode = _Decoder(path, encoding, "input file")
    size = path.stat().st_size
    threshold = max(1, int(size * (1 - tail_fraction))) if tail_fraction > 0 else None
    pos = 0
    yield (_DOC, split)
    for block in _byte_blocks(path, progress):
        n = len(block)
        if threshold is not None and pos + n >= threshold:
            rel = block.find(b"\n", max(0, threshold - 1 - pos))
            if rel >= 0 and pos + rel + 1 < size:  # the held-out tail starts after this line break
                yield (_TEXT, decode(block[: rel + 1]))
                yield (_END, False)  # a cut, not the document's end: no end-of-text id
                yield (_DOC, "eval")
                threshold = None
                block = block[rel + 1 :]
        yield (_TEXT, decode(block))
        pos += n
    yield (_TEXT, decode(b"", final=True))
    yield (_END, True)


def _decoded_blocks(path: Path, encoding: str | None, what: str,
                    progress: Callable[[int], None] | None) -> Iterator[str]:
    decode = _Decoder(path, encoding, what)
    for block in _byte_blocks(path, progress):
        yield decode(block)
    tail = decode(b"", final=True)
    if tail:
        yield tail


def _blank_line_events(path: Path, encoding: str | None, split: str | None,
                       progress: Callable[[int], None] | None) -> Iterator[tuple]:
    """Documents separated by runs of blank lines (whitespace only)."""
    in_doc = False
    carry = ""
    for text in _decoded_blocks(path, encoding, "input file", progress):
        text = carry + text if carry else text
        cut = text.rfind("\n") + 1  # complete lines only; the rest waits for the next block
        text, carry = text[:cut], text[cut:]
        lead = _BLANK_LEAD.match(text)  # (the block starts at a line start)
        pos = 0
        if lead is not None:
            if in_doc:
                yield (_END, True)
                in_doc = False
            pos = lead.end()
        for m in _BLANK_RUN.finditer(text, pos):
            end = m.start() + 1  # the document keeps its last line break
            if in_doc:
                yield (_TEXT, text[pos:end])
                yield (_END, True)
                in_doc = False
            else:
                yield (_FULL, split, text[pos:end], True)
            pos = m.end()
        if pos < len(text):
            if not in_doc:
                yield (_DOC, split)
                in_doc = True
            yield (_TEXT, text[pos:])
        if len(carry) > 4 * SEGMENT_CAP:  # one enormous line: hand it on without waiting for its end
            if not in_doc:
                yield (_DOC, split)
                in_doc = True
            yield (_TEXT, carry)
            carry = ""
    if carry and not carry.isspace():  # a last line without a line break
        if not in_doc:
            yield (_DOC, split)
            in_doc = True
        yield (_TEXT, carry)
    if in_doc:
        yield (_END, True)


def _jsonl_events(path: Path, encoding: str | None, split: str | None, text_field: str,
                  progress: Callable[[int], None] | None) -> Iterator[tuple]:
    """One JSON object per line; the document is ``obj[text_field]``."""
    lineno = 0
    carry = ""
    for text in _decoded_blocks(path, encoding, "JSONL file", progress):
        text = carry + text if carry else text
        lines = text.split("\n")
        carry = lines.pop()  # after the last \n: an incomplete line (or "")
        for line in lines:
            lineno += 1
            doc = _jsonl_text(path, lineno, line, text_field)
            if doc:
                yield (_FULL, split, doc, True)
    if carry.strip():
        doc = _jsonl_text(path, lineno + 1, carry, text_field)
        if doc:
            yield (_FULL, split, doc, True)


def _jsonl_text(path: Path, lineno: int, line: str, text_field: str) -> str | None:
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not a JSON object ({e.msg} at column {e.colno}); JSONL input holds "
                         "one JSON object per line") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}:{lineno}: a JSON {type(obj).__name__}, not an object; JSONL input holds one "
                         "JSON object per line")
    if text_field not in obj:
        raise ValueError(f"{path}:{lineno}: no {text_field!r} field (it has {sorted(obj)[:8]}); name the text "
                         "with --text-field")
    value = obj[text_field]
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{path}:{lineno}: field {text_field!r} is a {type(value).__name__}, not a string")
    return value


def _parquet_events(path: Path, split: str | None, text_field: str,
                    progress: Callable[[int], None] | None) -> Iterator[tuple]:
    datasets = _require_datasets()
    try:
        ds = datasets.load_dataset("parquet", data_files=[str(path)], split="train", streaming=True)
    except Exception as e:  # noqa: BLE001 - a damaged file, a version mismatch ...: name the file
        raise ValueError(f"could not read parquet file {str(path)!r}: {e}") from e
    for i, row in enumerate(ds):
        if text_field not in row:
            raise ValueError(f"{path}: row {i} has no {text_field!r} column (it has {sorted(row)[:8]}); name the "
                             "text with --text-field")
        value = row[text_field]
        if value is None:
            continue
        if not isinstance(value, str):
            raise ValueError(f"{path}: row {i}: column {text_field!r} is a {type(value).__name__}, not a string")
        if value:
            yield (_FULL, split, value, True)
    if progress is not None:
        progress(path.stat().st_size)


@dataclass
class Source:
    """One input file: its path, format and role (``train`` or ``eval``)."""

    path: Path
    fmt: str
    role: str

    def events(self, doc_sep: str, text_field: str, encoding: str | None, eval_fraction: float,
               progress: Callable[[int], None] | None) -> Iterator[tuple]:
        """Reader events; a document's split is fixed here (``eval`` inputs, held-out file tails)
        or left ``None`` for the every-1/F-th-document rule."""
        split = None if self.role == "train" and eval_fraction > 0 else self.role
        if self.fmt == "jsonl":
            return _jsonl_events(self.path, encoding, split, text_field, progress)
        if self.fmt == "parquet":
            return _parquet_events(self.path, split, text_field, progress)
        if doc_sep == "blank-line":
            return _blank_line_events(self.path, encoding, split, progress)
        return _text_file_events(self.path, encoding, self.role, eval_fraction if self.role == "train" else 0.0,
                                 progress)


def _sources(inputs: Sequence[str | os.PathLike[str]], role: str, fmt: str) -> list[Source]:
    out = []
    for p in inputs:
        path = Path(p)
        if not path.exists():
            raise ValueError(f"input file {str(path)!r} does not exist")
        if not path.is_file():
            raise ValueError(f"input {str(path)!r} is not a file (give the files themselves, e.g. DIR/*.txt)")
        out.append(Source(path.resolve(), input_format(path, fmt), role))
    return out


# ---------------------------------------------------------------------- segments and tasks
def _cut_at(buf: str, pos: int) -> int:
    """End of the segment that starts at ``pos`` (``len(buf) - pos > SEGMENT_CAP``): the first cut
    point of :data:`_CUTS` at least :data:`SEGMENT_CHARS` in, by preference, else after the first
    line break there, else at :data:`SEGMENT_CAP` characters. Depends on the text only."""
    lo, hi = pos + SEGMENT_CHARS - 1, pos + SEGMENT_CAP
    for rx, after in _CUTS:
        m = rx.search(buf, lo, hi + 1)
        if m is not None and m.start() + after > pos:
            return m.start() + after
    nl = buf.find("\n", lo, hi)
    return nl + 1 if nl >= 0 else hi


def _is_eval(index: int, fraction: float) -> bool:
    """The every-1/F-th rule: document ``index`` is held out iff floor((i+1)F) > floor(iF)."""
    return math.floor((index + 1) * fraction) > math.floor(index * fraction)


@dataclass
class _Stats:
    documents: int = 0
    skipped: int = 0
    chars: int = 0


def _segments(events: Iterator[tuple], eval_fraction: float, stats: _Stats) -> Iterator[tuple[str, str, bool, bool, bool]]:
    """``(split, text, first, last, eos)`` segments of the documents (see :func:`_cut_at`); a
    document's split is decided at its first segment (the 1/F rule counts kept documents only)."""
    index = 0  # documents whose split the 1/F rule decided
    given: str | None = None  # the reader's split for the current document
    split, buf, first = "train", "", True

    def begin() -> str:
        nonlocal index
        stats.documents += 1
        if given is not None:
            return given
        index += 1
        return "eval" if _is_eval(index - 1, eval_fraction) else "train"

    for ev in events:
        kind = ev[0]
        if kind == _DOC:
            given, buf, first = ev[1], "", True
            continue
        if kind == _TEXT:
            buf = buf + ev[1] if buf else ev[1]
        elif kind == _FULL:
            given, buf, first = ev[1], ev[2], True
        pos = 0
        while len(buf) - pos > SEGMENT_CAP:  # decided only with SEGMENT_CAP+1 characters in view
            cut = _cut_at(buf, pos)
            if first:
                split = begin()
            stats.chars += cut - pos
            yield split, buf[pos:cut], first, False, False
            first, pos = False, cut
        buf = buf[pos:] if pos else buf
        if kind != _TEXT:  # _END or _FULL: the document ends
            if first and not buf.strip():  # an empty or whitespace-only document
                stats.skipped += 1
            else:
                if first:
                    split = begin()
                stats.chars += len(buf)
                yield split, buf, first, True, bool(ev[-1])
            buf = ""


def _tasks(segments: Iterator[tuple]) -> Iterator[list[tuple]]:
    """Segments grouped into worker tasks of about :data:`TASK_CHARS` characters."""
    task: list[tuple] = []
    size = 0
    for seg in segments:
        task.append(seg)
        size += len(seg[1])
        if size >= TASK_CHARS:
            yield task
            task, size = [], 0
    if task:
        yield task


# ---------------------------------------------------------------------- workers
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_json: str, dtype: str, eos_id: int | None, pool_worker: bool = False) -> None:
    """Worker set-up: its own copy of the tokenizer (no truncation, no padding)."""
    from tokenizers import Tokenizer  # noqa: PLC0415

    if pool_worker:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops the pool and cleans up
    tok = Tokenizer.from_str(tokenizer_json)
    tok.no_truncation()
    tok.no_padding()
    _WORKER.update(tok=tok, dtype=np.dtype(dtype), eos=eos_id)


def _encode_texts(texts: list[str], eos_after: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of each text (no special tokens; the end-of-text id after those marked), back to
    back in the file's dtype, and the count of each."""
    tok, dtype, eos = _WORKER["tok"], _WORKER["dtype"], _WORKER["eos"]
    ids = [tok.encode(t, add_special_tokens=False).ids if t else [] for t in texts]
    if eos is not None:
        for piece, e in zip(ids, eos_after):
            if e:
                piece.append(eos)
    lengths = np.fromiter((len(i) for i in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter((v for piece in ids for v in piece), dtype=np.int64, count=int(lengths.sum()))
    if flat.size and int(flat.max()) > np.iinfo(dtype).max:
        raise ValueError(f"the tokenizer produced id {int(flat.max())}, beyond {dtype} (its length is wrong)")
    return flat.astype(dtype), lengths


class _SplitWriter:
    """Appends one split's tokens and document offsets to its files, hashing as it goes."""

    def __init__(self, folder: Path, name: str, dtype: np.dtype):
        self.name, self.dtype = name, dtype
        self.tokens_file, self.docs_file = f"{name}.tokens", f"{name}.docs"
        self.tok = open(folder / self.tokens_file, "wb")
        self.docs = open(folder / self.docs_file, "wb")
        self.sha = hashlib.sha256()
        self.n_tokens = self.n_docs = 0
        self.max_id = -1
        self._in_doc = False  # the current document has tokens (its start is recorded)
        self._starts: list[int] = []

    def add(self, ids: np.ndarray, lengths: list[int], firsts: list[bool]) -> None:
        """Segments of this split, in order: ``ids`` their tokens back to back, ``lengths`` and
        ``firsts`` (starts a document) per segment. A document starts at its first token."""
        o = self.n_tokens
        for n, first in zip(lengths, firsts):
            if first:
                self._in_doc = False
            if n and not self._in_doc:
                self._starts.append(o)
                self.n_docs += 1
                self._in_doc = True
            o += n
        if len(self._starts) >= 1 << 16:
            self._flush_starts()
        if len(ids):
            data = np.ascontiguousarray(ids, dtype=self.dtype.newbyteorder("<"))
            self.tok.write(memoryview(data).cast("B"))
            self.sha.update(memoryview(data).cast("B"))
            self.n_tokens += len(data)
            self.max_id = max(self.max_id, int(data.max()))

    def _flush_starts(self) -> None:
        if self._starts:
            self.docs.write(np.asarray(self._starts, dtype="<i8").tobytes())
            self._starts = []

    def close(self) -> dict[str, Any]:
        self._flush_starts()
        for f in (self.tok, self.docs):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        return {"tokens_file": self.tokens_file, "docs_file": self.docs_file, "tokens": self.n_tokens,
                "documents": self.n_docs, "max_id": self.max_id, "sha256": self.sha.hexdigest()}

    def abort(self) -> None:
        for f in (self.tok, self.docs):
            f.close()


# ---------------------------------------------------------------------- prepare
def sample_text(inputs: Sequence[str | os.PathLike[str]], max_chars: int, fmt: str = "auto", doc_sep: str = "file",
                text_field: str = "text", encoding: str | None = None) -> str:
    """The first ``max_chars`` characters of the inputs' documents, joined by line breaks (read as a
    stream: what a tokenizer is trained on when none is given)."""
    parts, total = [], 0
    for src in _sources(inputs, "train", fmt):
        for ev in src.events(doc_sep, text_field, encoding, 0.0, None):
            if ev[0] in (_TEXT, _FULL):
                parts.append(ev[-2 if ev[0] == _FULL else 1][: max_chars - total])
                total += len(parts[-1])
            if ev[0] in (_END, _FULL):
                parts.append("\n")
            if total >= max_chars:
                return "".join(parts)
    return "".join(parts)


def prepare_corpus(inputs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], tokenizer: Any, *,
                   eval_inputs: Sequence[str | os.PathLike[str]] | None = None,
                   eval_fraction: float | None = None, fmt: str = "auto", doc_sep: str = "file",
                   text_field: str = "text", encoding: str | None = None, workers: int = 1, eos: bool = True,
                   overwrite: bool = False, progress: Callable[[int], None] | None = None,
                   total_callback: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Tokenise ``inputs`` into the prepared directory ``out`` (module docstring); returns its
    ``meta.json`` plus ``seconds`` and ``mb_per_second`` (input bytes).

    Args:
        tokenizer: a fast HF tokenizer (saved into ``out/tokenizer``).
        eval_inputs: held-out files (then ``eval_fraction`` must be 0 or ``None``).
        eval_fraction: held-out share when no ``eval_inputs`` (default 0.01; 0: no held-out split).
        workers: tokenising processes (1: in this process).
        progress: called with each number of input bytes read; ``total_callback`` once with the total.
    """
    from engram.training.data import tokenizer_fingerprint  # noqa: PLC0415

    t0 = time.perf_counter()
    out = Path(out)
    if doc_sep not in DOC_SEPS:
        raise ValueError(f"--doc-sep {doc_sep!r} must be one of {', '.join(DOC_SEPS)}")
    if workers < 1:
        raise ValueError(f"--workers {workers} must be >= 1")
    if not text_field:
        raise ValueError("--text-field must name a field")
    if eval_inputs and eval_fraction:
        raise ValueError("give --eval FILE or --eval-fraction, not both")
    fraction = 0.0 if eval_inputs else (DEFAULT_EVAL_FRACTION if eval_fraction is None else float(eval_fraction))
    if not 0 <= fraction < 1:
        raise ValueError(f"--eval-fraction {fraction} must be in [0, 1)")
    _check_encoding(encoding)
    if not inputs:
        raise ValueError("engram prepare needs at least one input file")
    sources = _sources(inputs, "train", fmt) + _sources(eval_inputs or [], "eval", fmt)
    if any(s.fmt == "parquet" for s in sources):
        _require_datasets()
    check_out(out, overwrite)
    fingerprint = tokenizer_fingerprint(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    vocab = len(tokenizer)
    if vocab > 1 << 32:
        raise ValueError(f"a tokenizer of {vocab} ids does not fit uint32 token files")
    dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
    eos_id = getattr(tokenizer, "eos_token_id", None) if eos else None
    if eos_id is not None and not 0 <= int(eos_id) < vocab:
        raise ValueError(f"the tokenizer's eos id {eos_id} is outside its {vocab} ids")
    total = sum(s.path.stat().st_size for s in sources)
    if total_callback is not None:
        total_callback(total)

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    writers: dict[str, _SplitWriter] = {}
    pool = None
    try:
        writers = {name: _SplitWriter(tmp, name, dtype) for name in SPLITS}
        stats = _Stats()

        def events() -> Iterator[tuple]:
            for src in sources:
                yield from src.events(doc_sep, text_field, encoding, fraction, progress)

        def write(task: list[tuple], result: tuple[np.ndarray, np.ndarray]) -> None:
            flat, lengths = result
            held = np.fromiter((seg[0] == "eval" for seg in task), dtype=bool, count=len(task))  # (S,)
            if not held.any():
                writers["train"].add(flat, lengths.tolist(), [seg[2] for seg in task])
                return
            per_token = np.repeat(held, lengths)  # (tokens,)
            for name, flag in (("train", False), ("eval", True)):
                pick = held == flag
                if pick.any():
                    writers[name].add(flat[per_token == flag], lengths[pick].tolist(),
                                      [seg[2] for seg, k in zip(task, pick.tolist()) if k])

        tasks = _tasks(_segments(events(), fraction, stats))
        json_spec = backend.to_str()
        if workers == 1:
            _init_worker(json_spec, dtype.str, eos_id)
            for task in tasks:
                write(task, _encode_texts([seg[1] for seg in task], [seg[4] for seg in task]))
        else:
            import multiprocessing  # noqa: PLC0415
            from concurrent.futures import ProcessPoolExecutor  # noqa: PLC0415

            # spawn: no fork of a process holding torch / tokenizers threads; a worker that dies
            # (killed, out of memory) raises BrokenProcessPool here instead of hanging
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_init_worker, initargs=(json_spec, dtype.str, eos_id, True))
            pending: deque = deque()
            for task in tasks:  # at most 2 tasks per worker in flight: the input is never read ahead further
                pending.append((task, pool.submit(_encode_texts, [seg[1] for seg in task], [seg[4] for seg in task])))
                while len(pending) > 2 * workers:
                    t, r = pending.popleft()
                    write(t, r.result())
            while pending:
                t, r = pending.popleft()
                write(t, r.result())
            pool.shutdown()
            pool = None
        splits = {name: w.close() for name, w in writers.items()}
        writers = {}
        if splits["train"]["tokens"] == 0:
            raise ValueError("the inputs hold no training text (every document is empty or held out)")
        if fraction > 0 or eval_inputs:
            if splits["eval"]["tokens"] == 0:
                raise ValueError(
                    "the held-out split is empty: " + (
                        "the --eval files hold no text" if eval_inputs else
                        f"{stats.documents} documents, and --eval-fraction {fraction} selects none of them "
                        "(one document per file holds out each file's tail from a line start; a file without a "
                        "line break there gives none): give --eval FILE, a larger --eval-fraction, "
                        "--doc-sep blank-line, or --eval-fraction 0 for no held-out split"))
        else:
            for suffix in ("tokens", "docs"):
                (tmp / f"eval.{suffix}").unlink()
            del splits["eval"]
        tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        _check_saved_tokenizer(tmp / TOKENIZER_DIR, fingerprint)
        seconds = time.perf_counter() - t0
        meta = {
            "format": FORMAT, "version": VERSION, "dtype": dtype.name, "byte_order": "little",
            "vocab_size": vocab, "eos_id": None if eos_id is None else int(eos_id),
            "tokenizer": {"fingerprint": fingerprint, "dir": TOKENIZER_DIR,
                          "name_or_path": str(getattr(tokenizer, "name_or_path", "") or "")},
            "input_formats": sorted({s.fmt for s in sources}), "doc_sep": doc_sep, "text_field": text_field,
            "encoding": encoding or "utf-8", "eval_fraction": fraction, "eos": eos_id is not None,
            "segment_chars": [SEGMENT_CHARS, SEGMENT_CAP],
            "sources": [{"path": str(s.path), "bytes": s.path.stat().st_size, "format": s.fmt, "role": s.role}
                        for s in sources],
            "input_bytes": total, "skipped_documents": stats.skipped, "splits": splits,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "prepare_seconds": round(seconds, 3),
        }
        _write_json_synced(tmp / META_FILE, meta)
        _install(tmp, out, overwrite)
    except BaseException:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for w in writers.values():
            w.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**meta, "seconds": seconds, "mb_per_second": total / 1e6 / max(seconds, 1e-9)}


def _remove_stale_temporaries(out: Path) -> None:
    """Delete ``.OUT.tmp-PID-*`` / ``.OUT.old-PID-*`` left beside ``out`` by a writer on this machine
    that is no longer running (killed before it could clean up)."""
    for p in out.parent.glob(f".{glob.escape(out.name)}.*-*-*"):
        m = re.fullmatch(rf"\.{re.escape(out.name)}\.(?:tmp|old)-(\d+)-[0-9a-f]{{8}}", p.name)
        if m is None or not p.is_dir() or p.is_symlink():
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (PermissionError, OverflowError):
            pass


def _check_saved_tokenizer(path: Path, fingerprint: str) -> None:
    from transformers import AutoTokenizer  # noqa: PLC0415

    from engram.training.data import tokenizer_fingerprint  # noqa: PLC0415

    got = tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(path)))
    if got != fingerprint:
        raise RuntimeError(f"the tokenizer saved to {str(path)!r} encodes differently once loaded (fingerprint "
                           f"{got[:16]} vs {fingerprint[:16]}); prepare with a tokenizer that save_pretrained "
                           "round-trips")


def _write_json_synced(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(data, indent=2))
        f.flush()
        os.fsync(f.fileno())


def check_out(out: Path, overwrite: bool) -> None:
    """``FileExistsError`` unless ``out`` may be written (absent, an empty directory, or a prepared
    directory with ``overwrite``), checked before any work."""
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir() and not out.is_symlink():
        if not any(out.iterdir()):
            return
        if (out / META_FILE).is_file():
            if overwrite:
                return
            raise FileExistsError(f"{str(out)!r} already holds prepared data; add --overwrite to replace it")
    raise FileExistsError(f"{str(out)!r} exists and is not a directory written by engram prepare; "
                          "choose another --out (it is never replaced)")


def _install(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished temporary directory to ``out`` (last step: ``out`` is complete or absent)."""
    check_out(out, overwrite)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if out.exists():  # a prepared directory, overwrite given: move it aside, rename, delete it
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    try:
        fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


# ---------------------------------------------------------------------- reading prepared data
@dataclass
class PreparedSplit:
    """One split of a prepared directory: mapped tokens and document offsets."""

    name: str
    tokens: np.ndarray  # (n,) uint16 / uint32, memory-mapped
    doc_offsets: np.ndarray  # (documents,) int64, memory-mapped
    info: dict[str, Any]

    @property
    def n_tokens(self) -> int:
        return int(self.info["tokens"])


def _bad(path: Path, msg: str) -> ValueError:
    return ValueError(f"prepared data {str(path)!r}: {msg}; run engram prepare again")


def _int_field(path: Path, d: dict[str, Any], key: str, where: str) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise _bad(path, f"{where} field {key!r} is {v!r}, not a non-negative integer (meta.json is damaged)")
    return v


class PreparedCorpus:
    """A directory written by :func:`prepare_corpus`, opened and checked (:func:`open_prepared`)."""

    def __init__(self, path: Path, meta: dict[str, Any], splits: dict[str, PreparedSplit]):
        self.path, self.meta, self.splits = path, meta, splits

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def fingerprint(self) -> str:
        return str(self.meta["tokenizer"]["fingerprint"])

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_DIR

    def load_tokenizer(self) -> Any:
        """The tokenizer saved beside the tokens (checked against the fingerprint)."""
        from transformers import AutoTokenizer  # noqa: PLC0415

        p = self.tokenizer_path
        if not (p / "tokenizer.json").is_file():
            raise _bad(self.path, f"its tokenizer {str(p)!r} is missing; give the one it was prepared with "
                                  "(--tokenizer)")
        try:
            tok = AutoTokenizer.from_pretrained(str(p))
        except Exception as e:  # noqa: BLE001 - name the directory, whatever HF raises
            raise _bad(self.path, f"its tokenizer {str(p)!r} cannot be loaded ({e})") from e
        self.check_tokenizer(tok, f"the tokenizer saved in {str(p)!r}")
        return tok

    def check_tokenizer(self, tokenizer: Any, what: str = "the tokenizer") -> None:
        """``ValueError`` unless ``tokenizer`` encodes as the one the tokens were made with."""
        from engram.training.data import tokenizer_fingerprint  # noqa: PLC0415

        got = tokenizer_fingerprint(tokenizer)
        if got != self.fingerprint or len(tokenizer) != self.vocab_size:
            raise ValueError(
                f"{what} ({len(tokenizer)} ids, fingerprint {got[:16]}) is not the tokenizer {str(self.path)!r} was "
                f"prepared with ({self.vocab_size} ids, fingerprint {self.fingerprint[:16]}): its ids would mean other "
                f"text. Use --tokenizer {str(self.tokenizer_path)!r} (or no --tokenizer), or run engram prepare "
                "again with this tokenizer")

    def verify(self, progress: Callable[[int], None] | None = None) -> None:
        """Read every token file once (in :data:`VERIFY_BYTES` blocks, never mapped whole): ids below
        the vocabulary, SHA-256 as recorded, document offsets ascending from 0 inside the file."""
        for split in self.splits.values():
            _verify_split(self.path, split, self.vocab_size, progress)

    def batcher(self, batch_size: int, seq_len: int, seed: int = 0) -> Any:
        """A :class:`~engram.training.data.MemmapBatcher` over the training split."""
        from engram.training.data import MemmapBatcher  # noqa: PLC0415

        tr = self.splits["train"]
        return MemmapBatcher(tr.tokens, batch_size, seq_len, seed, doc_offsets=tr.doc_offsets,
                             vocab_size=self.vocab_size)

    def eval_batches(self, batch_size: int, seq_len: int, max_tokens: int) -> list[Any]:
        """Held-out :class:`~engram.training.data.Batch` es (with document starts); ``[]`` without an eval split."""
        from engram.training.data import memmap_eval_batches  # noqa: PLC0415

        ev = self.splits.get("eval")
        if ev is None:
            return []
        return memmap_eval_batches(ev.tokens, batch_size, seq_len, max_tokens, ev.doc_offsets, self.vocab_size)


def is_prepared_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory (the caller then opens it as prepared data)."""
    return Path(path).is_dir()


def open_prepared(path: str | os.PathLike[str], tokenizer: Any = None, verify: bool = True,
                  progress: Callable[[int], None] | None = None) -> PreparedCorpus:
    """Open a prepared directory, checking (each a ``ValueError`` naming what is wrong): the
    metadata file is there and well-formed, every file has the size the header gives (a truncated
    or padded file is refused before it is mapped), ``tokenizer`` (if given) is the one it was
    prepared with, and with ``verify`` every id is below the vocabulary, the token bytes match their
    SHA-256 and the document offsets are sound."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"prepared data {str(p)!r} does not exist")
    if not p.is_dir():
        raise ValueError(f"{str(p)!r} is not a directory of prepared data")
    meta_path = p / META_FILE
    if not meta_path.is_file():
        raise ValueError(f"{str(p)!r} has no {META_FILE}: it is not a directory written by engram prepare, or its "
                         "metadata file was lost (the token files cannot be trusted without it); run engram prepare")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise _bad(p, f"{META_FILE} is not readable JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _bad(p, f"{META_FILE} is not an {FORMAT} header (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version") != VERSION:
        raise ValueError(f"prepared data {str(p)!r} has format version {meta.get('version')!r}; this engram reads "
                         f"version {VERSION}: run engram prepare again with this version")
    if meta.get("dtype") not in ("uint16", "uint32"):
        raise _bad(p, f"dtype {meta.get('dtype')!r} is not uint16 or uint32")
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    vocab = _int_field(p, meta, "vocab_size", "header")
    if vocab < 1 or vocab > np.iinfo(dtype).max + 1:
        raise _bad(p, f"vocab_size {vocab} does not fit its dtype {meta['dtype']}")
    tok_meta = meta.get("tokenizer")
    if not isinstance(tok_meta, dict) or not isinstance(tok_meta.get("fingerprint"), str):
        raise _bad(p, "the header has no tokenizer fingerprint")
    raw_splits = meta.get("splits")
    if not isinstance(raw_splits, dict) or "train" not in raw_splits:
        raise _bad(p, "the header names no training split")
    splits = {}
    for name, info in raw_splits.items():
        if name not in SPLITS or not isinstance(info, dict):
            raise _bad(p, f"the header has an unknown split {name!r}")
        splits[name] = _open_split(p, name, info, dtype, vocab)
    corpus = PreparedCorpus(p, meta, splits)
    if tokenizer is not None:
        corpus.check_tokenizer(tokenizer)
    if verify:
        corpus.verify(progress)
    return corpus


def _open_split(p: Path, name: str, info: dict[str, Any], dtype: np.dtype, vocab: int) -> PreparedSplit:
    n = _int_field(p, info, "tokens", f"split {name!r}")
    docs = _int_field(p, info, "documents", f"split {name!r}")
    max_id = info.get("max_id")
    if not isinstance(max_id, int) or max_id >= vocab:
        raise ValueError(f"prepared data {str(p)!r}: split {name!r} holds ids up to {max_id!r}, but the tokenizer has "
                         f"{vocab} ids; run engram prepare again")
    files = {}
    for key, default, item, count in (("tokens_file", f"{name}.tokens", dtype.itemsize, n),
                                      ("docs_file", f"{name}.docs", 8, docs)):
        fname = info.get(key, default)
        if not isinstance(fname, str) or "/" in fname or "\\" in fname or fname.startswith("."):
            raise _bad(p, f"split {name!r} names file {fname!r}")
        f = p / fname
        if not f.is_file():
            raise _bad(p, f"{fname} is missing")
        size, want = f.stat().st_size, item * count
        if size != want:
            raise _bad(p, f"{fname} is {size} bytes but {META_FILE} says {count} x {item} = {want} bytes: "
                          f"it is {'truncated' if size < want else 'longer than recorded'} or corrupt")
        files[key] = f
    tokens = (np.memmap(files["tokens_file"], dtype=dtype, mode="r", shape=(n,)) if n
              else np.zeros(0, dtype=dtype))
    offsets = (np.memmap(files["docs_file"], dtype="<i8", mode="r", shape=(docs,)) if docs
               else np.zeros(0, dtype="<i8"))
    return PreparedSplit(name, tokens, offsets, info)


def _verify_split(p: Path, split: PreparedSplit, vocab: int, progress: Callable[[int], None] | None) -> None:
    f = p / split.info.get("tokens_file", f"{split.name}.tokens")
    dtype = split.tokens.dtype
    h = hashlib.sha256()
    buf = bytearray(VERIFY_BYTES)
    view = memoryview(buf)
    done = 0
    with open(f, "rb") as fh:
        while True:
            k = fh.readinto(buf)
            if not k:
                break
            chunk = view[:k]
            h.update(chunk)
            arr = np.frombuffer(chunk, dtype=dtype)
            if arr.size and int(arr.max()) >= vocab:
                bad = int(np.argmax(arr >= vocab))
                raise ValueError(f"prepared data {str(p)!r}: {f.name} holds id {int(arr[bad])} at token {done + bad}, "
                                 f"but the tokenizer has {vocab} ids (the file was changed or built with another "
                                 "tokenizer); run engram prepare again")
            done += arr.size
            if progress is not None:
                progress(k)
    if h.hexdigest() != split.info.get("sha256"):
        raise _bad(p, f"{f.name} does not match the SHA-256 in {META_FILE} (it changed after it was written)")
    offs = split.doc_offsets
    if len(offs):
        if int(offs[0]) != 0 or int(offs[-1]) >= max(split.n_tokens, 1):
            raise _bad(p, f"{split.name}.docs holds offsets outside its token file")
        step = 1 << 20
        for i in range(0, len(offs), step):
            part = np.asarray(offs[max(0, i - 1) : i + step])
            if part.size > 1 and not bool(np.all(part[1:] > part[:-1])):
                raise _bad(p, f"{split.name}.docs is not ascending")
    elif split.n_tokens:
        raise _bad(p, f"{split.name} has tokens but no documents")


def load_prepared_data(path: str | os.PathLike[str], batch_size: int, seq_len: int, seed: int,
                       tokenizer: Any = None, tokenizer_arg: str | None = None,
                       eval_tokens: int = 16384) -> tuple[Any, Any, list[Any], dict[str, Any]]:
    """``(tokenizer, batcher, eval_batches, info)`` for ``engram train/study --data DIR``: the
    directory opened and verified, ``tokenizer`` (a checkpoint's), else ``--tokenizer``, else
    the one saved beside the tokens, checked to be the one the tokens were made with."""
    corpus = open_prepared(path, verify=False)  # the header and file sizes first: cheap, before any tokenizer
    if "eval" not in corpus.splits:
        raise ValueError(f"prepared data {str(corpus.path)!r} has no held-out split to evaluate on; prepare it "
                         "with --eval-fraction F or --eval FILE")
    if tokenizer is not None:
        corpus.check_tokenizer(tokenizer, "the checkpoint's tokenizer")
    elif tokenizer_arg:
        from engram.training.data import get_tokenizer  # noqa: PLC0415

        tokenizer = get_tokenizer(tokenizer_arg, "")
        corpus.check_tokenizer(tokenizer, f"--tokenizer {tokenizer_arg!r}")
    else:
        tokenizer = corpus.load_tokenizer()
    corpus.verify()
    batcher = corpus.batcher(batch_size, seq_len, seed)
    evals = corpus.eval_batches(batch_size, seq_len, eval_tokens)
    tr, ev = corpus.splits["train"], corpus.splits["eval"]
    info = {"source": f"prepared {corpus.path} ({tr.info['documents']} + {ev.info['documents']} held-out documents)",
            "prepared": str(corpus.path), "train_tokens": tr.n_tokens, "eval_tokens": ev.n_tokens,
            "eval_tokens_used": int(sum(b[1].numel() for b in evals)), "tokenizer_vocab": len(tokenizer),
            "train_sha256": tr.info["sha256"], "eval_sha256": ev.info["sha256"],
            "train_documents": tr.info["documents"], "eval_documents": ev.info["documents"],
            "tokenizer_fingerprint": corpus.fingerprint}
    return tokenizer, batcher, evals, info
