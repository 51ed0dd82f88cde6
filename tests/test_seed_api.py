"""The seed documents' examples (001, 002) run as written, with a local tokenizer for "gpt2"."""

from __future__ import annotations

import torch
from torch import nn


def test_seed_001_quickstart(ref_tokenizer):
    from engram import EngramConfig, EngramModule, EngramTokenizer

    hf_tokenizer = ref_tokenizer  # AutoTokenizer.from_pretrained("gpt2") in the seed
    k = 5  # Knowledge scaling
    config = EngramConfig(
        hidden_size=1024,
        engram_vocab_size=len(hf_tokenizer),
        max_ngram_size=3,
        engram_table_size=[len(hf_tokenizer) * k, len(hf_tokenizer) * k],
        n_embed_per_ngram=512,
        n_head_per_ngram=8,
        hc_mult=1,
        pad_id=hf_tokenizer.pad_token,
        seed=42,
    )
    layer_ids = [2, 6]
    engram_tokenizer = EngramTokenizer(config, hf_tokenizer, layer_ids=layer_ids)
    vocab_sizes_2 = engram_tokenizer.vocab_distributions[layer_ids[0]]
    engram_2 = EngramModule(config, vocab_sizes_2)
    vocab_sizes_6 = engram_tokenizer.vocab_distributions[layer_ids[1]]
    engram_6 = EngramModule(config, vocab_sizes_6)

    assert engram_tokenizer.raw_pad_id == hf_tokenizer.convert_tokens_to_ids(hf_tokenizer.pad_token)
    assert all(p > len(hf_tokenizer) * k for order in vocab_sizes_2 for p in order)
    ids = hf_tokenizer("The quick brown fox jumps over the lazy dog", return_tensors="np")["input_ids"]
    hash_2 = engram_tokenizer.compress_and_hash(ids, layer_id=2)
    assert hash_2.shape == (1, ids.shape[1], 16) and type(hash_2).__module__ == "numpy"
    h = torch.randn(1, ids.shape[1], 1024)
    for module, lid in ((engram_2, 2), (engram_6, 6)):
        out = module(h, engram_tokenizer.compress_and_hash(ids, layer_id=lid, return_tensors="pt"))
        assert out.shape == h.shape and torch.isfinite(out).all()


def test_seed_001_sizing_k(ref_tokenizer):
    from transformers import GPT2Config, GPT2Model

    from engram import EngramConfig, EngramTokenizer

    hf_tokenizer = ref_tokenizer
    hf_config = GPT2Config(vocab_size=len(ref_tokenizer), n_layer=12, n_embd=64, n_head=2)  # a tiny "gpt2"
    hf_model = GPT2Model(hf_config)
    layer_ids = [2, hf_config.num_hidden_layers // 2]
    hidden_size, n_embed_per_ngram, n_head_per_ngram, hc_mult, max_ngram_size, kernel_size = 64, 32, 8, 1, 3, 4
    model_params = sum(p.numel() for p in hf_model.parameters())
    target_params = model_params / 3
    num_layers, vocab_size, num_orders = len(layer_ids), len(hf_tokenizer), max_ngram_size - 1
    engram_input_dim = num_orders * n_embed_per_ngram
    proj_params = (engram_input_dim * hidden_size) + (hc_mult * engram_input_dim * hidden_size)
    conv_params = (hidden_size * hc_mult) * kernel_size
    total_fixed_params = (proj_params + conv_params) * num_layers
    memory_budget = target_params - total_fixed_params
    param_cost_per_k = num_layers * num_orders * vocab_size * (n_embed_per_ngram // n_head_per_ngram)
    k = max(1, int(memory_budget / param_cost_per_k) if memory_budget > 0 else 1)
    config = EngramConfig(
        hidden_size=hidden_size, engram_vocab_size=vocab_size, engram_table_size=[vocab_size * k] * num_orders,
        max_ngram_size=max_ngram_size, n_embed_per_ngram=n_embed_per_ngram, n_head_per_ngram=n_head_per_ngram,
        hc_mult=hc_mult, pad_id=hf_tokenizer.pad_token, kernel_size=kernel_size, seed=42,
    )
    engram_tokenizer = EngramTokenizer(config, hf_tokenizer, layer_ids=layer_ids)
    assert set(engram_tokenizer.vocab_distributions) == set(layer_ids) and k >= 1


def test_seed_002_gpt_data_flow(ref_tokenizer):
    """Seed 002's Block/GPT sketch: every block gets the whole hash dict and picks its layer."""
    from engram import EngramConfig, EngramModule, EngramTokenizer

    tok = ref_tokenizer
    engram_cfg = EngramConfig(hidden_size=32, engram_vocab_size=len(tok), engram_table_size=[len(tok) * 2] * 2,
                              n_embed_per_ngram=16, n_head_per_ngram=4, pad_id=tok.pad_token, seed=42,
                              layer_ids=[1, 2], use_offload=False)

    class EngramSetup:
        cfg = engram_cfg
        tokenizer = EngramTokenizer(engram_cfg, tok)
        layer_ids = engram_cfg.layer_ids

    class Block(nn.Module):
        def __init__(self, engram, layer_id: int):
            super().__init__()
            self.attn, self.mlp = nn.Linear(32, 32), nn.Linear(32, 32)
            self.engram = None
            if engram and layer_id in engram.layer_ids:
                self.engram = EngramModule(config=engram.cfg,
                                           layer_vocab_sizes=engram.tokenizer.vocab_distributions[layer_id])

        def forward(self, hs, hi):
            if self.engram:
                hs = self.engram(hs, hi) + hs
            hs = hs + self.attn(hs)
            return hs + self.mlp(hs)

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(len(tok), 32)
            self.blocks = nn.ModuleList(Block(EngramSetup, i) for i in range(3))

        def forward(self, idx, hash_idx):
            x = self.wte(idx)
            for block in self.blocks:
                x = block(x, hash_idx)
            return x

    model = GPT()
    ids = tok("hello, world", return_tensors="pt").input_ids
    hash_ids = EngramSetup.tokenizer.compress_and_hash(ids, return_tensors="pt")
    out = model.forward(ids, hash_ids)
    assert out.shape == (1, ids.shape[1], 32)
    # Each block used its own layer's hashes: feeding block 1 the hashes of layer 1 explicitly agrees.
    b1 = model.blocks[1]
    h = torch.randn(1, ids.shape[1], 32)
    torch.testing.assert_close(b1.engram(h, hash_ids), b1.engram(h, hash_ids[1]))
    assert not torch.allclose(b1.engram(h, hash_ids[1]), b1.engram(h, hash_ids[2] % 100))
