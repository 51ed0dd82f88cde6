"""Fast paths of issue #5 against their plain paths (no timing asserts: see benchmarks/ and `engram bench`).

- hashing: fast exact modulo == int64 ``torch.remainder`` on random and adversarial int64 mixes,
  and fast == plain == the NumPy oracle (benchmarks/numpy_hash.py) on ids;
- ShortConv: shifted multiply-adds == ``F.conv1d``, outputs and gradients, whole and in pieces;
- tables: SparseAdam == dense Adam on rows touched at every step, and the documented lazy
  difference on rows skipped at a step; RowSparseAdam == SparseAdam bit for bit;
  ``build_optimizer`` picks RowSparseAdam for sparse tables;
- ``clip_grad_norm_`` with sparse gradients == clipping the densified gradients.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from engram import EngramConfig
from engram.ops import cpu as cpu_kernels
from engram.cli.bench import numpy_hash
from engram.core.hashing import NgramHashMapping, split_plan
from engram.models.gpt import EngramGPT, GPTConfig
from engram.nn.module import Engram, EngramLayerState, ShortConv
from engram.training.optim import RowSparseAdam, build_optimizer, clip_grad_norm_, optimizer_state_bytes
from engram.core.tokenizer import CompressedTokenizer

ROOT = Path(__file__).resolve().parents[1]
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def tiny_tokenizer(vocab: int = 97) -> CompressedTokenizer:
    """A compressed tokenizer without HF: raw id i -> canonical i // 2 (pairs merge, as casing does)."""
    return CompressedTokenizer(lookup_table=np.arange(vocab, dtype=np.int64) // 2)


def mapping(sizes=(211, 307), max_ngram: int = 3, **kw) -> NgramHashMapping:
    cfg = EngramConfig(hidden_size=32, layer_ids=[0, 2], max_ngram_size=max_ngram, n_embed_per_ngram=16,
                       n_head_per_ngram=4, engram_vocab_size=list(sizes), pad_id=1, seed=3, **kw)
    return NgramHashMapping(cfg, tiny_tokenizer())


# ---------------------------------------------------------------------------------- hashing
def adversarial_mixes(n_random: int = 4000) -> torch.Tensor:
    edges = [0, 1, -1, 2, -2, INT64_MIN, INT64_MIN + 1, INT64_MAX, INT64_MAX - 1]
    for b in range(1, 63):  # around every power of two, both signs, and chunk boundaries
        for d in (-1, 0, 1):
            edges += [2**b + d, -(2**b) + d]
    edges = [min(max(e, INT64_MIN), INT64_MAX) for e in edges]
    g = torch.Generator().manual_seed(0)
    rand = torch.randint(INT64_MIN, INT64_MAX, (n_random,), generator=g, dtype=torch.long)
    return torch.cat([torch.tensor(edges, dtype=torch.long), rand])


@pytest.mark.parametrize("sizes", [(211, 307), (646_400, 646_400), (2**29, 2**30), (2**33, 2**34)])
def test_fast_residues_equal_remainder_on_adversarial_int64(sizes):
    m = mapping(sizes)
    assert m.fast_widths is not None
    vals = adversarial_mixes()
    primes = m._constants(torch.device("cpu"))["primes"]  # (L, 1, 1, O, K)
    L, O, K = primes.shape[0], primes.shape[3], primes.shape[4]
    # Also multiples of each prime and their neighbours: residues 0 and p-1.
    p = primes.flatten()
    near = torch.cat([p * 12345 + d for d in (-1, 0, 1)] + [-(p * 777) + d for d in (-1, 0, 1)])
    vals = torch.cat([vals, near])
    mixes = vals.view(1, -1, 1).expand(L, -1, O).contiguous()  # (L, n, O)
    fast = m.residues(mixes, "fast")
    plain = m.residues(mixes, "plain")
    assert torch.equal(fast, plain)
    # the scalar (Python int) path on ids that reach the extremes: compressed ids are free int64
    x = vals[:64].view(4, 16)
    a, b = m.hash_compressed(x, method="scalar"), m.hash_compressed(x, method="plain")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and against Python's exact big-int modulo for a sample
    pl = primes.view(L, O, K)
    for i in range(0, vals.numel(), 97):
        v = int(vals[i])
        assert int(fast[0, i, 1, 2]) == v % int(pl[0, 1, 2])


def test_split_plan_limits():
    assert split_plan(646_403) == (20, 44)
    assert split_plan(2**33) == (12, 12, 40)
    assert split_plan(2**40) is None  # too big: the plain path is used
    big = mapping((2**40, 2**40))
    assert big.fast_widths is None
    ids = torch.randint(0, 97, (2, 600))
    assert all(torch.equal(a, b) for a, b in zip(big.hash(ids).values(), big.hash(ids, method="plain").values()))
    with pytest.raises(ValueError, match="method"):
        big.hash(ids, method="fast-ish")


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (2, 700), (4, 0)])
def test_fast_hash_equals_plain_and_numpy_oracle(shape):
    m = mapping((5003, 7001))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, shape, generator=g)
    methods = ("fast", "plain", "scalar", "auto") + (("kernel",) if cpu_kernels.available() else ())
    paths = {k: m.hash(ids, method=k) for k in methods}
    ref = numpy_hash(m, ids.numpy())
    for lid in m.layer_ids:
        assert paths["fast"][lid].shape == (*shape, m.config.n_heads_total)
        for k in methods:
            assert torch.equal(paths[k][lid], paths["plain"][lid]), k
        assert np.array_equal(paths["fast"][lid].numpy(), ref[lid])
    # with a history: the second half hashed after the first equals hashing it whole
    if shape[1] > 2:
        comp = m.compress(ids)
        t = shape[1] // 2
        hist = m.next_history(None, comp[:, :t])
        tail = m.hash_compressed(comp[:, t:], hist, method="fast")
        for lid in m.layer_ids:
            assert torch.equal(tail[lid], paths["plain"][lid][:, t:])


