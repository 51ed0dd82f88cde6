"""The fused C decode kernels (engram/cpu_kernels.py) against the plain torch paths they replace.

- hash step: bit-identical hash ids and next history, any history length, padding, negative ids,
  large primes; bad ids still raise the plain path's error;
- Engram branch, one token per row: same outputs and conv state as the plain path to float32
  rounding, over several steps, for every variant (hc_mult, gate, conv, bias, keep-mode state,
  padding), with the plain table looked up in C and with offloaded storage looked up first;
- the kernels stay out of the way where they would change behaviour: autograd, hooks (``engram
  inspect``), bad rows; and whole-model greedy decoding gives the same tokens either way.

Without a C compiler the kernels cannot be built and these tests skip (the plain path is then
the only path, tested everywhere else); with one, a failed build is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from engram import EngramConfig
from engram.ops import cpu as cpu_kernels
from engram.core.hashing import NgramHashMapping
from engram.models.gpt import EngramGPT, GPTConfig
from engram.nn.module import Engram, EngramLayerState
from test_perf_paths import adversarial_mixes, mapping, tiny_tokenizer


@pytest.fixture(scope="module", autouse=True)
def kernels():
    if not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler: the kernels cannot be built here")
    with cpu_kernels.enabled(True):
        assert cpu_kernels.available(), "a C compiler is present but the kernels did not build or load"
        yield


# ------------------------------------------------------------------------------------ hash step
@pytest.mark.parametrize("sizes,max_ngram", [((211, 307), 3), ((2**33, 2**34), 3), ((1009, 1013, 1019), 4)])
@pytest.mark.parametrize("B,T", [(1, 1), (3, 1), (2, 5)])
def test_hash_step_kernel_is_bit_identical(sizes, max_ngram, B, T):
    m = mapping(sizes, max_ngram)
    g = torch.Generator().manual_seed(B * 10 + T)
    ids = torch.randint(0, 97, (B, T), generator=g)
    ids[0, 0] = -4  # negative ids pass through compression
    mask = torch.rand(B, T, generator=g) > 0.3
    long_hist = m.compress(torch.randint(0, 97, (B, m.history_len + 3), generator=g))
    for hist in (None, long_hist[:, 3:], long_hist):  # start, exactly N-1, a longer (kept) history
        for tm in (None, mask):
            got = cpu_kernels.hash_step(m, ids, hist, tm)
            assert got is not None, "the kernel declined a case it handles"
            want = m._step_scalar(ids, hist, tm)
            assert set(got[0]) == set(want[0])
            assert all(torch.equal(got[0][k], want[0][k]) for k in want[0])
            assert torch.equal(got[1], want[1])


def test_kernel_modulo_equals_torch_remainder_on_adversarial_int64():
    x = adversarial_mixes()
    for p in (2, 3, 211, 646_403, 2**31 - 1, 2**34 - 41, 2**61 - 1, 2**63 - 25):
        assert torch.equal(cpu_kernels.residues(x, torch.tensor(p)), torch.remainder(x, p)), p


@pytest.mark.parametrize("sizes,max_ngram", [((211, 307), 3), ((2**33, 2**34), 3), ((1009, 1013, 1019), 4)])
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (2, 9000)])  # the last is split over threads
def test_bulk_hash_kernel_is_bit_identical(sizes, max_ngram, shape):
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


def test_hash_kernel_method_without_kernels_is_a_clear_error():
    m = mapping()
    with cpu_kernels.enabled(False):
        with pytest.raises(RuntimeError, match="kernel"):
            m.hash(torch.ones(1, 3, dtype=torch.long), method="kernel")
        assert torch.equal(m.hash(torch.ones(1, 3, dtype=torch.long))[0],
                           m.hash(torch.ones(1, 3, dtype=torch.long), method="plain")[0])


def test_hash_step_kernel_leaves_bad_ids_to_the_plain_error():
    m = mapping()
    assert cpu_kernels.hash_step(m, torch.full((1, 1), 97), None, None) is None
    with pytest.raises(ValueError, match="97"):
        m.hash_step(torch.full((1, 1), 97))
    with pytest.raises(TypeError, match="integer"):
        m.hash_step(torch.ones(1, 1))


def test_hash_step_calls_listeners_on_the_kernel_path():
    m = mapping()
    seen = []
    m.step_listeners.append(seen.append)
    hashed, _ = m.hash_step(torch.tensor([[5]]))
    assert len(seen) == 1 and seen[0] is hashed


# ------------------------------------------------------------------------------------ branch
def branch(seed: int = 0, **kw) -> Engram:
    opts = dict(hidden_size=16, hc_mult=1, layer_ids=[0], max_ngram_size=3, n_embed_per_ngram=8,
                n_head_per_ngram=2, engram_vocab_size=[53, 59], pad_id=1)
    opts.update(kw)
    cfg = EngramConfig(**opts)
    sizes = NgramHashMapping(cfg, tiny_tokenizer()).table_sizes[0]
    torch.manual_seed(seed)
    eng = Engram(cfg, 0, sizes)
    with torch.no_grad():  # nothing zero-initialised: every term of the math shows
        for p in eng.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return eng.eval()


def steps(eng: Engram, fused: bool, n: int, B: int, keep: bool, masked: bool, seed: int = 1):
    """n decode steps with fresh inputs each; returns the outputs and the final conv state."""
    cfg = eng.config
    g = torch.Generator().manual_seed(seed)
    state = EngramLayerState(keep=keep)
    outs = []
    with cpu_kernels.enabled(fused), torch.no_grad():
        for i in range(n):
            h = torch.randn(B, 1, cfg.hc_mult, cfg.hidden_size, generator=g)  # (B, 1, M, D)
            ids = torch.stack([torch.randint(0, s, (B, 1), generator=g) for s in eng.memory.sizes], -1)  # (B, 1, H)
            mask = (torch.rand(B, 1, generator=g) > 0.3) if masked else None
            outs.append(eng(h if cfg.hc_mult > 1 else h.squeeze(2), ids, state, mask))
    return torch.stack(outs), state.conv


VARIANTS = {
    "default": {},
    "hc_mult2": {"hc_mult": 2},
    "no_gate": {"use_gate": False},
    "no_conv": {"use_short_conv": False},
    "no_bias": {"value_bias": False},
    "kernel2": {"kernel_size": 2, "max_ngram_size": 2, "engram_vocab_size": [53]},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("B,keep,masked", [(1, False, False), (3, False, True), (2, True, True)])
def test_branch_kernel_equals_plain_path_over_steps(variant, B, keep, masked):
    eng = branch(**VARIANTS[variant])
    cfg = eng.config
    h = torch.randn(B, 1, cfg.hc_mult, cfg.hidden_size)
    ids = torch.zeros(B, 1, cfg.n_heads_total, dtype=torch.long)
    with torch.no_grad():
        assert cpu_kernels.engram_step(eng, h, ids, None, None, eng.lookup) is not None, "the kernel declined"
    got, got_state = steps(eng, True, 6, B, keep, masked)
    want, want_state = steps(eng, False, 6, B, keep, masked)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if cfg.use_short_conv:
        assert got_state.shape == want_state.shape
        torch.testing.assert_close(got_state, want_state, rtol=1e-5, atol=1e-6)
    else:
        assert got_state is None and want_state is None


def test_branch_kernel_on_offloaded_storage_equals_plain_path(tmp_path):
    from engram.offload import offload

    eng = branch()
    model_like = torch.nn.Sequential(eng)
    offload(model_like, "host")
    assert type(eng.memory).__name__ != "MultiHeadEmbedding"
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 1, 16, generator=g)
    ids = torch.stack([torch.randint(0, s, (2, 1), generator=g) for s in eng.memory.sizes], -1)
    calls = []

    def lookup(x):
        calls.append(x)
        return eng.lookup(x)

    with torch.no_grad():
        assert cpu_kernels.engram_step(eng, h.unsqueeze(2), ids, None, None, lookup) is not None
    assert len(calls) == 1  # the storage module looks up once
    got, _ = steps(eng, True, 4, 2, False, True)
    want, _ = steps(eng, False, 4, 2, False, True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_branch_kernel_steps_aside_for_autograd_hooks_and_bad_rows():
    eng = branch()
    h = torch.randn(1, 1, 1, 16)
    ids = torch.zeros(1, 1, eng.config.n_heads_total, dtype=torch.long)
    assert cpu_kernels.engram_step(eng, h, ids, None, None, eng.lookup) is None  # autograd on: plain path
    with torch.no_grad():
        eng.gate = lambda *a: Engram.gate(eng, *a)  # what `engram inspect` does
        assert cpu_kernels.engram_step(eng, h, ids, None, None, eng.lookup) is None
        del eng.gate
        handle = eng.value_proj.register_forward_hook(lambda *a: None)
        assert cpu_kernels.engram_step(eng, h, ids, None, None, eng.lookup) is None
        handle.remove()
        assert cpu_kernels.engram_step(eng, h.double(), ids, None, None, eng.lookup) is None
        bad = ids.clone()
        bad[0, 0, -1] = 10**6  # past the flat table: the plain path's IndexError, not a wild read
        assert cpu_kernels.engram_step(eng, h, bad, None, None, eng.lookup) is None
        with pytest.raises(IndexError):
            eng(h.squeeze(2), bad)
        assert cpu_kernels.engram_step(eng, h, ids[..., :-1], None, None, eng.lookup) is None  # wrong head count


def test_training_gradients_unchanged_by_kernels():
    """The kernels never run under autograd, so a training step is the plain one."""
    eng = branch()
    h = torch.randn(2, 1, 16, requires_grad=True)
    ids = torch.ones(2, 1, eng.config.n_heads_total, dtype=torch.long)
    grads = []
    for on in (True, False):
        with cpu_kernels.enabled(on):
            eng.zero_grad()
            h.grad = None
            eng(h, ids).square().sum().backward()
            grads.append([h.grad.clone()] + [p.grad.clone() for p in eng.parameters() if p.grad is not None])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_gpt_greedy_decode_same_tokens_with_and_without_kernels():
    eng = EngramConfig(hidden_size=32, hc_mult=2, layer_ids=[0, 1], max_ngram_size=3, n_embed_per_ngram=16,
                       n_head_per_ngram=4, engram_vocab_size=[211, 307], pad_id=1)
    torch.manual_seed(0)
    model = EngramGPT(GPTConfig(vocab_size=97, n_layer=2, n_head=2, n_embd=32, block_size=64, hc_mult=2, engram=eng),
                      tiny_tokenizer()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randint(0, 97, (3, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    out, logits = {}, {}
    for on in (True, False):
        with cpu_kernels.enabled(on), torch.no_grad():
            cache = model.new_cache()
            step, _ = model(x, cache=cache, attention_mask=mask)
            toks, steps_logits = [], []
            for _ in range(12):
                nxt = step[:, -1].argmax(-1, keepdim=True)  # (B, 1)
                toks.append(nxt)
                step, _ = model(nxt, cache=cache)
                steps_logits.append(step)
            out[on], logits[on] = torch.cat(toks, 1), torch.cat(steps_logits, 1)
    assert torch.equal(out[True], out[False])
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)


def test_branch_kernel_follows_weight_changes():
    """Weights edited in place, replaced, or converted: the kernel reads the current ones (or declines)."""
    eng = branch()
    g = torch.Generator().manual_seed(5)
    h = torch.randn(2, 1, 16, generator=g)
    ids = torch.stack([torch.randint(0, s, (2, 1), generator=g) for s in eng.memory.sizes], -1)

    def both():
        with torch.no_grad():
            with cpu_kernels.enabled(True):
                got = eng(h, ids)
            with cpu_kernels.enabled(False):
                want = eng(h, ids)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    both()
    with torch.no_grad():
        eng.value_proj.weight.mul_(2.0)  # in place (an optimizer step, load_state_dict)
        eng.memory.embedding.weight[:, 0] += 1.0
    both()
    eng.key_proj.weight = torch.nn.Parameter(torch.randn_like(eng.key_proj.weight))  # replaced
    both()
    eng.double()
    with torch.no_grad():
        assert cpu_kernels.engram_step(eng, h.double().unsqueeze(2), ids, None, None, eng.lookup) is None
        assert cpu_kernels.engram_step(eng, h.unsqueeze(2), ids, None, None, eng.lookup) is None  # float64 weights
    eng.float()
    both()


_DECODE_SNIPPET = """
import numpy as np, torch
from engram import EngramConfig
from engram.ops import cpu as cpu_kernels
from engram.nn.module import Engram, EngramLayerState
cfg = EngramConfig(hidden_size=16, layer_ids=[0], max_ngram_size=3, n_embed_per_ngram=8, n_head_per_ngram=2,
                   engram_vocab_size=[53, 59], pad_id=1)
eng = Engram(cfg, 0, [[53, 59], [61, 67]]).eval()
with torch.no_grad():
    y = eng(torch.randn(1, 1, 16), torch.zeros(1, 1, 4, dtype=torch.long), EngramLayerState())
print(cpu_kernels.available(), tuple(y.shape))
"""


def _run(env: dict) -> str:
    res = subprocess.run([sys.executable, "-c", _DECODE_SNIPPET], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_kernels_build_into_the_cache_dir_on_first_use(tmp_path):
    assert _run({"ENGRAM_CACHE_DIR": str(tmp_path)}) == "True (1, 1, 16)"
    assert len(list(tmp_path.glob("engram_cpu_*"))) == 1
    assert _run({"ENGRAM_CACHE_DIR": str(tmp_path)}) == "True (1, 1, 16)"  # reused, not rebuilt
    assert len(list(tmp_path.glob("engram_cpu_*"))) == 1


@pytest.mark.parametrize("env", [{"CC": "/nonexistent/cc"}, {"ENGRAM_CPU_KERNELS": "0"}])
def test_without_kernels_everything_runs_the_plain_path(tmp_path, env):
    assert _run({"ENGRAM_CACHE_DIR": str(tmp_path), **env}) == "False (1, 1, 16)"
