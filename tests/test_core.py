"""Core library: exact addressing, module variants, decode state, EngramGPT, validation."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from engram import (CompressedTokenizer, Engram, EngramConfig, EngramGPT, EngramLayerState,
                    GPTConfig, NgramHashMapping)


def ref_config(case, **kw) -> EngramConfig:
    c = case["config"]
    return EngramConfig(
        hidden_size=32, engram_vocab_size=c["engram_vocab_size"], max_ngram_size=c["max_ngram_size"],
        n_head_per_ngram=c["n_head_per_ngram"], n_embed_per_ngram=4 * c["n_head_per_ngram"],
        layer_ids=c["layer_ids"], pad_id=c["pad_id"], seed=c["seed"], **kw,
    )


def small_config(**kw) -> EngramConfig:
    base = dict(hidden_size=32, layer_ids=[0, 2], max_ngram_size=3, n_embed_per_ngram=16, n_head_per_ngram=4,
                engram_vocab_size=[211, 307], pad_id=1, seed=3)
    base.update(kw)
    return EngramConfig(**base)


# ---------------------------------------------------------------------------------- addressing
def test_reference_vectors_bit_exact(ref_tokenizer, ref_vectors):
    for case in ref_vectors:
        mapping = NgramHashMapping(ref_config(case), ref_tokenizer)
        assert mapping.compressed.lookup_table.tolist() == case["lookup_table"]
        assert len(mapping.compressed) == case["compressed_vocab_size"]
        assert mapping.pad_id == case["pad_id_compressed"]
        for lid in case["config"]["layer_ids"]:
            assert mapping.multipliers[lid] == case["layer_multipliers"][str(lid)]
            assert mapping.table_sizes[lid] == case["head_table_sizes"][str(lid)]
        ids = torch.tensor(case["input_ids"])
        for inp in (ids, ids.numpy(), ids.to(torch.int32)):
            out = mapping.hash(inp)
            for lid in case["config"]["layer_ids"]:
                assert out[lid].dtype == torch.int64
                assert out[lid].tolist() == case["hash_ids"][str(lid)], lid


def test_hash_with_history_equals_full(ref_tokenizer, ref_vectors):
    case = ref_vectors[1]
    mapping = NgramHashMapping(ref_config(case), ref_tokenizer)
    ids = torch.tensor(case["input_ids"])
    full = mapping.hash(ids)
    history = None
    pieces = {lid: [] for lid in mapping.layer_ids}
    for s, e in [(0, 1), (1, 2), (2, 7), (7, 100), (100, ids.shape[1])]:
        comp = mapping.compress(ids[:, s:e])
        out = mapping.hash_compressed(comp, history)
        history = mapping.next_history(history, comp)
        for lid in pieces:
            pieces[lid].append(out[lid])
    for lid in pieces:
        assert torch.equal(torch.cat(pieces[lid], 1), full[lid])


def test_compressed_tokenizer_roundtrip_and_types(ref_tokenizer):
    ct = CompressedTokenizer(ref_tokenizer)
    again = CompressedTokenizer.from_state_dict(ct.state_dict())
    assert np.array_equal(again.lookup_table, ct.lookup_table) and again.fingerprint() == ct.fingerprint()
    ids = np.array([[0, 5, -1, 4095]])
    out = ct(ids)
    assert isinstance(out, np.ndarray) and out[0, 2] == -1 and out[0, 1] == ct.lookup_table[5]
    tout = ct(torch.from_numpy(ids))
    assert isinstance(tout, torch.Tensor) and tout.tolist() == out.tolist()
    state = ct.state_dict()
    state["lookup_table"][3] += 1
    with pytest.raises(ValueError, match="corrupt"):
        CompressedTokenizer.from_state_dict(state)


def test_compression_merges_case_and_space_variants(ref_tokenizer):
    ct = CompressedTokenizer(ref_tokenizer)
    # Any two raw ids whose decoded text normalises equal must share a canonical id.
    a = ref_tokenizer.convert_tokens_to_ids("the")
    b = ref_tokenizer.convert_tokens_to_ids("Ġthe")
    if a is not None and b is not None and ref_tokenizer.unk_token_id not in (a, b):
        assert ct.lookup_table[a] == ct.lookup_table[b]
    assert len(ct) < ct.raw_vocab_size


@pytest.mark.slow  # a fresh Python process (~5 s): CI runs it after the default tests
def test_hashing_determinism_across_processes(ref_tokenizer):
    code = (
        "import torch, sys; from transformers import AutoTokenizer; from engram import *;"
        f"tok=AutoTokenizer.from_pretrained({str(ref_tokenizer.name_or_path)!r});"
        "m=NgramHashMapping(EngramConfig(hidden_size=32, layer_ids=[0,3], n_embed_per_ngram=16,"
        " n_head_per_ngram=4, engram_vocab_size=[1000,2000], pad_id=0, seed=7), tok);"
        "ids=torch.arange(0, 4000, 37)[:108].view(2, -1); h=m.hash(ids);"
        "print(sum(int(v.sum()) * (i + 1) for i, v in enumerate(h.values())))"
    )
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(s)}).stdout for s in (1, 2)}
    assert len(outs) == 1 and outs.pop().strip().lstrip("-").isdigit()


# ---------------------------------------------------------------------------------- config
@pytest.mark.parametrize("kw, field", [
    (dict(engram_vocab_size=[1, 100]), "engram_vocab_size"),
    (dict(n_head_per_ngram=0), "n_head_per_ngram"),
    (dict(n_embed_per_ngram=10, n_head_per_ngram=4), "n_embed_per_ngram"),
    (dict(max_ngram_size=1, engram_vocab_size=[]), "max_ngram_size"),
    (dict(layer_ids=[1, 1]), "layer_ids"),
    (dict(layer_ids=[-1]), "layer_ids"),
    (dict(engram_vocab_size=[100]), "engram_vocab_size"),
    (dict(hc_mult=0), "hc_mult"),
    (dict(hidden_size=0), "hidden_size"),
])
def test_config_validation_names_field(kw, field):
    with pytest.raises(ValueError, match=field):
        small_config(**kw)


def test_config_seed_spelling_and_roundtrip():
    cfg = EngramConfig(hidden_size=64, engram_vocab_size=4096, engram_table_size=[5000, 6000],
                       n_embed_per_ngram=32, n_head_per_ngram=4)
    assert cfg.engram_vocab_size == [5000, 6000] and cfg.tokenizer_vocab_size == 4096
    assert EngramConfig.from_dict(cfg.to_dict()) == cfg
    # The seed's default table size: 5 x 129,280 rows per order (its [129280 * 5] * 2; README, "Seed API").
    assert EngramConfig(engram_vocab_size=4096).engram_vocab_size == [646400, 646400]
    assert EngramConfig(engram_vocab_size=4096, max_ngram_size=4).engram_vocab_size == [646400] * 3
    with pytest.raises(ValueError, match="unknown"):
        EngramConfig.from_dict({"hiden_size": 3})


# ---------------------------------------------------------------------------------- module
VARIANTS = {
    "full": {}, "noconv": dict(use_short_conv=False), "nogate": dict(use_gate=False),
    "nobias": dict(value_bias=False), "lite": dict(lite=True),
}


def make_engram(hc_mult=1, **kw) -> tuple[Engram, EngramConfig]:
    cfg = small_config(hc_mult=hc_mult, **kw)
    sizes = [[101 + 2 * j + 10 * n for j in range(cfg.n_head_per_ngram)] for n in range(cfg.n_orders)]
    torch.manual_seed(0)
    mod = Engram(cfg, 0, sizes)
    # Non-trivial conv and lite tables, so the tests see them act.
    with torch.no_grad():
        for name, p in mod.named_parameters():
            if "conv" in name or (cfg.lite and "embedding" in name):
                p.normal_(0, 0.5)
    return mod, cfg


def random_hash(mod: Engram, B: int, T: int) -> torch.Tensor:
    sizes = torch.tensor(mod.memory.sizes)
    return (torch.rand(B, T, len(sizes)) * sizes).long()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("hc_mult", [1, 3])
def test_every_variant_forward_backward(variant, hc_mult):
    mod, cfg = make_engram(hc_mult, **VARIANTS[variant])
    B, T = 2, 9
    h = torch.randn(B, T, hc_mult, cfg.hidden_size, requires_grad=True)
    hid = random_hash(mod, B, T)
    y = mod(h if hc_mult > 1 else h[:, :, 0], hid)
    assert y.shape == ((B, T, hc_mult, cfg.hidden_size) if hc_mult > 1 else (B, T, cfg.hidden_size))
    (y.square().sum()).backward()
    for name, p in mod.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if "embedding" in name:
            touched = torch.unique(mod.memory.flat_rows(hid))
            untouched = torch.ones(p.shape[0], dtype=torch.bool)
            untouched[touched] = False
            assert p.grad[touched].abs().sum() > 0 and p.grad[untouched].abs().sum() == 0
    if variant != "lite":  # the branch reads the hidden state only through the gate
        reads_hidden = h.grad is not None and bool(h.grad.abs().sum() > 0)
        assert reads_hidden == (variant != "nogate")


def test_variants_differ_and_conv_is_zero_initialised():
    cfg = small_config()
    mod = Engram(cfg, 0, [[101] * 4, [103] * 4])
    assert torch.count_nonzero(mod.short_conv.conv.weight) == 0
    h, hid = torch.randn(1, 5, cfg.hidden_size), random_hash(mod, 1, 5)
    no_conv = Engram(cfg.replace(use_short_conv=False), 0, [[101] * 4, [103] * 4])
    no_conv.load_state_dict({k: v for k, v in mod.state_dict().items() if "short_conv" not in k})
    assert torch.allclose(mod(h, hid), no_conv(h, hid))  # zero conv: Y = u exactly
    zero = Engram(cfg.replace(zero_init_output=True), 0, [[101] * 4, [103] * 4])
    assert torch.count_nonzero(zero(h, hid)) == 0
    lite = Engram(cfg.replace(lite=True), 0, [[101] * 4, [103] * 4])
    assert torch.count_nonzero(lite(h, hid)) == 0  # zero-initialised lite table


@pytest.mark.parametrize("variant", ["full", "noconv", "nogate", "lite"])
@pytest.mark.parametrize("hc_mult", [1, 2])
def test_decode_step_equals_full_forward(variant, hc_mult):
    mod, cfg = make_engram(hc_mult, **VARIANTS[variant])
    B, T = 2, 23
    h = torch.randn(B, T, hc_mult, cfg.hidden_size)
    hid = random_hash(mod, B, T)
    full = mod(h, hid)
    for chunks in ([1] * T, [5, 1, 1, 7, 9]):
        state, outs, s = EngramLayerState(), [], 0
        for n in chunks:
            outs.append(mod(h[:, s:s + n], hid[:, s:s + n], state))
            s += n
        torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------- validation
def test_bad_inputs_raise_clear_errors(ref_tokenizer):
    mapping = NgramHashMapping(small_config(), ref_tokenizer)
    with pytest.raises(ValueError, match="4096"):
        mapping.hash(torch.tensor([[1, 4096]]))
    with pytest.raises(TypeError, match="integer"):
        mapping.hash(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(TypeError, match="integer"):
        mapping.hash(np.array([[1.5]]))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        mapping.hash(torch.tensor([1, 2, 3]))
    mod, cfg = make_engram()
    h = torch.randn(1, 4, cfg.hidden_size)
    with pytest.raises(ValueError, match="heads"):
        mod(h, torch.zeros(1, 4, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        mod(h, torch.zeros(1, 4, cfg.n_heads_total))
    with pytest.raises(ValueError, match="hidden_size"):
        mod(torch.randn(1, 4, cfg.hidden_size + 1), torch.zeros(1, 4, cfg.n_heads_total, dtype=torch.long))
    with pytest.raises(ValueError, match="hash_ids"):
        mod(h, torch.zeros(1, 5, cfg.n_heads_total, dtype=torch.long))
    with pytest.raises(ValueError, match="tokenizer"):
        NgramHashMapping(small_config(engram_vocab_size=100, engram_table_size=[211, 307]), ref_tokenizer)


def test_short_and_empty_sequences(ref_tokenizer):
    mapping = NgramHashMapping(small_config(max_ngram_size=4, engram_vocab_size=[211, 307, 401]), ref_tokenizer)
    empty = mapping.hash(torch.zeros(2, 0, dtype=torch.long))
    assert all(v.shape == (2, 0, 12) for v in empty.values())
    ids = torch.tensor([[17, 99], [5, 6]])
    short = mapping.hash(ids)
    # T < N-1: history is pad-filled, so the result equals the prefix of a longer sequence.
    longer = mapping.hash(torch.cat([ids, torch.tensor([[7, 8], [9, 10]])], 1))
    for lid in short:
        assert torch.equal(short[lid], longer[lid][:, :2])
    mod, cfg = make_engram()
    assert mod(torch.randn(1, 0, cfg.hidden_size), torch.zeros(1, 0, cfg.n_heads_total, dtype=torch.long)).shape == (1, 0, cfg.hidden_size)


# ---------------------------------------------------------------------------------- EngramGPT
def tiny_gpt(ref_tokenizer, hc_mult=1, engram=True, **kw) -> EngramGPT:
    ecfg = small_config(hidden_size=32, hc_mult=hc_mult, **kw) if engram else None
    cfg = GPTConfig(vocab_size=len(ref_tokenizer), n_layer=3, n_head=2, n_embd=32, block_size=64,
                    hc_mult=hc_mult, engram=ecfg)
    torch.manual_seed(0)
    model = EngramGPT(cfg, ref_tokenizer if engram else None).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "conv" in name:
                p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("hc_mult", [1, 2])
def test_gpt_fuse_projections_keeps_outputs_decoding_and_checkpoints(ref_tokenizer, tmp_path, hc_mult):
    """EngramGPT.fuse_projections: the same logits (full and cached), the same greedy tokens, and a
    checkpoint saved after it loads in the fused layout with the same logits."""
    from engram.training.checkpoint import load_checkpoint, save_checkpoint

    model = tiny_gpt(ref_tokenizer, hc_mult)
    with torch.no_grad():
        for e in model.engram_layers():
            e.value_proj.weight.normal_(0, 0.3)
    ids = torch.randint(0, len(ref_tokenizer), (2, 20), generator=torch.Generator().manual_seed(3))
    ref, _ = model(ids)
    tokens = model.generate(ids[:, :6], 10, temperature=0)
    assert model.fuse_projections() is model
    assert model.config.engram.fused_kv and model.hashing.config.fused_kv
    assert all(e.config is model.config.engram for e in model.engram_layers())
    out, _ = model(ids)
    torch.testing.assert_close(out, ref)
    cache = model.new_cache()
    steps = [model(ids[:, :12], cache=cache)[0]] + [model(ids[:, t : t + 1], cache=cache)[0] for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), ref)
    assert torch.equal(model.generate(ids[:, :6], 10, temperature=0), tokens)
    save_checkpoint(tmp_path / "ck", model, ref_tokenizer)
    loaded = load_checkpoint(tmp_path / "ck").model.eval()
    assert loaded.config.engram.fused_kv and hasattr(loaded.engram_layers()[0], "wkv")
    torch.testing.assert_close(loaded(ids)[0], ref)


@pytest.mark.parametrize("hc_mult", [1, 2])
@pytest.mark.parametrize("variant", ["full", "lite", "noconv"])
def test_gpt_cached_decode_equals_full(ref_tokenizer, hc_mult, variant):
    model = tiny_gpt(ref_tokenizer, hc_mult, **VARIANTS[variant])
    ids = torch.randint(0, len(ref_tokenizer), (2, 30), generator=torch.Generator().manual_seed(1))
    full, _ = model(ids)
    for chunks in ([1] * 30, [7, 1, 11, 11]):
        cache, outs, s = model.new_cache(), [], 0
        for n in chunks:
            outs.append(model(ids[:, s:s + n], cache=cache)[0])
            s += n
        torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["full", "lite", "noconv"])
def test_gpt_static_cache_equals_the_growing_one(ref_tokenizer, variant):
    """A static cache (preallocated, updated in place) gives the logits of the growing cache,
    chunk by chunk, and the same greedy tokens through generate, which reuses it."""
    model = tiny_gpt(ref_tokenizer, **VARIANTS[variant])
    ids = torch.randint(0, len(ref_tokenizer), (2, 30), generator=torch.Generator().manual_seed(1))
    dyn, stat, s = model.new_cache(), model.new_cache(static=True, batch_size=2), 0
    for n in (7, 1, 11, 1):
        torch.testing.assert_close(model(ids[:, s:s + n], cache=stat)[0], model(ids[:, s:s + n], cache=dyn)[0],
                                   atol=1e-5, rtol=0)
        s += n
    assert dyn.length == int(stat.pos) == s
    if dyn.history is not None:
        assert torch.equal(stat.history, dyn.history)
    for i, st in dyn.engram.items():
        if st.conv is not None:
            torch.testing.assert_close(stat.engram[i].conv, st.conv, atol=1e-6, rtol=0)
    want = model.generate(ids[:, :9], 12, temperature=0)
    first = model.generate(ids[:, :9], 12, temperature=0, static_cache=True)
    cache = model._static_caches[(2, torch.device("cpu"), torch.float32)]
    kv_ptr = cache.kv[0][0].data_ptr()
    again = model.generate(ids[:, :9], 12, temperature=0, static_cache=True)  # the same cache, cleared
    assert torch.equal(first, want) and torch.equal(again, want)
    assert model._static_caches[(2, torch.device("cpu"), torch.float32)].kv[0][0].data_ptr() == kv_ptr


def test_generate_says_to_use_the_static_cache_when_cuda_graphs_refuse_the_growing_one(ref_tokenizer, monkeypatch):
    """CUDA graphs (``mode="reduce-overhead"``) cannot replay a step whose inputs are the last
    graph's outputs, which the growing cache's are; generate turns torch's error into the fix."""
    model = tiny_gpt(ref_tokenizer)
    prompt = torch.randint(0, 4000, (1, 4))
    calls = []

    def replaying_step(*args, **kwargs):  # the error cudagraph trees raise on the second step
        calls.append(kwargs["cache"])
        if len(calls) > 1 and not kwargs["cache"].static:
            raise RuntimeError("Error: accessing tensor output of CUDAGraphs that has been overwritten by a "
                               "subsequent run.")
        return torch.zeros(1, args[0].shape[1], 16), None

    monkeypatch.setattr(model, "forward", replaying_step)
    with pytest.raises(RuntimeError, match=r"generate\(\.\.\., static_cache=True\)"):
        model.generate(prompt, 3, temperature=0)
    assert model.generate(prompt, 3, temperature=0, static_cache=True).shape == (1, 7)
    monkeypatch.setattr(model, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("something else")))
    with pytest.raises(RuntimeError, match="^something else$"):
        model.generate(prompt, 3, temperature=0)


