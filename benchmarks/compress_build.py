"""Time building the compressed tokenizer for a large (150k-id) byte-level BPE vocabulary.

No hub access: the vocabulary is synthesised (random byte strings of 1-8 bytes, mixed case,
spaces, accents and invalid UTF-8 fragments) and wrapped as a ``PreTrainedTokenizerFast``, so the
decode + normalise path runs exactly as for a real tokenizer. Usage:

    python benchmarks/compress_build.py --vocab 151643 --repeats 3
"""

from __future__ import annotations

import argparse
import random
import statistics
import time


def synthetic_tokenizer(vocab: int, seed: int = 0):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    byte_to_char = pre_tokenizers.ByteLevel.alphabet()
    alphabet = sorted(byte_to_char)
    words = set(alphabet)
    pieces = ["Ġ", "the", "The", "THE", "é", "Ã", "ing", "Ġa", "Ġ\n", "ĠĠ"]
    while len(words) < vocab:
        n = rng.randint(1, 8)
        w = "".join(rng.choice(pieces) if rng.random() < 0.3 else rng.choice(alphabet) for _ in range(n))
        words.add(w)
    vocab_map = {w: i for i, w in enumerate(sorted(words))}
    tok = Tokenizer(models.BPE(vocab=vocab_map, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=151643)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from engram import CompressedTokenizer

    tok = synthetic_tokenizer(args.vocab)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ct = CompressedTokenizer(tok)
        times.append(time.perf_counter() - t0)
    print(f"vocab {len(tok):,} ids -> {len(ct):,} canonical ids; build median {statistics.median(times):.2f}s "
          f"(runs: {', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()
