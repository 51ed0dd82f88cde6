"""transformers integration: EngramForCausalLM.from_base on GPT-2 / Llama / Qwen2 / Mistral / Phi.

Tiny models built from configs (no hub). Engram weights are randomised where a test must be able
to see a wrong decode state (the branch starts at exactly zero, which would hide it).
"""

from __future__ import annotations

import copy

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import engram  # noqa: E402  - registers the Auto classes
from engram import EngramConfig  # noqa: E402
from engram.hf import EngramForCausalLM  # noqa: E402
from engram.hf.cache import EngramCacheLayer  # noqa: E402
from engram.training.optim import build_optimizer  # noqa: E402
from engram.core.tokenizer import CompressedTokenizer  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PhiConfig,
    Qwen2Config,
    Qwen3Config,
)

V, D = 4096, 32
DOC = Path(__file__).resolve().parents[1] / "docs" / "transformers.md"


def tiny_config(family: str):
    common = dict(vocab_size=V, bos_token_id=None, eos_token_id=0, pad_token_id=1)
    if family == "gpt2":
        return GPT2Config(n_embd=D, n_layer=3, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                          attn_pdrop=0.0, **common)
    kw = dict(hidden_size=D, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=64, **common)
    if family == "phi":
        return PhiConfig(resid_pdrop=0.0, embd_pdrop=0.0, **kw)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}[family]
    return cls(num_key_value_heads=2, **kw)


def tiny_base(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family)).eval()


def tiny_engram(**kw) -> EngramConfig:
    base = dict(hidden_size=D, layer_ids=[0, 2], n_embed_per_ngram=16, n_head_per_ngram=2,
                engram_vocab_size=[1009, 1009])
    base.update(kw)
    return EngramConfig(**base)


