"""Row stores: a table's parts as CPU tensors (host RAM) or in a file read through memory maps (disk).

Shapes: N rows of the flat table, U rows of one fetch, n columns of a part.

The table file format: a JSON header (magic, version, sizes, dim, codec, fingerprint, parts and
their page-aligned offsets, file size) in the first page(s), then each part's rows.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram.storage.quant import RowCodec, make_codec

_MAGIC = b"ENGRAMTB"
_VERSION = 1
_ALIGN = 4096
_NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64,
              torch.int8: np.int8, torch.uint8: np.uint8}


def _cuda_present() -> bool:
    return torch.cuda.is_available()


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


# ====================================================================================== stores
class HostRowStore:
    """Parts ``{name: (N, n)}`` of a table as CPU tensors (pinned when CUDA is present)."""

    def __init__(self, parts: dict[str, torch.Tensor]):
        self.parts = parts

    def fetch(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """CPU row ids ``(U,)`` -> parts of those rows (in pinned staging when CUDA is present).

        ``index_select`` runs in C++ without the GIL, so a prefetch thread overlaps the model.
        """
        out = {}
        for name, src in self.parts.items():
            if _cuda_present():
                buf = torch.empty((rows.numel(), src.shape[1]), dtype=src.dtype, pin_memory=True)
                out[name] = torch.index_select(src, 0, rows, out=buf)  # (U, n)
            else:
                out[name] = src.index_select(0, rows)  # (U, n)
        return out

    def put(self, rows: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        """Overwrite rows ``(U,)`` in place."""
        with torch.no_grad():
            for name, src in self.parts.items():
                src.index_copy_(0, rows, parts[name].to(src.dtype))

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parts.values())


class DiskRowStore(HostRowStore):
    """A table file: a JSON header, then each part's rows at a page-aligned offset.

    Reads gather from tensors over read-only memory maps (only touched pages are read); writes go
    through ``os.pwrite``. Open with :meth:`open`, make with :meth:`create`.
    """

    def __init__(self, path: Path, header: dict[str, Any]):
        self.path, self.header = path, header
        self.num_rows = int(header["num_rows"])
        self._map()

    # ---------------------------------------------------------------- file format
    @staticmethod
    def layout(codec: RowCodec, num_rows: int) -> tuple[dict[str, dict[str, Any]], int]:
        """``({part: {dtype, cols, offset}}, file_size)`` of a table of ``num_rows`` rows."""
        parts, off = {}, _ALIGN  # the header owns the first page (more if it is long)
        for name, (dtype, cols) in codec.parts().items():
            if dtype not in _NP_DTYPES:
                raise TypeError(f"{dtype} tables cannot be stored on disk; use float32/float16 or quantize")
            parts[name] = {"dtype": str(dtype).removeprefix("torch."), "cols": cols, "offset": off}
            off = _align(off + num_rows * cols * dtype.itemsize)
        return parts, off

    @classmethod
    def create(cls, path: str | os.PathLike, codec: RowCodec, sizes: list[int], fingerprint: str | None,
               source: torch.Tensor | None = None, chunk_rows: int = 1 << 16) -> "DiskRowStore":
        """Write a table file atomically and open it.

        ``source`` ``(N, d)`` is encoded chunk by chunk; ``None`` leaves a sparse all-zero file
        (``ftruncate``; no disk space used until rows are written). The file is built as
        ``<path>.tmp-<pid>`` and renamed over ``path`` only when complete, so an error (a full
        disk included) leaves any previous file untouched.
        """
        path = Path(path)
        num_rows = sum(sizes)
        if source is not None and tuple(source.shape) != (num_rows, codec.dim):
            raise ValueError(f"source has shape {tuple(source.shape)}, expected ({num_rows}, {codec.dim})")
        parts, file_size = cls.layout(codec, num_rows)
        header = {"format": "engram-table", "version": _VERSION, "sizes": [int(s) for s in sizes],
                  "dim": codec.dim, "num_rows": num_rows, "codec": codec.config(), "fingerprint": fingerprint,
                  "parts": parts, "file_size": file_size}
        blob = json.dumps(header).encode()
        head = _MAGIC + len(blob).to_bytes(8, "little") + blob
        if len(head) > _ALIGN:  # huge size lists: move the data back by whole pages
            shift = _align(len(head)) - _ALIGN
            for p in parts.values():
                p["offset"] += shift
            header["file_size"] = file_size = file_size + shift
            blob = json.dumps(header).encode()
            head = _MAGIC + len(blob).to_bytes(8, "little") + blob
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, file_size)  # sparse: holes read as zeros
            if source is not None:
                for start in range(0, num_rows, chunk_rows):
                    enc = codec.encode(source[start : start + chunk_rows])
                    for name, p in parts.items():
                        row_bytes = p["cols"] * enc[name].element_size()
                        _pwrite_all(fd, enc[name].numpy().tobytes(), p["offset"] + start * row_bytes)
            _pwrite_all(fd, head, 0)  # header last: a half-written file never looks valid
            os.fsync(fd)
        except BaseException as exc:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise OSError(errno.ENOSPC, f"no space left on device while writing the Engram table {path} "
                              f"({file_size} bytes); the previous file, if any, is untouched") from exc
            raise
        os.close(fd)
        os.replace(tmp, path)
        return cls.open(path)

    @classmethod
    def open(cls, path: str | os.PathLike, sizes: list[int] | None = None, dim: int | None = None,
             fingerprint: str | None = None, codec: str | None = None) -> "DiskRowStore":
        """Open and validate a table file; the expectations given must match its header."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no Engram table file at {path}")
        actual = path.stat().st_size
        with open(path, "rb") as f:
            pre = f.read(16)
            if len(pre) < 16 or pre[:8] != _MAGIC:
                raise ValueError(f"{path} is not an Engram table file (bad magic)")
            n = int.from_bytes(pre[8:], "little")
            try:
                header = json.loads(f.read(n))
            except ValueError as exc:
                raise ValueError(f"{path} has a corrupt header ({exc})") from exc
        if header.get("version") != _VERSION:
            raise ValueError(f"{path} has table format version {header.get('version')}, this code reads {_VERSION}")
        if actual != header["file_size"]:
            raise ValueError(f"{path} is truncated or damaged: its header says {header['file_size']} bytes, "
                             f"the file has {actual}")
        where = f"{path} was written for another config"
        if sizes is not None and [int(s) for s in sizes] != header["sizes"]:
            raise ValueError(f"{where}: per-head table sizes {header['sizes']} != expected {list(sizes)}")
        if dim is not None and dim != header["dim"]:
            raise ValueError(f"{where}: row width {header['dim']} != expected {dim}")
        if fingerprint is not None and header.get("fingerprint") not in (None, fingerprint):
            raise ValueError(f"{where}: fingerprint {header.get('fingerprint')} != expected {fingerprint} "
                             "(different seed, layer, tokenizer or table sizes)")
        if codec is not None and header["codec"]["codec"] != codec:
            raise ValueError(f"{path} stores quantize={header['codec']['codec']!r} rows, not {codec!r}")
        return cls(path, header)

    def codec(self) -> RowCodec:
        """The codec the file was written with."""
        c = self.header["codec"]
        q = None if c["codec"] == "none" else c["codec"]
        return make_codec(q, self.header["dim"], getattr(torch, c["dtype"]), c.get("block", 32))

    # ---------------------------------------------------------------- rows
    def _map(self) -> None:
        parts = {}
        for name, p in self.header["parts"].items():
            mm = np.memmap(self.path, dtype=_NP_DTYPES[getattr(torch, p["dtype"])], mode="r",
                           offset=p["offset"], shape=(self.num_rows, p["cols"]))
            raw = getattr(mm, "_mmap", None)
            if raw is not None and hasattr(mmap, "MADV_RANDOM"):
                raw.madvise(mmap.MADV_RANDOM)  # hashed rows are random: no readahead per page fault
            with warnings.catch_warnings():  # read-only on purpose: writes go through pwrite
                warnings.simplefilter("ignore", UserWarning)
                parts[name] = torch.from_numpy(mm)  # (N, n), a view of the mapping: nothing read yet
        self.parts = parts

    def put(self, rows: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        """Overwrite rows in place with ``pwrite`` (not atomic: for updates, not for creation)."""
        fd = os.open(self.path, os.O_WRONLY)
        try:
            for name, p in self.header["parts"].items():
                data = parts[name].contiguous().numpy()
                row_bytes = data.shape[1] * data.itemsize
                for i, r in enumerate(rows.tolist()):
                    _pwrite_all(fd, data[i].tobytes(), p["offset"] + r * row_bytes)
        finally:
            os.close(fd)

    def drop_page_cache(self) -> None:
        """Evict this file from the OS page cache (cold-cache benchmarks); Linux/POSIX only."""
        self.parts = {}  # unmap first: mapped pages are not dropped
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        self._map()

    def nbytes(self) -> int:
        return int(self.header["file_size"])

    def close(self) -> None:
        """Unmap the file."""
        self.parts = {}


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


# ====================================================================================== cache
