"""Offloaded tables (host, disk), hot-row cache, prefetch, seed alias, training path, faults.

Every storage option is checked against the in-memory model it replaces: logits and greedy
generations must be bit-identical (quantised rows are covered in test_quant.py).
"""

from __future__ import annotations

import copy
import errno
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from engram import (CompressedTokenizer, Engram, EngramConfig, EngramGPT, EngramModule, GPTConfig,
                    MultiHeadEmbedding)
from engram.offload import (DiskMultiHeadEmbedding, HostMultiHeadEmbedding, HotRowCache, OffloadMultiHeadEmbedding,
                            cache_stats, offload, table_path)
from engram.storage.prefetch import Prefetcher

DOC = Path(__file__).resolve().parents[1] / "docs" / "offload.md"


def tiny_model(seed: int = 0, sparse_grad: bool = False) -> EngramGPT:
    torch.manual_seed(seed)
    ecfg = EngramConfig(hidden_size=32, layer_ids=[0, 2], max_ngram_size=3, n_embed_per_ngram=16,
                        n_head_per_ngram=2, engram_vocab_size=[101, 151], pad_id=1, seed=3, sparse_grad=sparse_grad)
    cfg = GPTConfig(vocab_size=256, n_layer=3, n_head=2, n_embd=32, block_size=64, engram=ecfg)
    tok = CompressedTokenizer(lookup_table=np.arange(256) % 200)
    return EngramGPT(cfg, tok).eval()


@pytest.fixture(scope="module")
def model() -> EngramGPT:
    return tiny_model()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(1))


def offloaded(model: EngramGPT, tmp_path: Path, **kw) -> EngramGPT:
    m = copy.deepcopy(model)
    if kw.get("where") == "disk":
        kw["path"] = tmp_path
    return offload(m, **kw)


STORAGE = [
    dict(where="host"),
    dict(where="disk"),
    dict(where="host", cache_rows=8),  # far fewer rows than one batch needs: evicts rows it uses
    dict(where="disk", cache_rows=8, cache_policy="lfu"),
    dict(where="host", cache_rows=4096),  # holds every row
    dict(where="host", cache_rows=64, prefetch=True),
    dict(where="disk", prefetch=True),
]


