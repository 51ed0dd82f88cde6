"""The on-disk format of Engram table files and table directories: header, checksum, manifest, temporaries.

A table file (``engram_layer{L}.table``) is a header in the first page(s), then each codec
part's rows at a page-aligned offset (:func:`layout`)::

    b"ENGRAMTB" | header length (8 bytes, little endian) | header (JSON) | ... | part 0 | part 1 ...

Header (version 2): ``format`` ("engram-table"), ``version``, ``sizes``, ``dim``, ``num_rows``,
``codec``, ``fingerprint``, ``parts`` ({name: {dtype, cols, offset}}), ``file_size``,
``table_id`` (random, new for every file written: a table set's manifest names it), ``checksum``
and ``dirty``. Every field is checked on open (:func:`check_header`): a missing or invalid one,
a foreign file or a cut-off header is a ``ValueError`` that names the file and the field, and the
parts must lie exactly where :func:`layout` puts them, so no header can make a memory map reach
past the file it describes. Version-1 files (no
``table_id``/``checksum``/``dirty``) still open, unverified: there is nothing to verify against.

Checksum (``"sha256t64k:<hex>"``): SHA-256 over the header's meaning (every field above except
``version``, ``table_id``, ``checksum``, ``dirty``) followed by the SHA-256 of each 64 KiB chunk
of the data region (``[first part offset, file_size)``, inter-part padding included). A chunk
that the file system reports as a hole (``SEEK_DATA``) is all zeros by definition and gets the
zero chunk's digest without being read, so a sparse 32 GiB table made by ``create_empty`` is
sealed and verified in the time its written rows take. Equal checksums mean equal rows *and*
equal sizes/codec/fingerprint, which is how :func:`engram.storage.offload.offload` tells "the
same table again" from "a different table".

Dirty rule (tables written in place, ``write_rows``): the first write through a store marks
the file dirty in its header (``checksum: null``, ``dirty: {pid, host, since}``, flushed to disk
before any row is written); ``flush()``/``close()`` of the store, or its garbage collection, or
interpreter exit, recompute the checksum and write a clean header (a *seal*). Opening a dirty
file is a ``ValueError`` that says who marked it and whether that process is alive (a crash
leaves the mark behind), unless this very process holds the writer (then it opens, unverified:
the rows are being written by us), or the caller passes ``verify=False``. A write that failed
half-way (a full disk) leaves the mark on purpose.

Table sets: :func:`engram.storage.offload.offload` writes a directory's tables to temporary files
(``<name>.tmp-<pid>-<hex>``), then the manifest ``engram_tables.json`` listing each file's
``table_id``, then renames the tables into place. Opening a file that a manifest in its
directory lists with another ``table_id`` (or does not list) is a ``ValueError``: the directory
holds a mixed set (an interrupted offload, or a file copied in by hand). Temporaries of writers
that are no longer alive (same machine) are removed by the next offload into the directory and
are never opened: only exact table names are.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import socket
import time
from pathlib import Path
from typing import Any

import torch

from engram.storage.quant import RowCodec, make_codec

MAGIC = b"ENGRAMTB"
VERSION = 2
READABLE_VERSIONS = (1, 2)
ALIGN = 4096
HASH_CHUNK = 1 << 16  # 64 KiB: the hole granularity of verification (sparse tables)
READ_BLOCK = 1 << 22  # bytes read per pread while hashing
CHECKSUM_PREFIX = "sha256t64k:"
MANIFEST = "engram_tables.json"
_MAX_HEADER = 1 << 26  # a header longer than this is corrupt (a sizes list of millions of heads)
_CODECS = ("none", "int8", "fp8", "fp8_e8m0")
#: dtypes a part can have on disk (numpy can map them).
STORABLE = (torch.float32, torch.float16, torch.float64, torch.int8, torch.uint8)
#: Fields the checksum covers besides the rows (what the rows *mean*).
_COVERED = ("format", "sizes", "dim", "num_rows", "codec", "fingerprint", "parts", "file_size")
_TMP_RE = re.compile(r"^(?P<base>.+\.table|" + re.escape(MANIFEST) + r")\.tmp-(?P<pid>\d+)(?:-[0-9a-f]{8})?$")


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def layout(codec: RowCodec, num_rows: int) -> tuple[dict[str, dict[str, Any]], int]:
    """``({part: {dtype, cols, offset}}, file_size)`` of a table of ``num_rows`` rows (header: first page)."""
    parts, off = {}, ALIGN  # the header owns the first page (more if it is long)
    for name, (dtype, cols) in codec.parts().items():
        if dtype not in STORABLE:
            raise TypeError(f"{dtype} tables cannot be stored on disk; use float32/float16 or quantize")
        parts[name] = {"dtype": str(dtype).removeprefix("torch."), "cols": cols, "offset": off}
        off = align(off + num_rows * cols * dtype.itemsize)
    return parts, off


def _is_dtype_name(v: Any) -> bool:
    return isinstance(v, str) and isinstance(getattr(torch, v, None), torch.dtype)


# ====================================================================================== header
def encode_header(header: dict[str, Any]) -> bytes:
    blob = json.dumps(header).encode()
    return MAGIC + len(blob).to_bytes(8, "little") + blob


def header_room(header: dict[str, Any]) -> int:
    """Bytes reserved for the header: everything before the first part."""
    return min(p["offset"] for p in header["parts"].values())


def write_header(fd: int, header: dict[str, Any], path: Path) -> None:
    """Write ``header`` at offset 0; it must fit before the first part."""
    head = encode_header(header)
    room = header_room(header)
    if len(head) > room:
        raise ValueError(f"{path}: the table header ({len(head)} bytes) no longer fits its {room} reserved bytes")
    pwrite_all(fd, head, 0)


def dirty_mark() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname()[:64], "since": round(time.time(), 3)}


def placeholder_fields() -> dict[str, Any]:
    """Header fields at their longest, to reserve room for later rewrites (seal, dirty)."""
    return {"table_id": "0" * 32, "checksum": CHECKSUM_PREFIX + "0" * 64,
            "dirty": {"pid": 4_194_304, "host": "h" * 64, "since": 9_999_999_999.999}}


def read_header(fd: int, path: Path) -> dict[str, Any]:
    """The validated header of the open table file ``fd`` (``ValueError`` naming file and field)."""
    pre = os.pread(fd, 16, 0)
    if len(pre) < 16 or pre[:8] != MAGIC:
        raise ValueError(f"{path} is not an Engram table file (bad magic: it does not start with {MAGIC!r})")
    n = int.from_bytes(pre[8:], "little")
    size = os.fstat(fd).st_size
    if n <= 0 or n > _MAX_HEADER:
        raise ValueError(f"{path} has a corrupt header (header length field {n} is impossible)")
    if 16 + n > size:
        raise ValueError(f"{path} has a truncated header: it needs {16 + n} bytes, the file has {size}")
    blob = os.pread(fd, n, 16)
    if len(blob) < n:
        raise ValueError(f"{path} has a truncated header: read {16 + len(blob)} of {16 + n} bytes")
    try:
        header = json.loads(blob)
    except ValueError as exc:
        raise ValueError(f"{path} has a corrupt header (not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{path} has a corrupt header (a JSON {type(header).__name__}, not an object)")
    check_header(header, path, head_len=16 + n)
    return header


def _is_int(v: Any, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def check_header(header: dict[str, Any], path: Path, head_len: int | None = None) -> None:
    """Every field present, of the right type, and consistent with the layout of the rows."""
    def need(name: str, ok: Any, expect: str) -> Any:
        if name not in header:
            raise ValueError(f"{path}: the table header has no {name!r} field (expected {expect}); the file is "
                             "damaged or was not written by engram")
        value = header[name]
        if not ok(value):
            raise ValueError(f"{path}: the table header field {name!r} is invalid: {value!r:.200} (expected {expect})")
        return value

    need("format", lambda v: v == "engram-table", "'engram-table'")
    version = need("version", lambda v: _is_int(v, 1), "a format version number")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"{path} has table format version {version}; this code reads versions "
                         f"{list(READABLE_VERSIONS)} (a newer engram wrote it?)")
    sizes = need("sizes", lambda v: isinstance(v, list) and v and all(_is_int(s, 1) for s in v),
                 "a non-empty list of positive ints")
    dim = need("dim", lambda v: _is_int(v, 1), "a positive int")
    need("num_rows", lambda v: v == sum(sizes), f"sum(sizes) = {sum(sizes)}")
    codec_cfg = need("codec", lambda v: isinstance(v, dict) and v.get("codec") in _CODECS
                     and _is_dtype_name(v.get("dtype")) and (v["codec"] != "fp8" or _is_int(v.get("block", 32), 1)),
                     f"{{'codec': one of {list(_CODECS)}, 'dtype': a torch dtype name}}")
    need("fingerprint", lambda v: v is None or isinstance(v, str), "a string or null")
    try:
        codec = make_codec(None if codec_cfg["codec"] == "none" else codec_cfg["codec"], dim,
                           getattr(torch, codec_cfg["dtype"]), codec_cfg.get("block", 32))
        expected_parts, expected_size = layout(codec, sum(sizes))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: the table header field 'codec' is invalid: {codec_cfg!r} ({exc})") from exc

    def parts_ok(v: Any) -> bool:
        if not isinstance(v, dict) or set(v) != set(expected_parts):
            return False
        shifts = set()
        for name, exp in expected_parts.items():
            got = v[name]
            if not isinstance(got, dict) or got.get("dtype") != exp["dtype"] or got.get("cols") != exp["cols"] \
                    or not _is_int(got.get("offset")):
                return False
            shifts.add(got["offset"] - exp["offset"])
        return len(shifts) == 1 and (s := shifts.pop()) >= 0 and s % ALIGN == 0

    parts = need("parts", parts_ok, f"{json.dumps(expected_parts)} (offsets shifted by a whole number of pages)")
    shift = next(iter(parts.values()))["offset"] - next(iter(expected_parts.values()))["offset"]
    need("file_size", lambda v: v == expected_size + shift, f"{expected_size + shift} for this layout")
    if head_len is not None and head_len > min(p["offset"] for p in parts.values()):
        raise ValueError(f"{path}: the table header ({head_len} bytes) overlaps the rows at offset "
                         f"{min(p['offset'] for p in parts.values())}")
    if version >= 2:
        need("table_id", lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{32}", v) is not None,
             "32 hex digits")
        dirty = need("dirty", lambda v: v is None or (isinstance(v, dict) and _is_int(v.get("pid"))),
                     "null or {'pid', 'host', 'since'}")
        need("checksum", lambda v: (v is None and dirty is not None) or (
            isinstance(v, str) and re.fullmatch(re.escape(CHECKSUM_PREFIX) + "[0-9a-f]{64}", v) is not None),
            f"'{CHECKSUM_PREFIX}' + 64 hex digits (null only while the file is marked dirty)")


def new_table_id() -> str:
    return secrets.token_hex(16)


# ====================================================================================== checksum
_ZERO_DIGESTS: dict[int, bytes] = {}


def _zero_digest(n: int) -> bytes:
    if n not in _ZERO_DIGESTS:
        _ZERO_DIGESTS[n] = hashlib.sha256(bytes(n)).digest()
    return _ZERO_DIGESTS[n]


def _next_data(fd: int, off: int, end: int) -> tuple[int, int]:
    """``(data_start, data_end)`` of the first data extent at or after ``off`` (``end`` if none)."""
    try:
        start = os.lseek(fd, off, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # only a hole up to the end of the file
            return end, end
        return off, end  # no hole support (EINVAL): everything is data
    except AttributeError:  # no SEEK_DATA on this platform
        return off, end
    if start >= end:
        return end, end
    try:
        stop = os.lseek(fd, start, os.SEEK_HOLE)
    except OSError:
        stop = end
    return start, min(stop, end)


def checksum(fd: int, header: dict[str, Any], path: Path | str = "table") -> str:
    """The content checksum of the open table file ``fd`` (module doc); reads with ``pread``, never a map."""
    meta = json.dumps({k: header.get(k) for k in _COVERED}, sort_keys=True, separators=(",", ":")).encode()
    outer = hashlib.sha256(b"engram-table-checksum-v1\0" + meta + b"\0")
    start = min(p["offset"] for p in header["parts"].values())
    end = int(header["file_size"])
    buf = bytearray(READ_BLOCK)
    view = memoryview(buf)
    off = start
    while off < end:
        data_start, data_end = _next_data(fd, off, end)
        # whole chunks before the next data are holes: zeros, not read
        first_data_chunk = start + (data_start - start) // HASH_CHUNK * HASH_CHUNK
        n_holes = (first_data_chunk - off) // HASH_CHUNK
        if n_holes:
            outer.update(_zero_digest(HASH_CHUNK) * n_holes)
            off += n_holes * HASH_CHUNK
        if data_start >= end:  # the tail is a hole (maybe a short last chunk)
            if off < end:
                outer.update(_zero_digest(end - off))
            break
        # read whole chunks from off up to the end of this data extent (at most READ_BLOCK)
        stop = min(end, start + -(-(data_end - start) // HASH_CHUNK) * HASH_CHUNK, off + READ_BLOCK)
        n = stop - off
        got = 0
        while got < n:
            k = os.preadv(fd, [view[got:n]], off + got)
            if k == 0:
                raise ValueError(f"{path} is truncated: it ends at {off + got} bytes, its header says {end}")
            got += k
        for c in range(0, n, HASH_CHUNK):
            outer.update(hashlib.sha256(view[c : min(c + HASH_CHUNK, n)]).digest())
        off = stop
    return CHECKSUM_PREFIX + outer.hexdigest()


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


# ====================================================================================== temporaries
def temp_name(path: Path) -> Path:
    """A private temporary next to ``path``: ``<name>.tmp-<pid>-<8 hex>``."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(directory: Path) -> list[Path]:
    """Remove table/manifest temporaries in ``directory`` whose writer process is gone; returns them."""
    removed = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for name in names:
        m = _TMP_RE.match(name)
        if m is None or pid_alive(int(m["pid"])):
            continue
        p = directory / name
        try:
            if p.is_file() and not p.is_symlink():
                p.unlink()
                removed.append(p)
        except OSError:  # gone meanwhile, or not ours to remove
            pass
    return removed


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory
    finally:
        os.close(fd)


