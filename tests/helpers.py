"""Small models and tokenizers the tests share (no HF tokenizer, no network)."""

from __future__ import annotations

import numpy as np
import torch

from engram import EngramConfig
from engram.core.tokenizer import CompressedTokenizer
from engram.models.gpt import EngramGPT, GPTConfig


def tiny_tokenizer(vocab: int = 97) -> CompressedTokenizer:
    """A compressed tokenizer without HF: raw id i -> canonical i // 2 (pairs merge, as casing does)."""
    return CompressedTokenizer(lookup_table=np.arange(vocab, dtype=np.int64) // 2)


def tiny_gpt(sparse: bool) -> EngramGPT:
    eng = EngramConfig(hidden_size=32, layer_ids=[1], max_ngram_size=3, n_embed_per_ngram=16, n_head_per_ngram=4,
                       engram_vocab_size=[211, 307], pad_id=1, sparse_grad=sparse)
    torch.manual_seed(0)
    return EngramGPT(GPTConfig(vocab_size=97, n_layer=2, n_head=2, n_embd=32, block_size=32, engram=eng),
                     tiny_tokenizer())


#: Flags of a tiny `engram train` / `study` run (a second or two on 2 cores).
TINY = ["--layers", "2", "--dim", "32", "--heads", "2", "--seq-len", "32", "--batch-size", "4",
        "--table-size", "101", "--vocab-size", "300", "--engram-dim", "32", "--eval-tokens", "256",
        "--warmup-steps", "2", "--no-progress", "--threads", "1"]


def make_text(n_lines: int = 600, seed: int = 0) -> str:
    """A small generated corpus of four-word sentences."""
    import random  # noqa: PLC0415

    rng = random.Random(seed)
    words = ["the cat", "a dog", "my friend", "the king", "sees", "loves", "finds", "the moon", "an apple", "the river"]
    return "\n".join(" ".join(rng.choice(words) for _ in range(4)) + "." for _ in range(n_lines)) + "\n"