def test_hash_checks_ids_on_cpu_and_negative_ids_pass_through():
    m = mapping()
    with pytest.raises(ValueError, match="97"):
        m.hash(torch.tensor([[1, 97]]))
    ids = torch.tensor([[3, -5, 7, 9]])
    comp = m.compress(ids)
    assert comp.tolist() == [[1, -5, 3, 4]]
    a, b = m.hash(ids, method="fast"), m.hash(ids, method="plain")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("B,T", [(1, 1), (2, 3), (3, 5), (4, 40)])  # the last is past the scalar path
def test_hash_step_equals_compress_mask_hash_and_history(B, T):
    m = mapping()
    g = torch.Generator().manual_seed(B * 100 + T)
    ids = torch.randint(0, 97, (B, T), generator=g)
    ids[0, 0] = -4  # negative ids pass through, as in compress
    mask = torch.rand(B, T, generator=g) > 0.3
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


def test_fast_constants_survive_dtype_casts():
    """model.to(bfloat16) must not round the fast path's float64 constants."""
    m = mapping((646_400, 646_400))
    ids = torch.randint(0, 97, (2, 600))
    before = m.hash(ids, method="fast")
    m.to(torch.bfloat16)
    after = m.hash(ids, method="fast")
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------------- short conv
@pytest.mark.parametrize("hc_mult", [1, 2])
def test_conv_taps_equal_conv1d_with_gradients_and_state(hc_mult):
    torch.manual_seed(0)
    D, K, dil = 8, 4, 3
    taps = ShortConv(D, hc_mult, K, dil, 1e-5, method="taps")
    plain = ShortConv(D, hc_mult, K, dil, 1e-5, method="conv")
    with torch.no_grad():
        taps.conv.weight.normal_()
        taps.norm_weight.uniform_(0.5, 1.5)
    plain.load_state_dict(taps.state_dict())
    x = torch.randn(2, 11, hc_mult, D, requires_grad=True)
    y1, y2 = taps(x), plain(x)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y1)
    gx1, gw1, gn1 = torch.autograd.grad(y1, (x, taps.conv.weight, taps.norm_weight), g)
    gx2, gw2, gn2 = torch.autograd.grad(y2, (x, plain.conv.weight, plain.norm_weight), g)
    for a, b in ((gx1, gx2), (gw1, gw2), (gn1, gn2)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # decode: pieces with state == whole (a one-token step sums its taps in one reduction: float
    # reassociation only)
    st = EngramLayerState()
    pieces = torch.cat([taps(x[:, :5], st), taps(x[:, 5:6], st), taps(x[:, 6:7], st), taps(x[:, 7:], st)], 1)
    torch.testing.assert_close(pieces, y1, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="method"):
        ShortConv(D, 1, K, dil, 1e-5, method="fft")


# ---------------------------------------------------------------------------------- tables
def _table_pair(sparse: bool, seed: int = 0) -> nn.Embedding:
    torch.manual_seed(seed)
    return nn.Embedding(50, 4, sparse=sparse)


def _adam_steps(sparse: bool, batches: list[torch.Tensor]) -> torch.Tensor:
    emb = _table_pair(sparse)
    opt = (torch.optim.SparseAdam if sparse else torch.optim.Adam)(emb.parameters(), lr=0.1, betas=(0.9, 0.95))
    target = torch.linspace(-1, 1, 4)
    for idx in batches:
        opt.zero_grad()
        ((emb(idx) - target) ** 2).sum().backward()
        opt.step()
    return emb.weight.detach()


def test_sparse_adam_equals_dense_adam_on_rows_touched_every_step():
    idx = torch.tensor([[3, 7, 7, 11], [3, 40, 2, 2]])  # duplicates accumulate, as in a batch
    dense, sparse = _adam_steps(False, [idx] * 4), _adam_steps(True, [idx] * 4)
    torch.testing.assert_close(sparse, dense, rtol=1e-6, atol=1e-7)
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[idx.flatten()] = False
    assert torch.equal(sparse[untouched], _table_pair(True).weight.detach()[untouched])


def test_sparse_adam_is_lazy_on_rows_skipped_at_a_step():
    """Documented difference: a row skipped at a step keeps its value under lazy Adam, while
    dense Adam still moves it with its decaying momentum."""
    a, b = torch.tensor([[1, 2]]), torch.tensor([[5, 6]])
    dense, sparse = _adam_steps(False, [a, b]), _adam_steps(True, [a, b])
    torch.testing.assert_close(sparse[5:7], dense[5:7], rtol=1e-6, atol=1e-7)  # same first update
    after_one = _adam_steps(True, [a])
    torch.testing.assert_close(sparse[1:3], after_one[1:3], rtol=0, atol=0)  # lazy: untouched at step 2
    assert not torch.allclose(dense[1:3], after_one[1:3])  # dense: moved by momentum


@pytest.mark.parametrize("maximize", [False, True])
def test_row_sparse_adam_is_bit_identical_to_sparse_adam(maximize):
    """Same update, state and state-dict format as torch.optim.SparseAdam, over steps with
    duplicate rows, empty steps, a changed lr, and a state dict moved between the two."""
    torch.manual_seed(0)
    a, b = nn.Embedding(300, 8, sparse=True), nn.Embedding(300, 8, sparse=True)
    b.load_state_dict(a.state_dict())
    kw = {"lr": 0.05, "betas": (0.8, 0.95), "eps": 1e-6, "maximize": maximize}
    oa, ob = torch.optim.SparseAdam(a.parameters(), **kw), RowSparseAdam(b.parameters(), **kw)
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        idx = torch.randint(0, 300, (4, 50), generator=g)  # many duplicates
        target = torch.randn(8, generator=g)
        for emb, opt in ((a, oa), (b, ob)):
            opt.zero_grad()
            loss = ((emb(idx) - target) ** 2).sum() if step != 3 else emb(idx[:, :0]).sum()  # step 3: no rows
            loss.backward()
            opt.step()
        if step == 4:
            for opt in (oa, ob):
                opt.param_groups[0]["lr"] = 0.01
        assert torch.equal(a.weight, b.weight), step
        for key in ("exp_avg", "exp_avg_sq", "step"):
            sa, sb = oa.state[a.weight][key], ob.state[b.weight][key]
            assert torch.equal(sa, sb) if torch.is_tensor(sa) else sa == sb
    oa2 = torch.optim.SparseAdam(a.parameters(), **kw)
    oa2.load_state_dict(ob.state_dict())  # a RowSparseAdam checkpoint resumes under SparseAdam
    assert oa2.state[a.weight]["step"] == ob.state[b.weight]["step"]
    with pytest.raises(RuntimeError, match="row-sparse"):
        w = nn.Parameter(torch.zeros(3, 2))
        w.grad = torch.ones(3, 2)
        RowSparseAdam([w]).step()


def tiny_gpt(sparse: bool) -> EngramGPT:
    eng = EngramConfig(hidden_size=32, layer_ids=[1], max_ngram_size=3, n_embed_per_ngram=16, n_head_per_ngram=4,
                       engram_vocab_size=[211, 307], pad_id=1, sparse_grad=sparse)
    torch.manual_seed(0)
    return EngramGPT(GPTConfig(vocab_size=97, n_layer=2, n_head=2, n_embd=32, block_size=32, engram=eng),
                     tiny_tokenizer())


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_model_equals_eager_in_forward_and_cached_generate():
    """``model.compile(dynamic=True)``: one graph break (id checks + hash), same logits and tokens."""
    import torch._dynamo

    torch._dynamo.reset()
    eager, compiled = tiny_gpt(True).eval(), tiny_gpt(True).eval()
    compiled.compile(dynamic=True)
    x = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x)[0], eager(x)[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(compiled.generate(x, 6, temperature=0), eager.generate(x, 6, temperature=0))
    with pytest.raises(ValueError, match="vocabulary size"):  # checks still run eagerly
        compiled(torch.full((1, 3), 97))
    torch._dynamo.reset()


def test_build_optimizer_uses_row_sparse_adam_for_sparse_tables_and_state_bytes():
    x = torch.randint(0, 97, (2, 16))
    for sparse in (False, True):
        model = tiny_gpt(sparse)
        opts = build_optimizer(model, 1e-3, weight_decay=0.1, table_lr_mult=5.0)
        kinds = [type(o).__name__ for o in opts]
        assert kinds == ["AdamW", "RowSparseAdam" if sparse else "Adam"]
        assert opts[1].param_groups[0]["lr"] == pytest.approx(5e-3)
        assert opts[1].param_groups[0]["base_lr"] == pytest.approx(5e-3)
        _, loss = model(x, x)
        loss.backward()
        table = model.table_parameters()[0]
        assert table.grad.is_sparse == sparse
        for o in opts:
            o.step()
        rows, d = table.shape
        # two fp32 moments per entry (+ a step counter): 2 * d * 4 bytes per row
        assert optimizer_state_bytes(opts[1]) - 2 * rows * d * 4 in range(0, 64)


def test_clip_grad_norm_with_sparse_grads_equals_dense_clipping():
    torch.manual_seed(0)
    ws = nn.Parameter(torch.randn(20, 3))
    wd = nn.Parameter(torch.randn(5))
    idx = torch.tensor([1, 4, 4, 9])
    loss = (F.embedding(idx, ws, sparse=True) ** 2).sum() + (wd**3).sum()
    loss.backward()
    dense_ws = ws.grad.to_dense().clone()
    dense_wd = wd.grad.clone()
    expect_norm = math.sqrt(float((dense_ws**2).sum() + (dense_wd**2).sum()))
    total = clip_grad_norm_([ws, wd], max_norm=1.0)
    assert float(total) == pytest.approx(expect_norm, rel=1e-5)
    scale = 1.0 / (expect_norm + 1e-6)
    torch.testing.assert_close(ws.grad.to_dense(), dense_ws * scale)
    torch.testing.assert_close(wd.grad, dense_wd * scale)
    # below the limit: unchanged
    assert float(clip_grad_norm_([ws, wd], max_norm=100.0)) == pytest.approx(1.0, rel=1e-4)


def test_sparse_and_dense_tables_train_the_same_first_step():
    """Same update on the model's tables where the gradient is well above eps. Known convention
    difference: Adam adds eps after the bias correction of v (``sqrt(v / bc2) + eps``),
    SparseAdam before (``(sqrt(v) + eps) / sqrt(bc2)``), so small gradients differ slightly."""
    x = torch.randint(0, 97, (2, 16))
    out, grads, init = [], [], None
    for sparse in (False, True):
        model = tiny_gpt(sparse)
        init = model.table_parameters()[0].detach().clone()
        opts = build_optimizer(model, 1e-2)
        _, loss = model(x, x)
        loss.backward()
        g = model.table_parameters()[0].grad
        grads.append(g.to_dense() if g.is_sparse else g.clone())
        for o in opts:
            o.step()
        out.append(model.table_parameters()[0].detach().clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    clear = grads[0].abs() > 1e-3
    assert clear.sum() > 50
    torch.testing.assert_close(out[0][clear], out[1][clear], rtol=1e-4, atol=1e-6)
    untouched = (grads[0] == 0).all(-1)
    assert torch.equal(out[1][untouched], init[untouched]) and torch.equal(out[0][untouched], init[untouched])


# ---------------------------------------------------------------------------------- engram bench
def test_engram_bench_quick_writes_json_markdown_and_plots(tmp_path, capsys):
    from engram.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "--out", str(out), "--quick", "--reps", "1", "--threads", "1"]) == 0
    r = json.loads((out / "bench.json").read_text())
    assert set(r) >= {"machine", "settings", "seq", "hashing", "lookup", "table", "decode", "plots"}
    assert r["hashing"]["bit_exact"] is True
    assert [row["T"] for row in r["seq"]["rows"]] == r["settings"]["seqs"]
    assert r["seq"]["params"]["engram"]["table"] > 0 and r["seq"]["params"]["base"]["table"] == 0
    assert set(r["table"]["modes"]) == {"sparse", "dense"}
    assert r["decode"]["tok_s"]["engram"] > 0 and r["lookup"]["gb_s"]["memcpy"] > 0
    md = (out / "bench.md").read_text()
    assert "| sparse | 10x |" in md and "Mtok/s" in md
    for f in r["plots"]:
        assert (out / f).read_bytes()[:4] == b"\x89PNG"
    assert main(["bench", "--out", str(out), "--only", "hashing,nope"]) == 2
    assert "unknown sections" in capsys.readouterr().err


