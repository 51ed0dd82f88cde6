"""A tokenizer for examples, tests and ``engram demo`` that needs no network.

A small byte-level BPE is trained in a second on a fixed text shipped with
the package (``engram/assets/tiny_corpus.txt``: the first 120 kB of Tiny Shakespeare, public
domain), so its vocabulary never changes when the package's code does.
"""

from __future__ import annotations

from pathlib import Path


def local_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE trained on the package's fixed corpus (a ``PreTrainedTokenizerFast``).

    Deterministic: the same ``vocab_size`` gives the same ids on every machine and version that
    ships the same ``engram/assets/tiny_corpus.txt``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = Path(__file__).parent / "assets" / "tiny_corpus.txt"
    text = corpus.read_text(encoding="utf-8").split("\n\n")  # one speech per item
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|endoftext|>")
