"""Where a CUDA training step and a decode step make the host wait for the GPU.

Runs the study-sized model (sparse and dense tables, fp32 and bf16) for a few training steps and
a few cached decode steps under ``torch.cuda.set_sync_debug_mode("warn")`` and prints every
synchronising call with the Python line that made it, counted per step. Zero lines for the
steps between loss read-backs is the goal (tests/test_cuda.py asserts it on a tiny model).

    python benchmarks/cuda_sync_sites.py
"""

from __future__ import annotations

import collections
import traceback
import warnings

import torch

from engram import EngramConfig, GPTConfig
from engram.training import data
from engram.training.loop import Trainer, TrainConfig, build_model


def sites(fn, steps: int) -> collections.Counter:
    """``{call site: count}`` of synchronising CUDA calls made by ``steps`` calls of ``fn``."""
    found: collections.Counter = collections.Counter()
    old = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message) and "prototype" not in str(message):  # not the mode's own notice
            stack = [f for f in traceback.extract_stack()[:-1] if "engram" in f.filename or "benchmarks" in f.filename]
            where = " <- ".join(f"{f.filename.split('engram/')[-1]}:{f.lineno} {f.name}" for f in stack[-3:][::-1])
            found[f"{str(message)[:60]} @ {where or f'{filename}:{lineno}'}"] += 1
        else:
            old(message, category, filename, lineno, file, line)

    warnings.showwarning = record
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            for _ in range(steps):
                fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = old
    return found


def main() -> None:
    corpus = data.load_corpus()
    tok = data.get_tokenizer(None, corpus.train_text, 4096)
    ids = data.encode(tok, corpus.train_text)
    batcher = data.TokenBatcher(ids, 16, 128, seed=0)
    for sparse in (True, False):
        for dtype in ("fp32", "bf16"):
            eng = EngramConfig(hidden_size=128, layer_ids=[1], max_ngram_size=3, n_embed_per_ngram=128,
                               n_head_per_ngram=4, engram_vocab_size=[17000, 17000], pad_id=tok.pad_token_id,
                               sparse_grad=sparse, zero_init_output=True)
            cfg = GPTConfig(vocab_size=len(tok), n_layer=4, n_head=4, n_embd=128, block_size=128, engram=eng)
            t = Trainer(build_model(cfg, tok, 0), batcher, TrainConfig(batch_size=16, seq_len=128, max_steps=1000,
                                                                      dtype=dtype), device="cuda")
            for _ in range(3):
                t.train_step()
            t.sync()
            t.sync_every = 10**9
            found = sites(t.train_step, 5)
            print(f"training, {'sparse' if sparse else 'dense'} tables, {dtype}: "
                  f"{sum(found.values()) / 5:.1f} synchronising calls per step")
            for k, v in found.most_common():
                print(f"   {v / 5:4.1f}/step  {k}")
    model = t.model.eval()
    with torch.inference_mode():
        cache = model.new_cache()
        logits, _ = model(torch.randint(0, len(tok), (1, 16), device="cuda"), cache=cache)
        state = {"nxt": logits[:, -1].argmax(-1, keepdim=True)}

        def step() -> None:
            lg, _ = model(state["nxt"], cache=cache)
            state["nxt"] = lg[:, -1].argmax(-1, keepdim=True)

        step()
        found = sites(step, 5)
    print(f"decode: {sum(found.values()) / 5:.1f} synchronising calls per step")
    for k, v in found.most_common():
        print(f"   {v / 5:4.1f}/step  {k}")


if __name__ == "__main__":
    main()
