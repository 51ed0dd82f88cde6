"""engram.ops: the hash formula, its C kernel (bit for bit), and the kernel build cache.

The C kernels are a fast path only: with no compiler, ``ENGRAM_CPU_KERNELS=0`` or an unusable
cache directory the formula runs. A machine with a C compiler must build them (CI has one).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch

from engram import EngramConfig
from engram.config import next_unused_prime
from engram.core.hashing import NgramHashMapping
from engram.ops import cpu
from engram.ops.hash import barrett_magic, hash_ngrams, hash_ngrams_reference
from helpers import tiny_tokenizer

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
HAVE_CC = any(shutil.which(c) for c in ("cc", "gcc", "clang"))


def mapping(sizes=(211, 307), max_ngram: int = 3, **kw) -> NgramHashMapping:
    cfg = EngramConfig(hidden_size=32, layer_ids=[0, 2], max_ngram_size=max_ngram, n_embed_per_ngram=16,
                       n_head_per_ngram=4, engram_vocab_size=list(sizes), pad_id=1, seed=3, **kw)
    return NgramHashMapping(cfg, tiny_tokenizer())


def adversarial_mixes(n_random: int = 4000) -> torch.Tensor:
    edges = [0, 1, -1, 2, -2, INT64_MIN, INT64_MIN + 1, INT64_MAX, INT64_MAX - 1]
    for b in range(1, 63):  # around every power of two, both signs
        for d in (-1, 0, 1):
            edges += [2**b + d, -(2**b) + d]
    edges = [min(max(e, INT64_MIN), INT64_MAX) for e in edges]
    g = torch.Generator().manual_seed(0)
    rand = torch.randint(INT64_MIN, INT64_MAX, (n_random,), generator=g, dtype=torch.long)
    return torch.cat([torch.tensor(edges, dtype=torch.long), rand])


def python_hash(m: NgramHashMapping, comp: list[list[int]]) -> dict[int, list]:
    """DESIGN.md §2.4 on Python ints (an oracle independent of torch): rows per layer, (B, T, H)."""
    N, out = m.config.max_ngram_size, {}
    for lid in m.layer_ids:
        mult, primes = m.multipliers[lid], m.table_sizes[lid]
        rows = []
        for seq in comp:
            full = [m.pad_id] * (N - 1) + seq
            per_t = []
            for t in range(N - 1, len(full)):
                mix, heads = 0, []
                for k in range(N):
                    mix ^= (full[t - k] * mult[k]) & ((1 << 64) - 1)  # wrapping int64, as unsigned bits
                    if k:
                        signed = mix - (1 << 64) if mix >> 63 else mix
                        heads += [signed % p for p in primes[k - 1]]
                per_t.append(heads)
            rows.append(per_t)
        out[lid] = rows
    return out


@pytest.fixture(scope="module")
def kernels():
    if not HAVE_CC:
        pytest.skip("no C compiler on this machine: the kernels cannot be built (the formula runs)")
    with cpu.enabled(True):
        assert cpu.available(), "a C compiler is present but the kernels did not build or load"
        yield


# ------------------------------------------------------------------------------------ the formula
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (2, 700), (4, 0)])
def test_formula_equals_python_int_oracle(shape):
    m = mapping((5003, 7001))
    ids = torch.randint(0, 97, shape, generator=torch.Generator().manual_seed(1))
    comp = m.compress(ids)
    got = m.hash_compressed(comp, method="plain")
    want = python_hash(m, comp.tolist())
    for lid in m.layer_ids:
        assert got[lid].shape == (*shape, m.config.n_heads_total)
        assert got[lid].tolist() == (want[lid] if shape[1] else [[] for _ in range(shape[0])])
    if shape[1] > 2:  # the second half hashed after the first equals hashing it whole
        t = shape[1] // 2
        tail = m.hash_compressed(comp[:, t:], m.next_history(None, comp[:, :t]), method="plain")
        assert all(torch.equal(tail[lid], got[lid][:, t:]) for lid in m.layer_ids)


def test_hash_checks_ids_on_cpu_and_negative_ids_pass_through():
    m = mapping()
    with pytest.raises(ValueError, match="97"):
        m.hash(torch.tensor([[1, 97]]))
    ids = torch.tensor([[3, -5, 7, 9]])
    assert m.compress(ids).tolist() == [[1, -5, 3, 4]]
    a, b = m.hash(ids), m.hash(ids, method="plain")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="method"):
        m.hash(ids, method="fast")


def test_compress_few_ids_path_equals_gather_path():
    ct = tiny_tokenizer()
    ids = torch.tensor([[3, -5, 96, 0], [7, 8, -1, 50]])
    few = ct.compress(ids)  # 8 ids: the Python-int path
    many = ct.compress(ids.repeat(1, 8))[:, :4]  # 64 ids: the tensor gather
    assert torch.equal(few, many) and torch.equal(few, ct(ids))
    assert few.tolist() == [[1, -5, 48, 0], [3, 4, -1, 25]]
    for bad in (torch.tensor([[1, 97]]), torch.full((2, 40), 97)):
        with pytest.raises(ValueError, match="97"):
            ct.compress(bad)
    with pytest.raises(TypeError):
        ct.compress(torch.zeros(2, 2))


@pytest.mark.parametrize("B,T", [(1, 1), (2, 3), (4, 40)])
def test_hash_step_equals_compress_mask_hash_and_history(B, T):
    m = mapping()
    g = torch.Generator().manual_seed(B * 100 + T)
    ids = torch.randint(0, 97, (B, T), generator=g)
    ids[0, 0] = -4  # negative ids pass through, as in compress
    mask = torch.rand(B, T, generator=g) > 0.3
    for on in (True, False):
        with cpu.enabled(on):
            for hist in (None, m.compress(torch.randint(0, 97, (B, m.history_len), generator=g))):
                for tm in (None, mask):
                    got, nxt = m.hash_step(ids, hist, tm)
                    comp = m.compress(ids)
                    if tm is not None:
                        comp = torch.where(tm, comp, m.pad_id)
                    want = m.hash_compressed(comp, hist, method="plain")
                    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
                    assert torch.equal(nxt, m.next_history(hist, comp))
            with pytest.raises(ValueError, match="97"):
                m.hash_step(torch.full((B, T), 97))
            with pytest.raises(TypeError, match="integer"):
                m.hash_step(torch.ones(B, T))


def test_hash_step_calls_listeners():
    m = mapping()
    seen = []
    m.step_listeners.append(seen.append)
    hashed, _ = m.hash_step(torch.tensor([[5]]))
    assert len(seen) == 1 and seen[0] is hashed


def test_hash_constants_survive_dtype_and_device_casts():
    m = mapping((646_400, 646_400))
    ids = torch.randint(0, 97, (2, 600))
    before = m.hash(ids)
    m.to(torch.bfloat16)
    after = m.hash(ids, method="plain")
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------------------ the C kernel
def _primes_after(start: int, n: int) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        out.append(next_unused_prime(out[-1] if out else start, set()))
    return out


# Both of the kernel's residue paths: doubles (bulk calls, primes < 2^30; exact only below that
# bound, so the primes just under and over it matter) and Barrett (decode steps, larger primes).
RESIDUE_PRIMES = [2, 3, 211, 646_403, 2**20 + 7, 2**31 - 1, 2**34 - 41, 2**61 - 1, 2**63 - 25,
                  *_primes_after(2**30 - 300, 4), *_primes_after(2**30, 2)]


@pytest.mark.parametrize("method", ["double", "barrett"])
def test_kernel_modulo_equals_torch_remainder_on_adversarial_int64(kernels, method):
    x = adversarial_mixes()
    g = torch.Generator().manual_seed(1)
    for p in RESIDUE_PRIMES:
        k = torch.randint(-(2**62) // p, 2**62 // p, (500,), generator=g)
        xs = torch.cat([x, k * p, k * p - 1, k * p + 1, k * p + p // 2])  # multiples of p and their neighbours
        assert torch.equal(cpu.residues(xs, p, method), torch.remainder(xs, p)), (p, method)
    with pytest.raises(ValueError, match="prime"):
        cpu.residues(x, 0)
    with pytest.raises(ValueError, match="method"):
        cpu.residues(x, 3, "fast")


@pytest.mark.parametrize("max_ngram,heads", [(2, 1), (3, 3), (3, 8), (4, 9), (3, 16)])
def test_bulk_kernel_paths_equal_the_formula(kernels, max_ngram, heads):
    """Every shape the blocked kernel distinguishes: heads that fill 0, 1 or 2 vectors and a part
    of one, positions across its 256-position blocks and the 64-position switch to doubles,
    outputs of 1 MiB and more (streaming stores; rows aligned to them or not), orders whose
    primes straddle 2^30 (one order on Barrett, the other on doubles), document starts, and time
    slices (the threaded split), against the formula."""
    g = torch.Generator().manual_seed(max_ngram * 100 + heads)
    O, L = max_ngram - 1, 2
    small = [_primes_after(5003 + 1000 * i, heads) for i in range(L * O)]
    near = [_primes_after(2**30 - 20 * heads * (i + 1), heads) for i in range(L * O)]
    big = [_primes_after(2**30 + 1000 * i, heads) for i in range(L * O)]
    tables = {"small": small, "near_2^30": near, "mixed": [big[i] if i % O == 0 else small[i] for i in range(L * O)]}
    mult = torch.randint(INT64_MIN, INT64_MAX, (L, max_ngram), generator=g) | 1
    for name, rows in tables.items():
        primes = torch.tensor([sum(rows[l * O:(l + 1) * O], []) for l in range(L)])  # (L, H)
        for B, T in ((1, 63), (1, 64), (2, 257), (3, 600), (4, 2048)):
            full = torch.randint(-(2**40), 2**40, (B, O + T), generator=g)
            starts = torch.rand(B, T, generator=g) < 0.05
            for st in (None, starts):
                want = hash_ngrams_reference(full, mult, primes, st, pad_id=5)
                reps = -(-cpu.PARALLEL_MIN_TOKENS // (B * T))  # enough rows for the threaded split
                n = torch.get_num_threads()
                try:
                    torch.set_num_threads(1)  # one call over everything
                    got = hash_ngrams(full, mult, primes, barrett_magic(primes), "kernel", st, 5)
                    torch.set_num_threads(3)  # three time slices, hashed by the pool
                    sliced = cpu.hash_ngrams(full.repeat(reps, 1), mult, primes, barrett_magic(primes),
                                             None if st is None else st.repeat(reps, 1), 5)
                finally:
                    torch.set_num_threads(n)
                assert torch.equal(got, want), (name, B, T, st is None)
                assert torch.equal(sliced, want.repeat(1, reps, 1, 1)), (name, B, T, st is None)


@pytest.mark.parametrize("sizes,max_ngram", [((211, 307), 3), ((2**33, 2**34), 3), ((1009, 1013, 1019), 4)])
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (2, 9000)])  # the last is split over threads
def test_bulk_hash_kernel_is_bit_identical(kernels, sizes, max_ngram, shape):
    m = mapping(sizes, max_ngram)
    g = torch.Generator().manual_seed(shape[1])
    ids = torch.randint(-3, 97, shape, generator=g)
    hist = m.compress(torch.randint(0, 97, (shape[0], m.history_len), generator=g))
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for h in (None, hist):
            got = m.hash_compressed(m.compress(ids), h, method="kernel")
            want = m.hash_compressed(m.compress(ids), h, method="plain")
            assert all(torch.equal(got[k], want[k]) for k in want)
    finally:
        torch.set_num_threads(n)


def test_hash_ngrams_backends_on_adversarial_multipliers(kernels):
    """Random full-range multipliers and big primes: every int64 corner of the mix."""
    g = torch.Generator().manual_seed(7)
    mult = torch.randint(INT64_MIN, INT64_MAX, (2, 4), generator=g) | 1
    primes = torch.tensor([[2**61 - 1, 2**31 - 1, 646_403], [3, 2**33 + 17, 1009]], dtype=torch.long)
    full = torch.randint(-(2**40), 2**40, (3, 50), generator=g)
    ref = hash_ngrams_reference(full, mult, primes)
    assert torch.equal(hash_ngrams(full, mult, primes, barrett_magic(primes), backend="kernel"), ref)


@pytest.mark.parametrize("sizes,max_ngram", [((211, 307), 3), ((2**33, 2**34), 3), ((1009, 1013, 1019), 4)])
def test_hash_step_kernel_is_bit_identical(kernels, sizes, max_ngram):
    m = mapping(sizes, max_ngram)
    g = torch.Generator().manual_seed(5)
    for B, T in ((1, 1), (3, 1), (2, 5)):
        ids = torch.randint(0, 97, (B, T), generator=g)
        ids[0, 0] = -4
        mask = torch.rand(B, T, generator=g) > 0.3
        long_hist = m.compress(torch.randint(0, 97, (B, m.history_len + 3), generator=g))
        for hist in (None, long_hist[:, 3:], long_hist):  # start, exactly N-1, a longer (kept) history
            for tm in (None, mask):
                mult, primes, magic = m._cpu
                got = cpu.hash_step(ids, m.compressed.table_on("cpu"), hist, tm, m.pad_id, mult, primes, magic)
                assert got is not None, "the kernel declined a case it handles"
                want, nxt = m._step_tensor(ids, hist, tm)
                assert all(torch.equal(got[0][i], want[lid]) for i, lid in enumerate(m.layer_ids))
                assert torch.equal(got[1], nxt)
    mult, primes, magic = m._cpu  # an id outside the table: declined, so the torch path raises
    assert cpu.hash_step(torch.full((1, 1), 97), m.compressed.table_on("cpu"), None, None, 1, mult, primes, magic) is None


def test_kernel_backend_without_kernels_is_a_clear_error():
    m = mapping()
    with cpu.enabled(False):
        with pytest.raises(RuntimeError, match="kernel"):
            m.hash(torch.ones(1, 3, dtype=torch.long), method="kernel")
        assert torch.equal(m.hash(torch.ones(1, 3, dtype=torch.long))[0],
                           m.hash(torch.ones(1, 3, dtype=torch.long), method="plain")[0])


# ------------------------------------------------------------------------------------ the build cache
_SNIPPET = """
import torch
from engram.ops import cpu
from engram.ops.hash import hash_ngrams, hash_ngrams_reference, barrett_magic
mult, primes = torch.tensor([[3, 5, 7]]), torch.tensor([[11, 13, 17, 19]])
full = torch.arange(12).view(2, 6)
assert torch.equal(hash_ngrams(full, mult, primes, barrett_magic(primes)), hash_ngrams_reference(full, mult, primes))
print(cpu.available())
"""


def _run(env: dict) -> str:
    res = subprocess.run([sys.executable, "-c", _SNIPPET], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def _libs(d):
    return sorted(p for p in d.glob("engram_cpu_*") if not p.name.endswith(".sha256"))


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler on this machine")
def test_kernels_build_into_a_private_cache_dir_and_are_reused(tmp_path):
    root = tmp_path / "cache"
    cache = root / "kernels"
    assert _run({"ENGRAM_CACHE_DIR": str(root)}) == "True"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    (lib,) = _libs(cache)
    mtime = lib.stat().st_mtime_ns
    assert _run({"ENGRAM_CACHE_DIR": str(root)}) == "True"  # reused, not rebuilt
    assert _libs(cache) == [lib] and lib.stat().st_mtime_ns == mtime


@pytest.mark.slow  # a fresh Python process (~5 s): CI runs it after the default tests
@pytest.mark.skipif(not HAVE_CC, reason="no C compiler on this machine")
def test_a_planted_or_tampered_library_is_never_loaded(tmp_path):
    """A library whose recorded hash does not match (replaced after the build, or a symlink to
    someone else's file) is rebuilt, not loaded; a cache dir others can write is not used."""
    root = tmp_path / "cache"
    cache = root / "kernels"
    assert _run({"ENGRAM_CACHE_DIR": str(root)}) == "True"
    (lib,) = _libs(cache)
    good = lib.read_bytes()
    marker = tmp_path / "planted-ran"
    planted = tmp_path / "planted.c"
    planted.write_text(f'#include <stdio.h>\n__attribute__((constructor)) static void f(void) '
                       f'{{ FILE *o = fopen("{marker}", "w"); if (o) fclose(o); }}\n')
    evil = tmp_path / "evil.so"
    subprocess.run([shutil.which("cc") or "gcc", "-shared", "-fPIC", str(planted), "-o", str(evil)], check=True)
    lib.write_bytes(evil.read_bytes())  # tampered in place
    assert _run({"ENGRAM_CACHE_DIR": str(root)}) == "True"
    assert not marker.exists() and lib.read_bytes() == good  # rebuilt over it
    lib.unlink()
    lib.symlink_to(evil)  # a symlink to a foreign file
    assert _run({"ENGRAM_CACHE_DIR": str(root)}) == "True"
    assert not marker.exists() and not lib.is_symlink()
    os.chmod(cache, 0o777)  # a directory others can write: not used at all, the formula runs
    try:
        assert _run({"ENGRAM_CACHE_DIR": str(root)}) == "False"
    finally:
        os.chmod(cache, 0o700)
    assert not marker.exists()


@pytest.mark.parametrize("env", [{"CC": "/nonexistent/cc"}, {"ENGRAM_CPU_KERNELS": "0"}])
def test_without_kernels_the_formula_runs(tmp_path, env):
    assert _run({"ENGRAM_CACHE_DIR": str(tmp_path / "c"), **env}) == "False"
    assert not (tmp_path / "c" / "kernels").exists() or not _libs(tmp_path / "c" / "kernels")
