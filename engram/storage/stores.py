"""Row stores: a table's parts as CPU tensors (host RAM) or in a file read through memory maps (disk).

Shapes: N rows of the flat table, U rows of one fetch, n columns of a part.

The table file format (a JSON header in the first page(s), then each part's rows), its checksum,
the dirty rule for rows written in place and table-set manifests: :mod:`engram.storage.tablefile`.
"""

from __future__ import annotations

import errno
import mmap
import os
import socket
import warnings
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram.storage import tablefile
from engram.storage.quant import RowCodec, make_codec

_NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64,
              torch.int8: np.int8, torch.uint8: np.uint8}


def _cuda_present() -> bool:
    return torch.cuda.is_available()


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


class _Writer:
    """This process's write session on one table file, shared by every store of that file.

    The first :meth:`mark_dirty` writes the dirty mark into the header (and ``fdatasync``) before
    any row is written; :meth:`seal` writes the fresh checksum and a clean header. The last store
    to let go (close, garbage collection, interpreter exit) seals it, unless a write failed
    half-way: then the mark stays, so the next open says so.
    """

    def __init__(self, path: Path, key: tuple[int, int]):
        self.path, self.key = path, key
        self.fd = os.open(path, os.O_RDWR)
        try:
            st = os.fstat(self.fd)
            if (st.st_dev, st.st_ino) != key:
                raise ValueError(f"{path} was replaced by another file since it was opened; reopen it to write rows")
            self.header = tablefile.read_header(self.fd, path)
        except BaseException:
            os.close(self.fd)
            raise
        self.dirty = self.header.get("dirty") is not None  # a mark left before us (opened with verify=False)
        self.failed = False
        self.users = 0
        self.pid = os.getpid()  # a forked child never seals its parent's session

    def mark_dirty(self) -> None:
        if self.dirty:
            return
        h = dict(self.header, checksum=None, dirty=tablefile.dirty_mark())
        if h["version"] < 2:  # a version-1 file becomes version 2 on its first write
            h.update(version=tablefile.VERSION, table_id=tablefile.new_table_id())
        tablefile.write_header(self.fd, h, self.path)
        getattr(os, "fdatasync", os.fsync)(self.fd)  # the mark is on disk before any row changes
        self.header, self.dirty = h, True

    def seal(self) -> None:
        if not self.dirty:
            return
        if self.failed:
            raise ValueError(f"{self.path}: an earlier row write failed half-way, so the file stays marked dirty; "
                             "close it, and once its rows are right, open it with verify=False and flush() to "
                             "re-seal it")
        os.fsync(self.fd)  # rows first, then the header that vouches for them
        h = dict(self.header, dirty=None)
        h["checksum"] = tablefile.checksum(self.fd, h, self.path)
        tablefile.write_header(self.fd, h, self.path)
        os.fsync(self.fd)
        self.header, self.dirty = h, False

    def release(self) -> None:
        self.users -= 1
        if self.users > 0 or os.getpid() != self.pid:
            return
        _WRITERS.pop(self.key, None)
        try:
            if self.dirty and not self.failed:
                self.seal()
            elif self.failed:
                warnings.warn(f"{self.path} stays marked dirty: a row write failed half-way", RuntimeWarning,
                              stacklevel=2)
        except Exception as exc:  # noqa: BLE001 - runs from finalizers: report, never raise
            warnings.warn(f"could not seal {self.path}: {exc}", RuntimeWarning, stacklevel=2)
        finally:
            os.close(self.fd)


#: (st_dev, st_ino) -> the live write session of that file in this process.
_WRITERS: dict[tuple[int, int], _Writer] = {}


