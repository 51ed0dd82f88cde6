"""PhiEngramConfig / PhiEngramForCausalLM (seed 004 spelling) on the shared EngramForCausalLM path."""

from __future__ import annotations

import pytest
import torch

import engram  # noqa: E402,F401  - registers the Auto classes
from engram.hf import EngramForCausalLM  # noqa: E402
from engram.hf.phi import PhiEngramConfig, PhiEngramForCausalLM  # noqa: E402
from transformers import AutoModelForCausalLM, PhiConfig, PhiForCausalLM  # noqa: E402

V = 4096
SMALL = dict(n_embed_per_ngram=16, n_head_per_ngram=2, engram_vocab_size=[1009, 1009])
PHI = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
           max_position_embeddings=64, resid_pdrop=0.0, embd_pdrop=0.0, eos_token_id=0, pad_token_id=1,
           bos_token_id=None)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def phi_dir(tmp_path_factory):
    """A plain Phi checkpoint directory (stands in for microsoft/phi-1)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("phi")
    PhiForCausalLM(PhiConfig(**PHI)).save_pretrained(path)
    return path


def ids_batch():
    return torch.randint(2, V, (2, 8), generator=torch.Generator().manual_seed(0))


def test_config_fields_and_defaults():
    c = PhiEngramConfig(**PHI, engram_layer_ids=[0, 2], engram_config=SMALL)
    e = c.to_engram_config()
    assert (e.hidden_size, e.layer_ids, e.n_head_per_ngram, e.zero_init_output) == (32, [0, 2], 2, True)
    # The reference placement [1, 15] is kept where it fits (seed example: 2 layers -> [1]).
    assert PhiEngramConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4).engram_layer_ids == [1]
    assert PhiEngramConfig(num_hidden_layers=24).engram_layer_ids == [1, 15]
    with pytest.raises(ValueError, match=r"engram_layer_ids \[3\] are outside the 3 decoder layers"):
        PhiEngramConfig(**PHI, engram_layer_ids=[1, 3])
    with pytest.raises(ValueError, match="hidden_size"):
        PhiEngramConfig(**PHI, engram_config={**SMALL, "hidden_size": 64})
    with pytest.raises(ValueError, match="n_embed_per_ngram"):
        PhiEngramConfig(**PHI, engram_config={**SMALL, "n_embed_per_ngram": 15})


def test_seed_spelling_from_base_config_dict(ref_tokenizer):
    """Seed 004: PhiEngramConfig(**base_config.to_dict(), engram_layer_ids=[...])."""
    base_config = PhiConfig(**PHI)
    config = PhiEngramConfig(**base_config.to_dict(), engram_layer_ids=[1], engram_config=SMALL)
    model = PhiEngramForCausalLM(config, tokenizer=ref_tokenizer)
    assert isinstance(model, EngramForCausalLM) and isinstance(model.backbone, PhiForCausalLM)
    assert model.config.model_type == "phi_engram"
    with torch.no_grad():
        assert model(ids_batch()).logits.shape == (2, 8, V)


def test_load_plain_phi_checkpoint_with_fresh_engram(phi_dir, ref_tokenizer):
    phi = PhiForCausalLM.from_pretrained(phi_dir).eval()
    ids = ids_batch()
    with torch.no_grad():
        ref = phi(ids).logits
    model, info = PhiEngramForCausalLM.from_pretrained(
        phi_dir, engram_layer_ids=[0, 2], engram_config=SMALL, tokenizer=ref_tokenizer, output_loading_info=True
    )
    assert info["unexpected_keys"] == set()
    assert info["missing_keys"] and all(k.startswith("engram.") for k in info["missing_keys"])
    # Every Phi weight came from the checkpoint, under backbone.
    phi_sd = phi.state_dict()
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, phi_sd[k]), k
    # Fresh Engram weights: a real table, correct offsets, zero output so logits are unchanged.
    mem = model.engram["0"].memory
    assert 0.8 < mem.embedding.weight.std().item() < 1.2
    sizes = torch.tensor(mem.sizes)
    assert torch.equal(mem.offsets, torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)[:-1]]))
    assert torch.equal(model.engram["0"].key_norm_weight, torch.ones_like(model.engram["0"].key_norm_weight))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, ref, rtol=0, atol=0)


def test_save_load_roundtrip_and_generation(phi_dir, ref_tokenizer, tmp_path):
    model = PhiEngramForCausalLM.from_pretrained(phi_dir, engram_layer_ids=[1], engram_config=SMALL,
                                                 tokenizer=ref_tokenizer).eval()
    with torch.no_grad():
        for name, p in model.engram.named_parameters():
            p.add_(torch.randn_like(p) * 0.3)
    ids = ids_batch()
    with torch.no_grad():
        ref = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # no tokenizer needed
    assert isinstance(loaded, PhiEngramForCausalLM) and loaded.config.engram_layer_ids == [1]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref, rtol=0, atol=0)
        out = loaded.generate(ids, max_new_tokens=5, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=1, eos_token_id=None)
        full = loaded(out.sequences, use_cache=False).logits
    for i, step in enumerate(out.logits):
        torch.testing.assert_close(step, full[:, ids.shape[1] - 1 + i], rtol=0, atol=1e-4)


def test_tokenizer_checks(ref_tokenizer, tmp_path, caplog):
    config = PhiEngramConfig(**PHI, engram_layer_ids=[1], engram_config=SMALL)
    # Seed API: no tokenizer -> uncompressed ids, said out loud.
    with caplog.at_level("WARNING", logger="engram.hf"):
        model = PhiEngramForCausalLM(config)
    assert "uncompressed" in caplog.text
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not match the compression table of the saved model"):
        PhiEngramForCausalLM.from_pretrained(tmp_path, tokenizer=ref_tokenizer)
    with pytest.raises(TypeError, match="PhiEngramConfig"):
        PhiEngramForCausalLM(PhiConfig(**PHI))


def test_freeze_backbone_phi(ref_tokenizer):
    config = PhiEngramConfig(**PHI, engram_layer_ids=[1], engram_config=SMALL)
    model = PhiEngramForCausalLM(config, tokenizer=ref_tokenizer).freeze_backbone()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("engram.") for n in names)
    assert len(model.engram_parameters()) == len(names)