@pytest.mark.parametrize("T", [1, 3, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_factored_gate_equals_normalise_then_dot_with_gradients(T, dtype):
    """The gate's factored form against DESIGN.md §3 as written: RMSNorm both, dot, signed sqrt."""
    cfg = EngramConfig(hidden_size=16, hc_mult=2, layer_ids=[0], max_ngram_size=3, n_embed_per_ngram=8,
                       n_head_per_ngram=2, engram_vocab_size=[31, 37])
    torch.manual_seed(0)
    mod = Engram(cfg, 0, [[37, 41], [43, 47]]).to(dtype)
    with torch.no_grad():
        mod.key_norm_weight.uniform_(0.5, 1.5)
        mod.query_norm_weight.uniform_(-1.5, 1.5)
    e = torch.randn(2, T, cfg.memory_dim, dtype=dtype, requires_grad=True)
    h = (torch.randn(2, T, 2, 16, dtype=dtype) * 3).requires_grad_()

    def plain():
        k = F.rms_norm(mod.key_proj(e).view(2, T, 2, 16), (16,)) * mod.key_norm_weight
        q = F.rms_norm(h, (16,)) * mod.query_norm_weight
        z = (k * q).sum(-1, keepdim=True) / math.sqrt(16)
        return torch.sigmoid(z.abs().clamp_min(1e-6).sqrt() * z.sign())

    got, expect = mod.gate(e, h), plain()
    tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(got, expect, **tol)
    g = torch.randn_like(got)
    params = (e, h, mod.key_proj.weight, mod.key_norm_weight, mod.query_norm_weight)
    rel = 2e-5 if dtype == torch.float32 else 1e-10  # of the largest entry: sums over 2*T tokens reassociate
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(plain(), params, g)):
        assert (a - b).abs().max() <= rel * b.abs().max(), (a - b).abs().max()


@pytest.mark.parametrize("shape", [(1, 1, 1, 16), (2, 3, 2, 16), (4, 40, 2, 16)])  # the last: F.rms_norm path
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_rms_norm_composite_equals_f_rms_norm_with_gradients(shape, dtype):
    from engram.nn.module import rms_norm

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g, dtype=dtype) * 3).requires_grad_()
    for weight in (None, torch.rand(16, generator=g, dtype=dtype).requires_grad_(),
                   torch.rand(2, 16, generator=g, dtype=dtype).requires_grad_()):
        if weight is not None and weight.dim() == 2 and shape[2] != 2:
            continue
        got = rms_norm(x, weight, 1e-5)
        want = F.rms_norm(x, (16,), eps=1e-5) * (1 if weight is None else weight)
        tol = {"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
        torch.testing.assert_close(got, want, **tol)
        params = (x,) if weight is None else (x, weight)
        grad = torch.randn(got.shape, generator=g, dtype=dtype)
        for a, b in zip(torch.autograd.grad(got, params, grad), torch.autograd.grad(want, params, grad)):
            torch.testing.assert_close(a, b, rtol=1e-5 if dtype == torch.float32 else 1e-10,
                                       atol=1e-5 if dtype == torch.float32 else 1e-10)


def test_training_after_generate_works():
    """Constants cached during an inference-mode generate must not leak into autograd."""
    model = tiny_gpt(True)
    x = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    model.generate(x[:, :4], 3, temperature=0)  # runs under torch.inference_mode
    opts = build_optimizer(model, 1e-3)
    _, loss = model(x, x)
    loss.backward()
    for o in opts:
        o.step()
    assert torch.isfinite(loss) and model.table_parameters()[0].grad is not None


def test_factored_gate_half_precision_does_not_overflow():
    cfg = EngramConfig(hidden_size=64, layer_ids=[0], max_ngram_size=2, n_embed_per_ngram=16,
                       n_head_per_ngram=2, engram_vocab_size=[31])
    torch.manual_seed(0)
    mod = Engram(cfg, 0, [[37, 41]])
    e = torch.randn(1, 4, cfg.memory_dim)
    h = torch.randn(1, 4, 1, 64) * 100  # sum of squares ~6e5 > float16's max
    ref = mod.gate(e, h)
    got = mod.to(torch.float16).gate(e.half(), h.half())
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), ref, rtol=0, atol=5e-3)


def test_docs_performance_example_runs():
    import re

    text = (ROOT / "docs" / "performance.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/performance.md[python block {i}]", "exec"), {"__name__": "__docs__"})
