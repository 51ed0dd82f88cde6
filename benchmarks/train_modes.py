"""Training-step time of the study's Engram model in each mode of the loop, side by side.

Modes: fp32 eager, bf16 autocast eager, fp32 compiled, bf16 compiled (``--modes`` to choose).
Every mode trains its own copy of the same model on the same batches; after ``--warmup`` steps
each (compilation happens there), ``--rounds`` rounds of one timed step per mode, order
alternating. Prints median seconds per step, tokens/s and the ratio to fp32 eager, with the load
average and thread count.

    python benchmarks/train_modes.py --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from engram import EngramConfig, GPTConfig
from engram.training import data
from engram.training.loop import Trainer, TrainConfig, build_model

MODES = {"fp32": ("fp32", False), "bf16": ("bf16", False), "fp32+compile": ("fp32", True),
         "bf16+compile": ("bf16", True)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--rounds", type=int, default=10)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    corpus = data.load_corpus()
    tok = data.get_tokenizer(None, corpus.train_text, 4096)
    ids = data.encode(tok, corpus.train_text)
    eng = EngramConfig(hidden_size=128, layer_ids=[1], max_ngram_size=3, n_embed_per_ngram=128, n_head_per_ngram=4,
                       engram_vocab_size=[17000, 17000], pad_id=tok.pad_token_id, sparse_grad=True,
                       zero_init_output=True)
    cfg = GPTConfig(vocab_size=len(tok), n_layer=4, n_head=4, n_embd=128, block_size=128, engram=eng)
    batcher = data.TokenBatcher(ids, 16, 128, seed=0)
    trainers = {}
    for m in a.modes.split(","):
        dtype, comp = MODES[m]
        trainers[m] = Trainer(build_model(cfg, tok, 0), batcher,
                              TrainConfig(batch_size=16, seq_len=128, max_steps=10_000, dtype=dtype, compile=comp), name=m)
    load0 = os.getloadavg()[0]
    for t in trainers.values():
        for _ in range(a.warmup):
            t.train_step()
    times = {m: [] for m in trainers}
    order = list(trainers)
    for r in range(a.rounds):
        for m in (order if r % 2 == 0 else order[::-1]):
            trainers[m].train_step()
            times[m].append(trainers[m].step_times[-1])
    base = statistics.median(times[order[0]])
    print(f"threads {torch.get_num_threads()}, load average {load0:.2f} -> {os.getloadavg()[0]:.2f}, "
          f"{a.rounds} interleaved rounds after {a.warmup} warm-up steps, B=16 T=128")
    for m, ts in times.items():
        med = statistics.median(ts)
        print(f"{m:14s} median {med * 1e3:7.1f} ms/step  {16 * 128 / med:8,.0f} tok/s  x{base / med:.2f} vs {order[0]}  "
              f"last loss {trainers[m].losses[-1]:.3f}")


if __name__ == "__main__":
    main()
