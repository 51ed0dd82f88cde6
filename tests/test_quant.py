"""Quantised table rows: error bounds of the codecs, and offloaded quantised tables equal the
in-memory model whose table is replaced by its dequantised copy (bit for bit)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from engram.offload import DiskMultiHeadEmbedding, HostMultiHeadEmbedding, offload
from engram.storage.quant import Fp8BlockCodec, Int8RowCodec, fake_quantize, make_codec

from test_offload import tiny_model


def table(n: int = 200, d: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, d, generator=g) * torch.logspace(-4, 1, n)[:, None]  # many magnitudes
    w[3] = 0.0  # an all-zero row
    w[5, 7] = 50.0  # an outlier
    return w


def test_int8_error_bound_and_size():
    w = table()
    codec = Int8RowCodec(32)
    deq = codec.decode(codec.encode(w))
    amax = w.abs().amax(1, keepdim=True)
    assert ((deq - w).abs() <= amax / 254 * (1 + 1e-5)).all()
    assert torch.equal(deq[3], torch.zeros(32))
    assert codec.row_bytes() == 32 + 4 and make_codec(None, 32).row_bytes() == 128


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="torch without float8_e4m3fn")
def test_fp8_block_error_bound_and_size():
    w = table(d=64)
    codec = Fp8BlockCodec(64, block=32)
    parts = codec.encode(w)
    assert parts["codes"].dtype == torch.uint8 and parts["scale"].shape == (200, 2)
    deq = codec.decode(parts)
    scale = w.view(200, 2, 32).abs().amax(2, keepdim=True) / 448
    bound = w.abs() / 16 + (scale * 2.0**-9).expand(200, 2, 32).reshape(200, 64)
    assert ((deq - w).abs() <= bound * (1 + 1e-5)).all()
    assert torch.equal(deq[3], torch.zeros(64))
    assert codec.row_bytes() == 64 + 8
    # the outlier only coarsens its own block
    assert (deq[5, 32:] - w[5, 32:]).abs().max() <= w[5, 32:].abs().max() / 16


def test_codec_validation():
    with pytest.raises(ValueError, match="quantize"):
        make_codec("int4", 8)
    with pytest.raises(ValueError, match="divide"):
        Fp8BlockCodec(48, block=32)
    assert Fp8BlockCodec(24, block=32).block == 24
    with pytest.raises(ValueError, match="dim"):
        make_codec("int8", 0)


def e8m0_model(seed: int) -> torch.nn.Module:
    """tiny_model with rows 32 wide (DeepSeek-V4.1's format has one exponent per 32 values)."""
    from engram import EngramConfig, EngramGPT, GPTConfig
    from engram.core.tokenizer import CompressedTokenizer

    torch.manual_seed(seed)
    ecfg = EngramConfig(hidden_size=32, layer_ids=[0, 2], max_ngram_size=3, n_embed_per_ngram=64,
                        n_head_per_ngram=2, engram_vocab_size=[101, 151], pad_id=1, seed=3)
    cfg = GPTConfig(vocab_size=256, n_layer=3, n_head=2, n_embd=32, block_size=64, engram=ecfg)
    return EngramGPT(cfg, CompressedTokenizer(lookup_table=np.arange(256) % 200)).eval()


@pytest.mark.parametrize("quantize", ["int8", "fp8", "fp8_e8m0"])
@pytest.mark.parametrize("where,cache_rows", [("host", 0), ("host", 8), ("disk", 16)])
def test_quantised_offload_equals_dequantised_in_memory(quantize, where, cache_rows, tmp_path):
    model = tiny_model(seed=2) if quantize != "fp8_e8m0" else e8m0_model(seed=2)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(4))
    ref = copy.deepcopy(model)
    for b in ref.blocks:
        if b.engram is not None:
            w = b.engram.memory.embedding.weight
            w.data.copy_(fake_quantize(w.data, quantize))
    m = offload(copy.deepcopy(model), where, path=tmp_path if where == "disk" else None,
                cache_rows=cache_rows, quantize=quantize)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(m(ids)[0], ref(ids)[0])
        full = model(ids)[0]
    # quantisation moves the logits, but only a little on this tiny model
    assert 0 < (m(ids)[0] - full).abs().max() < 0.05
    mem = m.blocks[0].engram.memory
    plain = model.blocks[0].engram.memory.embedding.weight
    if where == "host":  # (tiny disk files are dominated by page alignment; see test_offload)
        assert mem.storage_bytes() < plain.numel() * plain.element_size() * 0.6


def test_host_and_disk_int8_agree(tmp_path):
    w = table()
    host = HostMultiHeadEmbedding([80, 120], 32, weight=w, quantize="int8")
    disk = DiskMultiHeadEmbedding.write(tmp_path / "q.table", w, [80, 120], quantize="int8")
    h = torch.stack([torch.randint(0, 80, (2, 7)), torch.randint(0, 120, (2, 7))], -1)
    assert torch.equal(host(h), disk(h))
    assert host.storage_bytes() == 200 * 36
