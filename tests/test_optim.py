"""Optimizers for tables: SparseAdam == dense Adam on rows touched at every step (and the documented
lazy difference on rows skipped), RowSparseAdam == SparseAdam bit for bit, ``build_optimizer``'s
groups, ``clip_grad_norm_`` with sparse gradients == clipping the densified gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from helpers import tiny_gpt
from engram.training import optim
from engram.training.optim import RowSparseAdam, build_optimizer, clip_grad_norm_, optimizer_state_bytes, summed_rows



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


def _lookup_grad(idx: torch.Tensor, rows: int = 300, d: int = 8) -> torch.Tensor:
    w = nn.Parameter(torch.zeros(rows, d))
    (F.embedding(idx, w, sparse=True) * torch.randn(*idx.shape, d, generator=torch.Generator().manual_seed(2))).sum().backward()
    return w.grad  # uncoalesced: one entry per lookup


def test_summed_rows_static_shape_sums_duplicates_like_coalesce():
    """The accelerator form (no data-dependent shape, so no host stall) holds the same rows, in
    the same order, and sums as coalesce(), and its unused slots scatter nothing."""
    for idx in (torch.randint(0, 300, (4, 50), generator=torch.Generator().manual_seed(1)),  # many duplicates
                torch.arange(7), torch.tensor([5, 5, 5]), torch.zeros(0, dtype=torch.long)):
        grad = _lookup_grad(idx)
        assert not grad.is_coalesced() or idx.numel() == 0
        rows, values, live = summed_rows(grad, static_shape=True)
        c = grad.coalesce()
        k = c._indices().shape[1]
        assert rows.shape[0] == idx.numel() and values.shape == (idx.numel(), 8)  # shape from the input alone
        if idx.numel():
            assert live[:k].eq(1).all() and live[k:].eq(0).all()
            assert torch.equal(rows[:k], c._indices()[0])
            torch.testing.assert_close(values[:k], c._values(), rtol=1e-6, atol=1e-6)  # summation order aside
            assert values[k:].eq(0).all()
        dense = torch.zeros(300, 8).index_add_(0, rows, values * (1 if live is None else live))
        torch.testing.assert_close(dense, grad.to_dense(), rtol=1e-6, atol=1e-6)


def test_row_sparse_adam_static_shape_path_equals_coalesced_path(monkeypatch):
    """RowSparseAdam and clipping through the accelerator form train the same table as the CPU
    form (to float rounding: the sums run in another order), here on a CPU (tests/test_cuda.py runs it where it is the default)."""
    def train(static: bool) -> tuple[torch.Tensor, dict]:
        monkeypatch.setattr(optim, "summed_rows", lambda g, static_shape=None: summed_rows(g, static))
        torch.manual_seed(0)
        emb = nn.Embedding(300, 8, sparse=True)
        opt = RowSparseAdam(emb.parameters(), lr=0.05, betas=(0.8, 0.95))
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            idx = torch.randint(0, 300, (4, 50), generator=g)
            opt.zero_grad()
            ((emb(idx) - torch.randn(8, generator=g)) ** 2).sum().backward()
            clip_grad_norm_(list(emb.parameters()), 1.0)
            opt.step()
        return emb.weight.detach(), opt.state[emb.weight]

    (w0, s0), (w1, s1) = train(False), train(True)
    torch.testing.assert_close(w1, w0, rtol=1e-6, atol=1e-7)  # clipping scales before vs after summing
    torch.testing.assert_close(s1["exp_avg_sq"], s0["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    assert s1["step"] == s0["step"] == 5


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


