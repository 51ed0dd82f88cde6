"""The four performance targets of issue #5, measured as ratios in one process (ABAB, medians).

Run: ``python benchmarks/perf_targets.py [--reps 7] [--only SECTIONS]`` (``--only decode_parts``: where a decode
token's time goes, timed inside ``generate``). Self-contained on purpose (only the public
API of ``engram``), so the same script measured the code before and after the performance work.

Model: the study default (``engram.cli.flags.DEFAULTS``): GPTConfig(vocab 4096, n_layer 4,
n_head 4, n_embd 128, block_size 256) with Engram at block 1, (2,3)-grams x 4 heads,
n_embed_per_ngram 128, 20,000 base rows per head; batch (16, 128). The table section compares
5,003 (1x) with 500,009 (100x) base rows per head; the hash section uses EngramConfig's defaults
(2 layers of (2,3)-grams x 8 heads) on ids (8, 4096) (see :func:`bench_hash`; ``--threads 1`` for
one thread against NumPy's one).
"""

from __future__ import annotations

import argparse
import os
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from numpy_hash import numpy_hash_from_mapping  # noqa: E402

from engram import EngramConfig  # noqa: E402
from engram.core.hashing import NgramHashMapping  # noqa: E402
from engram.models.gpt import EngramGPT, GPTConfig  # noqa: E402
try:  # the layout since the redesign; the flat one before it (to measure both with this script)
    from engram.cli.bench import decode_seconds, forward_fn, interleaved, make_train_step, train_step_fn  # noqa: E402
except ImportError:
    from engram.bench import decode_seconds, forward_fn, interleaved, make_train_step, train_step_fn  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "reference"


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(FIXTURES / "tokenizer-bpe4096"))


def bench_hash(tok, reps: int) -> dict:
    """Hashing ids (8, 4096) with EngramConfig's defaults (2 layers, (2,3)-grams x 8 heads).

    ``speedup``: ``mapping.hash`` (compression + the C kernel, with torch's threads: ``--threads``)
    over NumPy as DeepSeek's demo writes it (benchmarks/numpy_hash.py), bit-exact. On the same
    compressed ids, the kernel alone against ``torch.compile`` of the formula (a fast path stays
    only while it beats that) and the eager formula.
    """
    from engram.ops.hash import barrett_magic, hash_ngrams, hash_ngrams_reference

    cfg = EngramConfig()  # 2 layers, (2,3)-grams x 8 heads, default tables
    m = NgramHashMapping(cfg, tok)
    ids = np.random.default_rng(0).integers(0, 4096, size=(8, 4096), dtype=np.int64)
    t_ids = torch.from_numpy(ids)
    ref = numpy_hash_from_mapping(m, ids)
    got = m.hash(t_ids)
    exact = all(np.array_equal(ref[l], got[l].numpy()) for l in ref)
    # The same work as tensors: compressed ids after a pad-filled history, (L, N) multipliers, (L, H) primes.
    full = torch.cat([m.initial_history(8), m.compress(t_ids)], dim=1)  # (B, N-1+T)
    mult = torch.tensor([m.multipliers[l] for l in m.layer_ids])  # (L, N)
    primes = torch.tensor([[p for order in m.table_sizes[l] for p in order] for l in m.layer_ids])  # (L, H)
    magic = barrett_magic(primes)
    formula = hash_ngrams_reference(full, mult, primes)  # (L, B, T, H)
    compiled = torch.compile(hash_ngrams_reference)
    exact = exact and torch.equal(compiled(full, mult, primes), formula) \
        and torch.equal(hash_ngrams(full, mult, primes, magic, backend="kernel"), formula)
    # glibc hands blocks above its mmap threshold back to the OS on free; the threshold starts at
    # 128 KiB and rises to the largest such block freed. Until something frees a large block, each
    # of NumPy's 256 KiB temporaries is a fresh mapping (~2000 page faults per call, 2-3x slower).
    # Freeing one 30 MiB block first puts the baseline at its fastest whatever ran before.
    np.empty(30 << 20, dtype=np.uint8)
    med = interleaved({"numpy": lambda: numpy_hash_from_mapping(m, ids), "engram": lambda: m.hash(t_ids),
                       "kernel": lambda: hash_ngrams(full, mult, primes, magic, backend="kernel"),
                       "compiled_formula": lambda: compiled(full, mult, primes),
                       "formula": lambda: hash_ngrams_reference(full, mult, primes)}, reps)
    n = ids.size
    return {"bit_exact": exact, "torch_threads": torch.get_num_threads(),
            **{f"{k}_mtok_s": n / v / 1e6 for k, v in med.items()},
            "speedup": med["numpy"] / med["engram"], "kernel_vs_compiled": med["compiled_formula"] / med["kernel"]}


