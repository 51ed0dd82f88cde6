"""Command-line flags shared by ``engram train`` and ``engram study`` (data, model size, Engram
settings, optimisation), parsed one way, and the small helpers every command uses."""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from engram.config import EngramConfig
from engram.core.hashing import resolve_pad_id
from engram.models.gpt import GPTConfig

#: Defaults chosen by measurement on a shared 2-core CPU (docs/study.md).
DEFAULTS = dict(n_layer=4, n_embd=128, n_head=4, seq_len=128, batch_size=16, vocab_size=4096,
                engram_layers="1", table_size=None, ngram=3, engram_heads=4, engram_dim=128,
                lr=3e-3, table_lr_mult=5.0, warmup_steps=30, eval_tokens=16384,
                sparse_tables=True, engram_init="zero")


# ---------------------------------------------------------------------- shared flags
def add_data_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", metavar="FILE", help="plain-text training files (last 10%% of each held out), "
                                                            "or one directory written by engram prepare (memory-mapped)")
    g.add_argument("--eval-data", nargs="+", metavar="FILE", help="held-out text (then --data is all training text)")
    g.add_argument("--dataset", metavar="NAME", help="a Hugging Face `datasets` corpus (needs the package and a network)")
    g.add_argument("--tokenizer", metavar="PATH_OR_NAME", help="HF tokenizer (default: byte-level BPE trained on the data, cached)")
    g.add_argument("--vocab-size", type=int, default=DEFAULTS["vocab_size"], help="size of the trained BPE (default %(default)s)")
    g.add_argument("--encoding", metavar="NAME", help="text encoding of the --data files (default: UTF-8, strictly: "
                                                      "undecodable bytes are an error)")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--layers", type=int, default=DEFAULTS["n_layer"], help="transformer blocks (default %(default)s)")
    g.add_argument("--dim", type=int, default=DEFAULTS["n_embd"], help="model width D (default %(default)s)")
    g.add_argument("--heads", type=int, default=DEFAULTS["n_head"], help="attention heads (default %(default)s)")
    g.add_argument("--seq-len", type=int, default=DEFAULTS["seq_len"], help="context length T (default %(default)s)")
    g = p.add_argument_group("engram")
    g.add_argument("--engram-layers", default=DEFAULTS["engram_layers"],
                   help="comma-separated 0-based blocks with an Engram branch (default %(default)s)")
    g.add_argument("--table-size", type=int, default=DEFAULTS["table_size"],
                   help="base table rows per hash head, every order (default: from the training text, "
                        "training tokens / 60, at least 1,000: docs/science.md; each head takes the next unused prime)")
    g.add_argument("--ngram", type=int, default=DEFAULTS["ngram"], help="max n-gram order (default %(default)s)")
    g.add_argument("--engram-heads", type=int, default=DEFAULTS["engram_heads"], help="hash heads per order (default %(default)s)")
    g.add_argument("--engram-dim", type=int, default=DEFAULTS["engram_dim"], help="memory width per order (default %(default)s)")
    g.add_argument("--engram-init", choices=("zero", "default"), default=DEFAULTS["engram_init"],
                   help="zero: the value projection starts at 0, so the branch starts as a no-op (default %(default)s); "
                        "default: PyTorch's init, whose branch output at step 0 is ~25x the token embeddings")
    g.add_argument("--dense-tables", dest="sparse_tables", action="store_false", default=DEFAULTS["sparse_tables"],
                   help="dense table gradients and Adam (default: sparse gradients and lazy Adam (RowSparseAdam), O(rows touched))")


def int_at_least(minimum: int):
    """An argparse ``type``: an int >= ``minimum`` (the error names the flag)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{v} must be >= {minimum}")
        return v
    return parse


def finite_float(minimum: float = 0.0, strict: bool = False):
    """An argparse ``type``: a finite float >= ``minimum`` (> with ``strict``)."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(v) or v < minimum or (strict and v == minimum):
            raise argparse.ArgumentTypeError(f"{text} must be a finite number {'>' if strict else '>='} {minimum}")
        return v
    return parse


def add_optim_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int_at_least(1), help="step budget per model")
    g.add_argument("--time-budget", type=finite_float(0.0, strict=True), metavar="SECONDS", help="seconds of training per model (own clock)")
    g.add_argument("--batch-size", type=int_at_least(1), default=DEFAULTS["batch_size"], help="default %(default)s")
    g.add_argument("--lr", type=finite_float(0.0, strict=True), default=DEFAULTS["lr"], help="dense learning rate (default %(default)s)")
    g.add_argument("--table-lr-mult", type=finite_float(0.0, strict=True), default=DEFAULTS["table_lr_mult"], help="table lr multiplier (default %(default)s)")
    g.add_argument("--warmup-steps", type=int_at_least(0), default=DEFAULTS["warmup_steps"], help="default %(default)s")
    g.add_argument("--weight-decay", type=finite_float(0.0), default=0.1, help="AdamW decay of dense matrices (default %(default)s)")
    g.add_argument("--grad-clip", type=finite_float(0.0), default=1.0, help="max gradient norm, 0 = off (default %(default)s)")
    g.add_argument("--eval-points", type=int_at_least(1), default=8, help="held-out evaluations over the budget (default %(default)s)")
    g.add_argument("--eval-tokens", type=int_at_least(1), default=DEFAULTS["eval_tokens"], help="held-out tokens per evaluation (default %(default)s)")
    g.add_argument("--seed", type=int_at_least(0), default=0, help="seed of weights and token stream (default %(default)s)")
    g.add_argument("--threads", type=int_at_least(1), help="torch CPU threads (default: torch's choice)")
    g.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="autocast dtype of the dense math; weights, tables and optimizer state stay fp32 "
                        "(default %(default)s; fp16 only on a GPU)")
    g.add_argument("--grad-accum", type=int_at_least(1), default=1,
                   help="split each batch into N micro-batches (same update, less memory; default %(default)s)")
    g.add_argument("--compile", action="store_true", help="run the model's forward through torch.compile")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def parse_layers(text: str) -> list[int]:
    try:
        layers = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"--engram-layers must be comma-separated block indices, got {text!r}") from e
    if not layers:
        raise ValueError("--engram-layers is empty")
    return layers