@pytest.mark.parametrize("kw", STORAGE, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_offloaded_logits_and_generation_bit_identical(model, ids, tmp_path, kw):
    m = offloaded(model, tmp_path, **kw)
    ref, _ = model(ids)
    with torch.no_grad():
        for _ in range(2):  # second pass: served (partly) from the cache
            out, _ = m(ids)
            assert torch.equal(out, ref)
    prompt = ids[:, :5]
    assert torch.equal(m.generate(prompt, 8, temperature=0), model.generate(prompt, 8, temperature=0))
    # prefill + decode steps: the same logits as the in-memory model's steps

    def steps(mod: EngramGPT) -> torch.Tensor:
        cache = mod.new_cache()
        with torch.no_grad():
            out = [mod(ids[:, :10], cache=cache)[0]] + [mod(ids[:, t : t + 1], cache=cache)[0] for t in range(10, 14)]
        return torch.cat(out, 1)

    assert torch.equal(steps(m), steps(model))
    if kw.get("prefetch"):
        used = [b.engram.memory.prefetch_used for b in m.blocks if b.engram is not None]
        assert min(used) > 0, "prefetched rows were never consumed"
        m.engram_prefetcher.close()
        assert not hasattr(m, "engram_prefetcher")
        assert torch.equal(m(ids)[0], ref)


def test_cache_statistics_and_row_contents(model, ids):
    m = offload(copy.deepcopy(model), "host", cache_rows=4096)
    with torch.no_grad():
        m(ids)
    first = cache_stats(m)
    assert set(first) == {0, 2} and all(s["hits"] == 0 and s["misses"] > 0 for s in first.values())
    with torch.no_grad():
        m(ids)
    for lid, s in cache_stats(m).items():
        assert s["hits"] == first[lid]["misses"]  # everything seen once is now cached
        assert s["hit_rate"] == pytest.approx(0.5)
    mem = m.blocks[0].engram.memory
    cached = mem.cache.rows >= 0
    ref_w = model.blocks[0].engram.memory.embedding.weight
    assert torch.equal(mem.cache.data[cached], ref_w[mem.cache.rows[cached]])


def test_cache_eviction_keeps_rows_in_use_and_values_exact():
    w = torch.randn(50, 4)
    mem = HostMultiHeadEmbedding([20, 30], 4, weight=w, cache_rows=3)
    ref = MultiHeadEmbedding([20, 30], 4)
    ref.embedding.weight.data.copy_(w)
    gen = torch.Generator().manual_seed(0)
    for step in range(20):
        h = torch.stack([torch.randint(0, 20, (2, 5), generator=gen), torch.randint(0, 30, (2, 5), generator=gen)], -1)
        if step % 3 == 0:
            h[..., 0] = 7  # a hot row
        assert torch.equal(mem(h), ref(h))
        assert mem.cache.stats()["filled"] <= 3
    assert mem.cache.hits > 0
    keys, rows = mem.cache.keys, mem.cache.rows
    assert torch.equal(keys, torch.sort(rows).values)


def test_prefetcher_skips_mismatched_ids_and_in_memory_tables(model, ids):
    m = offload(copy.deepcopy(model), "host", cache_rows=16)
    with Prefetcher(m) as pf, torch.no_grad():
        pf.prefetch({0: torch.zeros(1, 2, 4, dtype=torch.long), 2: torch.zeros(1, 2, 4, dtype=torch.long)})
        out, _ = m(ids)  # the stale prefetch is drained and ignored
        assert torch.equal(out, model(ids)[0])
    assert m.hashing.step_listeners == []
    with Prefetcher(copy.deepcopy(model)) as pf, torch.no_grad():
        pf.model(ids)
        assert pf.submitted == 0


def test_copying_a_prefetching_model_leaves_the_prefetcher_behind(model, ids):
    import pickle

    m = offload(copy.deepcopy(model), "host", cache_rows=16, prefetch=True)
    user = Prefetcher(m)  # a second, user-made one: both listen to the same mapping
    for twin in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert twin.engram_prefetcher is None and twin.hashing.step_listeners == []
        with torch.no_grad():
            assert torch.equal(twin(ids)[0], model(ids)[0])
    before = m.engram_prefetcher.submitted
    with torch.no_grad():
        m(ids)
    assert m.engram_prefetcher.submitted > before and user.submitted > 0  # the original still prefetches
    user.close()
    m.engram_prefetcher.close()


def test_offload_finds_engram_in_any_container(tmp_path):
    cfg = EngramConfig(hidden_size=16, layer_ids=[1], n_embed_per_ngram=8, n_head_per_ngram=2,
                       engram_vocab_size=[31, 37])
    torch.manual_seed(0)
    holder = nn.ModuleDict({"inner": nn.Sequential(Engram(cfg, 1, [[31, 37], [41, 43]]))}).eval()
    h = torch.randn(2, 5, 16)
    hid = torch.stack([torch.randint(0, s, (2, 5)) for s in [31, 37, 41, 43]], -1)
    ref = holder["inner"][0](h, hid)
    offload(holder, "disk", path=tmp_path, cache_rows=4)
    assert isinstance(holder["inner"][0].memory, DiskMultiHeadEmbedding)
    assert table_path(tmp_path, 1).is_file()
    with torch.no_grad():
        assert torch.equal(holder["inner"][0](h, hid), ref)


def test_offload_argument_errors(model, tmp_path):
    with pytest.raises(ValueError, match="where"):
        offload(copy.deepcopy(model), "gpu")
    with pytest.raises(ValueError, match="path"):
        offload(copy.deepcopy(model), "disk")
    with pytest.raises(ValueError, match="quantize"):
        offload(copy.deepcopy(model), "host", quantize="int4")
    with pytest.raises(ValueError, match="cache_rows"):
        offload(copy.deepcopy(model), "host", cache_rows=-1)
    with pytest.raises(ValueError, match="no Engram"):
        offload(nn.Linear(2, 2), "host")
    m = offload(copy.deepcopy(model), "host")
    with pytest.raises(ValueError, match="already offloaded"):
        offload(m, "host")
    with pytest.raises(ValueError, match="heads"):
        m.blocks[0].engram.memory(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        m.blocks[0].engram.memory(torch.zeros(1, 2, 4))


# ---------------------------------------------------------------------------------- disk files
def test_meta_model_opens_existing_files_and_checks_config(model, ids, tmp_path):
    offload(copy.deepcopy(model), "disk", path=tmp_path)  # writes the files
    m = copy.deepcopy(model)
    for b in m.blocks:
        if b.engram is not None:
            mem = b.engram.memory
            b.engram.memory = MultiHeadEmbedding(mem.sizes, mem.embedding_dim, device="meta")
    offload(m, "disk", path=tmp_path)  # opens them
    with torch.no_grad():
        assert torch.equal(m(ids)[0], model(ids)[0])
    # a model whose hashing differs (another seed) refuses the files
    other = tiny_model()
    other.hashing.multipliers = {k: [v + 2 for v in vs] for k, vs in other.hashing.multipliers.items()}
    for b in other.blocks:
        if b.engram is not None:
            mem = b.engram.memory
            b.engram.memory = MultiHeadEmbedding(mem.sizes, mem.embedding_dim, device="meta")
    with pytest.raises(ValueError, match="another config.*fingerprint"):
        offload(other, "disk", path=tmp_path)
    with pytest.raises(ValueError, match="quantize='none'"):
        DiskMultiHeadEmbedding(table_path(tmp_path, 0), quantize="int8")


def test_disk_file_faults(tmp_path):
    w = torch.randn(30, 4)
    path = tmp_path / "t.table"
    DiskMultiHeadEmbedding.write(path, w, [10, 20])
    with pytest.raises(FileNotFoundError, match="no Engram table file"):
        DiskMultiHeadEmbedding(tmp_path / "missing.table")
    with pytest.raises(ValueError, match="another config.*sizes"):
        DiskMultiHeadEmbedding(path, sizes=[20, 10])
    with pytest.raises(ValueError, match="another config.*width"):
        DiskMultiHeadEmbedding(path, dim=8)
    bad = tmp_path / "bad.table"
    bad.write_bytes(b"not a table at all")
    with pytest.raises(ValueError, match="not an Engram table"):
        DiskMultiHeadEmbedding(bad)
    short = tmp_path / "short.table"
    short.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        DiskMultiHeadEmbedding(short)


def test_full_disk_leaves_original_intact(tmp_path, monkeypatch):
    path = tmp_path / "t.table"
    DiskMultiHeadEmbedding.write(path, torch.randn(30, 4), [10, 20])
    before = path.read_bytes()
    real, calls = os.pwrite, []

    def full_disk(fd, data, offset):
        calls.append(offset)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full_disk)
    with pytest.raises(OSError, match="no space left.*untouched") as info:
        DiskMultiHeadEmbedding.write(path, torch.randn(30, 4), [10, 20])
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.table"]  # no temporary left behind
    DiskMultiHeadEmbedding(path, sizes=[10, 20], dim=4)


def test_sparse_file_reads_only_written_rows(tmp_path):
    sizes = [1_000_003, 999_983]  # 2M rows x 16 floats = 128 MB logical
    path = tmp_path / "big.table"
    mem = DiskMultiHeadEmbedding.create_empty(path, sizes, 16, cache_rows=4)
    assert path.stat().st_size > 120e6 and path.stat().st_blocks * 512 < 1e6  # sparse
    rows = torch.tensor([5, 1_000_003 + 77, 1_999_985])
    vals = torch.randn(3, 16)
    mem.write_rows(rows, vals)
    h = torch.tensor([[[5, 77], [0, 999_982]]])  # (1, 2, 2): head 1 rows are offset by sizes[0]
    out = mem(h)
    assert torch.equal(out[0, 0], vals[:2]) and torch.equal(out[0, 1, 1], vals[2])
    assert torch.equal(out[0, 1, 0], torch.zeros(16))
    mem.drop_page_cache()
    assert torch.equal(mem(h), out)
    assert torch.equal(DiskMultiHeadEmbedding(path).to_memory().embedding.weight[rows], vals)


def test_int8_disk_file_is_smaller_and_round_trips(tmp_path):
    w = torch.randn(300, 32)
    plain = DiskMultiHeadEmbedding.write(tmp_path / "a.table", w, [100, 200])
    q = DiskMultiHeadEmbedding.write(tmp_path / "b.table", w, [100, 200], quantize="int8")
    assert q.storage_bytes() < plain.storage_bytes() / 2
    assert torch.equal(plain.to_memory().embedding.weight, w)


# ---------------------------------------------------------------------------------- training
@pytest.mark.parametrize("sparse", [False, True])
def test_host_table_trains_in_place_like_in_memory(sparse, ids):
    ref = tiny_model(seed=5, sparse_grad=sparse).train()
    m = offload(copy.deepcopy(ref), "host")
    tab_ref, tab_m = ref.table_parameters(), m.table_parameters()
    assert all(t.device.type == "cpu" for t in tab_m) and tab_m[0].requires_grad
    opt_cls = torch.optim.SparseAdam if sparse else torch.optim.Adam
    opts = [(torch.optim.Adam(mod.dense_parameters(), lr=1e-2), opt_cls(mod.table_parameters(), lr=5e-2))
            for mod in (ref, m)]
    targets = torch.roll(ids, -1, 1)
    for _ in range(2):
        losses = []
        for mod, (dense, table) in zip((ref, m), opts):
            dense.zero_grad(), table.zero_grad()
            _, loss = mod(ids, targets)
            loss.backward()
            losses.append(loss)
            if sparse:
                assert mod.table_parameters()[0].grad.is_sparse
            dense.step(), table.step()
        assert torch.equal(losses[0], losses[1])
    for a, b in zip(tab_ref, tab_m):
        assert torch.equal(a, b)


def test_read_only_tables_refuse_training_with_clear_error(model, ids, tmp_path):
    m = offload(copy.deepcopy(model), "disk", path=tmp_path).train()
    with pytest.raises(RuntimeError, match="read-only.*model.eval"):
        m(ids)
    m.eval()
    m(ids)  # grad enabled but eval: fine (the table gets no gradient)
    c = offload(copy.deepcopy(model), "host", cache_rows=8).train()
    with pytest.raises(RuntimeError, match="read-only"):
        c(ids)
    with torch.no_grad():
        c(ids)


# ---------------------------------------------------------------------------------- seed API
def test_seed_alias_and_preload():
    cfg = EngramConfig(hidden_size=16, n_embed_per_ngram=8, n_head_per_ngram=2, engram_vocab_size=[31, 37])
    engram_1 = EngramModule(cfg, 100)
    mem = OffloadMultiHeadEmbedding(sizes=engram_1.memory.sizes, dim=engram_1.memory.embedding.embedding_dim,
                                    cache_size=engram_1.memory.sizes[0] // 2)
    engram_1.memory = mem
    hid = np.random.default_rng(0).integers(0, 100, (1, 9, 4))
    mem.preload(hid)
    assert mem.cache.stats()["filled"] > 0 and mem.cache.misses > 0
    with torch.no_grad():
        out = engram_1(torch.randn(1, 9, 16), {-1: hid})
    assert out.shape == (1, 9, 16) and mem.cache.hits > 0
    plain = MultiHeadEmbedding(mem.sizes, mem.embedding_dim)
    plain.embedding.weight.data.copy_(mem.embedding.weight)
    assert torch.equal(mem(torch.from_numpy(hid)), plain(torch.from_numpy(hid)))


def test_compat_use_offload_config():
    cfg = EngramConfig(hidden_size=16, n_embed_per_ngram=8, n_head_per_ngram=2, engram_vocab_size=[31, 37],
                       use_offload=True, offload_cache_lines=10)
    mod = EngramModule(cfg, 100).eval()
    assert isinstance(mod.memory, OffloadMultiHeadEmbedding) and mod.memory.cache.capacity == 10
    hid = torch.randint(0, 100, (2, 6, 4))
    with torch.no_grad():
        assert mod(torch.randn(2, 6, 16), hid).shape == (2, 6, 16)
    train = EngramModule(cfg.replace(offload_cache_lines=None), 100)  # no cache: a trainable host table
    train(torch.randn(2, 6, 16), hid).sum().backward()
    assert train.memory.embedding.weight.grad is not None


def test_hot_row_cache_validation():
    with pytest.raises(ValueError, match="capacity"):
        HotRowCache(0, 4)
    with pytest.raises(ValueError, match="policy"):
        HotRowCache(4, 4, policy="fifo")


def test_docs_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert blocks, "docs/offload.md has no python example"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], str(DOC), "exec"), {})