def test_gpt_static_cache_with_left_padding_and_reorder(ref_tokenizer):
    model = tiny_gpt(ref_tokenizer)
    real = torch.randint(5, 4000, (1, 10), generator=torch.Generator().manual_seed(2))
    padded = torch.cat([torch.cat([torch.full((1, 6), 3), real], 1), torch.randint(5, 4000, (1, 16))], 0)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[0, :6] = 0
    dyn, stat = model.new_cache(), model.new_cache(static=True, batch_size=2)
    a, b = model(padded, cache=dyn, attention_mask=mask)[0], model(padded, cache=stat, attention_mask=mask)[0]
    torch.testing.assert_close(b[:, 6:], a[:, 6:], atol=1e-5, rtol=0)
    index = torch.tensor([1, 0])
    dyn.reorder(index), stat.reorder(index)
    nxt = torch.tensor([[7], [9]])
    mask = torch.cat([mask.index_select(0, index), torch.ones(2, 1, dtype=torch.long)], 1)
    torch.testing.assert_close(model(nxt, cache=stat, attention_mask=mask)[0],
                               model(nxt, cache=dyn, attention_mask=mask)[0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="holds 2 sequences"):
        model(nxt[:1], cache=stat)
    with pytest.raises(ValueError, match="batch_size"):
        model.new_cache(static=True, batch_size=0)


def test_gpt_left_padding_matches_unpadded(ref_tokenizer):
    model = tiny_gpt(ref_tokenizer)
    real = torch.randint(5, 4000, (1, 10), generator=torch.Generator().manual_seed(2))
    padded = torch.cat([torch.full((1, 6), 3), real], 1)  # pad token deliberately not the Engram pad
    mask = torch.cat([torch.zeros(1, 6), torch.ones(1, 10)], 1).long()
    alone, _ = model(real)
    pad_out, _ = model(padded, attention_mask=mask)
    torch.testing.assert_close(pad_out[:, 6:], alone, atol=1e-5, rtol=0)
    greedy_alone = model.generate(real, 5, temperature=0)
    cache = model.new_cache()
    logits, _ = model(padded, cache=cache, attention_mask=mask)
    toks = []
    for _ in range(5):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        toks.append(nxt)
        logits, _ = model(nxt, cache=cache)
    assert torch.equal(torch.cat(toks, 1), greedy_alone[:, 10:])


def test_gpt_without_engram_and_param_groups(ref_tokenizer):
    with_e, without = tiny_gpt(ref_tokenizer), tiny_gpt(ref_tokenizer, engram=False)
    assert without.hashing is None and without.num_params()["table"] == 0
    counts = with_e.num_params()
    assert counts["table"] == sum(sum(s for o in with_e.hashing.table_sizes[l] for s in o) * 4 for l in (0, 2))
    assert counts["dense"] > without.num_params()["dense"]  # projections, norms, conv are dense


def test_gpt_validation(ref_tokenizer):
    model = tiny_gpt(ref_tokenizer)
    with pytest.raises(ValueError, match="vocabulary"):
        model(torch.tensor([[1, 99999]]))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="past the last block"):
        GPTConfig(vocab_size=4096, n_layer=2, n_embd=32, n_head=2, engram=small_config(layer_ids=[2]))
    with pytest.raises(ValueError, match="hidden_size"):
        GPTConfig(vocab_size=4096, n_layer=3, n_embd=64, n_head=2, engram=small_config())
    with pytest.raises(ValueError, match="tokenizer"):
        EngramGPT(GPTConfig(vocab_size=4096, n_layer=3, n_embd=32, n_head=2, engram=small_config()))


