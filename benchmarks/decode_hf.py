"""Greedy decode speed of a tiny transformers GPT-2 with and without Engram (tokens/s, medians).

Run: ``python benchmarks/decode_hf.py [--reps 7] [--new-tokens 64] [--threads 1] [--device cpu]``.

Both models share the same backbone weights (A = the plain ``GPT2LMHeadModel``, B = the same
model wrapped by ``EngramForCausalLM.from_base``); runs alternate A, B, A, B, ... so load from
other processes hits both equally, and the median of ``--reps`` runs is reported for batch 1 and 8.

Model: GPT-2, vocab 4096, 4 layers, n_embd 128, 4 heads; Engram at layers [1, 3], (2,3)-grams x
4 heads, n_embed_per_ngram 128, 10,007 base rows per head. Prompt 16 tokens, ``--new-tokens``
generated with the KV cache, no early stop.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from engram import EngramConfig
from engram.hf import EngramForCausalLM
from engram.core.tokenizer import CompressedTokenizer

VOCAB, D = 4096, 128


def build(device: str) -> tuple[torch.nn.Module, EngramForCausalLM]:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=4, n_head=4, n_positions=512, eos_token_id=0,
                     bos_token_id=0, pad_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    base = GPT2LMHeadModel(cfg).to(device).eval()
    # Benchmark only: an identity compression table stands in for a tokenizer (same cost per token).
    tok = CompressedTokenizer(lookup_table=np.arange(VOCAB, dtype=np.int64))
    ecfg = EngramConfig(hidden_size=D, layer_ids=[1, 3], n_embed_per_ngram=128, n_head_per_ngram=4,
                        engram_vocab_size=[10007, 10007], pad_id=1)
    # The wrapper shares the base model's modules and only adds hooks; keep an unhooked twin as A.
    plain = GPT2LMHeadModel(cfg).to(device).eval()
    plain.load_state_dict(base.state_dict())
    model = EngramForCausalLM.from_base(base, ecfg, tok).eval()
    return plain, model


@torch.no_grad()
def decode_seconds(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    if prompt.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=1, eos_token_id=None)
    if prompt.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 on a shared machine)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    plain, model = build(args.device)
    results = {}
    for batch in (1, 8):
        prompt = torch.randint(2, VOCAB, (batch, 16), generator=torch.Generator().manual_seed(batch)).to(args.device)
        decode_seconds(plain, prompt, 4), decode_seconds(model, prompt, 4)  # warm-up
        times = {"base": [], "engram": []}
        for _ in range(args.reps):  # interleaved A B A B
            times["base"].append(decode_seconds(plain, prompt, args.new_tokens))
            times["engram"].append(decode_seconds(model, prompt, args.new_tokens))
        tps = {k: batch * args.new_tokens / statistics.median(v) for k, v in times.items()}
        results[f"batch{batch}"] = {**{f"{k}_tokens_per_s": round(v, 1) for k, v in tps.items()},
                                    "engram_over_base": round(tps["engram"] / tps["base"], 3)}
        print(f"batch {batch}: base {tps['base']:.0f} tok/s, engram {tps['engram']:.0f} tok/s "
              f"(ratio {tps['engram'] / tps['base']:.3f}; median of {args.reps}, {args.new_tokens} new tokens)")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
