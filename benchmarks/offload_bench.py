"""Offloaded Engram tables: generation speed, quantisation cost, cache hit rates, a >RAM table.

Run (each prints a table and writes benchmarks/results/offload_<what>.json)::

    python benchmarks/offload_bench.py quality   # train briefly; int8/fp8 memory + val loss; hit rates
    python benchmarks/offload_bench.py speed     # generate tok/s: memory, host, disk warm/cold, int8, ...
    python benchmarks/offload_bench.py bigfile --gib 32   # a sparse table file larger than RAM

Model (the study size of benchmarks/perf_targets.py): GPTConfig(vocab 4096, n_layer 4, n_head 4,
n_embd 128, block 256), Engram at block 1, (2,3)-grams x 8 heads, n_embed_per_ngram 128 (rows of
16 floats), base rows per head 50,021 (10x the perf_targets 1x size: 51 MB of table).
Timings are interleaved (ABAB...) medians, so load from other users hits every variant alike.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from engram import EngramConfig, EngramGPT, GPTConfig
from engram.training.data import TokenBatcher, eval_batches
from engram.core.hashing import NgramHashMapping
from engram.offload import (DiskMultiHeadEmbedding, HostMultiHeadEmbedding, engram_modules, offload,
                            table_fingerprint, table_path)
from engram.cli.bench import interleaved, make_train_step
from engram.training.loop import peak_rss_bytes

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
RESULTS = ROOT / "benchmarks" / "results"
# The trained study model (57 MB) between `quality` and `speed`: under the repo's ignored build/
# directory (private, 0700), never a predictable name in a shared /tmp; loaded with weights_only=True.
CKPT = ROOT / "build" / "offload_bench" / "study_model.pt"


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(SHARED / "reference" / "tokenizer-bpe4096"))


def study_config(rows: int = 50_021) -> GPTConfig:
    eng = EngramConfig(hidden_size=128, layer_ids=[1], n_embed_per_ngram=128, n_head_per_ngram=8,
                       engram_vocab_size=[rows, rows], pad_id=None)
    return GPTConfig(vocab_size=4096, n_layer=4, n_head=4, n_embd=128, block_size=256, engram=eng)


def encode_file(tok, path: Path) -> np.ndarray:
    return np.asarray(tok(path.read_text())["input_ids"], dtype=np.int64)


def table_bytes(model) -> int:
    total = 0
    for e in engram_modules(model):
        mem = e.memory
        total += mem.storage_bytes() if hasattr(mem, "storage_bytes") else mem.embedding.weight.numel() * 4
    return total


def save(name: str, data: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"offload_{name}.json").write_text(json.dumps(data, indent=2))
    print(json.dumps(data, indent=2))


# ------------------------------------------------------------------------------------ quality
@torch.no_grad()
def val_loss(model, batches) -> float:
    model.eval()
    return float(np.mean([model(x, y)[1].item() for x, y in batches]))


def train_study_model(tok, steps: int, seed: int = 0):
    tokens = encode_file(tok, SHARED / "data" / "tinyshakespeare.txt")
    split = int(len(tokens) * 0.9)
    torch.manual_seed(seed)
    model = EngramGPT(study_config(), tok)
    batcher = TokenBatcher(tokens[:split], batch_size=8, seq_len=128, seed=seed)
    train_step = make_train_step(model, lr=3e-3, weight_decay=0.0)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        loss = train_step(*batcher.batch(step))
        if step % 25 == 0:
            print(f"step {step} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    return model, tokens[split:]


def cmd_quality(args) -> None:
    tok = tokenizer()
    if args.reuse and CKPT.exists():  # the split is deterministic: same held-out tokens
        model = load_study_model(tok)
        tokens = encode_file(tok, SHARED / "data" / "tinyshakespeare.txt")
        val_tokens = tokens[int(len(tokens) * 0.9):]
    else:
        model, val_tokens = train_study_model(tok, args.steps)
        CKPT.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        torch.save(model.state_dict(), CKPT)
    batches = eval_batches(val_tokens, batch_size=8, seq_len=256, max_tokens=args.eval_tokens)
    base_loss = val_loss(model, batches)
    base_bytes = table_bytes(model)
    quant = {}
    for q in ("int8", "fp8"):
        m = offload(copy.deepcopy(model), "host", quantize=q)
        loss = val_loss(m, batches)
        quant[q] = {"val_loss": loss, "delta": loss - base_loss, "table_bytes": table_bytes(m),
                    "memory_saved": 1 - table_bytes(m) / base_bytes}
    host_loss = val_loss(offload(copy.deepcopy(model), "host"), batches)
    hits = hit_rates(model, tok, args.hit_tokens)
    save("quality", {"train_steps": args.steps, "val_tokens": sum(x.numel() for x, _ in batches),
                     "val_loss_fp32": base_loss, "val_loss_host_offload": host_loss,
                     "table_bytes_fp32": base_bytes, "quantized": quant, "cache_hit_rates": hits,
                     "machine": "2-core CPU, shared"})


@torch.no_grad()
def hit_rates(model, tok, n_tokens: int) -> dict:
    """Decode-like stream (one token per lookup) over real text through caches of several sizes."""
    out = {}
    e = engram_modules(model)[0]
    weight = e.memory.embedding.weight
    for name, path in (("tinyshakespeare_val", None), ("wikitext2_valid", SHARED / "data" / "wikitext-2" / "valid.txt")):
        ids = (encode_file(tok, path) if path else encode_file(tok, SHARED / "data" / "tinyshakespeare.txt")[-60_000:])
        ids = torch.from_numpy(ids[:n_tokens])[None]  # (1, n)
        hid = model.hashing.hash(ids)[e.layer_id]  # (1, n, H): hashing the whole stream == step by step
        res = {}
        for rows in (1024, 4096, 16384):
            for policy in ("lru", "lfu"):
                mem = HostMultiHeadEmbedding(e.memory.sizes, e.memory.embedding_dim, weight=weight,
                                             cache_rows=rows, cache_policy=policy)
                for t in range(hid.shape[1]):
                    mem(hid[:, t : t + 1])
                res[f"{rows}_{policy}"] = round(mem.cache.stats()["hit_rate"], 4)
        distinct = int(torch.unique(hid + e.memory.offsets).numel())
        out[name] = {"tokens": int(ids.shape[1]), "lookups": int(hid.numel()), "distinct_rows": distinct,
                     "table_rows": e.memory.num_rows, "hit_rate": res}
        print(name, out[name], file=sys.stderr)
    return out


# ------------------------------------------------------------------------------------ speed
def load_study_model(tok) -> EngramGPT:
    model = EngramGPT(study_config(), tok)
    if CKPT.exists():
        model.load_state_dict(torch.load(CKPT, map_location="cpu", weights_only=True))
    else:
        print("no trained checkpoint (run `quality` first); timing a random model", file=sys.stderr)
    return model.eval()


def cmd_speed(args) -> None:
    torch.set_num_threads(args.threads)
    tok = tokenizer()
    model = load_study_model(tok)
    work = Path(tempfile.mkdtemp(prefix="engram_offload_"))
    try:
        variants = {
            "memory": model,
            "host": offload(copy.deepcopy(model), "host"),
            "host_cache4k": offload(copy.deepcopy(model), "host", cache_rows=4096),
            "host_int8": offload(copy.deepcopy(model), "host", quantize="int8"),
            "disk_warm": offload(copy.deepcopy(model), "disk", path=work / "a"),
            "disk_cold": offload(copy.deepcopy(model), "disk", path=work / "b"),
            "disk_cold_prefetch": offload(copy.deepcopy(model), "disk", path=work / "c", prefetch=True),
        }

        def drop(m) -> Callable[[], None]:
            return lambda: [e.memory.drop_page_cache() for e in engram_modules(m)]

        prompt = torch.from_numpy(encode_file(tok, SHARED / "data" / "tinyshakespeare.txt")[:args.prompt])[None]
        ref = model.generate(prompt, args.new_tokens, temperature=0)
        same = {k: bool(torch.equal(m.generate(prompt, args.new_tokens, temperature=0), ref)) for k, m in variants.items()}
        fns = {k: (lambda m=m: m.generate(prompt, args.new_tokens, temperature=0)) for k, m in variants.items()}
        before = {k: drop(variants[k]) for k in ("disk_cold", "disk_cold_prefetch")}
        med = interleaved(fns, args.reps, before)
        tps = {k: args.new_tokens / v for k, v in med.items()}
        save("speed", {"prompt_tokens": args.prompt, "new_tokens": args.new_tokens, "batch": 1, "reps": args.reps,
                       "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
                       "relative_to_memory": {k: round(v / tps["memory"], 3) for k, v in tps.items()},
                       "same_tokens_as_memory": same, "torch_threads": torch.get_num_threads(),
                       "machine": "2-core CPU, shared; no GPU"})
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------------ bigfile
def big_model(tok, rows_per_head: int, path: Path) -> EngramGPT:
    """EngramGPT whose table is opened from ``path`` without ever being allocated."""
    torch.manual_seed(0)
    return EngramGPT(study_config(rows_per_head), tok, table_device="meta")


def cmd_bigfile(args) -> None:
    torch.set_num_threads(args.threads)
    tok = tokenizer()
    dim = 16
    rows_per_head = int(args.gib * 2**30 / (dim * 4) / 16) + 1
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="engram_big_", dir="/var/tmp"))
    free = shutil.disk_usage(work).free
    print(f"free disk {free / 2**30:.1f} GiB; RAM {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.1f} GiB",
          file=sys.stderr)
    try:
        cfg = study_config(rows_per_head)
        hashing = NgramHashMapping(cfg.engram, tok)
        lid = cfg.engram.layer_ids[0]
        sizes = [p for order in hashing.table_sizes[lid] for p in order]
        t0 = time.perf_counter()
        mem = DiskMultiHeadEmbedding.create_empty(table_path(work, lid), sizes, dim,
                                                  fingerprint=table_fingerprint(hashing, lid, sizes, dim))
        create_s = time.perf_counter() - t0
        text = encode_file(tok, SHARED / "data" / "wikitext-2" / "valid.txt")[: args.tokens + 1]
        ids = torch.from_numpy(text)[None]  # (1, n)
        hid = hashing.hash(ids)[lid]  # (1, n, H)
        rows = torch.unique(hid + mem.offsets)  # only these rows are ever read: write them
        g = torch.Generator().manual_seed(0)
        mem.write_rows(rows, torch.randn(rows.numel(), dim, generator=g))
        t0 = time.perf_counter()
        mem.close()  # seals the file: fresh checksum (holes are not read), clean header
        seal_s = time.perf_counter() - t0
        st = table_path(work, lid).stat()
        model = big_model(tok, rows_per_head, work)
        t0 = time.perf_counter()
        offload(model, "disk", path=work)  # opens the file: checked against the config, checksum verified
        open_s = time.perf_counter() - t0
        model.eval()
        disk_mem = engram_modules(model)[0].memory

        def decode() -> None:  # teacher-forced decode over the text: the work of generate, known rows
            cache = model.new_cache()
            with torch.no_grad():
                model(ids[:, :1], cache=cache)
                for t in range(1, args.tokens):
                    model(ids[:, t : t + 1], cache=cache)

        ref_model = EngramGPT(study_config(5003), tok).eval()  # same dense size, small in-memory table

        def decode_ref() -> None:
            cache = ref_model.new_cache()
            with torch.no_grad():
                for t in range(args.tokens):
                    ref_model(ids[:, t : t + 1], cache=cache)

        med = interleaved({"bigfile_cold": decode, "bigfile_warm": decode, "memory_small_table": decode_ref},
                          args.reps, before={"bigfile_cold": disk_mem.drop_page_cache}, warmup=0)
        gen = model.generate(ids[:, :8], 16, temperature=0)
        save("bigfile", {
            "file_bytes": st.st_size, "file_gib": round(st.st_size / 2**30, 2), "allocated_bytes": st.st_blocks * 512,
            "ram_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
            "table_rows": mem.num_rows, "rows_written": int(rows.numel()), "create_s": round(create_s, 3),
            "seal_s": round(seal_s, 3), "open_verify_s": round(open_s, 3),
            "decode_tokens": args.tokens, "reps": args.reps,
            "tokens_per_s": {k: round(args.tokens / v, 1) for k, v in med.items()},
            "generate_ok": list(gen.shape), "peak_rss_mib": round(peak_rss_bytes() / 2**20),
            "machine": "2-core CPU, shared; no GPU",
        })
    finally:
        shutil.rmtree(work, ignore_errors=True)
        print(f"deleted {work}", file=sys.stderr)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--steps", type=int, default=150)
    q.add_argument("--eval-tokens", type=int, default=16_384)
    q.add_argument("--hit-tokens", type=int, default=5_000)
    q.add_argument("--reuse", action="store_true", help="evaluate the saved study model instead of training")
    s = sub.add_parser("speed")
    s.add_argument("--prompt", type=int, default=16)
    s.add_argument("--new-tokens", type=int, default=48)
    s.add_argument("--reps", type=int, default=9)
    s.add_argument("--threads", type=int, default=1, help="torch threads (1: least sensitive to other users' load)")
    b = sub.add_parser("bigfile")
    b.add_argument("--gib", type=float, default=32.0)
    b.add_argument("--tokens", type=int, default=256)
    b.add_argument("--reps", type=int, default=3)
    b.add_argument("--threads", type=int, default=1, help="torch threads (1: least sensitive to other users' load)")
    b.add_argument("--dir", default=None, help="where to put the file (default: a temp dir under /var/tmp)")
    args = p.parse_args()
    {"quality": cmd_quality, "speed": cmd_speed, "bigfile": cmd_bigfile}[args.what](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