def test_transformers_wrapper_offload_and_prefetch(ref_tokenizer, tmp_path):
    import engram.hf as hf
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=4096, n_embd=32, n_layer=3, n_head=2, n_positions=64,
                                      eos_token_id=0, pad_token_id=1, bos_token_id=None)).eval()
    ecfg = EngramConfig(hidden_size=32, layer_ids=[0, 2], n_embed_per_ngram=16, n_head_per_ngram=2,
                        engram_vocab_size=[1009, 1009])
    model = hf.EngramForCausalLM.from_base(base, ecfg, ref_tokenizer).eval()
    with torch.no_grad():
        for e in (m for m in model.modules() if isinstance(m, Engram)):
            nn.init.normal_(e.value_proj.weight, std=0.3)
    ids = torch.randint(2, 4096, (2, 6), generator=torch.Generator().manual_seed(0))
    ref = model.generate(ids, max_new_tokens=6, do_sample=False)
    m = offload(copy.deepcopy(model), "disk", path=tmp_path, cache_rows=16, prefetch=True)
    assert torch.equal(m.generate(ids, max_new_tokens=6, do_sample=False), ref)
    assert all(e.memory.prefetch_used > 0 for e in m.modules() if isinstance(e, Engram))
    m.engram_prefetcher.close()


def test_host_state_dict_keys_and_loading(model, ids):
    m = offload(tiny_model(seed=9), "host")
    assert set(m.state_dict()) == set(model.state_dict())
    m.load_state_dict(model.state_dict())  # a checkpoint of the in-memory model loads into the host table
    m.to("cpu")
    assert m.blocks[0].engram.memory.embedding.weight.device.type == "cpu"
    with torch.no_grad():
        assert torch.equal(m(ids)[0], model(ids)[0])
