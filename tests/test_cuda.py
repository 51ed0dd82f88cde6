"""The CUDA paths, against the CPU: training (dense and sparse tables, fp32 and bf16), the
compiled step, cached decoding, hashing of device ids, host-offloaded tables feeding a GPU
model, and no host synchronisation inside training or decode steps.

These run only where CUDA is (the device machine; see docs/performance.md "GPU"); the CPU CI
runs the same paths on the CPU in tests/test_training.py, tests/test_optim.py and
tests/test_compile.py, including the accelerator form of the sparse update
(``summed_rows(static_shape=True)``).
"""

from __future__ import annotations

import math

import pytest
import torch

from engram.training import data
from engram.training.loop import Trainer, TrainConfig

from helpers import make_text, tiny_gpt, tiny_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEV = "cuda"


def tiny_model(tok, sparse: bool) -> torch.nn.Module:
    from engram import EngramConfig, GPTConfig
    from engram.training.loop import build_model

    e = EngramConfig(hidden_size=32, layer_ids=[1], n_embed_per_ngram=32, n_head_per_ngram=2,
                     engram_vocab_size=[53, 53], pad_id=tok.eos_token_id, sparse_grad=sparse)
    return build_model(GPTConfig(vocab_size=len(tok), n_layer=2, n_head=2, n_embd=32, block_size=32, engram=e), tok, 0)


@pytest.fixture(scope="module")
def tok_ids():
    text = make_text()
    tok = data.train_bpe_tokenizer(text, 300)
    return tok, data.encode(tok, text)


def _trainer(tok, ids, device: str, sparse: bool, **cfg) -> Trainer:
    return Trainer(tiny_model(tok, sparse=sparse), data.TokenBatcher(ids, 8, 32, seed=1),
                   TrainConfig(lr=3e-3, warmup_steps=1, max_steps=100, batch_size=8, seq_len=32, **cfg),
                   device=device)


def _train(t: Trainer, steps: int) -> dict[str, torch.Tensor]:
    for _ in range(steps):
        t.train_step()
    t.sync()
    return {k: v.detach().float().cpu() for k, v in t.model.state_dict().items()}


@pytest.mark.parametrize("sparse", [False, True])
def test_training_on_cuda_matches_cpu(sparse, tok_ids):
    tok, ids = tok_ids
    tc, tg = _trainer(tok, ids, "cpu", sparse), _trainer(tok, ids, DEV, sparse)
    wc, wg = _train(tc, 4), _train(tg, 4)
    assert tg.losses == pytest.approx(tc.losses, rel=1e-4)
    assert tg.model.table_parameters()[0].device.type == "cuda"
    for k in wc:  # TF32 is off by default for matmuls in fp32; rounding of other kernels only
        torch.testing.assert_close(wg[k], wc[k], rtol=1e-4, atol=5e-5, msg=k)


@pytest.mark.parametrize("sparse", [False, True])
def test_training_steps_do_not_stall_the_host(sparse, tok_ids):
    """Between two loss read-backs a training step reads nothing back from the GPU (sparse
    table updates included: summed_rows keeps their shapes static)."""
    tok, ids = tok_ids
    t = _trainer(tok, ids, DEV, sparse)
    _train(t, 2)  # first steps allocate optimizer state
    t.sync_every = 100
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            t.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(t.losses) == 2
    t.sync()
    assert len(t.losses) == 5 and all(math.isfinite(v) for v in t.losses)
    assert all(s > 0 for s in t.step_times)  # CUDA event times


def test_bf16_autocast_on_cuda_trains_near_fp32(tok_ids):
    tok, ids = tok_ids
    t32, t16 = _trainer(tok, ids, DEV, True), _trainer(tok, ids, DEV, True, dtype="bf16")
    _train(t32, 3), _train(t16, 3)
    assert all(math.isfinite(v) for v in t16.losses)
    assert abs(t16.losses[0] - t32.losses[0]) < 0.05


def test_compiled_training_step_on_cuda_equals_eager(tok_ids):
    tok, ids = tok_ids
    te, tc = _trainer(tok, ids, DEV, True), _trainer(tok, ids, DEV, True, compile=True)
    we, wc = _train(te, 3), _train(tc, 3)
    assert tc.losses == pytest.approx(te.losses, rel=1e-4)
    for k in we:
        torch.testing.assert_close(wc[k], we[k], rtol=1e-4, atol=1e-4, msg=k)


def test_hashing_cuda_ids_equals_cpu_bit_for_bit():
    model = tiny_gpt(False)
    ids = torch.randint(0, 97, (3, 40), generator=torch.Generator().manual_seed(0))
    starts = torch.zeros(3, 40, dtype=torch.bool)
    starts[:, [0, 11, 27]] = True
    for kw in ({}, {"doc_starts": starts}):
        cpu = model.hashing.hash(ids, **kw)
        gpu = model.hashing.hash(ids.to(DEV), **{k: v.to(DEV) for k, v in kw.items()})
        assert set(cpu) == set(gpu)
        for layer in cpu:
            assert gpu[layer].device.type == "cuda" and torch.equal(gpu[layer].cpu(), cpu[layer])


