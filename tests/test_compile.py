"""``torch.compile`` is the fast path of the model code: compiled == eager, gradients included."""

from __future__ import annotations

import shutil

import pytest
import torch

from engram import EngramConfig
from helpers import tiny_gpt
from engram.nn.module import Engram, EngramLayerState

needs_cxx = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                               reason="torch.compile on CPU needs a C++ compiler")



@pytest.mark.slow
@needs_cxx
@pytest.mark.parametrize("fuse", [False, True])
def test_compiled_model_equals_eager_in_forward_and_cached_generate(fuse):
    """``model.compile(dynamic=True)``: same logits and tokens as eager, and bad ids still raise
    (from an assert inside the graph); ``fuse``: the decode recipe, ``fuse_projections()`` first."""
    import torch._dynamo

    torch._dynamo.reset()
    eager, compiled = tiny_gpt(True).eval(), tiny_gpt(True).eval()
    if fuse:
        compiled.fuse_projections()
    compiled.compile(dynamic=True)
    x = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x)[0], eager(x)[0], rtol=1e-5, atol=1e-5)
    want = eager.generate(x, 6, temperature=0)
    assert torch.equal(compiled.generate(x, 6, temperature=0), want)
    for bad in (97, -1):
        with pytest.raises((ValueError, RuntimeError), match="vocabulary size"):
            compiled(torch.full((1, 3), bad))
    torch._dynamo.reset()


