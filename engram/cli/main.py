"""``engram`` command line: a thin dispatcher; each subcommand lives in its own module.

Each module named in ``COMMANDS`` provides ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported only when their command runs, so ``engram --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("engram.cli.demo", "build an Engram GPT, hash a sentence and run it"),
    "study": ("engram.cli.study", "train the same GPT with and without Engram and compare"),
    "sweep": ("engram.cli.sweep", "one study over an axis: table size, placement, width, variants"),
    "train": ("engram.cli.train", "train one model and write report.json"),
    "prepare": ("engram.cli.prepare", "tokenise large text files into a memory-mapped token directory"),
    "generate": ("engram.cli.generate", "sample text from a checkpoint"),
    "inspect": ("engram.cli.inspect", "gate heatmap, table usage and Engram-off loss"),
    "eval": ("engram.cli.eval", "lm-evaluation-harness tasks on a checkpoint (needs the eval extra)"),
    "bench": ("engram.cli.bench", "time and memory benchmarks (hashing, lookup, step, decode)"),
    "size": ("engram.cli.size", "size Engram tables for a parameter or memory budget"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="engram", description="Engram conditional memory for PyTorch")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    wanted = argv[0] if argv and not argv[0].startswith("-") else None
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError as e:
                if e.name != module:
                    raise
                parser.error(f"command {name!r} is not available in this version")
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    args = parser.parse_args(argv)
    args._argv = list(argv)  # what the user typed: commands that must tell given flags from defaults read it
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0 if args.command is None else 2
    old = _terminate_as_interrupt()
    try:
        return int(args._run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as e:
        # Bad input is the user's to fix: say what, without a traceback.
        print(f"engram {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"engram {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _terminate_as_interrupt() -> object:
    """SIGTERM (``timeout``, a scheduler) unwinds like Ctrl-C, so temporary files are removed and a
    training loop saves between whole steps (it installs its own handler); returns the old handler."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


if __name__ == "__main__":
    raise SystemExit(main())
