"""``engram size``: size Engram tables for a parameter or memory budget (:mod:`engram.training.sizing`)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from engram.config import EngramConfig
from engram.training.sizing import BYTES_PER, count_hf_params, plan_per_rank, plan_tables


def _parse_count(text: str) -> int:
    mult = {"k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9, "t": 1e12}
    t = text.strip().lower()
    if t and t[-1] in mult:
        return int(float(t[:-1]) * mult[t[-1]])
    return int(float(t))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF config name or directory: take base parameters and hidden size from it")
    p.add_argument("--base-params", type=_parse_count, help="parameters of the model without Engram, e.g. 124M")
    p.add_argument("--hidden", type=int, help="hidden size D (default: from --model, else 1024)")
    p.add_argument("--layers", default="1,15", help="comma-separated 0-based Engram block ids")
    p.add_argument("--max-ngram", type=int, default=3)
    p.add_argument("--heads", type=int, default=8, help="hash heads per order")
    p.add_argument("--n-embed", type=int, default=512, help="n_embed_per_ngram")
    p.add_argument("--hc-mult", type=int, default=1)
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--share", type=float, help="Engram tables' share of all parameters (paper: 0.2-0.25)")
    budget.add_argument("--table-params", type=_parse_count, help="table parameters, e.g. 2B")
    budget.add_argument("--memory", type=_parse_count, help="bytes of table memory, e.g. 16G")
    p.add_argument("--dtype", default="fp32", choices=sorted(BYTES_PER), help="storage dtype for --memory")
    p.add_argument("--world-size", type=int, default=1,
                   help="processes the tables are row-sharded over (torchrun): print what each rank holds")
    p.add_argument("--tokens-per-step", type=_parse_count,
                   help="with --world-size: global batch in tokens, for the lookups and bytes exchanged per step")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    base, hidden = args.base_params, args.hidden
    if args.model:
        counted, model_hidden = count_hf_params(args.model)
        base = base or counted
        hidden = hidden or model_hidden
    hidden = hidden or 1024
    cfg = EngramConfig(hidden_size=hidden, hc_mult=args.hc_mult, layer_ids=[int(x) for x in args.layers.split(",")],
                       max_ngram_size=args.max_ngram, n_head_per_ngram=args.heads, n_embed_per_ngram=args.n_embed,
                       engram_vocab_size=[2] * (args.max_ngram - 1))
    plan = plan_tables(cfg, base_params=base, engram_share=args.share, table_params=args.table_params,
                       memory_bytes=args.memory, dtype=args.dtype)
    if args.world_size < 1:
        raise SystemExit("engram size: error: --world-size must be >= 1")
    per_rank = None
    if args.world_size > 1 or args.tokens_per_step is not None:
        per_rank = plan_per_rank(plan, args.world_size, args.tokens_per_step, args.dtype)
    if args.json:
        print(json.dumps({**asdict(plan), **({"per_rank": asdict(per_rank)} if per_rank else {})}, indent=2))
    else:
        print(plan.summary() + (f"\n{per_rank.summary()}" if per_rank else ""))
    return 0
