"""``engram study``: does Engram help per step and per wall-clock second?

Trains the same ``EngramGPT`` with and without Engram (and other variants) in ONE process,
interleaved one step each, on the same token stream with the same seed. Every model has its own
optimizers and its own clock that runs only inside its own training steps, so background load on
the machine slows all variants alike. Held-out loss is measured at regular points of each model's
budget (evaluation time is kept off the training clock). Writes ``report.json``, ``summary.md``
and two plots (validation loss against steps and against seconds) to ``--out`` and prints the
verdict: loss gap at equal steps and at equal seconds, step-time overhead, tokens/s, memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from engram.config import EngramConfig
from engram.cli.flags import (add_data_arguments, add_model_arguments, add_optim_arguments, engram_config_from_args,
                        fail, gpt_config_from_args, pad_id_of, prepare_data, train_config_from_args)

#: variant name -> how it changes the ``engram`` config (``None``: no Engram at all).
VARIANTS: dict[str, Callable[[EngramConfig], EngramConfig | None]] = {
    "baseline": lambda e: None,
    "engram": lambda e: e,
    "lite": lambda e: e.replace(lite=True),
    "noconv": lambda e: e.replace(use_short_conv=False),
    "nogate": lambda e: e.replace(use_gate=False),
}
DEFAULT_TIME_BUDGET = 90.0
RSS_NOTE = ("All runs share one process: rss_delta_mb is the growth of the process RSS while this run's model was "
            "built and took its first step (freed memory may be reused, so later runs can read low); state_mb counts "
            "parameters, gradients and optimizer state exactly; peak_rss_mb is the whole process.")


def parse_variants(text: str) -> list[str]:
    """``"baseline,engram"`` -> names; ``ValueError`` listing the valid ones for an unknown name."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        raise ValueError(f"unknown variant(s) {', '.join(bad)}; valid variants: {', '.join(VARIANTS)}")
    if len(names) < 1 or len(set(names)) != len(names):
        raise ValueError(f"--variants needs distinct names, got {text!r}")
    return names


def interp(curve: list[dict[str, Any]], key: str, x: float) -> float:
    """Validation loss at ``x`` (steps or seconds) by linear interpolation of ``curve``."""
    xs = np.array([c[key] for c in curve], dtype=float)
    ys = np.array([c["val_loss"] for c in curve], dtype=float)
    return float(np.interp(x, xs, ys))


def verdict(runs: list[dict[str, Any]], reference: str = "baseline") -> dict[str, Any]:
    """Compare every run with ``reference`` at equal steps and at equal seconds.

    Gaps are ``loss(variant) - loss(reference)``: negative means the variant is better.
    """
    by_name = {r["name"]: r for r in runs}
    if reference not in by_name:
        return {"reference": None, "comparisons": []}
    ref = by_name[reference]
    out = []
    for r in runs:
        if r["name"] == reference or len(r["curve"]) < 1 or len(ref["curve"]) < 1:
            continue
        at_step = min(r["curve"][-1]["step"], ref["curve"][-1]["step"])
        at_sec = min(r["curve"][-1]["seconds"], ref["curve"][-1]["seconds"])
        ls_v, ls_r = interp(r["curve"], "step", at_step), interp(ref["curve"], "step", at_step)
        lt_v, lt_r = interp(r["curve"], "seconds", at_sec), interp(ref["curve"], "seconds", at_sec)
        out.append({
            "variant": r["name"],
            "equal_steps": {"step": at_step, "loss": ls_v, "reference_loss": ls_r, "gap": ls_v - ls_r},
            "equal_seconds": {"seconds": at_sec, "loss": lt_v, "reference_loss": lt_r, "gap": lt_v - lt_r},
            "step_time_overhead": r["step_seconds_median"] / ref["step_seconds_median"] - 1,
            "tokens_per_second_ratio": r["tokens_per_second"] / ref["tokens_per_second"],
            "ahead_at_equal_steps": ls_v < ls_r,
            "ahead_at_equal_seconds": lt_v < lt_r,
        })
    return {"reference": reference, "comparisons": out}


