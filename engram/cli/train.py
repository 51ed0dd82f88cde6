"""``engram train``: train one model, checkpoint it, write ``report.json``.

Output layout of ``--out DIR``: ``DIR/checkpoints/step-N/`` and the pointer
``DIR/checkpoints/latest`` (see :mod:`engram.training.checkpoint`), and ``DIR/report.json``.
``--resume DIR`` continues a run from its last complete checkpoint to the same result an
uninterrupted run would reach; it writes only under ``DIR`` and refuses a changed setting (data,
flags, a foreign training state) unless ``--allow-changes`` says the change is meant.
SIGINT (Ctrl-C) and SIGTERM stop after the step in progress and save first (exit 130 / 143).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import uuid
from pathlib import Path
from typing import Any

import torch

from engram.cli.flags import (add_data_arguments, add_model_arguments, add_optim_arguments, engram_config_from_args,
                              device_from_args, fail, gpt_config_from_args, int_at_least, pad_id_of,
                              prepare_data, resolve_table_size, train_config_from_args)

#: Flags that fix the model or its tokenizer: a resume can never change them.
MODEL_FLAGS = ("layers", "dim", "heads", "seq_len", "engram_layers", "table_size", "ngram", "engram_heads",
               "engram_dim", "engram_init", "sparse_tables", "no_engram", "tokenizer", "vocab_size")
#: Flags a resume may change only with --allow-changes (they change the result).
CHANGEABLE_FLAGS = ("lr", "table_lr_mult", "warmup_steps", "weight_decay", "grad_clip", "batch_size", "seed",
                    "eval_points", "eval_tokens", "encoding", "dtype")
#: Where the text comes from: may name other files (a moved corpus) as long as the tokens are the
#: same; the token check (SHA-256 of the token streams) decides.
SOURCE_FLAGS = ("data", "eval_data", "dataset")
#: Fields of TrainConfig among the changeable flags.
_TRAIN_FIELDS = ("lr", "table_lr_mult", "warmup_steps", "weight_decay", "grad_clip", "batch_size", "seed",
                 "eval_points", "eval_tokens", "dtype")
_DATA_FLAGS = ("data", "eval_data", "dataset", "tokenizer", "vocab_size", "eval_tokens", "encoding")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="engram-run", help="output directory (default %(default)s)")
    p.add_argument("--no-engram", action="store_true", help="train the plain GPT (no Engram branch)")
    p.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR (its config and data flags are reused)")
    p.add_argument("--allow-changes", action="store_true",
                   help="with --resume: accept changed data and training flags (model flags can never change)")
    p.add_argument("--no-verify", action="store_true",
                   help="with --resume: check checkpoint file sizes only, not their SHA-256 (for huge checkpoints)")
    p.add_argument("--checkpoint-every", type=int_at_least(0), default=0, help="save every N steps (default: only at the end)")
    p.add_argument("--keep-checkpoints", type=int_at_least(1), default=2,
                   help="complete checkpoints kept in DIR/checkpoints (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoints already in --out")
    add_data_arguments(p)
    add_model_arguments(p)
    add_optim_arguments(p)


def run(args: argparse.Namespace) -> int:
    from engram.distributed.env import PeerFailure, init_from_env, launched_by_torchrun  # noqa: PLC0415
    from engram.training.checkpoint import CheckpointWriteError  # noqa: PLC0415
    from engram.training.loop import TrainingInterrupted  # noqa: PLC0415

    args._dist = None  # this rank of a torchrun job (engram.distributed), None in one process
    try:
        if launched_by_torchrun():  # several processes: dense weights data-parallel, tables row-sharded
            args._dist = init_from_env(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return _run(args)
    except PeerFailure as e:
        return fail(f"{e}; stopping this rank too (the last complete checkpoint is kept)")
    except (ValueError, TypeError) as e:
        return fail(str(e))
    except CheckpointWriteError as e:
        return fail(e.strerror or str(e))
    except TrainingInterrupted as e:
        print(f"engram: stopped by {e.signal_name} at step {e.step}; checkpoint saved. Continue with: "
              f"engram train --resume {args.out}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt as e:  # before training started, or a second Ctrl-C
        print(f"engram: interrupted{f' by {e}' if str(e) else ''}; the last complete checkpoint (if any) is kept",
              file=sys.stderr)
        return 143 if str(e) == "SIGTERM" else 130
    finally:
        if args._dist is not None:
            args._dist.close()


def _run(args: argparse.Namespace) -> int:
    from engram.training.checkpoint import RunLock, resolve_checkpoint_dir  # noqa: PLC0415

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.resume:  # a resumed run writes under its own directory, never where the checkpoint says
        resume = Path(args.resume)
        if args.out != "engram-run" and out.resolve() != resume.resolve():
            raise ValueError(f"--resume {str(resume)!r} continues the run in that directory; drop --out "
                             "(copy the run directory first to continue it elsewhere)")
        if not resume.exists():
            raise ValueError(f"--resume {str(resume)!r} does not exist")
        ck_dir = resolve_checkpoint_dir(resume)
        if ck_dir.parent.name == "checkpoints":  # DIR/checkpoints/step-N
            run_dir = ck_dir.parent.parent
        elif ck_dir.name == "checkpoint" and ck_dir != resume:  # DIR/checkpoint of earlier engram versions
            run_dir = ck_dir.parent
        else:
            raise ValueError(f"--resume {str(resume)!r} is not a run directory of engram train (no "
                             "checkpoints/ in it); a lone checkpoint can be loaded but not resumed")
        out = run_dir
        args.out = str(out)
    env = args._dist
    with RunLock(out) if env is None or env.is_main else contextlib.nullcontext():  # rank 0 holds the lock
        return _train(args, out)


def _given_flags(args: argparse.Namespace) -> set[str]:
    """The flags the user typed (a value equal to the default counts too), from ``args._argv``."""
    argv = getattr(args, "_argv", None)
    if argv is None:  # called without the command line: every non-default value counts as given
        defaults = vars(_parser().parse_args([]))
        return {k for k, v in vars(args).items() if k in defaults and v != defaults[k]}
    p = _parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv[1:] if argv[:1] == ["train"] else argv)))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    add_arguments(p)
    return p


def _normalise(key: str, value: Any) -> Any:
    if key in ("data", "eval_data") and value:
        return [str(Path(v).resolve()) for v in value]
    return value


def _check_changes(args: argparse.Namespace, saved: dict[str, Any]) -> dict[str, Any]:
    """Flags given now that differ from the run's: ``ValueError`` unless allowed; returns the allowed ones."""
    given = _given_flags(args)
    changed = {}
    for k in MODEL_FLAGS + CHANGEABLE_FLAGS:
        now = _normalise(k, getattr(args, k, None))
        if k in saved and k in given and now != saved[k]:
            changed[k] = (saved[k], now)
    fixed = {k: v for k, v in changed.items() if k in MODEL_FLAGS}
    if fixed:
        raise ValueError("--resume cannot change the model or its tokenizer: "
                         + ", ".join(f"--{k.replace('_', '-')} {a!r} -> {b!r}" for k, (a, b) in fixed.items()))
    if changed and not args.allow_changes:
        raise ValueError("--resume continues the saved run, whose settings differ from the flags given: "
                         + ", ".join(f"--{k.replace('_', '-')} {a!r} -> {b!r}" for k, (a, b) in changed.items())
                         + "; drop the flags, or add --allow-changes to continue with the new values")
    return {k: b for k, (a, b) in changed.items()}