def engram_config_from_args(args: argparse.Namespace, pad_id: int | None = None) -> EngramConfig:
    """The Engram config the flags describe (the ``engram`` study variant)."""
    size = args.table_size if args.table_size is not None else 20000  # a placeholder until the data is known
    if size < 2:
        raise ValueError(f"--table-size must be >= 2 rows, got {args.table_size!r}")
    return EngramConfig(
        hidden_size=args.dim, layer_ids=parse_layers(args.engram_layers), max_ngram_size=args.ngram,
        n_embed_per_ngram=args.engram_dim, n_head_per_ngram=args.engram_heads,
        engram_vocab_size=[size] * (args.ngram - 1), pad_id=pad_id, sparse_grad=args.sparse_tables,
        zero_init_output=args.engram_init == "zero",
    )


def gpt_config_from_args(args: argparse.Namespace, vocab_size: int, engram: EngramConfig | None) -> GPTConfig:
    return GPTConfig(vocab_size=vocab_size, n_layer=args.layers, n_head=args.heads, n_embd=args.dim,
                     block_size=args.seq_len, engram=engram)


def train_config_from_args(args: argparse.Namespace, default_steps: int | None = None) -> Any:
    from engram.training.loop import TrainConfig  # noqa: PLC0415

    steps = args.steps if args.steps is not None or args.time_budget is not None else default_steps
    return TrainConfig(lr=args.lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                       table_lr_mult=args.table_lr_mult, grad_clip=args.grad_clip, batch_size=args.batch_size,
                       seq_len=args.seq_len, seed=args.seed, max_steps=steps, time_budget=args.time_budget,
                       eval_points=args.eval_points, eval_tokens=args.eval_tokens,
                       checkpoint_every=getattr(args, "checkpoint_every", 0) or 0,
                       grad_accum=args.grad_accum, dtype=args.dtype, compile=args.compile)


def prepare_data(args: argparse.Namespace, batch_size: int, seq_len: int, seed: int, tokenizer: Any = None):
    """``(tokenizer, batcher, eval_data, info)`` from the data flags; errors before anything is written."""
    from engram.training.data import (TokenBatcher, array_sha256, encode, eval_batches, get_tokenizer,  # noqa: PLC0415
                                      load_corpus)
    from engram.training.prepared import is_prepared_dir, load_prepared_data  # noqa: PLC0415

    if args.data and any(is_prepared_dir(d) for d in args.data):  # a directory of engram prepare: memory-mapped
        others = [f for f, v in (("--eval-data", args.eval_data), ("--dataset", args.dataset),
                                 ("--encoding", getattr(args, "encoding", None))) if v]
        if len(args.data) != 1 or others:
            raise ValueError("--data DIR (a directory of engram prepare) takes that one directory alone, without "
                             + (", ".join(others) or "other --data paths")
                             + ": its held-out split and encoding were fixed by engram prepare")
        return load_prepared_data(args.data[0], batch_size, seq_len, seed, tokenizer, args.tokenizer, args.eval_tokens)
    corpus = load_corpus(args.data, args.eval_data, args.dataset, encoding=getattr(args, "encoding", None))
    if tokenizer is None:
        tokenizer = get_tokenizer(args.tokenizer, corpus.train_text, args.vocab_size)
    train_ids, eval_ids = encode(tokenizer, corpus.train_text), encode(tokenizer, corpus.eval_text)
    batcher = TokenBatcher(train_ids, batch_size, seq_len, seed)
    evals = eval_batches(eval_ids, batch_size, seq_len, args.eval_tokens)
    info = {"source": corpus.source, "train_tokens": int(len(train_ids)), "eval_tokens": int(len(eval_ids)),
            "eval_tokens_used": int(sum(y.numel() for _, y in evals)), "tokenizer_vocab": len(tokenizer),
            "train_sha256": array_sha256(train_ids), "eval_sha256": array_sha256(eval_ids)}
    return tokenizer, batcher, evals, info


def device_from_args(args: argparse.Namespace) -> Any:
    """The checked ``torch.device`` of ``--device`` (default: cuda if available, else cpu)."""
    from engram.training.loop import check_device, default_device  # noqa: PLC0415

    return check_device(args.device or default_device(), args.dtype)


def resolve_table_size(args: argparse.Namespace, info: dict[str, Any]) -> None:
    """Without ``--table-size``, set it from the training text (:func:`engram.training.sizing.rows_per_head_for`)
    and record the rule's choice in ``info``."""
    from engram.training.sizing import rows_per_head_for, table_size_rule_text  # noqa: PLC0415

    if args.table_size is None:
        args.table_size = rows_per_head_for(info["train_tokens"])
        info["table_size"] = {"rows_per_head": args.table_size, "rule": table_size_rule_text()}
    else:
        info["table_size"] = {"rows_per_head": args.table_size, "rule": "--table-size"}


def pad_id_of(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its eos id, else 0 (:func:`engram.core.hashing.resolve_pad_id`)."""
    return resolve_pad_id(None, tokenizer)


def fail(msg: str) -> int:
    print(f"engram: error: {msg}", file=sys.stderr)
    return 2