def gpt(tok, rows: int | None, sparse: bool | None = None, width: int = 128) -> EngramGPT:
    eng = None
    if rows is not None:
        kw = {} if sparse is None else {"sparse_grad": sparse}
        eng = EngramConfig(hidden_size=width, layer_ids=[1], n_embed_per_ngram=128, n_head_per_ngram=4,
                           engram_vocab_size=[rows, rows], **kw)
    torch.manual_seed(0)
    return EngramGPT(GPTConfig(vocab_size=4096, n_layer=4, n_head=4, n_embd=width, block_size=256, engram=eng), tok)


def decode_ratio(base: EngramGPT, eng: EngramGPT, reps: int, new: int = 64, warmup: int = 1, batch: int = 1,
                 static_cache: bool = False) -> dict:
    """Greedy tokens/s after a 16-token prompt, interleaved medians (on the models' device)."""
    prompt = torch.randint(0, 4096, (batch, 16)).to(base.lm_head.weight.device)
    med = decode_seconds({"base": base, "engram": eng}, prompt, new, reps, warmup, static_cache=static_cache)
    return {"base_tok_s": batch * new / med["base"], "engram_tok_s": batch * new / med["engram"],
            "ratio": med["base"] / med["engram"]}


def decode_parts(base: EngramGPT, eng: EngramGPT, reps: int, new: int = 64) -> dict:
    """Where a decode token's time goes, measured inside ``generate`` (µs per forward, medians).

    Micro-benchmarks of a part alone mislead here: inside the loop the model's weights evict
    the Python and dispatch state from the caches, so a part costs 2-3x its isolated time.
    Each part is timed with ``perf_counter`` around the call, runs interleaved base/Engram.
    """
    import statistics
    import time

    parts: dict[str, dict[str, list[float]]] = {"base": {}, "engram": {}}
    acc: dict[str, float] = {}

    def timed(name: str, fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            acc[name] = acc.get(name, 0.0) + time.perf_counter() - t0
            return out
        return run

    models = {"base": base, "engram": eng}
    for m in models.values():  # instance attributes shadow the methods for this measurement only
        m._prepare = timed("prepare", m._prepare)
        for i, b in enumerate(m.blocks):
            b.forward = timed(f"block{i}", b.forward)
            if b.engram is not None:
                b.engram.forward = timed("engram_branch", b.engram.forward)
        if m.hashing is not None:
            m.hashing.hash_step = timed("hash_step", m.hashing.hash_step)
        m.forward = timed("forward", m.forward)
    prompt = torch.randint(0, 4096, (1, 16))
    try:
        for r in range(reps + 1):
            for k, m in models.items():
                acc.clear()
                m.generate(prompt, new, temperature=0)
                if r:  # the first round warms up
                    for name, v in acc.items():
                        parts[k].setdefault(name, []).append(v / (new + 1) * 1e6)
    finally:
        for m in models.values():
            for obj in [m, *m.blocks, *(b.engram for b in m.blocks if b.engram is not None), m.hashing]:
                if obj is not None:
                    for attr in ("_prepare", "forward", "hash_step"):
                        obj.__dict__.pop(attr, None)
    return {k: {name: statistics.median(v) for name, v in d.items()} for k, d in parts.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--only", default="hash,table,overhead",
                    help="comma-separated sections: hash, table, overhead, train_fresh, optimizer, decode_width, "
                         "decode_parts, compiled")
    ap.add_argument("--sparse", choices=["default", "on", "off"], default="default",
                    help="EngramConfig.sparse_grad for the table and overhead runs")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", help="compiled: the models' device (cpu, cuda)")
    ap.add_argument("--compile-modes", default="default",
                    help="compiled: comma-separated torch.compile modes, each measured after the eager pair "
                         "(default, reduce-overhead: CUDA graphs, max-autotune-no-cudagraphs, ...); MODE+static "
                         "decodes with the static cache (reduce-overhead always does)")
    args = ap.parse_args()
    print("load average", os.getloadavg(), "device", args.device,
          torch.cuda.get_device_name() if args.device.startswith("cuda") else "", flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = tokenizer()
    res: dict = {"torch_threads": torch.get_num_threads()}
    only = args.only.split(",")
    sparse = {"default": None, "on": True, "off": False}[args.sparse]
    if "hash" in only:
        res["hash"] = bench_hash(tok, args.reps)
        print("hash", res["hash"], flush=True)
    x = torch.randint(0, 4096, (16, 128))
    y = torch.randint(0, 4096, (16, 128))
    if "table" in only:
        small, big = gpt(tok, 5003, sparse), gpt(tok, 500009, sparse)
        med = interleaved({"1x": train_step_fn(small, x, y), "100x": train_step_fn(big, x, y)}, args.reps)
        res["table"] = {"step_s_1x": med["1x"], "step_s_100x": med["100x"], "ratio": med["100x"] / med["1x"],
                        "sparse_grad": small.config.engram.sparse_grad}
        print("table", res["table"], flush=True)
        del small, big
    if "overhead" in only:
        base, eng = gpt(tok, None), gpt(tok, 20000, sparse)
        med = interleaved({"base": train_step_fn(base, x, y), "engram": train_step_fn(eng, x, y)}, args.reps)
        res["train_step"] = {"base_s": med["base"], "engram_s": med["engram"], "ratio": med["engram"] / med["base"]}
        print("train_step", res["train_step"], flush=True)
        base.eval(), eng.eval()
        med = interleaved({"base": forward_fn(base, x), "engram": forward_fn(eng, x)}, args.reps)
        res["forward"] = {"base_s": med["base"], "engram_s": med["engram"], "ratio": med["engram"] / med["base"]}
        print("forward", res["forward"], flush=True)
        res["decode"] = decode_ratio(base, eng, args.reps)
        print("decode", res["decode"], flush=True)
    if "train_fresh" in only:  # one repeated batch (cache-hot table rows) vs a new batch every step
        g = torch.Generator().manual_seed(1)
        batches = [(torch.randint(0, 4096, (16, 128), generator=g), torch.randint(0, 4096, (16, 128), generator=g))
                   for _ in range(64)]
        steps = {"base": make_train_step(gpt(tok, None)), "engram": make_train_step(gpt(tok, 20000, sparse))}
        calls = {"base": 0, "engram": 0}

        def fresh(k):
            def f():
                calls[k] += 1
                steps[k](*batches[calls[k] % len(batches)])
            return f
        med = interleaved({"base_fixed": lambda: steps["base"](x, y), "engram_fixed": lambda: steps["engram"](x, y),
                           "base_fresh": fresh("base"), "engram_fresh": fresh("engram")}, args.reps)
        res["train_fresh"] = {**{f"{k}_s": v for k, v in med.items()},
                              "ratio_fixed": med["engram_fixed"] / med["base_fixed"],
                              "ratio_fresh": med["engram_fresh"] / med["base_fresh"]}
        print("train_fresh", res["train_fresh"], flush=True)
    if "optimizer" in only:  # the table step alone: torch's SparseAdam vs RowSparseAdam (same update)
        from engram.training.optim import RowSparseAdam

        model = gpt(tok, 20000, True)
        table = model.table_parameters()[0]
        _, loss = model(x, y)
        loss.backward()
        grad = table.grad  # (rows, d) sparse, one study batch: 16 x 128 tokens x 8 heads
        opts = {"SparseAdam": torch.optim.SparseAdam([table], lr=1e-3), "RowSparseAdam": RowSparseAdam([table], lr=1e-3)}

        def opt_step(o):
            def f():
                table.grad = grad  # uncoalesced, as a backward leaves it
                o.step()
            return f
        med = interleaved({k: opt_step(o) for k, o in opts.items()}, args.reps)
        res["optimizer"] = {"rows": table.shape[0], "nnz": grad._nnz(), "width": table.shape[1],
                            **{f"{k}_ms": v * 1e3 for k, v in med.items()}}
        print("optimizer", res["optimizer"], flush=True)
    if "decode_width" in only:  # how the decode overhead scales with the backbone's width
        for width in (128, 256, 512):
            base, eng = gpt(tok, None, width=width).eval(), gpt(tok, 20000, sparse, width=width).eval()
            res[f"decode_width_{width}"] = decode_ratio(base, eng, args.reps)
            print(f"decode_width_{width}", res[f"decode_width_{width}"], flush=True)
    if "decode_parts" in only:  # µs per forward of each part, timed inside generate
        base, eng = gpt(tok, None).eval(), gpt(tok, 20000, sparse).eval()
        res["decode_parts"] = decode_parts(base, eng, args.reps)
        for name in res["decode_parts"]["engram"]:
            b, e = res["decode_parts"]["base"].get(name), res["decode_parts"]["engram"][name]
            print(f"decode_parts {name:14s} base {'-' if b is None else f'{b:7.1f}':>7} engram {e:7.1f} us/forward",
                  flush=True)
    if "compiled" in only:  # batch 1 and 8: eager, then the models under model.compile(dynamic=True)
        # Every compiled model in a process shares one dynamo cache of `forward`: here the GPT's 2
        # graphs and 3 for each Engram model per batch class, past the default limit of 8.
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 16))
        for batch in (1, 8):
            # Batch 1 and batch > 1 compile apart. Start each batch size with an empty cache, as a
            # process serving one batch size has.
            torch._dynamo.reset()
            base = gpt(tok, None).eval().to(args.device)
            eng = gpt(tok, 20000, sparse).eval().to(args.device)
            # The same Engram model (same seed, same weights) after EngramGPT.fuse_projections():
            # its key and value projections as one matmul, the decode recipe of docs/performance.md.
            fused = gpt(tok, 20000, sparse).eval().to(args.device).fuse_projections()
            res[f"decode_eager_b{batch}"] = decode_ratio(base, eng, args.reps, batch=batch)
            print(f"decode_eager_b{batch}", res[f"decode_eager_b{batch}"], flush=True)
            for spec in args.compile_modes.split(","):
                mode, _, cache = spec.partition("+")  # "+static": generate with the static cache
                static = cache == "static" or mode == "reduce-overhead"  # CUDA graphs need it
                torch._dynamo.reset()
                for m in (base, eng, fused):
                    m.compile(dynamic=True, mode=None if mode == "default" else mode)
                key = f"decode_compiled_b{batch}" + ("" if spec == "default" else f"_{spec}")
                # One process, ABAB...: base, Engram, Engram with fused projections, interleaved.
                prompt = torch.randint(0, 4096, (batch, 16)).to(args.device)
                med = decode_seconds({"base": base, "engram": eng, "fused": fused}, prompt, 64, args.reps,
                                     warmup=2, static_cache=static)
                res[key] = {"base_tok_s": batch * 64 / med["base"], "engram_tok_s": batch * 64 / med["engram"],
                            "ratio": med["base"] / med["engram"],
                            "fused_tok_s": batch * 64 / med["fused"], "fused_ratio": med["base"] / med["fused"]}
                print(key, res[key], flush=True)
    res["loadavg_end"] = list(os.getloadavg())
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