def _files_info(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Path, size and SHA-256 of every --data / --eval-data file (what a resume checks first)."""
    from engram.training.checkpoint import file_sha256  # noqa: PLC0415

    out = []
    for p in [*(args.data or []), *(args.eval_data or [])]:
        path = Path(p).resolve()
        if path.is_dir():  # a prepared corpus: its meta.json holds the SHA-256 of its token files
            path = path / "meta.json"
        out.append({"path": str(path), "size": path.stat().st_size, "sha256": file_sha256(path)})
    return out


def _check_files(files: list[dict[str, Any]] | None, allow_changes: bool) -> list[dict[str, Any]] | None:
    """Before a resume reads the data files its checkpoint names: each must be a regular file of
    the recorded size and SHA-256, so a stored path never decides what a run trains on. Returns
    the records when every file matched them (so they need not be hashed again), else ``None``."""
    from engram.training.checkpoint import file_sha256  # noqa: PLC0415

    for f in files or []:
        path = Path(f["path"])
        if not path.is_file():
            raise ValueError(f"the run's data file {str(path)!r} is missing or not a file; restore it, or give "
                             "the data with --data (its tokens must match the run's)")
        if allow_changes:
            continue
        if path.stat().st_size != f["size"]:
            raise ValueError(f"the run's data file {str(path)!r} has {path.stat().st_size:,} bytes, the run's had "
                             f"{f['size']:,}; it is not the data the run trained on (nothing was read from it). "
                             "Restore it, or add --allow-changes to continue on the new data")
        if file_sha256(path) != f["sha256"]:
            raise ValueError(f"the run's data file {str(path)!r} differs from the one the run trained on "
                             "(SHA-256); restore it, or add --allow-changes to continue on the new data")
    return None if allow_changes or not files else files


def _load_for_resume(args: argparse.Namespace, tables: str = "full") -> tuple[Any, dict[str, Any], dict[str, Any]]:
    from engram.training.checkpoint import load_checkpoint  # noqa: PLC0415

    ck = load_checkpoint(args.resume, load_training_state=True, verify=not args.no_verify, tables=tables)
    extra, state = ck.meta["extra"], ck.training_state
    if "data_args" not in extra or not isinstance(state, dict) or "train_config" not in state:
        raise ValueError(f"checkpoint {str(ck.path)!r} was not written by engram train (no run information "
                         "in its config.json); it can be loaded but not resumed")
    if extra.get("run_id") != state.get("run_id"):
        raise ValueError(f"checkpoint {str(ck.path)!r}: its training_state.pt belongs to another run "
                         f"(run id {state.get('run_id')!r}, the checkpoint's is {extra.get('run_id')!r}); "
                         "refusing to resume from a foreign training state")
    if ck.model.config.engram is not None and ck.tokenizer is None:
        raise ValueError(f"checkpoint {str(ck.path)!r} has no tokenizer; an Engram model cannot be resumed without it")
    saved_args = dict(extra.get("args") or {})
    saved_args.update(extra["data_args"])  # runs saved before "args" existed keep their data flags here
    return ck, saved_args, extra


def _rank_ordered(env: Any, fn: Any, *a: Any) -> Any:
    """``fn(*a)`` on rank 0 first (it fills the tokenizer and token caches), then on the other ranks."""
    if env is None or env.world == 1:
        return fn(*a)
    if not env.is_main:
        env.barrier()
    out = fn(*a)
    if env.is_main:
        env.barrier()
    return out


def _distributed_trainer(env: Any, model: Any, batcher: Any, tcfg: Any, evals: Any, name: str, ck: Any) -> Any:
    """This rank's :class:`~engram.distributed.trainer.DistributedTrainer`; with a checkpoint ``ck`` (its
    tables left on meta), its table rows and training state loaded, from any world size."""
    from engram.distributed.checkpoint import check_reshardable, load_shards, localize_training_state  # noqa: PLC0415
    from engram.distributed.trainer import DistributedTrainer  # noqa: PLC0415

    if ck is not None:
        check_reshardable(ck.meta, ck.path, model)
    trainer = DistributedTrainer(model, batcher, tcfg, env, evals, name=name)
    if ck is not None:
        load_shards(trainer.model, ck.path, ck.meta, env)
        trainer.load_state_dict(localize_training_state(ck.training_state, trainer.model, trainer.optimizers,
                                                        ck.path, ck.meta, env))
    return trainer


def _train(args: argparse.Namespace, out: Path) -> int:
    from engram.training.checkpoint import (clean_run_dir, is_checkpoint, latest_checkpoint,  # noqa: PLC0415
                                            save_run_checkpoint)
    from engram.training.loop import Trainer, TrainConfig, build_model, run_training, write_json_atomic  # noqa: PLC0415

    env = args._dist
    main = env is None or env.is_main
    for name in clean_run_dir(out) if main else []:
        print(f"engram: removed {name}, left in {out} by an interrupted save", file=sys.stderr)
    data_files = None  # size and SHA-256 of the data files, once verified or computed
    if args.resume:
        ck, saved_args, extra = _load_for_resume(args, tables="full" if env is None else "skip")
        changes = _check_changes(args, saved_args)
        tcfg_d = dict(ck.training_state["train_config"])
        if args.steps is not None:  # a longer (or shorter) budget never needs --allow-changes
            tcfg_d["max_steps"] = args.steps
        if args.time_budget is not None:
            tcfg_d["time_budget"] = args.time_budget
        if args.checkpoint_every:
            tcfg_d["checkpoint_every"] = args.checkpoint_every
        tcfg_d["grad_accum"], tcfg_d["compile"] = args.grad_accum, args.compile  # how, not what, is computed
        tcfg_d.update({k: v for k, v in changes.items() if k in _TRAIN_FIELDS})
        tcfg = TrainConfig(**tcfg_d)
        done_steps = int(ck.training_state["step"])
        if tcfg.time_budget is None and tcfg.max_steps is not None and done_steps >= tcfg.max_steps:
            print(f"engram: the run in {out} is already complete ({done_steps} steps); give --steps N with "
                  f"N > {done_steps} to train further", file=sys.stderr)
            return 0
        given = {k for k in SOURCE_FLAGS if getattr(args, k, None)}
        for k in _DATA_FLAGS:
            if k in saved_args and k not in changes and not (given and k in SOURCE_FLAGS):
                setattr(args, k, saved_args[k])
        if not given and (args.data or args.dataset):  # the run's own files: say which are read
            data_files = _check_files(extra.get("data_files"), args.allow_changes)
            print(f"engram: resuming on {', '.join(args.data or [args.dataset])}"
                  + (f" (eval: {', '.join(args.eval_data)})" if args.eval_data else ""), file=sys.stderr)
        tokenizer, batcher, evals, info = _rank_ordered(env, prepare_data, args, tcfg.batch_size, tcfg.seq_len,
                                                        tcfg.seed, ck.tokenizer)
        before = extra.get("data") or {}
        for key in ("train_sha256", "eval_sha256"):
            if key in before and before[key] != info[key] and not args.allow_changes:
                raise ValueError(f"the {'training' if key == 'train_sha256' else 'held-out'} data changed since the "
                                 f"checkpoint was saved ({before.get(key.replace('sha256', 'tokens'))} tokens then, "
                                 f"{info[key.replace('sha256', 'tokens')]} now, different content); restore it, "
                                 "or add --allow-changes to continue on the new data")
        model, run_id = ck.model, extra.get("run_id")
    else:
        if (latest_checkpoint(out) is not None or is_checkpoint(out / "checkpoint")) and not args.overwrite:
            raise ValueError(f"{str(out)!r} already holds a checkpoint; use --resume {out} to continue "
                             "or --overwrite to start again")
        tcfg = train_config_from_args(args, default_steps=300)
        device_from_args(args)  # a device that does not exist: an error before the data work
        # Validate the model flags before the (slower) data work.
        engram = None if args.no_engram else engram_config_from_args(args, pad_id=0)
        gpt_config_from_args(args, args.vocab_size, engram)
        tokenizer, batcher, evals, info = _rank_ordered(env, prepare_data, args, tcfg.batch_size, tcfg.seq_len, tcfg.seed)
        if not args.no_engram:
            resolve_table_size(args, info)
        engram = None if args.no_engram else engram_config_from_args(args, pad_id=pad_id_of(tokenizer))
        model = build_model(gpt_config_from_args(args, len(tokenizer), engram), tokenizer, tcfg.seed)
        run_id = uuid.uuid4().hex if env is None else env.broadcast_object(uuid.uuid4().hex)
        if args.overwrite and main:
            import shutil  # noqa: PLC0415

            shutil.rmtree(out / "checkpoints", ignore_errors=True)
    name = "baseline" if model.config.engram is None else "engram"
    if env is None:
        trainer = Trainer(model, batcher, tcfg, evals, name=name, device=device_from_args(args))
        if args.resume:
            trainer.load_state_dict(ck.training_state)
    else:
        trainer = _distributed_trainer(env, model, batcher, tcfg, evals, name, ck if args.resume else None)
    run_args = {k: _normalise(k, getattr(args, k, None)) for k in MODEL_FLAGS + CHANGEABLE_FLAGS + SOURCE_FLAGS}
    data_args = {k: run_args.get(k, getattr(args, k, None)) for k in _DATA_FLAGS}

    data_files = data_files if data_files is not None else _files_info(args)

    def save(t: Trainer) -> None:
        state = t.state_dict()
        state["run_id"] = run_id
        run_extra = {"run_id": run_id, "args": run_args, "data_args": data_args, "step": t.step,
                     "data": info, "data_files": data_files}
        if env is None:
            save_run_checkpoint(out, t.model, tokenizer, t.step, state, keep_last=args.keep_checkpoints, extra=run_extra)
        else:  # every rank writes its table rows; rank 0 the rest, the manifest and the pointer
            from engram.distributed.checkpoint import save_sharded_run_checkpoint  # noqa: PLC0415

            save_sharded_run_checkpoint(env, out, t.model, t.optimizers, tokenizer, t.step, state, run_extra,
                                        keep_last=args.keep_checkpoints)

    summary = run_training(trainer, save=save, progress_bar=not args.no_progress and main)
    if env is None:
        from engram.distributed.trainer import single_process_memory_report  # noqa: PLC0415

        summary.update(single_process_memory_report(trainer.model))
    if not main:
        return 0
    ckpt_dir = latest_checkpoint(out)
    report = {"data": info, "checkpoint": str(ckpt_dir), **summary}
    write_json_atomic(out / "report.json", report)
    print(f"{name}: {summary['steps']} steps, {summary['tokens_per_second']:,.0f} tok/s, "
          f"median step {summary['step_seconds_median'] * 1e3:.1f} ms, final val loss {summary['final_val_loss']:.4f}")
    print(f"wrote {out / 'report.json'} and {ckpt_dir}")
    return 0