@pytest.mark.slow
@needs_cxx
def test_a_decode_step_is_one_graph_with_the_hash_inside():
    """``fullgraph=True`` raises at any graph break: the id checks, masks and the N-gram hash of a
    prompt and of cached decode steps (with left padding) all trace into the step's graph, and
    the result equals eager, including the cache's n-gram history and conv state."""
    import torch._dynamo

    torch._dynamo.reset()
    eager = tiny_gpt(False).eval()
    step = torch.compile(eager, dynamic=True, fullgraph=True)
    x = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, :2] = 0  # row 0 left-padded
    with torch.inference_mode():
        ce, cc = eager.new_cache(), eager.new_cache()
        torch.testing.assert_close(step(x, cache=cc, attention_mask=mask)[0],
                                   eager(x, cache=ce, attention_mask=mask)[0], rtol=1e-5, atol=1e-5)
        for t in range(3):
            nxt = torch.tensor([[5 + t], [40 + t]])
            torch.testing.assert_close(step(nxt, cache=cc)[0], eager(nxt, cache=ce)[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(cc.history, ce.history)
        torch.testing.assert_close(cc.engram[1].conv, ce.engram[1].conv)
    torch._dynamo.reset()




def test_static_cache_decode_compiles_once_and_equals_eager():
    """With a static cache a compiled decode step has fixed shapes: one graph for the prompt, one
    for every decode step after it (``dynamic=False``: no recompile as the sequence grows, as
    CUDA graphs need), no graph break, and the logits, history and conv state equal eager."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    eager = tiny_gpt(False).eval()
    counter = CompileCounterWithBackend("inductor")
    step = torch.compile(eager, fullgraph=True, backend=counter)
    x = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(1))
    try:
        with torch.inference_mode():
            ce, cc = eager.new_cache(static=True, batch_size=2), eager.new_cache(static=True, batch_size=2)
            torch.testing.assert_close(step(x, cache=cc)[0], eager(x, cache=ce)[0], rtol=1e-5, atol=1e-5)
            for t in range(5):
                nxt = torch.tensor([[5 + t], [40 + t]])
                torch.testing.assert_close(step(nxt, cache=cc)[0], eager(nxt, cache=ce)[0], rtol=1e-5, atol=1e-5)
            assert counter.frame_count == 2  # the prompt's graph and the decode step's
            assert torch.equal(cc.history, ce.history) and torch.equal(cc.pos, ce.pos)
            torch.testing.assert_close(cc.engram[1].conv, ce.engram[1].conv)
            torch.testing.assert_close(cc.kv[1][0], ce.kv[1][0])
    finally:
        torch._dynamo.reset()


VARIANTS = {
    "default": {},
    "no_conv": {"use_short_conv": False, "value_bias": False},  # DeepSeek-V4.1's form
    "no_gate": {"use_gate": False},
    "hc2": {"hc_mult": 2},
    "lite": {"lite": True},
}


def branch(variant: str) -> Engram:
    kw = VARIANTS[variant]
    cfg = EngramConfig(hidden_size=16, layer_ids=[0], max_ngram_size=3, n_embed_per_ngram=16 if kw.get("lite") else 8,
                       n_head_per_ngram=2, engram_vocab_size=[53, 59], pad_id=1, **kw)
    torch.manual_seed(0)
    eng = Engram(cfg, 0, [[53, 59], [61, 67]])
    with torch.no_grad():  # non-trivial everywhere (the conv and value start at zero)
        for p in eng.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return eng


@needs_cxx
@pytest.mark.parametrize("variant", [pytest.param("default", marks=pytest.mark.slow), "no_conv",
                                     pytest.param("hc2", marks=pytest.mark.slow)])
def test_compiled_branch_equals_eager_with_gradients_and_state(variant):
    """The nanochat pattern: the fast path (here torch.compile of the formula) against the
    formula itself, outputs and every gradient, for a prefill and then decode steps with state.
    In float64: the signed square root's slope 1/(2 sqrt|z|) magnifies float32 reassociation
    differences near z = 0 beyond any useful float32 tolerance."""
    import torch._dynamo

    torch._dynamo.reset()
    eager = branch(variant).double()
    compiled = branch(variant).double()
    compiled.compile(dynamic=False)
    M = eager.config.hc_mult
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 6, M, 16, generator=g, dtype=torch.float64).requires_grad_()
    ids = torch.randint(0, 53, (2, 6, 4), generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :2] = False
    outs = []
    for mod in (eager, compiled):
        state = EngramLayerState()
        y = mod(h[:, :4], ids[:, :4], state, mask[:, :4])
        steps = [mod(h[:, t:t + 1], ids[:, t:t + 1], state, mask[:, t:t + 1]) for t in (4, 5)]
        out = torch.cat([y, *steps], dim=1)
        grads = torch.autograd.grad(out.square().sum(), [h, *mod.parameters()])
        outs.append((out, grads, state.conv))
    (a, ga, sa), (b, gb, sb) = outs
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    for x, y in zip(gb, ga):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-11)
    if sa is not None:
        torch.testing.assert_close(sb, sa, rtol=1e-10, atol=1e-12)
    torch._dynamo.reset()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_pieces_equal_whole_for_every_variant(variant):
    """Running a sequence in pieces with a decode state equals running it whole."""
    eng = branch(variant).eval()
    M = eng.config.hc_mult
    g = torch.Generator().manual_seed(2)
    h = torch.randn(3, 9, M, 16, generator=g)
    ids = torch.randint(0, 53, (3, 9, 4), generator=g)
    with torch.no_grad():
        whole = eng(h, ids)
        state = EngramLayerState()
        pieces = torch.cat([eng(h[:, a:b], ids[:, a:b], state) for a, b in ((0, 4), (4, 5), (5, 9))], dim=1)
    torch.testing.assert_close(pieces, whole, rtol=1e-5, atol=1e-6)


def test_short_conv_is_conv1d():
    """ShortConv's written-out taps equal F.conv1d over the causally padded input, with gradients."""
    import torch.nn.functional as F

    from engram.nn.module import ShortConv

    conv = ShortConv(8, 2, kernel_size=4, dilation=3, eps=1e-5)
    with torch.no_grad():
        conv.conv.weight.normal_()
        conv.norm_weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 11, 2, 8, requires_grad=True)
    got = conv(x)
    xn = F.rms_norm(x, (8,), eps=1e-5) * conv.norm_weight
    xn = F.pad(xn.reshape(2, 11, 16).transpose(1, 2), (conv.state_len, 0))  # (B, C, W+T)
    want = F.silu(F.conv1d(xn, conv.conv.weight, dilation=3, groups=16)).transpose(1, 2).view(2, 11, 2, 8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    params = [x, conv.conv.weight, conv.norm_weight]
    for a, b in zip(torch.autograd.grad(got.sum(), params), torch.autograd.grad(want.sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gate_values_are_read_with_an_ordinary_hook():
    eng = branch("hc2").eval()
    seen = []
    handle = eng.context_gate.register_forward_hook(lambda mod, args, out: seen.append(out))
    with torch.no_grad():
        eng(torch.randn(1, 5, 2, 16), torch.randint(0, 53, (1, 5, 4)))
    handle.remove()
    assert len(seen) == 1 and seen[0].shape == (1, 5, 2, 1)
    assert ((seen[0] > 0) & (seen[0] < 1)).all()


def test_half_precision_gate_does_not_overflow():
    eng = branch("default")
    e = torch.randn(1, 4, eng.config.memory_dim)
    h = torch.randn(1, 4, 1, 16) * 300  # sum of squares ~1.4e6 > float16's max
    k = eng.key_proj(e).view(1, 4, 1, 16)
    ref = eng.context_gate(k, h, eng.key_norm_weight, eng.query_norm_weight)
    half = eng.to(torch.float16)
    got = half.context_gate(k.half(), h.half(), half.key_norm_weight, half.query_norm_weight)
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), ref, rtol=0, atol=5e-3)