def randomise(model: EngramForCausalLM, seed: int = 1) -> EngramForCausalLM:
    """Make every Engram weight non-trivial (value projection, gate, conv included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.engram.named_parameters():
            std = 1.0 if "memory" in name else 0.3
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if "norm" in name else 0.0))
    return model


def left_padded_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    ids = torch.where(mask.bool(), ids, 1)  # pad id 1
    return ids, mask


@pytest.fixture(scope="module")
def tok(ref_tokenizer):
    return ref_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- attach
FAMILIES = ["gpt2", "llama", "qwen2", "qwen3", "mistral", "phi"]


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_at_attach(family, tok):
    """Right after attaching, every call form gives the base model's logits bit for bit: the
    wrapper hands the backbone exactly what it was given (positions included)."""
    base = tiny_base(family)
    ids, mask = left_padded_batch()
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    forms = {
        "plain": dict(),
        "mask": dict(attention_mask=mask),
        "mask+positions": dict(attention_mask=mask, position_ids=pos),
        "positions": dict(position_ids=pos),
        "cache": dict(attention_mask=mask, use_cache=True),
        "no cache": dict(attention_mask=mask, use_cache=False),
    }
    with torch.no_grad():
        refs = {name: base(ids, **kw).logits for name, kw in forms.items()}
        model = EngramForCausalLM.from_base(base, tiny_engram(), tok).eval()
        for name, kw in forms.items():
            out = model(ids, **kw).logits
            assert out.shape == (3, 7, V)
            torch.testing.assert_close(out, refs[name], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    assert sorted(model.engram.keys()) == ["0", "2"]
    # ... and the branch is really there: once trained it changes the logits.
    with torch.no_grad():
        assert (randomise(model)(ids, attention_mask=mask).logits - refs["mask"]).abs().max() > 1e-3


def test_training_moves_logits_and_lowers_loss(tok):
    model = EngramForCausalLM.from_base(tiny_base("gpt2"), tiny_engram(), tok)
    ids = torch.randint(2, V, (4, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(ids).logits
    opts = build_optimizer(model, lr=3e-3)
    losses = []
    for _ in range(6):
        loss = model(ids, labels=ids).loss
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
        losses.append(loss.item())
    with torch.no_grad():
        after = model(ids).logits
    assert losses[-1] < losses[0]
    assert (after - before).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_activation_checkpointing_equals_plain_backward(family, tok):
    """Checkpointed layers recompute in backward; Engram layers keep their activations."""
    plain = randomise(EngramForCausalLM.from_base(tiny_base(family), tiny_engram(layer_ids=[1]), tok)).train()
    ckpt = copy.deepcopy(plain)
    ckpt.activation_checkpointing_enable()
    layers = ckpt.family.decoder_layers(ckpt.backbone)
    assert [layer.gradient_checkpointing for layer in layers] == [True, False, True]
    ids = torch.randint(2, V, (2, 10), generator=torch.Generator().manual_seed(4))
    losses = []
    for model in (plain, ckpt):
        loss = model(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    grads = [(a.grad, b.grad) for a, b in zip(plain.parameters(), ckpt.parameters()) if a.grad is not None]
    assert len(grads) == sum(1 for p in plain.parameters() if p.requires_grad)
    for a, b in grads:
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    ckpt.activation_checkpointing_disable()
    assert not any(layer.gradient_checkpointing for layer in layers)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_wrapper_equals_eager(tok):
    """``model.compile(dynamic=True, fullgraph=True)`` on the wrapper: every step (the id check as
    an assert in the graph, the hash, the hooks, the backbone) is one graph with no graph break,
    equal to eager through ``generate``; a bad id still raises."""
    import torch._dynamo

    torch._dynamo.reset()
    eager = randomise(EngramForCausalLM.from_base(tiny_base("gpt2"), tiny_engram(layer_ids=[1]), tok))
    compiled = copy.deepcopy(eager)
    compiled.compile(dynamic=True, fullgraph=True)
    ids, mask = left_padded_batch()
    try:
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids, attention_mask=mask).logits,
                                       eager(ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)
            bad = ids.clone()
            bad[0, 3] = V + 5
            with pytest.raises(RuntimeError, match="vocabulary"):
                compiled(bad, attention_mask=mask)
        kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=1)
        assert torch.equal(compiled.generate(ids, **kw), eager.generate(ids, **kw))
    finally:
        torch._dynamo.reset()


def test_assisted_decoding_equals_greedy_and_crops_the_engram_cache(tok, monkeypatch):
    """Prompt lookup and a draft model propose tokens; rejected ones are cropped from the cache
    (Engram history and conv rows included), so the output equals plain greedy decoding."""
    from engram.hf.cache import EngramCacheLayer

    model = randomise(EngramForCausalLM.from_base(tiny_base("gpt2"), tiny_engram(layer_ids=[1]), tok))
    g = torch.Generator().manual_seed(5)
    pattern = torch.randint(2, V, (1, 6), generator=g)
    ids = torch.cat([pattern, pattern, pattern[:, :3]], 1)  # repeats, so prompt lookup proposes
    kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=1)
    ref = model.generate(ids, **kw)
    crops: list[int] = []
    real_crop = EngramCacheLayer.crop
    monkeypatch.setattr(EngramCacheLayer, "crop", lambda self, k: (crops.append(k), real_crop(self, k))[1])
    assert torch.equal(model.generate(ids, prompt_lookup_num_tokens=4, **kw), ref)
    torch.manual_seed(0)
    draft = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=V, n_embd=16, n_layer=1, n_head=2, n_positions=64,
                                                        bos_token_id=None, eos_token_id=0, pad_token_id=1)).eval()
    assert torch.equal(model.generate(ids, assistant_model=draft, **kw), ref)
    assert any(k < 0 for k in crops)  # tokens really were rolled back


def test_engram_cache_crop_limits():
    from engram.hf.cache import EngramCacheLayer
    from engram.nn.module import EngramLayerState

    layer = EngramCacheLayer(history_len=2, conv_len=3)
    layer.history, layer.seen = torch.arange(4).view(1, 4), 10
    layer.layers[1] = EngramLayerState(conv=torch.zeros(1, 5, 2))
    with pytest.raises(ValueError, match="negative"):
        layer.crop(3)
    with pytest.raises(ValueError, match="only 2 were recorded"):
        layer.crop(-3)
    layer.crop(-1)  # drop one token, then trim to what the next token reads
    assert layer.history.tolist() == [[1, 2]] and layer.layers[1].conv.shape == (1, 3, 2) and layer.seen == 9
    layer.activate_past_recording()
    assert layer.layers[1].keep and layer.layer(2).keep
    layer.record_past = False  # as generation resets it
    assert not layer.layers[1].keep and not layer.layers[2].keep


def test_freeze_backbone_trains_only_engram(tok):
    model = EngramForCausalLM.from_base(tiny_base("llama"), tiny_engram(), tok).freeze_backbone()
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    engram_before = {k: v.clone() for k, v in model.engram.state_dict().items()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.engram_parameters()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(2, V, (2, 10), generator=torch.Generator().manual_seed(4))
    for _ in range(3):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, backbone_before[k]), k
    changed = [k for k, v in model.engram.state_dict().items() if not torch.equal(v, engram_before[k])]
    assert any("memory" in k for k in changed) and any("value_proj" in k for k in changed)
    model.freeze_backbone(False)
    assert all(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------------------------- generation
def _check_steps_match_forward(model, ids, mask, out):
    """Every step's logits from cached generate == full no-cache forward over the final sequence."""
    seq = out.sequences
    B, P = ids.shape
    full_mask = torch.cat([mask, mask.new_ones(B, seq.shape[1] - P)], dim=1)
    pos = (full_mask.cumsum(-1) - 1).clamp_min(0)  # real tokens only, as generate counts them
    with torch.no_grad():
        full = model(seq, attention_mask=full_mask, position_ids=pos, use_cache=False).logits
    assert len(out.logits) == seq.shape[1] - P
    for i, step in enumerate(out.logits):
        torch.testing.assert_close(step, full[:, P - 1 + i], rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_equals_full_forward_left_padded(family, tok):
    """The guard for the next transformers release: for every supported family, cached greedy
    generation with a non-zero Engram branch equals the full forward at every step, and a padded
    row generates what it generates alone. A lost Engram state (n-gram history, conv tails) moves
    the logits by far more than the tolerance."""
    model = randomise(EngramForCausalLM.from_base(tiny_base(family), tiny_engram(), tok)).eval()
    ids, mask = left_padded_batch()
    kw = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True,
              pad_token_id=1, eos_token_id=None)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, **kw)
    _check_steps_match_forward(model, ids, mask, out)
    # A padded row generates what it generates alone.
    for row in (1, 2):
        real = ids[row, mask[row].bool()][None]
        with torch.no_grad():
            alone = model.generate(real, attention_mask=torch.ones_like(real), **kw)
        assert torch.equal(alone.sequences[0, real.shape[1]:], out.sequences[row, ids.shape[1]:])
        for a, b in zip(alone.logits, out.logits):
            torch.testing.assert_close(a[0], b[row], rtol=0, atol=1e-4)