# ====================================================================================== manifest
def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The table-set manifest of ``directory`` (``None`` if there is none); ``ValueError`` if damaged."""
    p = directory / MANIFEST
    try:
        text = p.read_text()
    except FileNotFoundError:
        return None
    try:
        man = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{p} (the Engram table-set manifest) is corrupt ({exc}); re-offload the model with "
                         "overwrite=True, or delete it to open the tables without the set check") from exc
    if not (isinstance(man, dict) and man.get("format") == "engram-table-set" and isinstance(man.get("tables"), dict)
            and all(isinstance(v, dict) and isinstance(v.get("table_id"), str) for v in man["tables"].values())):
        raise ValueError(f"{p} is not a valid Engram table-set manifest (expected format 'engram-table-set' and "
                         "'tables': {name: {'table_id': ...}}); re-offload the model with overwrite=True, or delete "
                         "it to open the tables without the set check")
    return man


def write_manifest(directory: Path, tables: dict[str, dict[str, Any]], generation: int) -> None:
    """Atomically (temporary + rename) write the manifest listing ``tables``."""
    p = directory / MANIFEST
    tmp = temp_name(p)
    data = json.dumps({"format": "engram-table-set", "version": 1, "generation": int(generation),
                       "tables": tables}, indent=1, sort_keys=True).encode()
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
    try:
        try:
            pwrite_all(fd, data, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def manifest_entry(header: dict[str, Any]) -> dict[str, Any]:
    return {"table_id": header.get("table_id"), "fingerprint": header.get("fingerprint")}


def check_in_set(path: Path, header: dict[str, Any]) -> None:
    """If ``path``'s directory has a manifest, ``path`` must be the file it lists (same ``table_id``)."""
    man = read_manifest(path.parent)
    if man is None:
        return
    entry = man["tables"].get(path.name)
    fix = ("the directory was changed after its tables were written together (an interrupted offload, or a file "
           "copied in by hand), so the layers may not belong to one model; re-offload the model into it with "
           "overwrite=True")
    if entry is None and header.get("table_id") is None:
        return  # a format version 1 file (no table_id) predates manifests: nothing to check it against
    if entry is None:
        raise ValueError(f"{path} is not listed in {path.parent / MANIFEST} (tables {sorted(man['tables'])}): {fix}")
    if entry["table_id"] != header.get("table_id"):
        raise ValueError(f"{path.parent} holds a mixed set of Engram tables: {path.name} has table_id "
                         f"{header.get('table_id')}, the manifest {MANIFEST} lists {entry['table_id']}: {fix}")


def update_manifest_entry(path: Path, header: dict[str, Any]) -> None:
    """After replacing one table file on its own: record it in its directory's manifest, if there is one."""
    man = read_manifest(path.parent)
    if man is None:
        return
    tables = dict(man["tables"])
    tables[path.name] = manifest_entry(header)
    write_manifest(path.parent, tables, int(man.get("generation", 0)) + 1)