def test_cached_decoding_on_cuda_equals_full_forward_and_cpu():
    model = tiny_gpt(False).eval()
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(3))
    out_cpu = model.generate(prompt, 12, temperature=0)
    model.to(DEV)
    out = model.generate(prompt.to(DEV), 12, temperature=0)
    assert torch.equal(out.cpu(), out_cpu)
    with torch.no_grad():
        full, _ = model(out[:, :-1])
        cache = model.new_cache()
        step_logits = [model(out[:, :5], cache=cache)[0]]
        for i in range(5, out.shape[1] - 1):
            step_logits.append(model(out[:, i : i + 1], cache=cache)[0])
    torch.testing.assert_close(torch.cat(step_logits, 1), full, rtol=1e-4, atol=1e-4)


def test_decode_step_does_not_stall_the_host():
    """A decode step (id checks off on accelerators, the hash, the lookup, the cache update)
    reads nothing back, so CUDA graphs can capture it."""
    model = tiny_gpt(False).eval().to(DEV)
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(3)).to(DEV)
    with torch.inference_mode():
        cache = model.new_cache()
        logits, _ = model(prompt, cache=cache)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        model(nxt, cache=cache)  # warm
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                logits, _ = model(nxt, cache=cache)
                nxt = logits[:, -1].argmax(-1, keepdim=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_host_offloaded_tables_feed_a_cuda_model_exactly():
    from engram.offload import offload

    ref = tiny_gpt(False).to(DEV)
    host = tiny_gpt(False).to(DEV)
    offload(host, "host", cache_rows=64)
    mem = host.blocks[1].engram.memory
    assert mem.table_weight is None or mem.table_weight.device.type == "cpu"
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(5)).to(DEV)
    with torch.no_grad():
        a, _ = ref(ids)
        b, _ = host(ids)
        c, _ = host(ids)  # from the hot-row cache
    assert torch.equal(a, b) and torch.equal(a, c)


def test_compress_cuda_ids_equals_cpu():
    """The compression table moves to the ids' device; the gather equals the CPU one."""
    ct = tiny_tokenizer()
    ids = torch.arange(97).view(1, -1)
    assert torch.equal(ct.compress(ids.to(DEV)).cpu(), ct.compress(ids))


def test_compiled_decode_on_cuda_is_one_graph_without_host_syncs():
    """``fullgraph=True`` on CUDA: the prompt and cached decode steps (hash, lookup, gate, conv,
    cache update) trace into one graph each, equal eager, and the compiled steps read nothing
    back to the host, so ``mode="reduce-overhead"`` can capture them as CUDA graphs."""
    import torch._dynamo

    torch._dynamo.reset()
    eager = tiny_gpt(False).eval().to(DEV)  # the move puts the hash constants on the GPU
    step = torch.compile(eager, dynamic=True, fullgraph=True)
    x = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(1)).to(DEV)
    try:
        with torch.inference_mode():
            ce, cc = eager.new_cache(), eager.new_cache()
            torch.testing.assert_close(step(x, cache=cc)[0], eager(x, cache=ce)[0], rtol=1e-4, atol=1e-4)
            for t in range(5):
                nxt = torch.tensor([[5 + t], [40 + t]], device=DEV)
                if t >= 2:  # compiled by now (steps 0-1 may compile): no synchronisation inside
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    got = step(nxt, cache=cc)[0]
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                torch.testing.assert_close(got, eager(nxt, cache=ce)[0], rtol=1e-4, atol=1e-4)
            assert torch.equal(cc.history, ce.history)
            torch.testing.assert_close(cc.engram[1].conv, ce.engram[1].conv, rtol=1e-4, atol=1e-4)
    finally:
        torch._dynamo.reset()


def test_reduce_overhead_generate_on_cuda_equals_eager():
    """``model.compile(mode="reduce-overhead")`` (CUDA graphs) with ``generate(static_cache=True)``
    decodes the same greedy tokens as eager, on the recording call and on replaying ones."""
    import torch._dynamo

    torch._dynamo.reset()
    model = tiny_gpt(False).eval().to(DEV)
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(3)).to(DEV)
    want = model.generate(prompt, 10, temperature=0)
    assert torch.equal(model.generate(prompt, 10, temperature=0, static_cache=True), want)  # eager, static
    try:
        model.compile(mode="reduce-overhead")  # static shapes: one graph for the prompt, one per decode step
        runs = [model.generate(prompt, 10, temperature=0, static_cache=True) for _ in range(3)]
        assert all(torch.equal(r, want) for r in runs)
    finally:
        torch._dynamo.reset()