def test_sampling_generate_equals_full_forward(tok):
    model = randomise(EngramForCausalLM.from_base(tiny_base("llama"), tiny_engram(), tok)).eval()
    ids, mask = left_padded_batch(1)
    torch.manual_seed(123)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=0,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=1, eos_token_id=None)
    _check_steps_match_forward(model, ids, mask, out)
    torch.manual_seed(123)
    with torch.no_grad():
        again = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=0,
                               pad_token_id=1, eos_token_id=None)
    assert torch.equal(again, out.sequences)


@pytest.mark.parametrize("family", ["gpt2", "phi"])
def test_beam_search_cache_equals_no_cache(family, tok):
    """Beams reorder the Engram state: cached beam search == beam search recomputing everything."""
    model = randomise(EngramForCausalLM.from_base(tiny_base(family), tiny_engram(), tok)).eval()
    ids, mask = left_padded_batch(2)
    kw = dict(max_new_tokens=6, num_beams=4, num_return_sequences=4, do_sample=False, output_scores=True,
              return_dict_in_generate=True, pad_token_id=1, eos_token_id=None, length_penalty=0.0)
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=mask, **kw)
        plain = model.generate(ids, attention_mask=mask, use_cache=False, **kw)
    assert torch.equal(cached.sequences, plain.sequences)
    torch.testing.assert_close(cached.sequences_scores, plain.sequences_scores, rtol=0, atol=1e-4)
    # The test only means something if beams were actually reordered during the search.
    steps = cached.beam_indices[:, : kw["max_new_tokens"]]
    assert (steps[:, 1:] != steps[:, :1]).any() or (steps != torch.arange(steps.shape[0])[:, None]).any()