def test_golden_short_training_run_loss_falls(ref_tokenizer):
    model = tiny_gpt(ref_tokenizer).train()
    text = "To be, or not to be, that is the question. " * 20
    ids = torch.tensor(ref_tokenizer(text)["input_ids"][:65])[None]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        _, loss = model(ids[:, :-1], targets=ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_meta_tables_are_never_allocated_and_open_from_disk(ref_tokenizer, tmp_path):
    from engram import offload

    model = tiny_gpt(ref_tokenizer)
    meta = EngramGPT(model.config, ref_tokenizer, table_device="meta").eval()
    assert all(p.is_meta for p in meta.table_parameters())
    assert meta.num_params() == model.num_params()
    dense = {k: v for k, v in model.state_dict().items() if "memory.embedding" not in k}
    meta.load_state_dict(dense, strict=False)
    offload(copy.deepcopy(model), "disk", path=tmp_path)  # writes the table files
    offload(meta, "disk", path=tmp_path)  # opens them: the tables were never in memory
    ids = torch.randint(0, 4000, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(meta(ids)[0], model(ids)[0])


def test_hash_split_over_threads_equals_unsplit(ref_tokenizer):
    from engram.ops.cpu import PARALLEL_MIN_TOKENS

    mapping = NgramHashMapping(small_config(), ref_tokenizer)
    ids = torch.randint(0, 4096, (3, PARALLEL_MIN_TOKENS // 2 + 7), generator=torch.Generator().manual_seed(9))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = {m: mapping.hash(ids, method=m) for m in ("auto", "plain")}
        torch.set_num_threads(3)  # uneven slices
        split = {m: mapping.hash(ids, method=m) for m in ("auto", "plain")}
    finally:
        torch.set_num_threads(n)
    for m in single:
        for lid in single[m]:
            assert torch.equal(single[m][lid], split[m][lid])
            assert torch.equal(single[m][lid], single["plain"][lid])
