"""Training-step time of the study's model with and without Engram in each mode of the loop, side by side.

Modes: fp32 eager, bf16 autocast eager, fp32 compiled, bf16 compiled (``--modes`` to choose).
Every (mode, model) pair trains its own copy of the same model on the same batches; after
``--warmup`` steps each (compilation happens there), ``--rounds`` rounds of one timed step per
pair, order alternating. Prints median seconds per step, tokens/s, the ratio to the first mode
and Engram's step-time overhead over the same model without it, with the load average, thread
count and device. ``--width/--layers/--batch/--seq`` scale the model (default: the study's).

    python benchmarks/train_modes.py --threads 1
    python benchmarks/train_modes.py --device cuda --width 768 --layers 12 --batch 32 --seq 512 --out r.json
"""

from __future__ import annotations

import argparse
import json
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
    p.add_argument("--models", default="base,engram", help="base (no Engram) and/or engram")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    p.add_argument("--hash", default="ahead", help="comma-separated: ahead (hashed in a background thread, the "
                   "default of the loop) and/or in-step (the model hashes inside the step); both: side by side")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    corpus = data.load_corpus()
    tok = data.get_tokenizer(None, corpus.train_text, 4096)
    ids = data.encode(tok, corpus.train_text)
    eng = EngramConfig(hidden_size=a.width, layer_ids=[1], max_ngram_size=3, n_embed_per_ngram=128, n_head_per_ngram=4,
                       engram_vocab_size=[17000, 17000], pad_id=tok.pad_token_id, sparse_grad=True,
                       zero_init_output=True)
    batcher = data.TokenBatcher(ids, a.batch, a.seq, seed=0)
    # (model, hash mode) pairs: the hash mode only matters with Engram
    pairs = [(model, h) for model in a.models.split(",") for h in (a.hash.split(",") if model == "engram" else ["-"])]
    trainers = {}
    for m in a.modes.split(","):
        dtype, comp = MODES[m]
        tcfg = TrainConfig(batch_size=a.batch, seq_len=a.seq, max_steps=10_000, dtype=dtype, compile=comp)
        for model, hash_mode in pairs:
            cfg = GPTConfig(vocab_size=len(tok), n_layer=a.layers, n_head=max(1, a.width // 64), n_embd=a.width,
                            block_size=a.seq, engram=eng if model == "engram" else None)
            name = model if model == "base" or "," not in a.hash else f"{model}:{hash_mode}"
            trainers[(m, name)] = Trainer(build_model(cfg, tok, 0), batcher, tcfg, name=f"{m}/{name}", device=a.device,
                                          hash_ahead=hash_mode != "in-step")
    load0 = os.getloadavg()[0]
    for t in trainers.values():
        for _ in range(a.warmup):
            t.train_step()
        t.sync()
    times = {k: [] for k in trainers}
    order = list(trainers)
    for r in range(a.rounds):
        for k in (order if r % 2 == 0 else order[::-1]):
            trainers[k].train_step()
            trainers[k].sync()  # an accelerator's step time is read back here
            times[k].append(trainers[k].step_times[-1])
    base = statistics.median(times[order[0]])
    ntok = a.batch * a.seq
    print(f"device {a.device}, threads {torch.get_num_threads()}, load average {load0:.2f} -> {os.getloadavg()[0]:.2f}, "
          f"{a.rounds} interleaved rounds after {a.warmup} warm-up steps, B={a.batch} T={a.seq} "
          f"width {a.width} layers {a.layers}")
    rows = []
    for (m, model), ts in times.items():
        med = statistics.median(ts)
        other = times.get((m, "base"))
        over = med / statistics.median(other) - 1 if other and model != "base" else None
        rows.append({"mode": m, "model": model, "median_s": med, "tok_s": ntok / med, "vs_first": base / med,
                     "engram_overhead": over, "last_loss": trainers[(m, model)].losses[-1]})
        print(f"{m:14s} {model:15s} median {med * 1e3:8.2f} ms/step  {ntok / med:10,.0f} tok/s  x{base / med:.2f} vs "
              f"{order[0][0]}/{order[0][1]}" + (f"  Engram step overhead {over:+.1%}" if over is not None else "")
              + f"  last loss {trainers[(m, model)].losses[-1]:.3f}")
    if a.out:
        info = {"device": a.device, "threads": torch.get_num_threads(), "load": [load0, os.getloadavg()[0]],
                "batch": a.batch, "seq": a.seq, "width": a.width, "layers": a.layers, "rounds": a.rounds,
                "torch": torch.__version__,
                "gpu": torch.cuda.get_device_name() if a.device.startswith("cuda") else None}
        with open(a.out, "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
