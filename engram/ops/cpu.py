"""The C backend of the N-gram hash: built with the system C compiler on first use, loaded with ctypes.

Shapes: B batch, T time, L Engram layers, N max_ngram_size, H heads per layer.

``csrc/engram_cpu.c`` computes :func:`engram.ops.hash.hash_ngrams_reference` (bulk hashing in
data loaders: each ``mix mod p`` exactly in doubles, vectorised over heads, for primes below 2^30,
else by Barrett reduction; docs/performance.md has the speed against NumPy and ``torch.compile``),
and a decode step's compress + hash + next history in one call. Every function here takes and
returns tensors; which backend runs is chosen in :func:`engram.ops.hash.hash_ngrams` and
:meth:`engram.core.hashing.NgramHashMapping.hash_step`.

Build: ``$CC`` (else ``cc``/``gcc``/``clang``) compiles the source once per (source, compiler,
flags, CPU) into the kernel cache (in a private temporary directory, then renamed into place, so
a process never sees a half-written library, and a source edited meanwhile builds under its own
key), a directory this user owns with mode 0700
(``kernels/`` under :func:`engram.ops.paths.cache_dir`, e.g. ``~/.cache/engram/kernels``). A library is
loaded only from there, only if it is a regular file (not a symlink) owned by this user and not
writable by others, and only if the SHA-256 recorded beside it at build time matches; anything
else is rebuilt. There is no shared-``/tmp`` fallback: with no usable cache directory, or no
compiler, or ``ENGRAM_CPU_KERNELS=0``, the torch formula runs (same results).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import torch

from engram.ops.paths import cache_dir
from engram.ops.threads import pool

log = logging.getLogger(__name__)

__all__ = ["available", "enabled", "hash_ngrams", "hash_step", "library", "residues"]

_SOURCE = Path(__file__).with_name("csrc") / "engram_cpu.c"
# -ffp-contract=fast lets the compiler fuse the double residue's multiply-adds (exact either way:
# csrc/engram_cpu.c, "doubles"); never -ffast-math, which would break it.
_FLAG_SETS = (
    ["-O3", "-march=native", "-ffp-contract=fast"],  # this CPU's instruction set
    ["-O3", "-ffp-contract=fast"],  # a compiler or CPU that refuses the first set
)
# From this many tokens the bulk hash splits the time axis over the thread pool.
PARALLEL_MIN_TOKENS = 8192
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_on = os.environ.get("ENGRAM_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")

_P, _I, _RC = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {  # name: (argument types, return type); each returns 0, or 2 when out of memory
    "engram_hash_step": ([_I, _I, _P, _P, _I, _P, _I, _P, _I, _I, _I, _I, _P, _P, _P, _P, _P, _P], _RC),
    "engram_hash": ([_I, _I, _I, _I, _P, _I, _I, _I, _P, _P, _P, _P, _P, _I], _RC),
    "engram_mod": ([_I, _P, _I, ctypes.c_uint64, _RC, _P], _RC),
}


def _cpu_id() -> str:
    """This CPU's model and instruction-set flags: a ``-march=native`` build is only valid for them
    (a home folder shared by machines of a cluster must not hand one CPU's build to another)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f.read(1 << 16).splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _private_dir(root: Path) -> bool:
    """Create ``root`` (mode 0700) or check it is a directory of ours that others cannot write."""
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(root)
    except OSError as err:
        log.info("engram: kernel cache %s unusable (%s); using the torch path", root, err)
        return False
    if not stat.S_ISDIR(st.st_mode) or (hasattr(os, "getuid") and st.st_uid != os.getuid()) \
            or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        log.warning("engram: kernel cache %s is not a private directory of this user; not using it", root)
        return False
    return True


def _trusted(lib: Path) -> bool:
    """A regular file (no symlink) of ours, not writable by others, whose recorded hash matches."""
    try:
        st = os.lstat(lib)
        recorded = lib.with_suffix(lib.suffix + ".sha256").read_text().strip()
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return False
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return False
    return hashlib.sha256(lib.read_bytes()).hexdigest() == recorded


def _compile(source: bytes, compiler: str) -> Path | None:
    """Build the shared library once per (source, compiler, flags, CPU); return its path or None."""
    root = cache_dir() / "kernels"
    if not _private_dir(root):
        return None
    suffix = ".dll" if sys.platform == "win32" else ".so"
    cpu = _cpu_id()
    for flags in _FLAG_SETS:
        key = hashlib.sha256(source + repr((compiler, flags, platform.machine(), cpu)).encode()).hexdigest()[:16]
        target = root / f"engram_cpu_{key}{suffix}"
        if _trusted(target):
            return target
        try:
            with tempfile.TemporaryDirectory(dir=root) as tmp:
                src, out = Path(tmp) / "engram_cpu.c", Path(tmp) / f"engram_cpu{suffix}"
                src.write_bytes(source)
                cmd = [compiler, *flags, "-std=c99", "-fPIC", "-shared", str(src), "-o", str(out)]
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                if res.returncode != 0:
                    log.debug("engram: %s failed: %s", " ".join(cmd), res.stderr.strip())
                    continue  # the flags, not the folder: try the next flag set
                os.chmod(out, 0o700)
                digest = Path(tmp) / "digest"
                digest.write_text(hashlib.sha256(out.read_bytes()).hexdigest())
                os.replace(digest, target.with_suffix(suffix + ".sha256"))
                os.replace(out, target)  # atomic: a concurrent build leaves one complete file
            if _trusted(target):
                return target
        except (OSError, subprocess.SubprocessError) as err:
            log.debug("engram: building the CPU kernels in %s failed: %s", root, err)
    return None


def library() -> ctypes.CDLL | None:
    """The loaded kernels, built on first call; ``None`` when disabled or unavailable, and inside
    a ``torch.compile`` graph (a C call is opaque to dynamo: graphs trace the torch formula,
    which inductor fuses)."""
    global _lib, _tried
    if not _on or torch.compiler.is_compiling():
        return None
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        path = _compile(_SOURCE.read_bytes(), compiler) if compiler and _SOURCE.exists() else None
        if path is None:
            log.info("engram: the CPU hash kernels could not be built; using the torch path")
        else:
            try:
                lib = ctypes.CDLL(str(path))
                for name, (argtypes, restype) in _SIGNATURES.items():
                    fn = getattr(lib, name)
                    fn.argtypes, fn.restype = argtypes, restype
                _lib = lib
            except (OSError, AttributeError) as err:
                log.info("engram: could not load the CPU hash kernels (%s); using the torch path", err)
        _tried = True
    return _lib


def available() -> bool:
    """Whether the kernels are switched on and could be built and loaded here."""
    return library() is not None


@contextlib.contextmanager
def enabled(on: bool) -> Iterator[None]:
    """Switch the kernels on or off inside a ``with`` block (``with enabled(False):`` times the torch path)."""
    global _on
    before, _on = _on, bool(on)
    try:
        yield
    finally:
        _on = before


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _cpu_long(t: torch.Tensor) -> torch.Tensor:
    return t.to("cpu", torch.long).contiguous()


def _starts(doc_starts: torch.Tensor | None, B: int, T: int) -> torch.Tensor | None:
    """``doc_starts`` as a contiguous CPU bool ``(B, T)`` (one byte per token, as the kernel reads it)."""
    if doc_starts is None:
        return None
    if tuple(doc_starts.shape) != (B, T):
        raise ValueError(f"doc_starts must have shape ({B}, {T}), got {tuple(doc_starts.shape)}")
    return doc_starts.to("cpu", torch.bool).contiguous()


def hash_ngrams(full: torch.Tensor, multipliers: torch.Tensor, primes: torch.Tensor,
                magic: torch.Tensor, doc_starts: torch.Tensor | None = None, pad_id: int = 0) -> torch.Tensor:
    """:func:`engram.ops.hash.hash_ngrams_reference` in C: ``full`` (B, N-1+T) CPU ids ->
    ``(L, B, T, H)``. From :data:`PARALLEL_MIN_TOKENS` tokens the time axis is split over the
    thread pool (the calls release the GIL and write disjoint slices). ``doc_starts`` (B, T) bool:
    the history resets to ``pad_id`` at each document start, as the formula does."""
    lib = library()
    if lib is None:
        raise RuntimeError("the CPU hash kernels are not available here")
    mult, primes, magic = _cpu_long(multipliers), _cpu_long(primes), _cpu_long(magic)
    (L, N), H = mult.shape, primes.shape[1]
    full = _cpu_long(full)
    B, T = full.shape[0], full.shape[1] - (N - 1)
    starts = _starts(doc_starts, B, T)  # (B, T) bool or None
    out = torch.empty(L, B, T, H, dtype=torch.long)  # (L, B, T, H)
    args = (full.data_ptr(), L, N, H // (N - 1), mult.data_ptr(), primes.data_ptr(), magic.data_ptr(), out.data_ptr(),
            _ptr(starts), int(pad_id))
    workers = torch.get_num_threads() if B * T >= PARALLEL_MIN_TOKENS else 1
    if workers < 2:
        rcs = [lib.engram_hash(B, T, 0, T, *args)]
    else:
        cuts = [T * i // workers for i in range(workers + 1)]
        rcs = list(pool(workers).map(lambda i: lib.engram_hash(B, T, cuts[i], cuts[i + 1], *args), range(workers)))
    if any(rcs):
        raise MemoryError("engram: the CPU hash kernel could not allocate its scratch buffers")
    return out


def residues(mixes: torch.Tensor, prime: int, method: str = "double") -> torch.Tensor:
    """``mixes mod prime`` (int64, same shape, non-negative) the way the kernel hashes; for tests.

    ``method``: ``"double"`` (the bulk path for primes below 2^30; Barrett above) or ``"barrett"``
    (a decode step's path, and every order with a prime of 2^30 or more).
    """
    lib = library()
    if lib is None:
        raise RuntimeError("the CPU hash kernels are not available here")
    if method not in ("double", "barrett"):
        raise ValueError(f"method={method!r} must be 'double' or 'barrett'")
    if not 1 <= int(prime) < 2**63:
        raise ValueError(f"prime={prime} must be in [1, 2**63)")
    x = _cpu_long(mixes)
    out = torch.empty_like(x)
    rc = lib.engram_mod(x.numel(), x.data_ptr(), int(prime), (2**64 - 1) // int(prime), method == "double",
                        out.data_ptr())
    if rc:
        raise MemoryError("engram: the CPU hash kernel could not allocate its scratch buffers")
    return out


def hash_step(input_ids: torch.Tensor, lookup: torch.Tensor, history: torch.Tensor | None,
              token_mask: torch.Tensor | None, pad_id: int, multipliers: torch.Tensor, primes: torch.Tensor,
              magic: torch.Tensor, doc_starts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Compress raw CPU ids ``(B, T)`` through ``lookup`` (V,), put ``pad_id`` at padding
    (``token_mask`` False), hash after ``history`` (B, >= N-1; the last N-1 are read; ``None``:
    pad-filled), in one call. ``doc_starts`` (B, T) bool marks document starts, where the history
    resets to ``pad_id`` (also in the next history). Returns ``(rows (L, B, T, H), next history
    (B, N-1))``, or ``None`` when an id is >= V (the caller's torch path raises its usual error)
    or an argument is not a CPU tensor of the kernel's dtype."""
    lib = library()
    if lib is None or input_ids.dtype != torch.long or input_ids.device.type != "cpu":
        return None
    (L, N), H = multipliers.shape, primes.shape[1]
    B, T = input_ids.shape
    if history is not None and (history.dtype != torch.long or history.device.type != "cpu"
                                or history.shape[0] != B or history.shape[1] < N - 1):
        return None
    if token_mask is not None and (token_mask.dtype != torch.bool or token_mask.device.type != "cpu"):
        return None
    if doc_starts is not None and (doc_starts.dtype != torch.bool or doc_starts.device.type != "cpu"
                                   or tuple(doc_starts.shape) != (B, T)):
        return None
    starts = None if doc_starts is None else doc_starts.contiguous()
    ids, hist = input_ids.contiguous(), None if history is None else history.contiguous()
    mask = None if token_mask is None else token_mask.contiguous()
    out = torch.empty(L, B, T, H, dtype=torch.long)  # (L, B, T, H)
    nxt = torch.empty(B, N - 1, dtype=torch.long)  # (B, N-1)
    rc = lib.engram_hash_step(
        B, T, ids.data_ptr(), lookup.data_ptr(), lookup.shape[0], _ptr(hist), 0 if hist is None else hist.shape[1],
        _ptr(mask), pad_id, L, N, H // (N - 1), multipliers.data_ptr(), primes.data_ptr(), magic.data_ptr(),
        out.data_ptr(), nxt.data_ptr(), _ptr(starts),
    )
    if rc == 2:
        raise MemoryError("engram: the CPU hash kernel could not allocate its scratch buffer")
    return None if rc != 0 else (out, nxt)
