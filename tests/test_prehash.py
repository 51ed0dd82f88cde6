"""Hashing ahead of the step (engram.training.prehash): the same batches and row ids as hashing
inside the step, so training is bit-identical, with document boundaries, gradient accumulation
and a jump to another step (a resume)."""

from __future__ import annotations

import pytest
import torch

from engram.training import data
from engram.training.loop import Trainer, TrainConfig
from engram.training.prehash import HashAhead

from helpers import make_text


@pytest.fixture(scope="module")
def tok_ids():
    text = make_text()
    tok = data.train_bpe_tokenizer(text, 300)
    return tok, data.encode(tok, text)


def _model(tok, sparse: bool):
    from engram import EngramConfig, GPTConfig
    from engram.training.loop import build_model

    e = EngramConfig(hidden_size=32, layer_ids=[0, 1], n_embed_per_ngram=32, n_head_per_ngram=2,
                     engram_vocab_size=[53, 59], pad_id=tok.eos_token_id, sparse_grad=sparse)
    return build_model(GPTConfig(vocab_size=len(tok), n_layer=2, n_head=2, n_embd=32, block_size=32, engram=e), tok, 0)


class Bounded(data.TokenBatcher):
    """A batcher whose rows hold document starts (as a prepared corpus gives)."""

    def batch_with_boundaries(self, step):
        x, y, _ = super().batch_with_boundaries(step)
        starts = torch.zeros(x.shape, dtype=torch.bool)
        starts[:, (step * 7) % x.shape[1]] = True
        starts[0, 3] = True
        return x, y, starts


@pytest.mark.parametrize("sparse,accum,bounded", [(True, 1, False), (False, 2, True), (True, 4, True)])
def test_hashing_ahead_trains_bit_identically_to_hashing_in_the_step(tok_ids, sparse, accum, bounded):
    tok, ids = tok_ids
    cls = Bounded if bounded else data.TokenBatcher
    runs = {}
    for ahead in (True, False):
        t = Trainer(_model(tok, sparse), cls(ids, 8, 32, seed=1),
                    TrainConfig(lr=3e-3, warmup_steps=1, max_steps=5, batch_size=8, seq_len=32, grad_accum=accum),
                    hash_ahead=ahead)
        assert (t.hash_ahead is not None) == ahead
        for _ in range(5):
            t.train_step()
        runs[ahead] = (t.losses, {k: v.clone() for k, v in t.model.state_dict().items()})
    assert runs[True][0] == runs[False][0]
    assert all(torch.equal(runs[True][1][k], runs[False][1][k]) for k in runs[False][1])


def test_hash_ahead_gives_the_models_hash_and_survives_a_jump(tok_ids):
    tok, ids = tok_ids
    model = _model(tok, True)
    b = Bounded(ids, 4, 32, seed=3)
    ahead = HashAhead(b, model.hashing)
    try:
        for step in (0, 1, 2, 7, 8, 3):  # in order, then a jump forward, then back (a resume)
            x, y, starts, hid = ahead.get(step)
            x0, y0, s0 = b.batch_with_boundaries(step)
            assert torch.equal(x, x0) and torch.equal(y, y0) and torch.equal(starts, s0)
            want = model.hashing.hash_step(x0, doc_starts=s0)[0]  # what the model computes in its forward
            assert set(hid) == set(want) == {0, 1}
            assert all(torch.equal(hid[k], want[k]) for k in want)
    finally:
        ahead.close()


def test_a_model_without_engram_has_nothing_to_hash_ahead(tok_ids):
    from engram import GPTConfig
    from engram.training.loop import build_model

    tok, ids = tok_ids
    m = build_model(GPTConfig(vocab_size=len(tok), n_layer=1, n_head=2, n_embd=32, block_size=32), tok, 0)
    t = Trainer(m, data.TokenBatcher(ids, 4, 32, seed=1), TrainConfig(max_steps=2, batch_size=4, seq_len=32))
    assert t.hash_ahead is None
    t.train_step()
    assert len(t.losses) == 1
