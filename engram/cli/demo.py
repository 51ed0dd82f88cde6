"""``engram demo``: build an Engram GPT, hash a sentence and run it (no network, no data files)."""

from __future__ import annotations

import argparse
import time

import torch

from engram.demo import local_tokenizer


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", help="path or hub name of a HF tokenizer (default: train a tiny local BPE)")
    p.add_argument("--text", default="Engram looks up N-gram memory in O(1): the cat sat on the mat.")
    p.add_argument("--layers", default="1", help="comma-separated 0-based Engram block ids")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from engram import EngramConfig, EngramGPT, GPTConfig

    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else local_tokenizer()
    layers = [int(x) for x in args.layers.split(",") if x.strip()]
    ecfg = EngramConfig(hidden_size=128, layer_ids=layers, n_embed_per_ngram=64, n_head_per_ngram=4,
                        engram_vocab_size=[len(tok) * 5, len(tok) * 5], pad_id=tok.pad_token, seed=args.seed)
    t0 = time.perf_counter()
    model = EngramGPT(GPTConfig(vocab_size=len(tok), n_layer=4, n_head=4, n_embd=128, block_size=256, engram=ecfg), tok)
    built = time.perf_counter() - t0
    ids = torch.tensor([tok(args.text)["input_ids"]])
    hashes = model.hashing.hash(ids)
    counts = model.num_params()
    print(f"tokenizer: {len(tok)} ids -> {len(model.hashing.compressed)} canonical ids")
    print(f"model: {counts['dense']:,} dense + {counts['table']:,} table parameters (built in {built:.2f}s)")
    print(f"text: {args.text!r} -> {ids.shape[1]} tokens")
    for lid, h in hashes.items():
        print(f"layer {lid}: hash ids {tuple(h.shape)}, primes {model.hashing.table_sizes[lid][0][:2]}..., "
              f"first token rows {h[0, 0, :4].tolist()}...")
    logits, loss = model(ids[:, :-1], targets=ids[:, 1:])
    print(f"logits {tuple(logits.shape)}, untrained loss {loss.item():.3f} (ln V = {torch.log(torch.tensor(float(len(tok)))):.3f})")
    out = model.generate(ids[:, :4], max_new_tokens=8, temperature=0)
    print(f"greedy continuation (untrained): {tok.decode(out[0, 4:])!r}")
    return 0