def test_incremental_forward_equals_full_forward(tok):
    """Prefill + one token at a time through a Cache == one full forward (left padding included)."""
    from transformers import DynamicCache

    model = randomise(EngramForCausalLM.from_base(tiny_base("mistral"), tiny_engram(), tok)).eval()
    ids, mask = left_padded_batch(3)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
        cache = DynamicCache()  # lazily filled cache: the Engram entry must not take a decoder index
        parts = [model(ids[:, :4], attention_mask=mask[:, :4], past_key_values=cache, use_cache=True).logits]
        for t in range(4, ids.shape[1]):
            parts.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache,
                               use_cache=True).logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-4)
    state = [layer for layer in cache.layers if isinstance(layer, EngramCacheLayer)]
    assert len(state) == 1 and cache.layers[-1] is state[0] and state[0].seen == ids.shape[1]
    assert model._step is None  # nothing of the call is left on the module


def test_cache_under_either_name_and_no_deprecation_warnings(tok, caplog):
    """``cache=`` (transformers >= 5.24) and ``past_key_values=`` (<= 5.23) are one argument on
    every supported version; neither the wrapper nor generate triggers a deprecation warning."""
    import logging
    import warnings

    from transformers import DynamicCache

    from engram.hf import compat as hf_compat

    model = randomise(EngramForCausalLM.from_base(tiny_base("llama"), tiny_engram(), tok)).eval()
    ids, mask = left_padded_batch(4)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
        for name in ("cache", "past_key_values"):
            cache = DynamicCache()
            first = model(ids[:, :5], attention_mask=mask[:, :5], use_cache=True, **{name: cache})
            assert hf_compat.output_cache(first) is cache
            rest = model(ids[:, 5:], attention_mask=mask, use_cache=True, **{name: cache}).logits
            torch.testing.assert_close(torch.cat([first.logits, rest], 1), full, rtol=0, atol=1e-4)
        with pytest.raises(ValueError, match="not both"):
            model(ids, cache=DynamicCache(), past_key_values=DynamicCache())
    caplog.set_level(logging.WARNING, logger="transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        with torch.no_grad():
            model(ids, attention_mask=mask)
            model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=1)
            model.generate(ids, attention_mask=mask, max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=1)
    bad = [r.getMessage() for r in caplog.records if "deprecat" in r.getMessage().lower()]
    assert not bad, bad


def test_prompt_lookup_and_sampling_modes_equal_full_forward(tok):
    """Prompt-lookup decoding == greedy; top-k/top-p sampling logits == the full forward."""
    model = randomise(EngramForCausalLM.from_base(tiny_base("qwen3"), tiny_engram(), tok)).eval()
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=1, eos_token_id=None)
    with torch.no_grad():
        greedy = model.generate(ids, **kw)
        lookup = model.generate(ids, prompt_lookup_num_tokens=3, **kw)
    assert torch.equal(lookup, greedy)
    torch.manual_seed(7)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=50, top_p=0.9, temperature=0.8,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=1, eos_token_id=None)
    _check_steps_match_forward(model, ids, torch.ones_like(ids), out)


# ---------------------------------------------------------------------------------------------- training
def test_table_parameters_is_one_implementation_and_follows_offload(tok, tmp_path):
    """EngramGPT and EngramForCausalLM share table_parameters; a disk table (no parameter) is
    skipped and the optimizer builder still works (it crashed with an AttributeError)."""
    from engram import EngramGPT, GPTConfig
    from engram.models import gpt
    from engram.nn import memory
    from engram.offload import offload

    model = EngramForCausalLM.from_base(tiny_base("gpt2"), tiny_engram(), tok)
    assert [id(p) for p in model.table_parameters()] == [id(e.memory.embedding.weight) for e in model.engram.values()]
    assert memory.table_parameters is gpt.table_parameters
    offload(model, "disk", path=tmp_path)
    assert model.table_parameters() == []
    opts = build_optimizer(model, lr=1e-3)
    assert len(opts) == 1 and isinstance(opts[0], torch.optim.AdamW)
    gpt = EngramGPT(GPTConfig(vocab_size=V, n_layer=2, n_head=2, n_embd=D, engram=tiny_engram(layer_ids=[1])), tok)
    assert [id(p) for p in gpt.table_parameters()] == [id(gpt.engram_layers()[0].memory.embedding.weight)]