class DiskRowStore(HostRowStore):
    """A table file: a JSON header, then each part's rows at a page-aligned offset.

    Format, checksum, dirty rule and table sets: :mod:`engram.storage.tablefile`. Reads gather
    from tensors over one read-only memory map of the file descriptor this store holds open.
    Before every fetch and write the size of that descriptor (``lseek(fd, 0, SEEK_END)``; the
    check costs 0.5-0.6 us a call here, ``fstat`` alone 0.9-1.5 us) is compared with the header,
    so a file truncated while mapped is a ``ValueError`` instead of SIGBUS killing the process
    (exit 135) on a page past the new end. Remaining race: a truncation *during* a gather, after
    the check, still raises SIGBUS (a signal Python cannot turn into an exception on the faulting
    thread); do not truncate or rewrite a table file in place while it is open, replace it by
    rename (as ``offload`` does). Writes go through ``os.pwrite`` under the dirty rule. Open with
    :meth:`open`, make with :meth:`create`
    (or :meth:`stage` + rename, as ``offload`` does for a whole set).
    """

    layout = staticmethod(tablefile.layout)

    def __init__(self, path: Path, header: dict[str, Any], fd: int | None = None):
        self.path, self.header = Path(path), header
        self.num_rows = int(header["num_rows"])
        self.file_size = int(header["file_size"])
        self._writer: _Writer | None = None
        self._release_writer: weakref.finalize | None = None
        self._mm: mmap.mmap | None = None
        self._closed = False
        self._fd = os.open(self.path, os.O_RDONLY) if fd is None else fd
        try:
            self._map()
        except BaseException:
            if fd is None:
                os.close(self._fd)
            raise  # a given fd stays the caller's to close
        self._close_fd = weakref.finalize(self, os.close, self._fd)

    # ---------------------------------------------------------------- creating
    @classmethod
    def stage(cls, path: str | os.PathLike, codec: RowCodec, sizes: list[int], fingerprint: str | None,
              source: torch.Tensor | None = None, chunk_rows: int = 1 << 16) -> tuple[Path, dict[str, Any]]:
        """Write the table meant for ``path`` into a private temporary next to it (``<name>.tmp-<pid>-<hex>``).

        Returns ``(temporary, header)``; the caller renames it over ``path`` (:meth:`create`) or
        removes it. ``source`` ``(N, d)`` is encoded chunk by chunk; ``None`` leaves a sparse
        all-zero file (``ftruncate``; no disk used until rows are written). The checksum is
        computed from the written file, and the header is written last.
        """
        path = Path(path)
        num_rows = sum(int(s) for s in sizes)
        if source is not None and tuple(source.shape) != (num_rows, codec.dim):
            raise ValueError(f"source has shape {tuple(source.shape)}, expected ({num_rows}, {codec.dim})")
        parts, file_size = tablefile.layout(codec, num_rows)
        header = {"format": "engram-table", "version": tablefile.VERSION, "sizes": [int(s) for s in sizes],
                  "dim": codec.dim, "num_rows": num_rows, "codec": codec.config(), "fingerprint": fingerprint,
                  "parts": parts, "file_size": file_size, "table_id": tablefile.new_table_id(),
                  "checksum": None, "dirty": None}
        longest = len(tablefile.encode_header({**header, **tablefile.placeholder_fields()}))
        if longest > tablefile.ALIGN:  # huge size lists: move the data back by whole pages
            shift = tablefile.align(longest) - tablefile.ALIGN
            for p in parts.values():
                p["offset"] += shift
            header["file_size"] = file_size = file_size + shift
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tablefile.temp_name(path)
        fd = os.open(tmp, os.O_CREAT | os.O_RDWR | os.O_EXCL, 0o644)
        try:
            os.ftruncate(fd, file_size)  # sparse: holes read as zeros
            if source is not None:
                for start in range(0, num_rows, chunk_rows):
                    enc = codec.encode(source[start : start + chunk_rows])
                    for name, p in parts.items():
                        row_bytes = p["cols"] * enc[name].element_size()
                        tablefile.pwrite_all(fd, enc[name].numpy().tobytes(), p["offset"] + start * row_bytes)
            header["checksum"] = tablefile.checksum(fd, header, tmp)
            tablefile.write_header(fd, header, tmp)  # header last: a half-written file never looks valid
            os.fsync(fd)
        except BaseException as exc:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                what = "no space left on device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
                raise OSError(exc.errno, f"{what} while writing the Engram table {path} ({file_size} bytes); "
                              "the previous file, if any, is untouched") from exc
            raise
        os.close(fd)
        return tmp, header

    @classmethod
    def create(cls, path: str | os.PathLike, codec: RowCodec, sizes: list[int], fingerprint: str | None,
               source: torch.Tensor | None = None, chunk_rows: int = 1 << 16) -> "DiskRowStore":
        """Write a table file atomically (:meth:`stage`, then rename over ``path``) and open it.

        An error (a full disk included) leaves any previous file untouched. If the directory has
        a table-set manifest, the new file's entry is recorded in it.
        """
        path = Path(path)
        tmp, header = cls.stage(path, codec, sizes, fingerprint, source, chunk_rows)
        try:
            tablefile.update_manifest_entry(path, header)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        tablefile.fsync_dir(path.parent)
        return cls.open(path, verify=False)  # just written and checksummed

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | os.PathLike, sizes: list[int] | None = None, dim: int | None = None,
             fingerprint: str | None = None, codec: str | None = None, verify: bool = True) -> "DiskRowStore":
        """Open and validate a table file; the expectations given must match its header.

        ``verify``: recompute the checksum of the rows (reads the whole file, holes excepted) and
        refuse a file marked dirty (:mod:`engram.storage.tablefile`); ``False`` skips both, for
        huge tables whose reading is too slow, or to open (and then :meth:`flush`) a dirty file.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no Engram table file at {path}")
        fd = os.open(path, os.O_RDONLY)
        try:
            header = tablefile.read_header(fd, path)
            actual = os.fstat(fd).st_size
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
            tablefile.check_in_set(path, header)
            cls._check_contents(fd, path, header, verify)
            return cls(path, header, fd)
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def _check_contents(fd: int, path: Path, header: dict[str, Any], verify: bool) -> None:
        st = os.fstat(fd)
        mine = _WRITERS.get((st.st_dev, st.st_ino))
        if header.get("dirty") is not None:
            if (mine is not None and mine.dirty) or not verify:
                return  # this process is writing its rows; or the caller asked not to check
            d = header["dirty"]
            pid, host = d.get("pid"), d.get("host")
            here = host == socket.gethostname()[:64]
            if here and pid != os.getpid() and tablefile.pid_alive(pid):
                who = f"process {pid} is writing rows into it (write_rows) and has not flushed or closed it yet"
            elif here:
                who = (f"process {pid} wrote rows into it and did not flush or close it (it crashed or was "
                       "killed, or a write failed half-way)")
            else:
                who = f"process {pid} on host {host} wrote rows into it and has not flushed or closed it"
            raise ValueError(f"{path} is marked dirty: {who}; its rows may be half-written and it has no valid "
                             "checksum. Flush or close the writer, or pass verify=False to open it anyway (then "
                             "flush() re-seals it with a fresh checksum)")
        if verify and header.get("checksum") is not None:
            got = tablefile.checksum(fd, header, path)
            if got != header["checksum"]:
                raise ValueError(f"{path} is corrupt: its rows do not match the checksum in its header "
                                 f"({header['checksum']}, computed {got}); rewrite the table (offload the model "
                                 "again with overwrite=True), or pass verify=False to skip the check (reads may "
                                 "then return damaged rows)")

    def codec(self) -> RowCodec:
        """The codec the file was written with."""
        c = self.header["codec"]
        q = None if c["codec"] == "none" else c["codec"]
        return make_codec(q, self.header["dim"], getattr(torch, c["dtype"]), c.get("block", 32))

    # ---------------------------------------------------------------- rows
    def _map(self) -> None:
        try:
            mm = mmap.mmap(self._fd, self.file_size, access=mmap.ACCESS_READ)
        except ValueError as exc:  # shorter than the header says
            raise ValueError(f"{self.path} is truncated: it has {os.fstat(self._fd).st_size} bytes, its header "
                             f"says {self.file_size}") from exc
        if hasattr(mmap, "MADV_RANDOM"):
            mm.madvise(mmap.MADV_RANDOM)  # hashed rows are random: no readahead per page fault
        parts = {}
        for name, p in self.header["parts"].items():
            arr = np.frombuffer(mm, dtype=_NP_DTYPES[getattr(torch, p["dtype"])], count=self.num_rows * p["cols"],
                                offset=p["offset"]).reshape(self.num_rows, p["cols"])
            with warnings.catch_warnings():  # read-only on purpose: writes go through pwrite
                warnings.simplefilter("ignore", UserWarning)
                parts[name] = torch.from_numpy(arr)  # (N, n), a view of the mapping: nothing read yet
        self._mm, self.parts = mm, parts

    def check_mapped(self) -> None:
        """Raise ``ValueError`` if the store is closed or its file is now shorter than its header says."""
        if self._closed:
            raise ValueError(f"the Engram table {self.path} is closed")
        size = os.lseek(self._fd, 0, os.SEEK_END)  # the size, as fstat's st_size, at a quarter of its cost
        if size < self.file_size:
            raise ValueError(f"{self.path} was truncated to {size} bytes while open (its header says "
                             f"{self.file_size}); no rows were read (a memory-mapped read past the end of the file "
                             "would kill the process with SIGBUS): restore or rewrite the table and reopen it")

    def fetch(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        self.check_mapped()
        return super().fetch(rows)

    def _writer_for(self) -> _Writer:
        if self._writer is None:
            st = os.fstat(self._fd)
            key = (st.st_dev, st.st_ino)
            w = _WRITERS.get(key)
            if w is None:
                w = _WRITERS[key] = _Writer(self.path, key)
            w.users += 1
            self._writer = w
            self._release_writer = weakref.finalize(self, w.release)
        return self._writer

    def put(self, rows: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        """Overwrite rows in place with ``pwrite`` (the file is marked dirty until :meth:`flush`)."""
        self.check_mapped()
        rows = rows.to("cpu", torch.long)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.num_rows):
            raise ValueError(f"row ids must be in [0, {self.num_rows}) for {self.path}, got "
                             f"[{int(rows.min())}, {int(rows.max())}]")
        w = self._writer_for()
        try:
            w.mark_dirty()
            for name, p in self.header["parts"].items():
                data = parts[name].contiguous().numpy()
                row_bytes = data.shape[1] * data.itemsize
                for i, r in enumerate(rows.tolist()):
                    tablefile.pwrite_all(w.fd, data[i].tobytes(), p["offset"] + r * row_bytes)
        except BaseException as exc:
            w.failed = True
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OSError(exc.errno, f"{os.strerror(exc.errno)} while writing rows into {self.path}; the file "
                              "stays marked dirty (rows may be half-written)") from exc
            raise

    def flush(self) -> None:
        """Seal the file after row writes: fsync, fresh checksum, clean header (no-op if nothing was written).

        A file that was opened dirty (``verify=False``) is re-sealed too.
        """
        if self._writer is None:
            if tablefile.read_header(self._fd, self.path).get("dirty") is None:
                return
            self._writer_for()
        self._writer.seal()
        self.header = dict(self._writer.header)

    def drop_page_cache(self) -> None:
        """Evict this file from the OS page cache (cold-cache benchmarks); Linux/POSIX only."""
        self.check_mapped()
        self.parts, self._mm = {}, None  # unmap first: mapped pages are not dropped
        os.fsync(self._fd)
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
        self._map()

    def nbytes(self) -> int:
        return self.file_size

    def close(self) -> None:
        """Seal (if rows were written and none failed), unmap and close the file."""
        try:
            if not self._closed and not (self._writer is not None and self._writer.failed):
                self.flush()  # (a failed writer is left dirty on release, with a warning)
        finally:
            self._closed = True
            if self._release_writer is not None:
                self._release_writer()
            self._writer = self._release_writer = None
            self.parts, self._mm = {}, None
            self._close_fd()

    # ---------------------------------------------------------------- copies
    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path), "table_id": self.header.get("table_id")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A copy (``copy.deepcopy``/pickle) reopens the same file; it must still be the same table."""
        path = Path(state["path"])
        fd = os.open(path, os.O_RDONLY)
        try:
            header = tablefile.read_header(fd, path)
            if header.get("table_id") != state["table_id"]:
                raise ValueError(f"{path} was replaced by another table since this store was copied or pickled")
        except BaseException:
            os.close(fd)
            raise
        DiskRowStore.__init__(self, path, header, fd)


# ====================================================================================== cache
