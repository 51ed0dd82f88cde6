"""The seed's own code runs against this package: ``lenML/engram_torch_unofficial`` (the library whose
README is seeds 001/002), tests ``tests/test_engram_suite.py`` and ``tests/test_embed.py`` at commit
bd60becafa48416e7244601f1c78025844165830, README at 74a20a73d64586b4c77960d1c7ce67e79588fa6a.

That repository has no license file (none in any stored version, and its README names none), so
its code is not copied here: these tests do exactly what its tests and examples do (same imports,
calls, shapes and attributes; a local tokenizer in place of "gpt2") and assert what they only print.
None of its tests reads hash ids of its own hash, so none depends on its deviating addressing
(raw ids, primes searched from ``engram_table_size // heads``); ours stays the official one.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_seed_module_paths_are_aliases_of_ours():
    import engram
    from engram.compat import EngramModule, EngramTokenizer, OffloadEmbedding
    from engram.config import EngramConfig  # noqa: F401 - the seed's import
    from engram.core.hashing import NgramHashMapping
    from engram.modules import EngramModule as M
    from engram.modules import MultiHeadEmbedding, OffloadMultiHeadEmbedding
    from engram.nn.module import Engram
    from engram.storage.tables import HostMultiHeadEmbedding
    from engram.tokenizer import AdapterTokenizer, EngramTokenizer as T

    assert T is EngramTokenizer is engram.EngramTokenizer and issubclass(T, NgramHashMapping)
    assert M is EngramModule is engram.EngramModule and issubclass(M, Engram)
    assert engram.OffloadEmbedding is OffloadEmbedding and issubclass(OffloadEmbedding, HostMultiHeadEmbedding)
    assert MultiHeadEmbedding is engram.MultiHeadEmbedding
    assert OffloadMultiHeadEmbedding is engram.OffloadMultiHeadEmbedding
    assert engram.AdapterTokenizer is AdapterTokenizer


def test_seed_default_table_size(ref_tokenizer):
    """The seed's test gives ``engram_vocab_size=len(tok)`` and no ``engram_table_size``: the default
    is the seed's 129280 * 5 rows per order; each head's table is the next unused prime above it."""
    from engram.config import EngramConfig
    from engram.tokenizer import EngramTokenizer

    cfg = EngramConfig(hidden_size=64, engram_vocab_size=len(ref_tokenizer), n_embed_per_ngram=16,
                       n_head_per_ngram=2, seed=42)
    assert cfg.engram_vocab_size == [646400, 646400] and cfg.tokenizer_vocab_size == len(ref_tokenizer)
    primes = [p for order in EngramTokenizer(cfg, ref_tokenizer, layer_ids=[2]).vocab_distributions[2] for p in order]

    def is_prime(n: int) -> bool:
        return n > 1 and all(n % k for k in range(2, int(n**0.5) + 1))

    expected, n = [], 646400 - 1  # the first 4 primes >= 646400 (2 orders x 2 heads), one per head
    while len(expected) < 4:
        n += 1
        if is_prime(n):
            expected.append(n)
    assert primes == expected


def test_seed_engram_suite_workflow(ref_tokenizer):
    """tests/test_engram_suite.py: hash, build, zero-init conv, table on the CPU, forward, backward."""
    from engram.config import EngramConfig
    from engram.core.hashing import NgramHashMapping
    from engram.modules import EngramModule
    from engram.tokenizer import EngramTokenizer

    hf_tokenizer = copy.deepcopy(ref_tokenizer)  # AutoTokenizer.from_pretrained("gpt2") in the seed
    hf_tokenizer.pad_token = hf_tokenizer.eos_token
    config = EngramConfig(hidden_size=512, engram_vocab_size=len(hf_tokenizer), max_ngram_size=3,
                          n_embed_per_ngram=64, n_head_per_ngram=4, hc_mult=1, seed=42)
    layer_id = 2
    engram_tokenizer = EngramTokenizer(config, hf_tokenizer, layer_ids=[layer_id])
    text = ["Hello world, this is a test for Engram.", "Short sentence."]
    input_ids = hf_tokenizer(text, return_tensors="np", padding=True, truncation=True, max_length=20)["input_ids"]
    hash_ids = engram_tokenizer.compress_and_hash(input_ids, layer_id=layer_id)
    assert isinstance(hash_ids, np.ndarray) and hash_ids.shape == (*input_ids.shape, 8)
    # The official addressing, not the seed's: the same rows as our NgramHashMapping.
    official = NgramHashMapping(config, hf_tokenizer, layer_ids=[layer_id]).hash(torch.from_numpy(input_ids))
    assert np.array_equal(hash_ids, official[layer_id].numpy())

    module = EngramModule(config, engram_tokenizer.vocab_distributions[layer_id])
    assert module.memory.embedding.weight.device.type == "cpu"
    assert module.conv is module.short_conv.conv and module.conv.weight.abs().sum().item() == 0
    reference = copy.deepcopy(module).to(DEVICE) if DEVICE != "cpu" else None  # table beside the rest

    module.to(DEVICE)
    hidden_states = torch.randn(*input_ids.shape, config.hidden_size).to(DEVICE)
    hash_tensor = torch.from_numpy(hash_ids).long().to(DEVICE)
    module.memory.cpu()  # the seed's "offload embedding to CPU": the rest stays on DEVICE
    output = module(hidden_states, hash_tensor)
    assert output.shape == hidden_states.shape and output.device.type == DEVICE
    output.sum().backward()
    grad = module.memory.embedding.weight.grad
    assert grad is not None and grad.device.type == "cpu" and grad.abs().sum() > 0

    if reference is None:  # one device only: the table is already beside the rest
        return
    # The table on another device changes nothing: output and gradients equal the one-device module's.
    ref_out = reference(hidden_states, hash_tensor)
    ref_out.sum().backward()
    torch.testing.assert_close(output, ref_out, rtol=0, atol=0)
    rows = (hash_tensor.cpu() + module.memory.offsets).unique()  # the table rows this batch touched
    ref_grad = reference.memory.embedding.weight.grad
    torch.testing.assert_close(grad[rows], ref_grad[rows.to(DEVICE)].cpu())  # (sums of repeated rows: any order)
    assert not grad.index_fill(0, rows, 0).any() and not ref_grad.index_fill(0, rows.to(DEVICE), 0).any()  # nothing else
    torch.testing.assert_close(module.value_proj.weight.grad, reference.value_proj.weight.grad)


def test_seed_conv_attribute_needs_a_short_conv():
    from engram.config import EngramConfig
    from engram.modules import EngramModule

    cfg = EngramConfig(hidden_size=16, n_embed_per_ngram=8, n_head_per_ngram=2, engram_vocab_size=[31, 37],
                       use_short_conv=False)
    with pytest.raises(AttributeError, match="conv"):
        EngramModule(cfg, 100).conv


@pytest.fixture
def ref_emb():
    torch.manual_seed(0)
    emb = nn.Embedding(10000, 64)
    nn.init.normal_(emb.weight)
    return emb


def test_seed_offload_embedding_from_embedding(ref_emb):
    """tests/test_embed.py (which runs only with CUDA there; here on whichever device there is)."""
    from engram import OffloadEmbedding

    ref = ref_emb.to(DEVICE)
    off = OffloadEmbedding.from_embedding(ref, cache_lines=100)
    assert off.weight.device.type == "cpu" and off.cache_weight.device.type == DEVICE
    assert off.cache_weight.shape == (100, 64) and not off.weight.requires_grad
    assert torch.equal(off.weight, ref.weight.detach().cpu())
    ref.weight.data.add_(1.0)  # a copy: the source's later changes do not reach it
    assert not torch.equal(off.weight, ref.weight.detach().cpu())


def test_seed_offload_embedding_equals_nn_embedding(ref_emb):
    from engram import OffloadEmbedding

    ref = ref_emb.to(DEVICE)
    off = OffloadEmbedding.from_embedding(ref, cache_lines=100)
    small = torch.randint(0, 10000, (10, 5), device=DEVICE)  # fits in the cache
    large = torch.arange(0, 200, device=DEVICE).unsqueeze(0)  # 200 distinct rows, 100 cache lines
    with torch.no_grad():
        for ids in (small, small, large):  # the second small one is served from the cache
            out = off(ids)
            assert out.device.type == DEVICE and torch.equal(out, ref(ids))
    assert off.cache.hits > 0 and off.cache.stats()["filled"] == 100

    model = nn.Sequential(OffloadEmbedding.from_embedding(ref, cache_lines=200), nn.Linear(64, 10).to(DEVICE))
    assert model(torch.randint(0, 1000, (4, 32), device=DEVICE)).shape == (4, 32, 10)


def test_seed_offload_embedding_padding_and_defaults():
    from engram import OffloadEmbedding

    ref_pad = nn.Embedding(1000, 32, padding_idx=0).to(DEVICE)
    off_pad = OffloadEmbedding.from_embedding(ref_pad, cache_lines=50)
    x = torch.tensor([[0, 10, 20]], device=DEVICE)
    y = off_pad(x)
    assert torch.all(y[0, 0] == 0) and torch.equal(y, ref_pad(x).detach())

    fresh = OffloadEmbedding(1000, 8, padding_idx=-1)  # as nn.Embedding: N(0, 1), padding row zero
    assert fresh.padding_idx == 999 and torch.all(fresh.weight[999] == 0) and fresh.weight[:999].std() > 0.5
    assert fresh.cache.capacity == 100  # default: 10% of the rows, as the seed's
    tiny = OffloadEmbedding(5, 8)  # 10% of 5 rows = 0 cache lines: no cache, rows straight from the host table
    assert tiny.cache is None and tiny.cache_weight is None
    assert torch.equal(tiny(torch.tensor([4, 0])).cpu(), tiny.weight[[4, 0]])
    with pytest.raises(ValueError, match="max_norm"):
        OffloadEmbedding(10, 4, max_norm=1.0)
    with pytest.raises(ValueError, match="cache_lines"):
        OffloadEmbedding(10, 4, cache_lines=-1)
    with pytest.raises(ValueError, match=r"must be in \[0, 1000\)"):
        off_pad(torch.tensor([[1000]]))


def test_seed_readme_offload_example(ref_tokenizer):
    """Seed 001's offload example: the module, the swap and ``preload`` run; its tokenizer, built
    from the default config (646,400-row tables), cannot address the example's 1,000-row tables,
    which is said clearly (the seed itself stopped earlier: ``EngramModule(EngramConfig(), 1000)``
    was a TypeError there)."""
    from engram import EngramConfig, EngramModule, EngramTokenizer, OffloadMultiHeadEmbedding

    engram_1 = EngramModule(EngramConfig(), 1000)
    offload_memory = OffloadMultiHeadEmbedding(sizes=engram_1.memory.sizes,
                                               dim=engram_1.memory.embedding.embedding_dim,
                                               cache_size=engram_1.memory.sizes[0] // 2)
    engram_1.memory = offload_memory
    engram_tokenizer = EngramTokenizer(engram_1.cfg, ref_tokenizer, layer_ids=[2])
    input_ids = ref_tokenizer("The quick brown fox jumps over the lazy dog", return_tensors="np")["input_ids"]
    hash_ids = engram_tokenizer.compress_and_hash(input_ids, layer_id=2)
    with pytest.raises(ValueError, match=r"hash_ids of head \d+ must be in \[0, 1000\)"):
        offload_memory.preload(hash_ids)
    offload_memory.preload(hash_ids % 1000)  # ids that fit: the cache fills
    assert offload_memory.cache.stats()["filled"] > 0


def test_seed_adapter_tokenizer():
    """``AdapterTokenizer``: a non-transformers tokenizer implementing decode, convert_ids_to_tokens
    and __len__ is enough to build an ``EngramTokenizer``."""
    from engram.config import EngramConfig
    from engram.tokenizer import AdapterTokenizer, EngramTokenizer

    class Chars(AdapterTokenizer):
        vocab = ["<pad>", "a", "A", "b", " ", "B", "c"]

        def decode(self, tokens, *args, **kwargs):
            return "".join(self.vocab[t] for t in tokens)

        def convert_ids_to_tokens(self, ids, *args, **kwargs):
            return self.vocab[ids]

        def __len__(self):
            return len(self.vocab)

    cfg = EngramConfig(hidden_size=16, n_embed_per_ngram=8, n_head_per_ngram=2, engram_vocab_size=len(Chars.vocab),
                       engram_table_size=[31, 37], pad_id=0)
    tok = EngramTokenizer(cfg, Chars(), layer_ids=[1])
    canon = tok.compressed.lookup_table
    assert canon[1] == canon[2] and canon[3] == canon[5] and len(set(canon.tolist())) == 5  # a=A, b=B
    a_b = tok.compress_and_hash(np.array([[1, 3, 6]]), layer_id=1)
    assert np.array_equal(a_b, tok.compress_and_hash(np.array([[2, 5, 6]]), layer_id=1))  # "abc" = "ABc"
    for method, args in (("decode", ([1],)), ("convert_ids_to_tokens", (1,)), ("__len__", ())):
        with pytest.raises(NotImplementedError, match=method):
            getattr(AdapterTokenizer(), method)(*args)