def _lm_dataset(n: int = 12, T: int = 12):
    g = torch.Generator().manual_seed(3)
    rows = torch.randint(2, 200, (n, T), generator=g)
    return [{"input_ids": r, "labels": r.clone()} for r in rows]


def test_clip_grad_norm_equals_torch_on_dense_gradients():
    from engram.training.optim import clip_grad_norm_

    g = torch.Generator().manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3, generator=g)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for x, y in zip(a, b):
        x.grad = torch.randn(x.shape, generator=g) * 4
        y.grad = x.grad.clone()
    n1 = clip_grad_norm_(a, 1.0)
    n2 = torch.nn.utils.clip_grad_norm_(b, 1.0)
    torch.testing.assert_close(n1, n2)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)


@pytest.mark.parametrize("sparse", [True, False])
def test_engram_trainer_trains_sparse_and_dense_tables(tok, tmp_path, sparse):
    """EngramTrainer (the transformers Trainer with Engram's optimizer groups and sparse-aware
    clipping) trains tables built with sparse gradients; the stock Trainer cannot (its clipping
    calls torch's clip_grad_norm_, which has no sparse kernel)."""
    from transformers import Trainer, TrainingArguments

    from engram.hf.trainer import EngramTrainer
    from engram.training.optim import CombinedOptimizer, RowSparseAdam

    torch.manual_seed(0)
    model = EngramForCausalLM.from_base(tiny_base("gpt2"), tiny_engram(sparse_grad=sparse), tok)
    model.train()
    tables_before = [p.detach().clone() for p in model.table_parameters()]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3,
                             learning_rate=1e-3, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
                             report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    trainer = EngramTrainer(model=model, args=args, train_dataset=_lm_dataset())
    result = trainer.train()
    combined = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    assert isinstance(combined, CombinedOptimizer)
    inner = combined.optimizers
    assert any(isinstance(o, RowSparseAdam) for o in inner) == sparse
    table_lrs = {g["lr"] for o in inner[1:] for g in o.param_groups}
    dense_lrs = {g["lr"] for g in inner[0].param_groups}
    assert max(table_lrs) == pytest.approx(5 * max(dense_lrs))  # same schedule, 5x for tables
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(norms) == 3 and all(n > 0 for n in norms)
    moved = [not torch.equal(a, b) for a, b in zip(tables_before, model.table_parameters())]
    assert all(moved)
    if sparse:  # the stock Trainer fails on sparse table gradients: the reason EngramTrainer exists
        plain = Trainer(model=model, args=args, train_dataset=_lm_dataset())
        with pytest.raises((NotImplementedError, RuntimeError)):
            plain.train()


# ---------------------------------------------------------------------------------------------- save / load
def test_save_load_auto_identical_logits(tok, tmp_path):
    model = randomise(EngramForCausalLM.from_base(tiny_base("gpt2"), tiny_engram(), tok)).eval()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # no tokenizer needed
    assert isinstance(loaded, EngramForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, ref, rtol=0, atol=0)
    # The right tokenizer is accepted; the config carries the compression table.
    AutoModelForCausalLM.from_pretrained(tmp_path, tokenizer=tok)
    assert loaded.hashing.compressed.fingerprint() == CompressedTokenizer(tok).fingerprint()


def test_fuse_projections_same_logits_and_saves_the_fused_layout(tok, tmp_path):
    model = randomise(EngramForCausalLM.from_base(tiny_base("gpt2"), tiny_engram(), tok)).eval()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    tokens = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=1)
    assert model.fuse_projections() is model
    assert model.engram_config.fused_kv and model.config.engram["fused_kv"]
    assert all(hasattr(e, "wkv") and not hasattr(e, "key_proj") for e in model.engram.values())
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, ref)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=1),
                       tokens)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.engram_config.fused_kv
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, attention_mask=mask).logits, ref)


