"""``engram bench``: time and memory of Engram against the same GPT without it, on this machine.

Writes ``--out DIR/bench.json`` (every figure and the settings), ``bench.md`` (tables) and PNG
plots. Every A/B figure is measured interleaved (A B A B ...) in one process after a warm-up and
reported as the median, so load from other processes hits both sides alike; peak RSS is
measured in a fresh child process per configuration.

Sections (shapes: B batch, T sequence length):
- ``seq``: train step (forward + backward + optimizer) and inference forward, Engram vs none,
  B=1, T in 128..4096; parameter counts; peak RSS.
- ``hashing``: compression + all heads (2 layers, (2,3)-grams x 8 heads, ids (8, 4096)),
  Mtok/s of the C kernel and the torch formula against NumPy written as the reference demo writes it
  (bit-exact check).
- ``lookup``: table gather GB/s (bytes of rows gathered) against this machine's memcpy GB/s.
- ``table``: train step time at 1x, 10x, 100x table rows, sparse (RowSparseAdam: SparseAdam's update) and dense (Adam).
- ``decode``: greedy decode tokens/s with a KV cache, Engram vs none.

The package needs no data files: the tokenizer is a synthetic compressed table (4096 raw ids ->
2048 canonical ids), which hashing speed does not depend on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram.ops import cpu as cpu_kernels
from engram.config import EngramConfig
from engram.core.hashing import NgramHashMapping
from engram.models.gpt import EngramGPT, GPTConfig
from engram.training.optim import build_optimizer
from engram.core.tokenizer import CompressedTokenizer
from engram.training.loop import peak_rss_bytes

VOCAB = 4096


# ---------------------------------------------------------------------------------- timing
def interleaved(fns: dict[str, Callable[[], Any]], reps: int, before: dict[str, Callable[[], Any]] | None = None,
                warmup: int = 1, device: torch.device | str | None = None) -> dict[str, float]:
    """Median seconds of each callable, run round-robin (A B A B ...) after ``warmup`` rounds.

    ``before[k]`` runs untimed ahead of each timed call of ``fns[k]`` (e.g. dropping a page cache).
    On a CUDA ``device`` each timed call ends with a synchronisation (the GPU's work is counted).
    """
    cuda = device is not None and torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if reps < 1:
        raise ValueError(f"reps={reps} must be >= 1")
    before = before or {}
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            if k in before:
                before[k]()
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def synthetic_tokenizer() -> CompressedTokenizer:
    """4096 raw ids -> 2048 canonical ids (pairs merge, as case variants do in a real tokenizer)."""
    return CompressedTokenizer(lookup_table=np.arange(VOCAB, dtype=np.int64) // 2)


def bench_gpt(rows: int | None, block_size: int = 256, sparse: bool = True, layer_ids: list[int] | None = None,
              n_embed_per_ngram: int = 128) -> EngramGPT:
    """The benchmark model: GPT(n_layer 4, n_head 4, n_embd 128), Engram at block 1 when ``rows``."""
    eng = None
    if rows is not None:
        eng = EngramConfig(hidden_size=128, layer_ids=layer_ids or [1], n_embed_per_ngram=n_embed_per_ngram,
                           n_head_per_ngram=8, engram_vocab_size=[rows, rows], sparse_grad=sparse)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=VOCAB, n_layer=4, n_head=4, n_embd=128, block_size=block_size, engram=eng)
    return EngramGPT(cfg, synthetic_tokenizer() if eng is not None else None)


def make_train_step(model: EngramGPT, lr: float = 1e-3,
                    weight_decay: float = 0.1) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``step(x, y) -> loss``: one optimizer step (``build_optimizer``: RowSparseAdam for sparse tables)."""
    opts = build_optimizer(model, lr, weight_decay)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for o in opts:
            o.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        for o in opts:
            o.step()
        return loss
    return step


def train_step_fn(model: EngramGPT, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One optimizer step on the fixed batch ``(x, y)`` per call (for timing)."""
    step = make_train_step(model)
    return lambda: step(x, y)


def forward_fn(model: EngramGPT, x: torch.Tensor) -> Callable[[], None]:
    def fwd() -> None:
        with torch.no_grad():
            model(x)
    return fwd


# ---------------------------------------------------------------------------------- sections
def bench_seq(seqs: list[int], reps: int, rows: int, rss: bool, device: str = "cpu") -> dict[str, Any]:
    """Engram vs none over sequence lengths (B=1): train step, forward, params, peak RSS."""
    base = bench_gpt(None, block_size=max(seqs)).to(device)
    eng = bench_gpt(rows, block_size=max(seqs)).to(device)
    out: dict[str, Any] = {"params": {"base": base.num_params(), "engram": eng.num_params()}, "rows": []}
    g = torch.Generator().manual_seed(0)
    for T in seqs:
        x = torch.randint(0, VOCAB, (1, T), generator=g).to(device)
        y = torch.randint(0, VOCAB, (1, T), generator=g).to(device)
        step = interleaved({"base": train_step_fn(base, x, y), "engram": train_step_fn(eng, x, y)}, reps, device=device)
        fwd = interleaved({"base": forward_fn(base, x), "engram": forward_fn(eng, x)}, reps, device=device)
        row = {"T": T, "train_s": step, "forward_s": fwd,
               "train_ratio": step["engram"] / step["base"], "forward_ratio": fwd["engram"] / fwd["base"]}
        if rss:
            row["peak_rss_mb"] = {k: rss_probe({"rows": r, "T": T}) for k, r in (("base", None), ("engram", rows))}
        out["rows"].append(row)
    if rss:
        out["bare_process_rss_mb"] = rss_probe({"bare": True})
    return out


def bench_hashing(shape: tuple[int, int], reps: int) -> dict[str, Any]:
    """Hash throughput: the default path (the C kernel where it builds, else the formula in torch),
    the torch formula, and NumPy written as the reference demo writes it. ``speedup_vs_numpy`` is
    the default path's."""
    cfg = EngramConfig(hidden_size=128, layer_ids=[1, 15])  # 2 layers, (2,3)-grams x 8 heads, default tables
    m = NgramHashMapping(cfg, synthetic_tokenizer())
    ids_np = np.random.default_rng(0).integers(0, VOCAB, size=shape, dtype=np.int64)
    ids = torch.from_numpy(ids_np)
    ref = numpy_hash(m, ids_np)
    methods = (["kernel"] if cpu_kernels.available() else []) + ["plain"]
    exact = all(np.array_equal(ref[l], got[l].numpy()) for k in methods for got in [m.hash(ids, method=k)] for l in ref)
    med = interleaved({"numpy": lambda: numpy_hash(m, ids_np),
                       **{k: (lambda k=k: m.hash(ids, method=k)) for k in methods}}, reps)
    n = ids.numel()
    return {"shape": list(shape), "bit_exact": exact, "seconds": med, "default": methods[0],
            "mtok_s": {k: n / v / 1e6 for k, v in med.items()},
            "speedup_vs_numpy": med["numpy"] / med[methods[0]],
            "speedup_plain_vs_numpy": med["numpy"] / med["plain"]}


def numpy_hash(mapping: NgramHashMapping, raw_ids: np.ndarray) -> dict[int, np.ndarray]:
    """NumPy hashing written as DeepSeek's demo writes it (``_get_ngram_hashes``: shifted copies,
    each order's mix from scratch, one ``mix % mod`` per head with a Python-int modulus), after the
    compression lookup -> ``{layer: (B, T, H)}``. The speed baseline of ``engram bench``."""
    x = np.asarray(mapping.compressed.lookup_table)[raw_ids]  # (B, T)
    B, T = x.shape
    out = {}
    for lid in mapping.layer_ids:
        multipliers = np.asarray(mapping.multipliers[lid], dtype=np.int64)
        N = len(multipliers)
        base_shifts = [x if k == 0 else np.pad(x, ((0, 0), (k, 0)), mode="constant", constant_values=mapping.pad_id)[:, :T]
                       for k in range(N)]
        heads = []
        for n in range(2, N + 1):
            tokens = base_shifts[:n]
            mix = tokens[0] * multipliers[0]
            for k in range(1, n):
                mix = np.bitwise_xor(mix, tokens[k] * multipliers[k])
            for mod in mapping.table_sizes[lid][n - 2]:
                heads.append((mix % int(mod)).astype(np.int64, copy=False))
        out[lid] = np.stack(heads, axis=2)  # (B, T, H)
    return out


def bench_lookup(rows: int, shape: tuple[int, int], reps: int) -> dict[str, Any]:
    """Gather GB/s of one Engram layer's tables vs a memcpy of the same number of bytes."""
    cfg = EngramConfig(hidden_size=128, layer_ids=[1], n_embed_per_ngram=512, n_head_per_ngram=8,
                       engram_vocab_size=[rows, rows])
    m = NgramHashMapping(cfg, synthetic_tokenizer())
    from engram.nn.memory import MultiHeadEmbedding

    mem = MultiHeadEmbedding([p for order in m.table_sizes[1] for p in order], cfg.head_dim)
    ids = torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(0))
    hid = m.hash(ids)[1]  # (B, T, H)
    nbytes = hid.numel() * cfg.head_dim * 4
    src = torch.empty(nbytes // 4)
    dst = torch.empty_like(src)
    src.normal_()
    with torch.no_grad():
        med = interleaved({"lookup": lambda: mem(hid), "memcpy": lambda: dst.copy_(src)}, reps)
    return {"table_rows": mem.num_rows, "row_bytes": cfg.head_dim * 4, "table_mb": mem.num_rows * cfg.head_dim * 4 / 2**20,
            "gathered_mb": nbytes / 2**20, "seconds": med,
            "gb_s": {k: nbytes / v / 1e9 for k, v in med.items()},
            "lookup_vs_memcpy": med["memcpy"] / med["lookup"]}


def bench_table(base_rows: int, mults: list[int], shape: tuple[int, int], reps: int,
                device: str = "cpu") -> dict[str, Any]:
    """Train step time vs table size (rows per head = base_rows * mult), sparse vs dense tables."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, shape, generator=g).to(device)
    y = torch.randint(0, VOCAB, shape, generator=g).to(device)
    out: dict[str, Any] = {"base_rows": base_rows, "shape": list(shape), "modes": {}}
    for mode, sparse in (("sparse", True), ("dense", False)):
        fns, info = {}, {}
        for mlt in mults:
            model = bench_gpt(base_rows * mlt, block_size=shape[1], sparse=sparse).to(device)
            fns[f"{mlt}x"] = train_step_fn(model, x, y)
            info[f"{mlt}x"] = {"table_rows": sum(p.shape[0] for p in model.table_parameters())}
        med = interleaved(fns, reps, device=device)
        first = med[f"{mults[0]}x"]
        for k, v in med.items():
            info[k].update({"step_s": v, "ratio_vs_1x": v / first})
        out["modes"][mode] = info
        del fns
    return out


def decode_seconds(models: dict[str, EngramGPT], prompt: torch.Tensor, new_tokens: int, reps: int,
                   warmup: int = 1, static_cache: bool = False) -> dict[str, float]:
    """Median seconds of greedy ``generate`` (KV cache; ``static_cache``: the static one) for each
    model, interleaved."""
    return interleaved({k: (lambda m=m: m.generate(prompt, new_tokens, temperature=0, static_cache=static_cache))
                        for k, m in models.items()}, reps, warmup=warmup, device=prompt.device)


def bench_decode(new_tokens: int, reps: int, rows: int, compile: bool = False, batch: int = 1,
                 device: str = "cpu", compile_mode: str | None = None,
                 fuse_projections: bool = False) -> dict[str, Any]:
    """Greedy decode tokens/s (16-token prompt, KV cache), Engram vs none; with ``compile`` both
    models run ``model.compile(dynamic=True, mode=compile_mode)`` (compiled in the untimed
    warm-up). ``compile_mode="reduce-overhead"`` (CUDA graphs) decodes with the static cache.
    ``fuse_projections``: the Engram model decodes after :meth:`EngramGPT.fuse_projections`."""
    base, eng = bench_gpt(None).to(device), bench_gpt(rows).to(device)
    base.eval(), eng.eval()
    if fuse_projections:
        eng.fuse_projections()
    if compile:
        for m in (base, eng):
            m.compile(dynamic=True, mode=compile_mode)
    static = compile and compile_mode == "reduce-overhead"
    prompt = torch.randint(0, VOCAB, (batch, 16), generator=torch.Generator().manual_seed(0)).to(device)
    med = decode_seconds({"base": base, "engram": eng}, prompt, new_tokens, reps, warmup=2 if compile else 1,
                         static_cache=static)
    return {"new_tokens": new_tokens, "batch": batch, "compiled": compile,
            "compile_mode": (compile_mode or "default") if compile else None, "static_cache": static,
            "fused_projections": fuse_projections,
            "tok_s": {k: batch * new_tokens / v for k, v in med.items()},
            "engram_vs_base": med["base"] / med["engram"]}


# ---------------------------------------------------------------------------------- peak RSS
def rss_probe(spec: dict[str, Any]) -> float:
    """Peak RSS (MiB) of a fresh process that builds the model of ``spec`` and runs 2 train steps."""
    code = "import sys, engram.cli.bench as b; b._rss_child(sys.argv[1])"
    res = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, check=True)
    return float(res.stdout.strip().splitlines()[-1])


def _rss_child(spec_json: str) -> None:
    spec = json.loads(spec_json)
    if not spec.get("bare"):
        torch.set_num_threads(1)
        T = int(spec["T"])
        model = bench_gpt(spec["rows"], block_size=T)
        x = torch.randint(0, VOCAB, (1, T))
        step = train_step_fn(model, x, x)
        step()
        step()
    print(peak_rss_bytes() / 2**20)  # MiB


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "loadavg_start": list(os.getloadavg())}


def to_markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = ["# engram bench\n", f"Machine: {m['processor']}, {m['cpu_count']} CPUs, torch {m['torch']} "
             f"({m['torch_threads']} threads), load average at start {m['loadavg_start'][0]:.1f}"
             + (f"; models on {m['device']} ({m['gpu']})" if m.get("gpu") else "") + ". "
             f"Medians of {r['settings']['reps']} interleaved runs after a warm-up.\n"]
    if "seq" in r:
        s = r["seq"]
        lines += ["## Engram vs none over sequence length (B=1)\n",
                  f"Parameters: base {s['params']['base']}, Engram {s['params']['engram']}.\n",
                  "| T | train base (ms) | train Engram (ms) | ratio | fwd base (ms) | fwd Engram (ms) | ratio | peak RSS base / Engram (MiB) |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in s["rows"]:
            rss = row.get("peak_rss_mb")
            rss_s = f"{rss['base']:.0f} / {rss['engram']:.0f}" if rss else "-"
            lines.append(f"| {row['T']} | {row['train_s']['base']*1e3:.1f} | {row['train_s']['engram']*1e3:.1f} | "
                         f"{row['train_ratio']:.2f} | {row['forward_s']['base']*1e3:.1f} | {row['forward_s']['engram']*1e3:.1f} | "
                         f"{row['forward_ratio']:.2f} | {rss_s} |")
        if "bare_process_rss_mb" in s:
            lines.append(f"\nA bare `python -c 'import engram'` process peaks at {s['bare_process_rss_mb']:.0f} MiB.")
        lines.append("")
    if "hashing" in r:
        h = r["hashing"]
        lines += [f"## Hashing, ids {tuple(h['shape'])}, 2 layers x (2,3)-grams x 8 heads\n",
                  "| path | Mtok/s |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in h["mtok_s"].items()]
        lines += [f"\nDefault path ({h['default']}) vs NumPy: {h['speedup_vs_numpy']:.2f}x; torch formula vs "
                  f"NumPy: {h['speedup_plain_vs_numpy']:.2f}x; bit-exact: {h['bit_exact']}.\n"]
    if "lookup" in r:
        lk = r["lookup"]
        lines += ["## Lookup vs memcpy\n",
                  f"Table {lk['table_rows']} rows x {lk['row_bytes']} B ({lk['table_mb']:.0f} MiB), "
                  f"{lk['gathered_mb']:.1f} MiB gathered per call: lookup {lk['gb_s']['lookup']:.2f} GB/s, "
                  f"memcpy {lk['gb_s']['memcpy']:.2f} GB/s ({lk['lookup_vs_memcpy']:.2f} of memcpy).\n"]
    if "table" in r:
        t = r["table"]
        lines += [f"## Train step vs table size (base {t['base_rows']} rows per head, batch {tuple(t['shape'])})\n",
                  "| tables | size | table rows | step (ms) | vs 1x |", "|---|---|---|---|---|"]
        for mode, info in t["modes"].items():
            for k, v in info.items():
                lines.append(f"| {mode} | {k} | {v['table_rows']} | {v['step_s']*1e3:.1f} | {v['ratio_vs_1x']:.2f} |")
        lines.append("")
    if "decode" in r:
        d = r["decode"]
        mode = d.get("compile_mode") or "default"
        how = (f"compiled (model.compile(dynamic=True{'' if mode == 'default' else f', mode={mode!r}'}))"
               + (", static cache" if d.get("static_cache") else "")) if d.get("compiled") else "eager"
        how += ", Engram projections fused" if d.get("fused_projections") else ""
        lines += [f"## Decode ({d['new_tokens']} new tokens, B={d.get('batch', 1)}, {how})\n",
                  f"Base {d['tok_s']['base']:.0f} tok/s, Engram {d['tok_s']['engram']:.0f} tok/s "
                  f"({d['engram_vs_base']:.2f} of base).\n"]
    return "\n".join(lines)


def _length_ticks(ax: Any, values: list[int]) -> None:
    """Label a log x axis at the measured lengths only."""
    from matplotlib.ticker import NullFormatter

    ax.set_xticks(values)
    ax.set_xticklabels([str(v) for v in values])
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot(r: dict[str, Any], out: Path) -> list[str]:
    """PNG plots next to bench.json; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    if "seq" in r:
        rows = r["seq"]["rows"]
        Ts = [row["T"] for row in rows]
        fig, axes = plt.subplots(1, 2 if rows and "peak_rss_mb" in rows[0] else 1, figsize=(10, 4), squeeze=False)
        ax = axes[0][0]
        for key, style in (("train_s", "-"), ("forward_s", "--")):
            for side in ("base", "engram"):
                ax.plot(Ts, [row[key][side] * 1e3 for row in rows], style, marker="o", label=f"{key[:-2]} {side}")
        ax.set(xscale="log", yscale="log", xlabel="sequence length T (B=1)", ylabel="ms", title="time")
        _length_ticks(ax, Ts)
        ax.legend()
        if axes.shape[1] > 1:
            ax = axes[0][1]
            for side in ("base", "engram"):
                ax.plot(Ts, [row["peak_rss_mb"][side] for row in rows], marker="o", label=side)
            ax.set(xscale="log", xlabel="sequence length T", ylabel="MiB", title="peak RSS (train step)")
            _length_ticks(ax, Ts)
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "seq.png", dpi=100)
        plt.close(fig)
        files.append("seq.png")
    if "table" in r:
        fig, ax = plt.subplots(figsize=(5, 4))
        for mode, info in r["table"]["modes"].items():
            ax.plot([v["table_rows"] for v in info.values()], [v["step_s"] * 1e3 for v in info.values()], marker="o", label=mode)
        ax.set(xscale="log", xlabel="table rows", ylabel="train step (ms)", title="step time vs table size")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "table_size.png", dpi=100)
        plt.close(fig)
        files.append("table_size.png")
    if "hashing" in r or "lookup" in r:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        if "hashing" in r:
            mt = r["hashing"]["mtok_s"]
            axes[0].bar(list(mt), list(mt.values()))
            axes[0].set(ylabel="Mtok/s", title="hashing")
        if "lookup" in r:
            gb = r["lookup"]["gb_s"]
            axes[1].bar(list(gb), list(gb.values()))
            axes[1].set(ylabel="GB/s", title="lookup vs memcpy")
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=100)
        plt.close(fig)
        files.append("throughput.png")
    return files


