"""``engram train``: train one model, checkpoint it, write ``report.json``.

Output layout of ``--out DIR``: ``DIR/checkpoint/`` (see :mod:`engram.training.checkpoint`) and
``DIR/report.json``. ``--resume DIR`` continues a run from its last checkpoint to the same result
an uninterrupted run would reach.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from engram.cli.flags import (add_data_arguments, add_model_arguments, add_optim_arguments, engram_config_from_args,
                              fail, gpt_config_from_args, pad_id_of, prepare_data, train_config_from_args)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="engram-run", help="output directory (default %(default)s)")
    p.add_argument("--no-engram", action="store_true", help="train the plain GPT (no Engram branch)")
    p.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR (its config and data flags are reused)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="save every N steps (default: only at the end)")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --out")
    add_data_arguments(p)
    add_model_arguments(p)
    add_optim_arguments(p)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, TypeError) as e:
        return fail(str(e))
    except KeyboardInterrupt:
        print("engram: interrupted (checkpoint saved)", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from engram.training.checkpoint import RunLock, resolve_checkpoint_dir  # noqa: PLC0415

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.resume:  # a resumed run writes under its own directory, never where the checkpoint says
        resume = Path(args.resume)
        ck_dir = resolve_checkpoint_dir(resume)  # DIR/checkpoint for a run directory
        run_dir = ck_dir.parent if ck_dir.name == "checkpoint" else resume
        if args.out != "engram-run" and out.resolve() != run_dir.resolve():
            raise ValueError(f"--resume {str(resume)!r} continues the run in {str(run_dir)!r}; drop --out "
                             "(copy the run directory first to continue it elsewhere)")
        out = run_dir
    with RunLock(out):  # checked and locked before any data or training work
        return _train(args, out)


def _train(args: argparse.Namespace, out: Path) -> int:
    from engram.training.checkpoint import is_checkpoint, load_checkpoint, save_checkpoint  # noqa: PLC0415
    from engram.training.loop import Trainer, TrainConfig, build_model, run_training, write_json_atomic  # noqa: PLC0415

    ckpt_dir = out / "checkpoint"
    if args.resume:
        ck = load_checkpoint(args.resume, load_training_state=True)
        saved = ck.meta["extra"]
        tcfg_d = dict(ck.training_state["train_config"])
        if args.steps is not None:  # a longer (or shorter) budget is the one thing a resume may change
            tcfg_d["max_steps"] = args.steps
        tcfg = TrainConfig(**tcfg_d)
        for k, v in saved.get("data_args", {}).items():
            setattr(args, k, v)
        tokenizer, batcher, evals, info = prepare_data(args, tcfg.batch_size, tcfg.seq_len, tcfg.seed, ck.tokenizer)
        model = ck.model
    else:
        if is_checkpoint(ckpt_dir) and not args.overwrite:
            raise ValueError(f"{str(ckpt_dir)!r} already holds a checkpoint; use --resume {out} to continue "
                             "or --overwrite to start again")
        tcfg = train_config_from_args(args, default_steps=300)
        # Validate the model flags before the (slower) data work.
        engram = None if args.no_engram else engram_config_from_args(args, pad_id=0)
        gpt_config_from_args(args, args.vocab_size, engram)
        tokenizer, batcher, evals, info = prepare_data(args, tcfg.batch_size, tcfg.seq_len, tcfg.seed)
        engram = None if args.no_engram else engram_config_from_args(args, pad_id=pad_id_of(tokenizer))
        model = build_model(gpt_config_from_args(args, len(tokenizer), engram), tokenizer, tcfg.seed)
    name = "baseline" if model.config.engram is None else "engram"
    trainer = Trainer(model, batcher, tcfg, evals, name=name)
    if args.resume:
        trainer.load_state_dict(ck.training_state)
    data_args = {k: getattr(args, k) for k in ("data", "eval_data", "dataset", "tokenizer", "vocab_size", "eval_tokens")}
    data_args["data"] = [str(Path(p).resolve()) for p in data_args["data"]] if data_args["data"] else None
    data_args["eval_data"] = [str(Path(p).resolve()) for p in data_args["eval_data"]] if data_args["eval_data"] else None

    def save(t: Trainer) -> None:
        save_checkpoint(ckpt_dir, t.model, tokenizer, t.state_dict(),
                        extra={"data_args": data_args, "out": str(out), "step": t.step, "data": info})

    summary = run_training(trainer, save=save, progress_bar=not args.no_progress)
    report = {"data": info, "checkpoint": str(ckpt_dir), **summary}
    write_json_atomic(out / "report.json", report)
    print(f"{name}: {summary['steps']} steps, {summary['tokens_per_second']:,.0f} tok/s, "
          f"median step {summary['step_seconds_median'] * 1e3:.1f} ms, final val loss {summary['final_val_loss']:.4f}")
    print(f"wrote {out / 'report.json'} and {ckpt_dir}")
    return 0
