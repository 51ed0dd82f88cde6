"""Corpora, BPE tokenizer cache and token batching (engram.training.data)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from engram.training import data


def make_text(n_lines: int = 400, seed: int = 0) -> str:
    rng = random.Random(seed)
    subj = ["the cat", "a dog", "my friend", "the old king", "our ship"]
    verb = ["sees", "loves", "finds", "carries", "forgets"]
    obj = ["the moon", "a red apple", "the river", "an old song", "the key"]
    return "\n".join(f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)}." for _ in range(n_lines)) + "\n"


def test_split_holdout_keeps_all_text_and_cuts_at_a_line():
    text = make_text()
    head, tail = data.split_holdout(text)
    assert head + tail == text
    assert 0.08 < len(tail) / len(text) < 0.12
    assert head.endswith("\n")
    with pytest.raises(ValueError, match="fraction"):
        data.split_holdout(text, 1.5)


def test_files_corpus_holdout_and_eval_data(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(make_text(seed=1))
    b.write_text(make_text(seed=2))
    c = data.files_corpus([str(a)])
    assert c.train_text + c.eval_text != ""
    assert a.read_text().startswith(c.train_text)
    assert a.read_text().endswith(c.eval_text)
    c2 = data.files_corpus([str(a)], [str(b)])
    assert c2.train_text == a.read_text() and c2.eval_text == b.read_text()


@pytest.mark.parametrize("content, message", [(None, "does not exist"), ("", "is empty"), ("  \n\n", "is empty")])
def test_bad_data_files_raise(tmp_path, content, message):
    p = tmp_path / "x.txt"
    if content is not None:
        p.write_text(content)
    with pytest.raises(ValueError, match=message):
        data.load_corpus([str(p)])


def test_load_corpus_argument_errors(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text(make_text())
    with pytest.raises(ValueError, match="not both"):
        data.load_corpus([str(p)], dataset="wikitext")
    with pytest.raises(ValueError, match="--eval-data needs --data"):
        data.load_corpus(None, [str(p)])


def test_dataset_without_package_is_a_clear_error():
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="datasets"):
            data.load_corpus(dataset="wikitext")
    else:
        pytest.skip("datasets is installed")


def test_stdlib_corpus_is_deterministic_and_split():
    c1 = data.stdlib_corpus(max_chars=200_000)
    c2 = data.stdlib_corpus(max_chars=200_000)
    assert c1.train_text == c2.train_text and c1.eval_text == c2.eval_text
    assert len(c1.train_text) > len(c1.eval_text) > 0
    assert "def " in c1.train_text and "standard library" in c1.source


def test_bpe_tokenizer_round_trips_and_is_cached(tmp_path):
    text = make_text()
    tok = data.train_bpe_tokenizer(text, vocab_size=300)
    assert len(tok) == 300
    ids = data.encode(tok, text)
    assert ids.dtype == np.int32 and len(ids) < len(text)  # BPE merges something
    assert tok.decode(ids.tolist()) == text
    tok2 = data.train_bpe_tokenizer(text, vocab_size=300)  # from the cache
    assert tok2.get_vocab() == tok.get_vocab()
    np.testing.assert_array_equal(data.encode(tok2, text), ids)
    assert (data.cache_dir() / "tokenizers").exists()
    with pytest.raises(ValueError, match="vocab_size"):
        data.train_bpe_tokenizer(text, vocab_size=100)


def test_batches_are_a_function_of_seed_and_step():
    tokens = np.arange(1000, dtype=np.int32)
    b = data.TokenBatcher(tokens, batch_size=3, seq_len=8, seed=5)
    x, y = b.batch(7)
    assert x.shape == y.shape == (3, 8) and x.dtype == torch.long
    torch.testing.assert_close(y[:, :-1], x[:, 1:])  # targets are the next tokens
    torch.testing.assert_close(x[:, 1:] - x[:, :-1], torch.ones(3, 7, dtype=torch.long))  # contiguous windows
    x2, _ = data.TokenBatcher(tokens, 3, 8, seed=5).batch(7)
    assert torch.equal(x, x2)
    assert not torch.equal(x, b.batch(8)[0])
    assert not torch.equal(x, data.TokenBatcher(tokens, 3, 8, seed=6).batch(7)[0])


def test_text_too_short_for_context():
    with pytest.raises(ValueError, match="too short for a context of 64"):
        data.TokenBatcher(np.arange(50), 2, 64)
    with pytest.raises(ValueError, match="held-out text .* too short"):
        data.eval_batches(np.arange(10), 2, 64, 1000)


def test_eval_batches_cover_distinct_windows():
    tokens = np.arange(1001)
    batches = data.eval_batches(tokens, batch_size=4, seq_len=10, max_tokens=100)
    xs = torch.cat([x for x, _ in batches])
    assert xs.shape == (10, 10)
    starts = xs[:, 0].tolist()
    assert len(set(starts)) == 10 and all(s % 10 == 0 for s in starts)
    assert starts[-1] >= 900  # spread over the whole text, not just its start