def test_resize_token_embeddings_keeps_old_ngrams_and_grows_the_table(tok, tmp_path):
    model = randomise(EngramForCausalLM.from_base(tiny_base("gpt2"), tiny_engram(), tok)).eval()
    ids, mask = left_padded_batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits  # (B, T, V)
    old_rows = model.hashing.hash(ids)
    grown = copy.deepcopy(tok)
    grown.add_tokens(["<tool_call>", "<observation>"])
    model.resize_token_embeddings(len(grown), tokenizer=grown)
    assert model.hashing.compressed.raw_vocab_size == len(grown) == V + 2
    assert model.hashing.multiplier_vocab == len(CompressedTokenizer(tok))  # multipliers unchanged
    new_rows = model.hashing.hash(ids)
    assert all(torch.equal(old_rows[k], new_rows[k]) for k in old_rows)  # every old n-gram keeps its rows
    with torch.no_grad():
        after = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(after[..., :V], before, rtol=0, atol=0)
        with_new = torch.cat([ids, torch.tensor([[V], [V + 1], [V]])], 1)
        out = model(with_new, attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)).logits
    assert out.shape[-1] == V + 2 and torch.isfinite(out).all()
    # the new tokens are distinct canonical ids: their n-gram rows differ
    a, b = model.hashing.hash(torch.tensor([[5, V]])), model.hashing.hash(torch.tensor([[5, V + 1]]))
    assert not torch.equal(a[0][:, 1], b[0][:, 1])
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(with_new).logits, model(with_new).logits, rtol=0, atol=0)
    AutoModelForCausalLM.from_pretrained(tmp_path, tokenizer=grown)  # the grown tokenizer matches
    # without a tokenizer each further id gets its own canonical id; a foreign tokenizer is refused
    model.resize_token_embeddings(V + 5)
    assert len(model.hashing.compressed) == len(CompressedTokenizer(grown)) + 3
    with pytest.raises(ValueError, match="differently"):
        model.resize_token_embeddings(V + 9000, tokenizer=_other_tokenizer())


def test_prefetcher_follows_a_resize(tok):
    """A Prefetcher attached before resize_token_embeddings keeps prefetching for the rebuilt hashing."""
    model = randomise(EngramForCausalLM.from_base(tiny_base("gpt2"), tiny_engram(), tok)).eval()
    ref = copy.deepcopy(model)
    engram.offload(model, "host", cache_rows=8, prefetch=True)
    pf = model.engram_prefetcher
    for m in (model, ref):
        torch.manual_seed(0)  # the new embedding rows are drawn at random: the same draws for both
        m.resize_token_embeddings(V + 3)
    ids = torch.cat([torch.randint(2, V, (2, 6), generator=torch.Generator().manual_seed(2)),
                     torch.full((2, 1), V + 1)], 1)
    with torch.no_grad():
        got = model(ids).logits
        want = ref(ids).logits
    assert pf.submitted == 2  # one gather per offloaded layer, from the new mapping
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    pf.close()
    assert model.hashing.step_listeners == []