# ---------------------------------------------------------------------------------- CLI
SECTIONS = ("seq", "hashing", "lookup", "table", "decode")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory (bench.json, bench.md, *.png)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and 2 repetitions (for tests and smoke runs)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per figure (default 7, quick 2)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--no-rss", action="store_true", help="skip the per-configuration peak-RSS child processes")
    p.add_argument("--compile", action="store_true", help="decode: both models under model.compile(dynamic=True)")
    p.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead", "max-autotune",
                                                            "max-autotune-no-cudagraphs"],
                   help="decode with --compile: torch.compile's mode (reduce-overhead: CUDA graphs, decoding "
                        "with the static cache)")
    p.add_argument("--fuse-projections", action="store_true",
                   help="decode: fuse each Engram layer's key and value projections (EngramGPT.fuse_projections)")
    p.add_argument("--batch", type=int, default=1, help="decode: prompts per batch (default 1)")
    p.add_argument("--device", default="cpu", help="seq, table, decode: the models' device (cpu, cuda, ...); "
                   "hashing and lookup run on the CPU, where training hashes")


def run(args: argparse.Namespace) -> int:
    only = [s for s in args.only.split(",") if s]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        raise ValueError(f"--only has unknown sections {bad}; choose from {SECTIONS}")
    if args.threads < 0:
        raise ValueError(f"--threads={args.threads} must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    from engram.training.loop import check_device  # noqa: PLC0415

    device = str(check_device(args.device))
    reps = args.reps if args.reps is not None else (2 if args.quick else 7)
    if reps < 1:
        raise ValueError(f"--reps={reps} must be >= 1")
    q = args.quick
    settings = {
        "reps": reps, "quick": q,
        "seqs": [32, 64] if q else [128, 256, 512, 1024, 2048, 4096],
        "rows": 211 if q else 5003,
        "hash_shape": (2, 256) if q else (8, 4096),
        "lookup_rows": 1009 if q else 65537, "lookup_shape": (2, 256) if q else (8, 4096),
        "table_mults": [1, 10] if q else [1, 10, 100], "table_shape": (2, 32) if q else (8, 256),
        "decode_tokens": 4 if q else 64,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    r: dict[str, Any] = {"machine": {**machine(), "device": device,
                                     "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None},
                         "settings": settings,
                         "model": "GPTConfig(vocab 4096, n_layer 4, n_head 4, n_embd 128); Engram at block 1, "
                                  "(2,3)-grams x 8 heads, n_embed_per_ngram 128, sparse tables"}
    if "seq" in only:
        r["seq"] = bench_seq(settings["seqs"], reps, settings["rows"], rss=not (q or args.no_rss or device != "cpu"),
                             device=device)
    if "hashing" in only:
        r["hashing"] = bench_hashing(settings["hash_shape"], reps)
    if "lookup" in only:
        r["lookup"] = bench_lookup(settings["lookup_rows"], settings["lookup_shape"], reps)
    if "table" in only:
        r["table"] = bench_table(settings["rows"], settings["table_mults"], settings["table_shape"], reps, device)
    if "decode" in only:
        if args.batch < 1:
            raise ValueError(f"--batch={args.batch} must be >= 1")
        mode = None if args.compile_mode in (None, "default") else args.compile_mode
        if mode is not None and not args.compile:
            raise ValueError("--compile-mode needs --compile")
        r["decode"] = bench_decode(settings["decode_tokens"], reps, settings["rows"], args.compile, args.batch, device,
                                   compile_mode=mode, fuse_projections=args.fuse_projections)
    r["machine"]["loadavg_end"] = list(os.getloadavg())
    r["plots"] = plot(r, out)
    (out / "bench.json").write_text(json.dumps(r, indent=1))
    md = to_markdown(r) + "\n" + "\n".join(f"![{f}]({f})" for f in r["plots"]) + "\n"
    (out / "bench.md").write_text(md)
    print(md)
    return 0
