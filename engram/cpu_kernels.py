"""Fused C kernels for CPU decode steps: the hash step and the Engram branch in one call each.

Shapes: B batch, T time, L Engram layers, H heads per layer, M branches (hc_mult), D hidden size,
W conv history rows.

Decoding one token on a CPU is dispatch-bound: hashing a few ids and the ~25 small tensor ops of
one Engram branch cost far more in interpreter and dispatcher time than in arithmetic (see
docs/performance.md). ``csrc/engram_cpu.c`` does the same math in one call each; it is compiled
with the system C compiler on first use (``$CC``, else ``cc``; about a second) into
``$ENGRAM_CACHE_DIR`` (default ``~/.cache/engram``) and loaded with :mod:`ctypes`, so the package
stays pure Python and needs no build step.

They are fast paths, never requirements: with no compiler, on a platform where the build fails,
or with ``ENGRAM_CPU_KERNELS=0`` in the environment, everything runs the plain torch path. The
kernels run only where the plain path would give the same values (float32, CPU, no autograd, one
token per row, no hooks); the table lookup itself stays with the storage module (a module swap:
in memory, offloaded or quantised). tests/test_cpu_kernels.py holds them equal
(hash ids bit-exact, branch outputs to float32 rounding). :func:`enabled` switches them off and
on at run time (e.g. to time both).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch

if TYPE_CHECKING:  # imported lazily at run time: module.py and hashing.py import this file
    from .hashing import NgramHashMapping
    from .module import Engram, EngramLayerState

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("csrc") / "engram_cpu.c"
_FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp-simd"],  # vectorised dot products for this CPU
    ["-O3"],  # a compiler or CPU that refuses the first set
)
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_on = os.environ.get("ENGRAM_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")

_CPU = torch.device("cpu")
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "engram_hash_step": [_I, _I, _P, _P, _I, _P, _I, _P, _I, _I, _I, _I, _P, _P, _P, _P],
    "engram_branch_step": [_I, _I, _I, _I, _P, _P, _I, _P, _I, _P, _P, _P, _P, _P, _P, _P, _P, _F, _F, _P, _I, _I,
                           _P, _F, _F, _P, _I, _P, _P, _P],
}


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$ENGRAM_CACHE_DIR``, else ``$XDG_CACHE_HOME/engram``."""
    if os.environ.get("ENGRAM_CACHE_DIR"):
        return Path(os.environ["ENGRAM_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "engram"


def _compile(source: bytes, compiler: str) -> Path | None:
    """Build the shared library once per (source, compiler, machine); return its path or None."""
    suffix = ".dll" if sys.platform == "win32" else ".so"
    for flags in _FLAG_SETS:
        key = hashlib.sha256(source + repr((compiler, flags, platform.machine())).encode()).hexdigest()[:16]
        for root in (cache_dir(), Path(tempfile.gettempdir()) / f"engram-{os.getuid() if hasattr(os, 'getuid') else 0}"):
            target = root / f"engram_cpu_{key}{suffix}"
            if target.exists():
                return target
            try:
                root.mkdir(parents=True, exist_ok=True)
                with tempfile.TemporaryDirectory(dir=root) as tmp:
                    src, out = Path(tmp) / "engram_cpu.c", Path(tmp) / f"engram_cpu{suffix}"
                    src.write_bytes(source)
                    cmd = [compiler, *flags, "-std=c99", "-fPIC", "-shared", str(src), "-o", str(out), "-lm"]
                    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                    if res.returncode != 0:
                        log.debug("engram: %s failed: %s", " ".join(cmd), res.stderr.strip())
                        break  # the flags, not the folder: try the next flag set
                    os.replace(out, target)  # atomic: a concurrent build leaves one complete file
                return target
            except (OSError, subprocess.SubprocessError) as err:
                log.debug("engram: building the CPU kernels in %s failed: %s", root, err)
    return None


def library() -> ctypes.CDLL | None:
    """The loaded kernels, built on first call; ``None`` when disabled or unavailable."""
    global _lib, _tried
    if not _on:
        return None
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        path = _compile(_SOURCE.read_bytes(), compiler) if compiler and _SOURCE.exists() else None
        if path is None:
            log.info("engram: no C compiler could build the CPU decode kernels; using the plain torch path")
        else:
            try:
                lib = ctypes.CDLL(str(path))
                for name, argtypes in _SIGNATURES.items():
                    fn = getattr(lib, name)
                    fn.argtypes, fn.restype = argtypes, ctypes.c_int
                _lib = lib
            except (OSError, AttributeError) as err:
                log.info("engram: could not load the CPU decode kernels (%s); using the plain torch path", err)
        _tried = True
    return _lib


def available() -> bool:
    """Whether the kernels are switched on and could be built and loaded here."""
    return library() is not None


@contextlib.contextmanager
def enabled(on: bool) -> Iterator[None]:
    """Switch the kernels on or off inside a ``with`` block (``with enabled(False):`` times the plain path)."""
    global _on
    before, _on = _on, bool(on)
    try:
        yield
    finally:
        _on = before


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def hash_step(mapping: NgramHashMapping, input_ids: torch.Tensor, history: torch.Tensor | None,
              token_mask: torch.Tensor | None) -> tuple[dict[int, torch.Tensor], torch.Tensor] | None:
    """:meth:`NgramHashMapping.hash_step` for CPU ids ``(B, T)`` in one call; ``None``: use the plain path.

    Returns ``({layer_id: (B, T, H)}, next history (B, N-1))``, bit-identical to the plain path.
    Ids outside the tokenizer also return ``None``, so the plain path raises its usual error.
    """
    lib = library()
    if lib is None or input_ids.dtype != torch.long:
        return None
    if history is not None and (history.dtype != torch.long or history.device.type != "cpu"):
        return None
    if token_mask is not None and (token_mask.dtype != torch.bool or token_mask.device.type != "cpu"):
        return None
    input_ids = input_ids.contiguous()
    history = None if history is None else history.contiguous()
    token_mask = None if token_mask is None else token_mask.contiguous()
    B, T = input_ids.shape
    cfg = mapping.config
    N, K = cfg.max_ngram_size, cfg.n_head_per_ngram
    L, H = len(mapping.layer_ids), cfg.n_heads_total
    if history is not None and (history.shape[0] != B or history.shape[1] < N - 1):
        return None
    if mapping._mult.device.type != "cpu":
        return None
    lookup = mapping.compressed.table_on(_CPU)  # (V,) int64, shares the NumPy table's memory
    out = torch.empty(L, B, T, H, dtype=torch.long)  # (L, B, T, H)
    nxt = torch.empty(B, N - 1, dtype=torch.long)  # (B, N-1)
    rc = lib.engram_hash_step(
        B, T, input_ids.data_ptr(), lookup.data_ptr(), lookup.shape[0],
        _ptr(history), 0 if history is None else history.shape[1], _ptr(token_mask), mapping.pad_id,
        L, N, K, mapping._mult.data_ptr(), mapping._primes.data_ptr(), out.data_ptr(), nxt.data_ptr(),
    )
    if rc != 0:
        return None
    return {lid: out[i] for i, lid in enumerate(mapping.layer_ids)}, nxt


def _hooked(*modules: torch.nn.Module | None) -> bool:
    return any(m is not None and (m._forward_hooks or m._forward_pre_hooks) for m in modules)


def plain_table(engram: Engram, hash_ids: torch.Tensor) -> torch.Tensor | None:
    """The branch's table when :func:`engram_step` can look ``hash_ids (B, 1, H)`` up itself, else ``None``.

    Only the plain in-memory :class:`~engram.memory.MultiHeadEmbedding`, unhooked, float32 and
    contiguous on the CPU; offloaded and quantised storage (module swaps) look up first.
    """
    from .memory import MultiHeadEmbedding

    mem = engram.memory
    if (type(mem) is not MultiHeadEmbedding or _hooked(mem, mem.embedding) or hash_ids.dtype != torch.long
            or hash_ids.shape[-1] != mem.num_heads):
        return None
    w = mem.embedding.weight
    if w.dtype != torch.float32 or w.device.type != "cpu" or not w.is_contiguous() or hash_ids.device.type != "cpu":
        return None
    return w


def engram_step(engram: Engram, hidden_states: torch.Tensor, e: torch.Tensor | None, hash_ids: torch.Tensor,
                state: EngramLayerState | None, token_mask: torch.Tensor | None) -> torch.Tensor | None:
    """:meth:`Engram.forward` for one token per row in one call; ``None``: use the plain path.

    Args: ``hidden_states (B, 1, M, D)``; ``e (B, 1, E)`` the memory vectors already looked up
    by the storage module (offloaded, quantised), or ``None`` to look ``hash_ids (B, 1, H)`` up
    here in the plain table (see :func:`plain_table`); the forward's ``state`` and
    ``token_mask``. Taken only where the plain path gives the same values: float32 on the CPU
    without autograd and nothing hooked into the branch (``engram inspect`` hooks the gate).
    Updates ``state`` as the plain path does. Returns ``(B, 1, M, D)``.
    """
    lib = library()
    if lib is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    cfg = engram.config
    B, T, M, D = hidden_states.shape
    if (T != 1 or cfg.lite or hidden_states.dtype != torch.float32 or hidden_states.device.type != "cpu"
            or "gate" in engram.__dict__):
        return None
    table = None
    if e is None:
        table = plain_table(engram, hash_ids)
        if table is None:
            return None
        E = engram.memory.num_heads * engram.memory.embedding_dim
    else:
        if e.dtype != torch.float32 or e.device.type != "cpu":
            return None
        e = e.contiguous()
        E = e.shape[-1]
    conv = engram.short_conv if cfg.use_short_conv else None
    key = engram.key_proj if cfg.use_gate else None
    if _hooked(engram.value_proj, key, conv):
        return None
    weights = [engram.value_proj.weight, engram.value_proj.bias]
    if key is not None:
        weights += [key.weight, key.bias, engram.key_norm_weight, engram.query_norm_weight]
    if conv is not None:
        weights += [conv.conv.weight, conv.norm_weight]
    if any(w is not None and (w.dtype != torch.float32 or w.device.type != "cpu" or not w.is_contiguous())
           for w in weights):
        return None
    past = None
    if conv is not None and state is not None and state.conv is not None:
        past = state.conv
        if past.dtype != torch.float32 or past.shape[0] != B or past.shape[1] < conv.state_len:
            return None
        past = past.contiguous()
    if token_mask is not None and token_mask.dtype != torch.bool:
        return None
    hs = hidden_states.contiguous()
    ids = None if table is None else hash_ids.contiguous()
    mask = None if token_mask is None else token_mask.contiguous()
    W = conv.state_len if conv is not None else 0
    tail = torch.empty(B, W, M * D) if conv is not None and state is not None else None  # (B, W, C)
    out = torch.empty(B, 1, M, D)  # (B, 1, M, D)
    eps = torch.finfo(torch.float32).eps  # RMSNorm's default eps, as in Engram.gate
    rc = lib.engram_branch_step(
        B, M, D, E, _ptr(e), _ptr(ids), 0 if table is None else engram.memory.num_heads,
        _ptr(None if table is None else engram.memory.offsets), 0 if table is None else engram.memory.num_rows,
        _ptr(table), engram.value_proj.weight.data_ptr(), _ptr(engram.value_proj.bias),
        _ptr(None if key is None else key.weight), _ptr(None if key is None else key.bias),
        _ptr(getattr(engram, "key_norm_weight", None)), _ptr(getattr(engram, "query_norm_weight", None)),
        hs.data_ptr(), (D**0.5) * eps, D**-0.5,
        _ptr(None if conv is None else conv.conv.weight), 0 if conv is None else conv.kernel_size,
        0 if conv is None else conv.dilation, _ptr(None if conv is None else conv.norm_weight),
        0.0 if conv is None else conv.eps, 1.0 / D, _ptr(past), 0 if past is None else past.shape[1],
        _ptr(mask), _ptr(tail), out.data_ptr(),
    )
    if rc == 1:
        return None  # a row outside the table: the plain path raises its usual error
    if rc != 0:
        raise MemoryError("engram: the CPU decode kernel could not allocate its scratch buffer")
    if tail is not None:
        if state.keep:  # recording for a later crop: every row is kept, as in ShortConv
            prev = past if past is not None else torch.zeros(B, W, M * D)
            state.conv = torch.cat([prev, tail[:, W - 1 :]], dim=1)  # (B, >= W+1, C)
        else:
            state.conv = tail
    return out