#: loss gaps smaller than this (nats/token) are reported as a tie: below the run-to-run noise of short studies.
TIE_NATS = 0.01


def _word(gap: float) -> str:
    return "tied" if abs(gap) < TIE_NATS else ("ahead" if gap < 0 else "behind")


def verdict_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for c in report["verdict"]["comparisons"]:
        s, t = c["equal_steps"], c["equal_seconds"]
        lines.append(
            f"{c['variant']} vs {report['verdict']['reference']}: "
            f"at step {s['step']}: {s['loss']:.4f} vs {s['reference_loss']:.4f} (gap {s['gap']:+.4f}); "
            f"at {t['seconds']:.1f}s: {t['loss']:.4f} vs {t['reference_loss']:.4f} (gap {t['gap']:+.4f}); "
            f"step time {c['step_time_overhead']:+.1%}; "
            f"-> {_word(t['gap'])} per wall-clock second, {_word(s['gap'])} per step"
        )
    return lines


def summary_markdown(report: dict[str, Any]) -> str:
    rows = ["| run | params dense | params table | steps | tokens/s | median step ms | final val loss | state MB | RSS delta MB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["runs"]:
        rows.append(f"| {r['name']} | {r['params_dense']:,} | {r['params_table']:,} | {r['steps']} | "
                    f"{r['tokens_per_second']:,.0f} | {r['step_seconds_median'] * 1e3:.1f} | {r['final_val_loss']:.4f} | "
                    f"{r['state_mb']:.1f} | {r['rss_delta_mb']:.1f} |")
    b = report["budget"]
    budget = f"{b['steps']} steps" if b["steps"] else f"{b['time_budget']:.0f} s"
    parts = [
        "# engram study", "",
        f"Corpus: {report['data']['source']}; {report['data']['train_tokens']:,} training tokens, "
        f"{report['data']['eval_tokens_used']:,} held-out tokens per evaluation.",
        f"Budget per model: {budget}; seed {report['seed']}; machine: {report['machine']['description']}.",
        "", *rows, "", "## Verdict", "", *[f"- {line}" for line in verdict_lines(report)], "",
        f"Process peak RSS: {report['peak_rss_mb']:.0f} MB. {RSS_NOTE}", "",
        "![validation loss vs steps](loss_vs_steps.png) ![validation loss vs seconds](loss_vs_seconds.png)", "",
    ]
    return "\n".join(parts)


def plot(report: dict[str, Any], out: Path) -> list[str]:
    """``loss_vs_steps.png`` and ``loss_vs_seconds.png`` in ``out``; returns the file names."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names = []
    for key, label, fname in (("step", "training step", "loss_vs_steps.png"),
                              ("seconds", "training seconds (own clock)", "loss_vs_seconds.png")):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for r in report["runs"]:
            pts = [c for c in r["curve"] if c["step"] > 0] or r["curve"]
            ax.plot([c[key] for c in pts], [c["val_loss"] for c in pts], marker="o", ms=3, label=r["name"])
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"engram study: validation loss vs {key}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = out / f".{fname}.tmp.png"
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, out / fname)
        names.append(fname)
    return names


def machine_info() -> dict[str, Any]:
    return {"description": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, "
                           f"torch {torch.__version__} with {torch.get_num_threads()} threads",
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version()}


# ---------------------------------------------------------------------- command
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variants", default="baseline,engram",
                   help=f"comma-separated runs (default %(default)s); valid: {', '.join(VARIANTS)}")
    p.add_argument("--out", default="engram-study", help="output directory (default %(default)s)")
    add_data_arguments(p)
    add_model_arguments(p)
    add_optim_arguments(p)
    p.epilog = (f"Without --steps or --time-budget every model trains {DEFAULT_TIME_BUDGET:.0f} s of its own clock. "
                "Runs are interleaved step by step in one process so machine load affects all alike.")


def run(args: argparse.Namespace) -> int:
    from engram.training.checkpoint import RunLock  # noqa: PLC0415

    try:
        with RunLock(args.out):  # checked and locked before any data or training work
            report = run_study(args)
    except (ValueError, TypeError, FloatingPointError) as e:
        return fail(str(e))
    print("\n".join(verdict_lines(report)))
    print(f"wrote {args.out}/report.json, summary.md, loss_vs_steps.png, loss_vs_seconds.png")
    return 130 if report.get("interrupted") else 0


def run_study(args: argparse.Namespace) -> dict[str, Any]:
    """Run the study the parsed ``args`` describe and write its outputs; returns the report."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    from engram.training.loop import (StopSignals, Trainer, build_model, peak_rss_mb, rss_mb,  # noqa: PLC0415
                                      write_json_atomic)

    variants = parse_variants(args.variants)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps is None and args.time_budget is None:
        args.time_budget = DEFAULT_TIME_BUDGET
    tcfg = train_config_from_args(args)
    base_engram = engram_config_from_args(args, pad_id=0)
    for v in variants:  # every config is validated before the data work and before writing anything
        gpt_config_from_args(args, args.vocab_size, VARIANTS[v](base_engram))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a directory")

    t0 = time.perf_counter()
    tokenizer, batcher, evals, info = prepare_data(args, tcfg.batch_size, tcfg.seq_len, tcfg.seed)
    info["prepare_seconds"] = time.perf_counter() - t0
    base_engram = engram_config_from_args(args, pad_id=pad_id_of(tokenizer))
    trainers, rss_delta = [], {}
    for v in variants:
        before = rss_mb()
        model = build_model(gpt_config_from_args(args, len(tokenizer), VARIANTS[v](base_engram)), tokenizer, tcfg.seed)
        trainers.append(Trainer(model, batcher, tcfg, evals, name=v))
        rss_delta[v] = rss_mb() - before

    interrupted = False
    bar = tqdm(total=1000, desc="study", unit="‰", disable=args.no_progress, dynamic_ncols=True)
    with StopSignals() as stop:  # SIGINT / SIGTERM: stop between whole steps and report what was done
        try:
            while not all(t.done for t in trainers):
                if stop.signum is not None:
                    raise KeyboardInterrupt
                for t in trainers:  # one step each, in turn
                    if t.eval_due():
                        t.evaluate()
                    if t.done:
                        continue
                    first = t.step == 0
                    before = rss_mb() if first else 0.0
                    t.train_step()
                    if first:
                        rss_delta[t.name] += rss_mb() - before
                bar.n = int(1000 * min(t.progress for t in trainers))
                bar.set_postfix_str(" | ".join(f"{t.name} {t.losses[-1]:.3f}" for t in trainers if t.losses), refresh=False)
                bar.refresh()
            for t in trainers:
                if t.eval_due():
                    t.evaluate()
        except KeyboardInterrupt:
            interrupted = True
            print("\ninterrupted: writing the report of the steps done so far", file=sys.stderr)
            for t in trainers:
                if t.step and (not t.curve or t.curve[-1].step != t.step):
                    t.evaluate()
    bar.close()

    runs = []
    for t in trainers:
        s = t.summary()
        s["rss_delta_mb"] = rss_delta[t.name]
        runs.append(s)
    report: dict[str, Any] = {
        "command": "engram study " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["study"] else "engram study",
        "variants": variants,
        "seed": tcfg.seed,
        "budget": {"steps": tcfg.max_steps, "time_budget": tcfg.time_budget},
        "data": info,
        "machine": machine_info(),
        "runs": runs,
        "peak_rss_mb": peak_rss_mb(),
        "rss_note": RSS_NOTE,
        "interrupted": interrupted,
        "total_seconds": time.perf_counter() - t0,
    }
    report["verdict"] = verdict(runs)
    out.mkdir(parents=True, exist_ok=True)
    plot(report, out)
    tmp = out / ".summary.md.tmp"
    tmp.write_text(summary_markdown(report))
    os.replace(tmp, out / "summary.md")
    write_json_atomic(out / "report.json", report)
    return report


def load_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``report.json`` written by :func:`run_study`."""
    return json.loads(Path(path).read_text())