@pytest.mark.slow  # a fresh Python process (~5 s): CI runs it after the default tests
def test_load_after_import_engram_in_fresh_process(tok, tmp_path):
    model = randomise(EngramForCausalLM.from_base(tiny_base("llama"), tiny_engram(), tok)).eval()
    ids = torch.randint(2, V, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "ref.pt")
    model.save_pretrained(tmp_path / "m")
    code = (
        "import torch, engram; from transformers import AutoModelForCausalLM\n"
        f"d = torch.load({str(tmp_path / 'ref.pt')!r})\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r})\n"
        "with torch.no_grad(): out = m(d['ids']).logits\n"
        "assert type(m).__name__ == 'EngramForCausalLM', type(m)\n"
        "assert torch.equal(out, d['logits']), (out - d['logits']).abs().max()\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- errors
def _other_tokenizer():
    """A tokenizer of another (small) vocabulary, trained here."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.ByteLevel()
    t.train_from_iterator(["the cat sat on the mat", "engram memory lookup"] * 20,
                          trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<pad>"]))
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", pad_token="<pad>")


def test_mismatched_tokenizer_on_load_is_an_error(tok, tmp_path):
    EngramForCausalLM.from_base(tiny_base("gpt2"), tiny_engram(), tok).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not match the compression table of the saved model"):
        AutoModelForCausalLM.from_pretrained(tmp_path, tokenizer=_other_tokenizer())
    # Same size, different compression: also refused, never silently rehashed.
    table = CompressedTokenizer(tok).lookup_table.copy()
    table[[5, 6]] = table[[6, 5]]
    with pytest.raises(ValueError, match="fingerprint"):
        AutoModelForCausalLM.from_pretrained(tmp_path, tokenizer=CompressedTokenizer(lookup_table=table))


def test_attach_errors(tok):
    base = tiny_base("gpt2")
    with pytest.raises(ValueError, match="hidden size 32"):
        EngramForCausalLM.from_base(base, tiny_engram(hidden_size=48), tok)
    with pytest.raises(ValueError, match=r"past the last decoder layer.*3 layers"):
        EngramForCausalLM.from_base(base, tiny_engram(layer_ids=[1, 3]), tok)
    small = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=300, n_embd=D, n_layer=2, n_head=2))
    with pytest.raises(ValueError, match="another vocabulary"):
        EngramForCausalLM.from_base(small, tiny_engram(layer_ids=[0]), tok)
    with pytest.raises(ValueError, match="tokenizer"):
        EngramForCausalLM.from_base(base, tiny_engram(), None)
    from transformers import OPTConfig

    opt = AutoModelForCausalLM.from_config(OPTConfig(vocab_size=V, hidden_size=D, num_hidden_layers=2,
                                                     num_attention_heads=2, ffn_dim=64, word_embed_proj_dim=D))
    with pytest.raises(ValueError, match="model_type='opt' has no Engram adapter"):
        EngramForCausalLM.from_base(opt, tiny_engram(layer_ids=[0]), tok)


def test_forward_errors(tok):
    model = EngramForCausalLM.from_base(tiny_base("gpt2"), tiny_engram(), tok)
    embeds = torch.zeros(1, 4, D)
    with pytest.raises(ValueError, match="needs input_ids"):
        model(inputs_embeds=embeds)
    with pytest.raises(ValueError, match="vocabulary size"):
        model(torch.tensor([[V + 5, 3]]))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.tensor([[4, 3]]), attention_mask=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(RuntimeError, match="outside EngramForCausalLM.forward"):
        model.backbone(torch.tensor([[4, 3]]))
    # input_ids with matching inputs_embeds is fine (hashing uses the ids)
    ids = torch.tensor([[4, 3, 9]])
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids)
        torch.testing.assert_close(model(ids, inputs_embeds=emb).logits, model(ids).logits)


# ---------------------------------------------------------------------------------------------- docs
def test_docs_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, "docs/transformers.md has no python example"
    monkeypatch.chdir(tmp_path)
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/transformers.md[python block {i}]", "exec"), {"__name__": "__doc__"})


@pytest.mark.slow  # a fresh Python process (~5 s): CI runs it after the default tests
@pytest.mark.parametrize("order", ["transformers first", "engram first, a model class next"])
def test_auto_classes_find_engram_checkpoints_in_either_import_order(tok, tmp_path, order):
    """`import engram` no longer imports transformers; the Auto classes still find the model."""
    model = EngramForCausalLM.from_base(tiny_base("gpt2"), tiny_engram(), tok)
    model.save_pretrained(tmp_path / "m")
    first = ("import transformers, engram" if order == "transformers first"
             else "import engram, sys; assert 'transformers' not in sys.modules; from transformers import GPT2LMHeadModel")
    code = (f"{first}\nfrom transformers import AutoConfig, AutoModelForCausalLM\n"
            f"c = AutoConfig.from_pretrained({str(tmp_path / 'm')!r}); assert type(c).__name__ == 'EngramCausalLMConfig'\n"
            "assert type(AutoConfig.for_model('engram_causal_lm')).__name__ == 'EngramCausalLMConfig'\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r})\n"
            "assert type(m).__name__ == 'EngramForCausalLM', type(m)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
