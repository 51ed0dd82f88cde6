"""``engram eval``: lm-evaluation-harness tasks on a checkpoint (``engram train`` output or a saved
``EngramForCausalLM``); prints lm-eval's results table. Needs the ``eval`` extra (lm-eval)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from engram.cli.flags import fail, finite_float, int_at_least


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="an engram train run directory or checkpoint, or a save_pretrained directory "
                        "(EngramForCausalLM or any causal LM, with its tokenizer)")
    p.add_argument("--tasks", required=True, metavar="T[,T]",
                   help="comma-separated lm-eval task names or YAML files; engram_ppl and engram_mc ship with engram")
    p.add_argument("--include-path", action="append", metavar="DIR",
                   help="a directory of task YAMLs to add (repeatable)")
    p.add_argument("--limit", type=finite_float(0.0, strict=True), metavar="N",
                   help="at most N documents per task (N < 1: that fraction of them)")
    p.add_argument("--batch-size", type=int_at_least(1), default=8, help="sequences per forward (default %(default)s)")
    p.add_argument("--num-fewshot", type=int_at_least(0), metavar="K", help="few-shot examples (default: each task's own)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int_at_least(1), help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", metavar="FILE", help="write lm-eval's results (JSON) here")
    p.add_argument("--log-samples", action="store_true", help="with --out: include every document's inputs and scores")
    p.add_argument("--verbose", action="store_true", help="show lm-eval's log messages (default: errors only)")


def _limit(value: float | None) -> float | int | None:
    if value is None or value < 1:
        return value
    if value != int(value):
        raise ValueError(f"--limit {value}: a count must be a whole number (or a fraction below 1)")
    return int(value)


def run(args: argparse.Namespace) -> int:
    try:
        from engram.evaluation import harness  # noqa: PLC0415 - imports lm-eval (optional)
    except ImportError as e:
        return fail(f"engram eval needs lm-eval: {e}")
    from lm_eval.utils import handle_non_serializable, make_table  # noqa: PLC0415

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        return fail("--tasks is empty")
    if args.log_samples and not args.out:
        return fail("--log-samples needs --out FILE")
    if args.out and Path(args.out).is_dir():
        return fail(f"--out {args.out!r} is a directory; give a file name")
    if args.threads:
        import torch  # noqa: PLC0415

        torch.set_num_threads(args.threads)
    if not args.verbose:  # lm-eval logs every task's setup at WARNING; the table is the output
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    results = harness.evaluate(args.checkpoint, tasks, include_path=args.include_path, limit=_limit(args.limit),
                               batch_size=args.batch_size, device=args.device, log_samples=args.log_samples,
                               num_fewshot=args.num_fewshot)
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
        print(f"wrote {out}", file=sys.stderr)
    return 0
