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
token per row, no hooks). A plain in-memory table is read in the kernel; offloaded or quantised
storage (module swaps) looks its rows up first and the kernel does the rest.
tests/test_cpu_kernels.py holds them equal (hash ids bit-exact, branch outputs to float32
rounding). :func:`enabled` switches them off and on at run time (e.g. to time both).
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
from typing import TYPE_CHECKING, Callable, Iterator, NamedTuple

import torch

from engram.nn.memory import MultiHeadEmbedding
from engram.ops.threads import pool

if TYPE_CHECKING:  # module.py and hashing.py import this file
    from engram.core.hashing import NgramHashMapping
    from engram.nn.module import Engram, EngramLayerState

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

_P, _I, _F, _RC = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_SIGNATURES = {  # name: (argument types, return type)
    "engram_hash_step": ([_I, _I, _P, _P, _I, _P, _I, _P, _I, _I, _I, _I, _P, _P, _P, _P, _P], _RC),
    "engram_hash": ([_I, _I, _I, _I, _P, _I, _I, _I, _P, _P, _P, _P], None),
    "engram_mod": ([_I, _P, _P, _P], None),
    "engram_branch_step": ([_I, _I, _I, _I, _P, _P, _I, _P, _I, _P, _P, _P, _P, _P, _P, _P, _P, _F, _F, _P, _I, _I,
                            _P, _F, _F, _P, _I, _P, _P, _P], _RC),
}


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$ENGRAM_CACHE_DIR``, else ``$XDG_CACHE_HOME/engram``."""
    if os.environ.get("ENGRAM_CACHE_DIR"):
        return Path(os.environ["ENGRAM_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "engram"


def _cpu_id() -> str:
    """This CPU's model and instruction-set flags: a ``-march=native`` build is only valid for them
    (a home folder shared by machines of a cluster must not hand one CPU's build to another)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f.read(1 << 16).splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _compile(source: bytes, compiler: str) -> Path | None:
    """Build the shared library once per (source, compiler, flags, CPU); return its path or None."""
    suffix = ".dll" if sys.platform == "win32" else ".so"
    cpu = _cpu_id()
    for flags in _FLAG_SETS:
        key = hashlib.sha256(source + repr((compiler, flags, platform.machine(), cpu)).encode()).hexdigest()[:16]
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
                for name, (argtypes, restype) in _SIGNATURES.items():
                    fn = getattr(lib, name)
                    fn.argtypes, fn.restype = argtypes, restype
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


# ------------------------------------------------------------------------------------ hash step
class _HashPlan(NamedTuple):
    """A mapping's constant hash arguments (CPU tensors this plan owns, so no pointer goes stale)."""

    compressed: object  # the CompressedTokenizer it was built for
    pad: int
    lookup: torch.Tensor  # (V,) int64 compression table
    mult: torch.Tensor  # (L, N)
    primes: torch.Tensor  # (L, H)
    magic: torch.Tensor  # (L, H) floor((2**64-1)/p) as uint64 bits, for the kernel's Barrett modulo
    layer_ids: tuple[int, ...]
    N: int
    K: int


def _hash_plan(mapping: NgramHashMapping) -> _HashPlan:
    """The hash's constant arguments, built once per mapping (and per compression table).

    Its own CPU copies of the multipliers and primes: the mapping's buffers may move to an
    accelerator.
    """
    plan = mapping.__dict__.get("_kernel_plan")
    if plan is None or plan.compressed is not mapping.compressed or plan.pad != mapping.pad_id:
        cfg = mapping.config
        primes = [[p for order in mapping.table_sizes[lid] for p in order] for lid in mapping.layer_ids]
        magic = [[m - 2**64 if m >= 2**63 else m for m in ((2**64 - 1) // p for p in row)] for row in primes]
        plan = _HashPlan(
            compressed=mapping.compressed, pad=mapping.pad_id, lookup=mapping.compressed.table_on("cpu"),
            mult=torch.tensor([mapping.multipliers[lid] for lid in mapping.layer_ids], dtype=torch.long),
            primes=torch.tensor(primes, dtype=torch.long), magic=torch.tensor(magic, dtype=torch.long),
            layer_ids=tuple(mapping.layer_ids), N=cfg.max_ngram_size, K=cfg.n_head_per_ngram,
        )
        mapping.__dict__["_kernel_plan"] = plan
    return plan


def hash_compressed(mapping: NgramHashMapping, full: torch.Tensor, T: int, workers: int = 1) -> torch.Tensor | None:
    """Hash ids of :meth:`NgramHashMapping.hash_compressed` in C; ``None`` when the kernels are unavailable.

    ``full (B, N-1+T)`` CPU compressed ids, history first. Returns ``(L, B, T, H)``,
    bit-identical to the torch paths. With ``workers > 1`` the time axis is split over the
    package's thread pool (the C calls release the GIL and write disjoint slices).
    """
    lib = library()
    if lib is None or full.device.type != "cpu":
        return None
    plan = _hash_plan(mapping)
    L, H = plan.primes.shape
    full = full.to(torch.long).contiguous()
    B = full.shape[0]
    out = torch.empty(L, B, T, H, dtype=torch.long)  # (L, B, T, H)
    args = (full.data_ptr(), L, plan.N, plan.K, plan.mult.data_ptr(), plan.primes.data_ptr(), plan.magic.data_ptr(),
            out.data_ptr())
    if workers < 2:
        lib.engram_hash(B, T, 0, T, *args)
    else:
        cuts = [T * i // workers for i in range(workers + 1)]
        list(pool(workers).map(lambda i: lib.engram_hash(B, T, cuts[i], cuts[i + 1], *args), range(workers)))
    return out


def residues(mixes: torch.Tensor, primes: torch.Tensor) -> torch.Tensor:
    """``mixes mod primes`` (int64, same shape, non-negative) by the kernels' modulo; for tests."""
    lib = library()
    if lib is None:
        raise RuntimeError("the CPU kernels are not available here")
    x, p = mixes.to(torch.long).contiguous(), primes.to(torch.long).expand_as(mixes).contiguous()
    out = torch.empty_like(x)
    lib.engram_mod(x.numel(), x.data_ptr(), p.data_ptr(), out.data_ptr())
    return out


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
    plan = _hash_plan(mapping)
    (L, H), N = plan.primes.shape, plan.N
    B, T = input_ids.shape
    if history is not None and (history.shape[0] != B or history.shape[1] < N - 1):
        return None
    input_ids = input_ids.contiguous()
    history = None if history is None else history.contiguous()
    token_mask = None if token_mask is None else token_mask.contiguous()
    out = torch.empty(B, T, H, dtype=torch.long) if L == 1 else torch.empty(L, B, T, H, dtype=torch.long)  # (L, B, T, H)
    nxt = torch.empty(B, N - 1, dtype=torch.long)  # (B, N-1)
    rc = lib.engram_hash_step(
        B, T, input_ids.data_ptr(), plan.lookup.data_ptr(), plan.lookup.shape[0], _ptr(history),
        0 if history is None else history.shape[1], _ptr(token_mask), plan.pad, L, N, plan.K,
        plan.mult.data_ptr(), plan.primes.data_ptr(), plan.magic.data_ptr(), out.data_ptr(), nxt.data_ptr(),
    )
    if rc != 0:
        return None  # an id outside the tokenizer (or no memory): the plain path raises its usual error
    if L == 1:
        return {plan.layer_ids[0]: out}, nxt
    return {lid: out[i] for i, lid in enumerate(plan.layer_ids)}, nxt


# ------------------------------------------------------------------------------------ Engram branch
def _hooked(*modules: torch.nn.Module | None) -> bool:
    return any(m is not None and (m._forward_hooks or m._forward_pre_hooks) for m in modules)


class _BranchPlan(NamedTuple):
    """A branch's constant kernel arguments (pointers, sizes, constants), in the kernel's order."""

    table: tuple  # (H, offsets, num_rows, table) of a plain table the kernel reads, or (0, None, 0, None)
    weights: tuple  # value weight and bias, key weight and bias, key and query norm weights
    gate: tuple  # float(sqrt(D) * eps), float(D**-0.5)
    conv: tuple  # conv weight, kernel size, dilation, norm weight, eps; (None, 0, 0, None, 0.0) without
    inv_d: float
    W: int  # conv history rows (0 without a conv)
    E: int  # memory width

    @property
    def reads_table(self) -> bool:
        return self.table[3] is not None


_NO_TABLE = (0, None, 0, None)


def _branch_plan(engram: Engram) -> _BranchPlan | None:
    """The branch's weight arguments, or ``None`` when the kernel does not apply to this module.

    Read through the module dicts (no ``nn.Module.__getattr__``) on every call, so swapped
    submodules, replaced parameters and new hooks are always seen; the checks of dtype, device,
    shape and layout are redone only when a weight's storage, dtype or shape changed (``.to()``,
    a replaced parameter). Every pointer the plan passes is part of that key.
    """
    cfg = engram.config
    mods, own = engram._modules, engram._parameters
    vp = mods["value_proj"]
    kp = mods["key_proj"] if cfg.use_gate else None
    conv = mods["short_conv"] if cfg.use_short_conv else None
    mem = mods["memory"]
    emb = mem._modules["embedding"] if type(mem) is MultiHeadEmbedding else None
    if _hooked(vp, kp, conv, mem, emb):
        return None
    params = [vp._parameters["weight"], vp._parameters["bias"]]
    if kp is not None:
        params += [kp._parameters["weight"], kp._parameters["bias"], own["key_norm_weight"], own["query_norm_weight"]]
    if conv is not None:
        params += [conv._modules["conv"]._parameters["weight"], conv._parameters["norm_weight"]]
    table = None if emb is None else emb._parameters["weight"]
    offsets = None if emb is None else mem._buffers["offsets"]
    key = tuple(None if p is None else (p.data_ptr(), p.dtype, p.shape) for p in [*params, table, offsets]) + (id(mem),)
    cached = engram.__dict__.get("_kernel_plan")
    if cached is not None and cached[0] == key:
        return cached[1]
    plan = None
    D, M, E = cfg.hidden_size, cfg.hc_mult, cfg.memory_dim
    shapes = [(D, E), (D,)]
    if kp is not None:
        shapes += [(M * D, E), (M * D,), (M, D), (M, D)]
    if conv is not None:
        shapes += [(M * D, 1, conv.kernel_size), (M, D)]
    if all(p is None or (p.dtype == torch.float32 and p.device.type == "cpu" and p.is_contiguous()
                         and tuple(p.shape) == want) for p, want in zip(params, shapes)):
        if table is not None and not (table.dtype == torch.float32 and table.device.type == "cpu"
                                      and table.is_contiguous() and offsets.device.type == "cpu"
                                      and mem.num_heads * mem.embedding_dim == E):
            table = None  # this table is looked up by the module, the rest still fused
        vw, vb, *rest = params
        kw, kb, kn, qn = rest[:4] if kp is not None else (None,) * 4
        cw, cn = rest[-2:] if conv is not None else (None, None)
        eps = torch.finfo(torch.float32).eps  # RMSNorm's default eps, as in Engram.gate
        plan = _BranchPlan(
            table=_NO_TABLE if table is None else (mem.num_heads, offsets.data_ptr(), mem.num_rows, table.data_ptr()),
            weights=(vw.data_ptr(), _ptr(vb), _ptr(kw), _ptr(kb), _ptr(kn), _ptr(qn)),
            gate=((D**0.5) * eps, D**-0.5),
            conv=(None, 0, 0, None, 0.0) if conv is None else (
                cw.data_ptr(), conv.kernel_size, conv.dilation, cn.data_ptr(), conv.eps),
            inv_d=1.0 / D, W=0 if conv is None else conv.state_len, E=E,
        )
    engram.__dict__["_kernel_plan"] = (key, plan)
    return plan


def engram_step(engram: Engram, hidden_states: torch.Tensor, hash_ids: torch.Tensor, state: EngramLayerState | None,
                token_mask: torch.Tensor | None, lookup: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
    """:meth:`Engram.forward` for one token per row in one call; ``None``: use the plain path.

    Args: ``hidden_states (B, 1, M, D)``, ``hash_ids (B, 1, H)``, the forward's ``state`` and
    ``token_mask``, and ``lookup``, the branch's ``hash_ids -> (B, 1, E)`` for storage the kernel
    does not read itself (offloaded, quantised: module swaps); a plain in-memory table is read
    in the kernel. Taken only where the plain path gives the same values: float32 on the CPU
    without autograd and nothing hooked into the branch (``engram inspect`` hooks the gate).
    Updates ``state`` as the plain path does. Returns ``(B, 1, M, D)``.
    """
    lib = library()
    if lib is None or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    B, T, M, D = hidden_states.shape
    if (T != 1 or engram.config.lite or hidden_states.dtype != torch.float32 or hidden_states.device.type != "cpu"
            or "gate" in engram.__dict__):
        return None
    plan = _branch_plan(engram)
    if plan is None:
        return None
    if (M, D) != (engram.config.hc_mult, engram.config.hidden_size):
        return None
    W, table = plan.W, plan.table
    in_kernel = plan.reads_table and hash_ids.dtype == torch.long and hash_ids.device.type == "cpu"
    if in_kernel and hash_ids.shape[-1] != table[0]:
        return None  # the plain path raises on a wrong head count
    past = None
    if W and state is not None and state.conv is not None:
        past = state.conv
        if past.dtype != torch.float32 or past.shape[0] != B or past.shape[1] < W:
            return None
        past = past.contiguous()
    if token_mask is not None:
        if token_mask.dtype != torch.bool:
            return None
        token_mask = token_mask.contiguous()
    e = ids = None
    if in_kernel:
        ids = hash_ids.contiguous()
    else:  # every check is done: the storage module's lookup runs once
        e = lookup(hash_ids).float().contiguous()  # (B, 1, E)
        if e.shape[-1] != plan.E or e.device.type != "cpu":
            return None  # the plain path raises on a wrong width
        table = _NO_TABLE
    hs = hidden_states.contiguous()
    tail = torch.empty(B, W, M * D) if plan.conv[0] is not None and state is not None else None  # (B, W, C)
    out = torch.empty(B, 1, M, D)  # (B, 1, M, D)
    rc = lib.engram_branch_step(
        B, M, D, plan.E, _ptr(e), _ptr(ids), *table, *plan.weights, hs.data_ptr(), *plan.gate, *plan.conv,
        plan.inv_d, _ptr(past), 0 if past is None else past.shape[1], _ptr(token_mask), _ptr(tail), out.data_ptr(),
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
