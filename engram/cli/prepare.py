"""``engram prepare``: tokenise large text files once, in parallel, into a memory-mapped token
directory that ``engram train --data DIR`` and ``engram study --data DIR`` read
(:mod:`engram.training.prepared` documents the format, the document conventions and the split).

    engram prepare corpus/*.txt --out data/corpus --tokenizer gpt2 --workers 8
    engram prepare shards/*.jsonl --out data/web --text-field content --eval-fraction 0.005
    engram prepare books/*.txt --doc-sep blank-line --out data/books      # BPE trained on a sample
    engram train --data data/corpus --steps 10000                         # its tokenizer is used
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from engram.cli.flags import finite_float, int_at_least


def _default_workers() -> int:
    return max(1, min(16, (os.cpu_count() or 2) - 1))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="FILE",
                   help="text, JSONL (.jsonl/.ndjson) or parquet (.parquet, needs the datasets package) files")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="the prepared directory to write (new, or "
                   "an empty directory, or an earlier prepared one with --overwrite)")
    p.add_argument("--eval", nargs="+", metavar="FILE", dest="eval_inputs",
                   help="held-out files (then no training text is held out)")
    p.add_argument("--eval-fraction", type=finite_float(0.0), default=None, metavar="F",
                   help="held-out share without --eval (default 0.01; 0: none): with one document per text file "
                        "the last F of each file, otherwise every 1/F-th document")
    p.add_argument("--format", choices=("auto", "text", "jsonl", "parquet"), default="auto",
                   help="input format (default: from each file's extension; anything else is text)")
    p.add_argument("--doc-sep", choices=("file", "blank-line"), default="file",
                   help="documents in text files: one per file (default), or separated by one or more blank lines")
    p.add_argument("--text-field", default="text", help="the JSONL field / parquet column of the text (default %(default)s)")
    p.add_argument("--encoding", metavar="NAME", help="text encoding (default UTF-8, strictly; ASCII-compatible ones only)")
    p.add_argument("--tokenizer", metavar="PATH_OR_NAME",
                   help="HF fast tokenizer (default: byte-level BPE trained on the start of the training text)")
    p.add_argument("--vocab-size", type=int_at_least(257), default=4096, help="size of that BPE (default %(default)s)")
    p.add_argument("--tokenizer-sample-mb", type=finite_float(0.0, strict=True), default=16.0,
                   help="MB of training text the BPE is trained on (default %(default)s)")
    p.add_argument("--workers", type=int_at_least(1), default=_default_workers(),
                   help="tokenising processes (default: CPUs - 1 = %(default)s)")
    p.add_argument("--no-eos", action="store_true", help="no end-of-text id after each document")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier prepared directory at --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from engram.training.data import get_tokenizer  # noqa: PLC0415
    from engram.training.prepared import check_out, prepare_corpus, sample_text  # noqa: PLC0415

    check_out(Path(args.out), args.overwrite)  # before any tokenizer work
    if args.tokenizer:
        tokenizer = get_tokenizer(args.tokenizer, "")
    else:
        text = sample_text(args.inputs, int(args.tokenizer_sample_mb * 1e6), args.format, args.doc_sep,
                           args.text_field, args.encoding)
        if not text.strip():
            raise ValueError("the inputs hold no text to train a tokenizer on")
        tokenizer = get_tokenizer(None, text, args.vocab_size)
    bars: list = []  # the progress bar, made once the input size is known

    def total(n: int) -> None:
        if not args.no_progress:
            from tqdm.auto import tqdm  # noqa: PLC0415

            bars.append(tqdm(total=n, unit="B", unit_scale=True, unit_divisor=1024, desc="prepare", file=sys.stderr,
                             dynamic_ncols=True))

    def progress(n: int) -> None:
        if bars:
            bars[0].update(n)

    try:
        meta = prepare_corpus(args.inputs, args.out, tokenizer, eval_inputs=args.eval_inputs,
                              eval_fraction=args.eval_fraction, fmt=args.format, doc_sep=args.doc_sep,
                              text_field=args.text_field, encoding=args.encoding, workers=args.workers,
                              eos=not args.no_eos, overwrite=args.overwrite, progress=progress,
                              total_callback=total)
    finally:
        for bar in bars:
            bar.close()
    splits = meta["splits"]
    held = splits.get("eval")
    print(f"prepared {args.out}: {splits['train']['tokens']:,} training tokens in {splits['train']['documents']:,} "
          "document(s)" + (f", {held['tokens']:,} held-out tokens in {held['documents']:,}" if held else "")
          + f" ({meta['dtype']}, vocabulary {meta['vocab_size']}); {meta['input_bytes'] / 1e6:.1f} MB of input in "
          f"{meta['seconds']:.1f} s ({meta['mb_per_second']:.1f} MB/s, {args.workers} worker"
          f"{'s' if args.workers > 1 else ''})")
    return 0
