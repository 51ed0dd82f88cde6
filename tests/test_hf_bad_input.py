"""EngramForCausalLM on awkward input: a model vocabulary padded past the tokenizer, ids outside the
vocabulary, a config.json edited after saving, loading without ``import engram``.

Tiny models from configs (tests/test_hf.py's helpers), the reference tokenizer (4096 ids).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

import engram  # noqa: F401  - registers the Auto classes
from engram.core.hashing import NgramHashMapping
from engram.core.tokenizer import CompressedTokenizer
from engram.hf import EngramForCausalLM
from engram.hf.modeling import LOAD_HINT, extend_lookup_table
from engram.hf.phi import PhiEngramConfig
from test_hf import D, V, _other_tokenizer, randomise, tiny_base, tiny_engram

PAD = 60  # spare ids past the tokenizer: the model embeds V + PAD (Qwen pads to a multiple of 64/128)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok(ref_tokenizer):
    return ref_tokenizer


def padded_qwen(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=V + PAD, hidden_size=D, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=None, eos_token_id=0, pad_token_id=1, tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).eval()


# ---------------------------------------------------------------------------------------------- 1. padded vocab
def test_padded_vocab_ids_hash_generate_and_round_trip(tok, tmp_path):
    model = randomise(EngramForCausalLM.from_base(padded_qwen(), tiny_engram(), tok)).eval()
    ref = NgramHashMapping(tiny_engram(), tok)  # what the tokenizer's ids hash to without the padding
    n_comp = len(ref.compressed)

    # Every id the tokenizer has keeps its canonical id and its rows bit for bit; the spare ids get
    # one new canonical id each, past the compressed vocabulary.
    table = model.hashing.compressed.lookup_table
    assert table.shape == (V + PAD,)
    assert np.array_equal(table[:V], ref.compressed.lookup_table)
    assert np.array_equal(table[V:], np.arange(n_comp, n_comp + PAD))
    assert model.hashing.multipliers == ref.multipliers and model.hashing.table_sizes == ref.table_sizes
    ids = torch.randint(2, V, (3, 9), generator=torch.Generator().manual_seed(3))
    got, want = model.hashing.hash(ids), ref.hash(ids)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # distinct spare ids are distinct n-grams
    a, b = model.hashing.hash(torch.tensor([[5, V]])), model.hashing.hash(torch.tensor([[5, V + PAD - 1]]))
    assert not torch.equal(a[0][:, 1], b[0][:, 1])

    # forward with spare ids (the old table stopped at the tokenizer: ValueError / device index error)
    with_spare = torch.cat([ids, torch.tensor([[V], [V + 7], [V + PAD - 1]])], 1)
    with torch.no_grad():
        logits = model(with_spare).logits
    assert logits.shape == (3, 10, V + PAD) and torch.isfinite(logits).all()

    # generation that can only sample spare ids, and whose cached steps equal a full forward
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(ids[:, :4], max_new_tokens=4, do_sample=True, top_k=0, suppress_tokens=list(range(V)),
                             output_logits=True, return_dict_in_generate=True, pad_token_id=1, eos_token_id=None)
        full = model(out.sequences, use_cache=False).logits
    new = out.sequences[:, 4:]
    assert new.shape == (3, 4) and bool((new >= V).all()) and bool((new < V + PAD).all())
    for i, step in enumerate(out.logits):
        finite = torch.isfinite(step)  # suppressed ids are -inf
        torch.testing.assert_close(step[finite], full[:, 3 + i][finite], rtol=0, atol=1e-4)

    # save / load: the grown table round-trips; the tokenizer it grew from still matches it
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert len(saved["engram_hashing"]["compressed"]["lookup_table"]) == V + PAD
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert loaded.hashing.compressed.raw_vocab_size == V + PAD
    assert loaded.hashing.multiplier_vocab == n_comp
    with torch.no_grad():
        torch.testing.assert_close(loaded(with_spare).logits, model(with_spare).logits, rtol=0, atol=0)
    AutoModelForCausalLM.from_pretrained(tmp_path / "m", tokenizer=tok)
    model.check_tokenizer(tok)
    with pytest.raises(ValueError, match="does not match the compression table"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m", tokenizer=_other_tokenizer())
    # A tokenizer grown into the spare ids with new tokens compresses exactly like the grown table.
    grown = CompressedTokenizer(lookup_table=np.concatenate([ref.compressed.lookup_table, [n_comp, n_comp + 1]]))
    model.check_tokenizer(grown)
    folded = CompressedTokenizer(lookup_table=np.concatenate([ref.compressed.lookup_table, [7]]))
    with pytest.raises(ValueError, match="fingerprint"):
        model.check_tokenizer(folded)  # a spare id now folding onto an existing token: a different model

    # A save from before the table grew (table = the tokenizer's 4096 ids) loads grown, same logits.
    shutil.copytree(tmp_path / "m", tmp_path / "old")
    saved["engram_hashing"]["compressed"] = ref.compressed.state_dict()
    (tmp_path / "old" / "config.json").write_text(json.dumps(saved))
    old = AutoModelForCausalLM.from_pretrained(tmp_path / "old")
    assert np.array_equal(old.hashing.compressed.lookup_table, table)
    with torch.no_grad():
        torch.testing.assert_close(old(with_spare).logits, model(with_spare).logits, rtol=0, atol=0)


def test_shrunk_embeddings_save_load_and_bound_the_ids(tok, tmp_path):
    """resize_token_embeddings to fewer rows keeps the (longer) table; that save used to fail to load
    ("the tokenizer has 4096 ids but the base model embeds only 4086")."""
    model = randomise(EngramForCausalLM.from_base(tiny_base("gpt2"), tiny_engram(), tok)).eval()
    model.resize_token_embeddings(V - 10)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.num_valid_ids == V - 10
    ids = torch.tensor([[3, V - 11, 7]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
        with pytest.raises(ValueError, match=rf"id {V - 10}, outside.*0\.\.{V - 11}"):
            loaded(torch.tensor([[3, V - 10]]))


def test_extend_lookup_table():
    t = np.array([0, 1, 1, 2, 0])
    assert np.array_equal(extend_lookup_table(t, 8), [0, 1, 1, 2, 0, 3, 4, 5])
    assert np.array_equal(extend_lookup_table(t, 5), t)
    assert np.array_equal(extend_lookup_table(t, 3), t)  # never shrinks


# ---------------------------------------------------------------------------------------------- 2. bad ids
def test_negative_and_out_of_vocab_ids_are_a_clear_error(tok):
    model = EngramForCausalLM.from_base(tiny_base("gpt2"), tiny_engram(), tok).eval()
    few = torch.tensor([[4, -1, 9]])  # the few-ids (Python) path
    many = torch.randint(2, V, (2, 12), generator=torch.Generator().manual_seed(0))  # the tensor / C path
    many[1, 5] = -100
    calls = []  # forwards of the wrapper: generate must refuse the prompt before its first one
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        for ids, bad in ((few, -1), (many, -100)):
            with pytest.raises(ValueError, match=rf"id {bad}, outside.*valid ids are 0\.\.{V - 1}.*negative"):
                model(ids)
            calls.clear()
            with pytest.raises(ValueError, match=rf"id {bad}, outside.*0\.\.{V - 1}"):
                model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=1)
            assert calls == []
        range_msg = rf"id {V + 3}, outside.*valid ids are 0\.\.{V - 1} \(vocabulary size {V}\)"
        with pytest.raises(ValueError, match=range_msg):
            model(torch.tensor([[4, V + 3]]))
        calls.clear()
        with pytest.raises(ValueError, match=rf"id {V}, outside"):
            model.generate(input_ids=torch.full((1, 20), V), max_new_tokens=2, pad_token_id=1)
        assert calls == []
        with pytest.raises(TypeError, match="integer"):
            model(torch.tensor([[1.0, 2.0]]))
        # padded vocabulary: the range is the model's, not the tokenizer's
        padded = EngramForCausalLM.from_base(padded_qwen(), tiny_engram(), tok).eval()
        padded(torch.tensor([[4, V + PAD - 1]]))
        with pytest.raises(ValueError, match=rf"id {V + PAD}, outside.*0\.\.{V + PAD - 1}"):
            padded(torch.tensor([[4, V + PAD]]))


# ---------------------------------------------------------------------------------------------- 3. edited config
def _edit(src, dst, **engram_fields):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["engram"].update(engram_fields)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_config_edited_after_saving_is_an_error(tok, tmp_path, caplog):
    model = randomise(EngramForCausalLM.from_base(tiny_base("gpt2"), tiny_engram(), tok)).eval()
    model.save_pretrained(tmp_path / "m")
    ids = torch.randint(2, V, (2, 6), generator=torch.Generator().manual_seed(1))

    # A correct save loads silently (no warning, no load report), output_loading_info as usual.
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "m", output_loading_info=True)
        again = EngramForCausalLM.from_pretrained(tmp_path / "m")
    assert not [r.getMessage() for r in caplog.records], caplog.text
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)

    # Flags that drop weights: unexpected keys (transformers would only log them).
    for field, match in (("use_short_conv", r"not in the model: engram\.0\.short_conv"),
                         ("use_gate", r"not in the model: engram\.0\.key_norm_weight"),
                         ("value_bias", r"not in the model: engram\.0\.key_proj\.bias")):
        edited = _edit(tmp_path / "m", tmp_path / field, **{field: False})
        with pytest.raises(ValueError, match=match + r".*config\.json edited"):
            AutoModelForCausalLM.from_pretrained(edited)
    # A flag that needs weights the checkpoint lacks: missing keys (transformers would initialise them).
    plain = randomise(EngramForCausalLM.from_base(tiny_base("gpt2"), tiny_engram(use_short_conv=False), tok))
    plain.save_pretrained(tmp_path / "noconv")
    edited = _edit(tmp_path / "noconv", tmp_path / "conv_on", use_short_conv=True)
    with pytest.raises(ValueError, match=r"missing from the checkpoint: engram\.0\.short_conv\.conv\.weight"):
        EngramForCausalLM.from_pretrained(edited)
    # Layers and table sizes: the saved hashing constants no longer fit.
    for field, value in (("layer_ids", [0]), ("engram_vocab_size", [1013, 1009])):
        edited = _edit(tmp_path / "m", tmp_path / field, **{field: value})
        with pytest.raises(ValueError, match=r"gives table sizes .* but its saved engram_hashing has .* edited"):
            AutoModelForCausalLM.from_pretrained(edited)


# ---------------------------------------------------------------------------------------------- 4. no import engram
@pytest.mark.slow  # a fresh Python process (~5 s): CI runs it after the default tests
def test_saved_config_says_how_to_load_and_auto_works_after_import_engram(tok, tmp_path):
    """transformers has no hook that finds a model type in an installed package: without
    ``import engram`` it refuses the checkpoint (advising an upgrade). The saved config.json then
    says what to do, near its top; after ``import engram`` the Auto classes load it."""
    EngramForCausalLM.from_base(tiny_base("gpt2"), tiny_engram(), tok).save_pretrained(tmp_path / "m")
    text = (tmp_path / "m" / "config.json").read_text()
    hint = json.loads(text)["engram_about"]
    assert hint == LOAD_HINT
    for words in ("pip install engram-torch", "import engram", "EngramForCausalLM.from_pretrained",
                  "no trust_remote_code"):
        assert words in hint
    assert text.index('"engram_about"') < text.index('"engram_hashing"')  # before the long table
    phi = json.loads(PhiEngramConfig(vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=4)
                     .to_json_string())
    assert phi["engram_about"] == LOAD_HINT

    code = (
        "import sys\nfrom transformers import AutoModelForCausalLM\n"
        f"path = {str(tmp_path / 'm')!r}\n"
        "try:\n    AutoModelForCausalLM.from_pretrained(path)\n"
        "except ValueError as e:\n    assert 'engram_causal_lm' in str(e), e\n"
        "else:\n    raise AssertionError('transformers loaded an Engram checkpoint without engram')\n"
        "assert 'engram' not in sys.modules\n"
        "import engram\n"
        "m = AutoModelForCausalLM.from_pretrained(path)\n"
        "assert type(m).__name__ == 'EngramForCausalLM', type(m)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
