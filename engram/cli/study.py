"""``engram study``: does Engram help per step and per wall-clock second?

Trains the same ``EngramGPT`` with and without Engram (and other variants), for each seed of
``--seeds``, interleaved one step each on the same token stream from the same initialisation.

**Load-independent by construction.** With a step budget (the default) training is a pure
function of ``(seed, step)``: the loss-vs-step curves are bit-identical however busy the machine
is. Time is measured apart from training: after it, fresh copies of the variants take warmed-up
steps in interleaved rounds (alternating order) on the same batches, which gives each variant's
seconds per step (median and quartiles). "Equal seconds" compares the curves at ``step x median
seconds per step``. ``--time-budget`` (each model's own clock) is kept and labelled
load-sensitive: its step counts depend on the machine's load.

**Spread.** Gaps (variant minus baseline, nats/token: negative = the variant is better) are
given per seed, with their mean and a 95% t-interval over seeds; "tied" when the interval holds 0.

Writes ``report.json``, ``summary.md`` and three plots (validation loss against steps and against
seconds with the seeds' band, and the gap against seconds) to ``--out`` and prints the verdict.
The report records threads, load averages, passes over the training text, and warnings (a run
that ends inside warmup, timing noise larger than the overhead, more than one pass, a time budget).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from engram.config import EngramConfig
from engram.cli.flags import (add_data_arguments, add_model_arguments, add_optim_arguments, engram_config_from_args,
                              device_from_args, fail, gpt_config_from_args, int_at_least, pad_id_of,
                              prepare_data, resolve_table_size, train_config_from_args)

#: variant name -> how it changes the ``engram`` config (``None``: no Engram at all).
VARIANTS: dict[str, Callable[[EngramConfig], EngramConfig | None]] = {
    "baseline": lambda e: None,
    "engram": lambda e: e,
    "lite": lambda e: e.replace(lite=True),
    "noconv": lambda e: e.replace(use_short_conv=False),
    "nogate": lambda e: e.replace(use_gate=False),
}
DEFAULT_STEPS = 120
DEFAULT_SEEDS = "0,1,2"
#: Timing rounds after warm-up steps (each round: one step of every variant, order alternating).
TIMING_WARMUP, TIMING_ROUNDS = 5, 20
SIGN = "gap = variant - baseline in nats/token: negative = the variant is better"
RSS_NOTE = ("All runs share one process: rss_delta_mb is the growth of the process RSS while this run's model was "
            "built and took its first step (freed memory may be reused, so later runs can read low); state_mb counts "
            "parameters, gradients and optimizer state exactly; peak_rss_mb is the whole process.")
#: two-sided 95% Student-t quantiles by degrees of freedom.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 30: 2.042}


#: Model flags a variant may override (``engram@table-size=5000:engram-layers=0+2``; ``+`` stands
#: for a comma inside a value).
OVERRIDABLE = {"table-size": "table_size", "engram-layers": "engram_layers", "ngram": "ngram",
               "engram-heads": "engram_heads", "engram-dim": "engram_dim", "dim": "dim", "layers": "layers",
               "heads": "heads", "engram-init": "engram_init"}


def split_variant(name: str) -> tuple[str, dict[str, Any]]:
    """``"engram@table-size=5000:dim=96"`` -> ``("engram", {"table_size": 5000, "dim": 96})``."""
    base, _, rest = name.partition("@")
    overrides: dict[str, Any] = {}
    for item in filter(None, rest.split(":")):
        key, eq, value = item.partition("=")
        if not eq or key not in OVERRIDABLE:
            raise ValueError(f"variant {name!r}: {item!r} is not FLAG=VALUE with FLAG one of {', '.join(OVERRIDABLE)}")
        value = value.replace("+", ",")
        attr = OVERRIDABLE[key]
        overrides[attr] = value if attr in ("engram_layers", "engram_init") else _int(value, name, key)
    return base, overrides


def _int(text: str, name: str, key: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"variant {name!r}: {key} needs an integer, got {text!r}") from None


def parse_variants(text: str) -> list[str]:
    """``"baseline,engram,engram@table-size=5000"`` -> names; ``ValueError`` listing the valid ones
    for an unknown name."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if split_variant(v)[0] not in VARIANTS]
    if bad:
        raise ValueError(f"unknown variant(s) {', '.join(bad)}; valid variants: {', '.join(VARIANTS)} "
                         f"(each optionally @FLAG=VALUE[:FLAG=VALUE], FLAG one of {', '.join(OVERRIDABLE)})")
    if len(names) < 1 or len(set(names)) != len(names):
        raise ValueError(f"--variants needs distinct names, got {text!r}")
    return names


def variant_config(name: str, args: argparse.Namespace, vocab_size: int, pad_id: int) -> Any:
    """The ``GPTConfig`` of variant ``name``: the flags, its overrides, its switch of the Engram config."""
    base, overrides = split_variant(name)
    vargs = argparse.Namespace(**{**vars(args), **overrides})
    engram = engram_config_from_args(vargs, pad_id=pad_id)
    return gpt_config_from_args(vargs, vocab_size, VARIANTS[base](engram))


def interp(curve: list[dict[str, Any]], key: str, x: float) -> float:
    """Validation loss at ``x`` (steps or seconds) by linear interpolation of ``curve``."""
    xs = np.array([c[key] for c in curve], dtype=float)
    ys = np.array([c["val_loss"] for c in curve], dtype=float)
    return float(np.interp(x, xs, ys))


def interval(values: list[float]) -> tuple[float, float, float]:
    """``(mean, low, high)``: a two-sided 95% Student-t interval of the mean (one value: no spread)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, mean, mean
    df = n - 1
    t = _T95.get(df) or _T95[max(k for k in _T95 if k <= df)]
    half = t * statistics.stdev(values) / math.sqrt(n)
    return mean, mean - half, mean + half


def _word(mean: float, low: float, high: float, n: int) -> str:
    if n >= 2:
        return "tied" if low <= 0 <= high else ("ahead" if mean < 0 else "behind")
    return "tied" if abs(mean) < TIE_NATS else ("ahead" if mean < 0 else "behind")


#: one seed has no spread: gaps smaller than this (nats/token) are then reported as a tie.
TIE_NATS = 0.01


def _pair(r: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    at_step = min(r["curve"][-1]["step"], ref["curve"][-1]["step"])
    at_sec = min(r["curve"][-1]["seconds"], ref["curve"][-1]["seconds"])
    ls_v, ls_r = interp(r["curve"], "step", at_step), interp(ref["curve"], "step", at_step)
    lt_v, lt_r = interp(r["curve"], "seconds", at_sec), interp(ref["curve"], "seconds", at_sec)
    return {"seed": r.get("seed", 0), "step": at_step, "seconds": at_sec,
            "loss_steps": ls_v, "ref_loss_steps": ls_r, "loss_seconds": lt_v, "ref_loss_seconds": lt_r}


def verdict(runs: list[dict[str, Any]], reference: str = "baseline",
            timing: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """Compare every variant with ``reference`` at equal steps and at equal seconds, per seed and
    over seeds (mean and 95% interval). Gaps are ``loss(variant) - loss(reference)``."""
    by_seed: dict[int, dict[str, dict[str, Any]]] = {}
    for r in runs:
        by_seed.setdefault(r.get("seed", 0), {})[r["name"]] = r
    names = list(dict.fromkeys(r["name"] for r in runs))
    if reference not in names:
        return {"reference": None, "sign": SIGN, "comparisons": []}
    out = []
    for name in names:
        if name == reference:
            continue
        pairs = [_pair(g[name], g[reference]) for _, g in sorted(by_seed.items())
                 if name in g and reference in g and g[name]["curve"] and g[reference]["curve"]]
        if not pairs:
            continue
        entry: dict[str, Any] = {"variant": name, "seeds": [p["seed"] for p in pairs]}
        for key, x in (("equal_steps", "step"), ("equal_seconds", "seconds")):
            suffix = "steps" if key == "equal_steps" else "seconds"
            gaps = [p[f"loss_{suffix}"] - p[f"ref_loss_{suffix}"] for p in pairs]
            mean, low, high = interval(gaps)
            entry[key] = {x: min(p[x] for p in pairs), "gap": mean, "low": low, "high": high, "gaps": gaps,
                          "loss": statistics.fmean(p[f"loss_{suffix}"] for p in pairs),
                          "reference_loss": statistics.fmean(p[f"ref_loss_{suffix}"] for p in pairs),
                          "verdict": _word(mean, low, high, len(gaps))}
        mine = [r for g in by_seed.values() for r in g.values() if r["name"] == name]
        refs = [r for g in by_seed.values() for r in g.values() if r["name"] == reference]
        if timing and name in timing and reference in timing:
            entry["step_time_overhead"] = timing[name]["median"] / timing[reference]["median"] - 1
        else:
            entry["step_time_overhead"] = (statistics.median(r["step_seconds_median"] for r in mine)
                                           / statistics.median(r["step_seconds_median"] for r in refs) - 1)
        entry["tokens_per_second_ratio"] = 1 / (1 + entry["step_time_overhead"])
        entry["ahead_at_equal_steps"] = entry["equal_steps"]["verdict"] == "ahead"
        entry["ahead_at_equal_seconds"] = entry["equal_seconds"]["verdict"] == "ahead"
        out.append(entry)
    return {"reference": reference, "sign": SIGN, "comparisons": out}


def verdict_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for c in report["verdict"]["comparisons"]:
        s, t = c["equal_steps"], c["equal_seconds"]
        n = len(c["seeds"])
        spread = (lambda d: f" [95% interval {d['low']:+.4f}, {d['high']:+.4f}]") if n >= 2 else (lambda d: "")
        lines.append(
            f"{c['variant']} vs {report['verdict']['reference']} ({n} seed{'s' if n > 1 else ''}): "
            f"at step {s['step']}: gap {s['gap']:+.4f}{spread(s)}; "
            f"at {t['seconds']:.3g} s: gap {t['gap']:+.4f}{spread(t)}; step time {c['step_time_overhead']:+.1%} "
            f"-> {t['verdict']} per wall-clock second, {s['verdict']} per step"
        )
    if lines:
        lines.append(f"({SIGN}; seconds = steps x measured seconds per step)" if report.get("budget", {}).get("steps")
                     else f"({SIGN}; seconds = each model's own clock: load-sensitive)")
    return lines


def summary_markdown(report: dict[str, Any]) -> str:
    rows = ["| run | seed | params dense | params table | steps | passes | s/step (timed) | final val loss | state MB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    timing = report.get("timing") or {}
    for r in report["runs"]:
        sps = timing.get(r["name"], {}).get("median", r["step_seconds_median"])
        rows.append(f"| {r['name']} | {r.get('seed', 0)} | {r['params_dense']:,} | {r['params_table']:,} | {r['steps']} | "
                    f"{r.get('passes', float('nan')):.2f} | {sps:.4f} | {r['final_val_loss']:.4f} | {r['state_mb']:.1f} |")
    b = report["budget"]
    budget = f"{b['steps']} steps" if b["steps"] else f"{b['time_budget']:.0f} s of own clock (load-sensitive)"
    m = report["machine"]
    parts = [
        "# engram study", "",
        f"Corpus: {report['data']['source']}; {report['data']['train_tokens']:,} training tokens, "
        f"{report['data']['eval_tokens_used']:,} held-out tokens per evaluation.",
        f"Budget per model: {budget}; seeds {', '.join(map(str, report['seeds']))}; machine: {m['description']}; "
        f"load average {m['load_before'][0]:.2f} before, {m['load_after'][0]:.2f} after.", "",
        *rows, "", "## Verdict", "", *[f"- {line}" for line in verdict_lines(report)], "",
    ]
    if timing:
        parts += ["## Timing", "", "| variant | median s/step | quartiles | timed steps |", "|---|---:|---:|---:|"]
        parts += [f"| {v} | {t['median']:.4f} | {t['p25']:.4f} - {t['p75']:.4f} | {t['n']} |" for v, t in timing.items()]
        parts += [""]
    if report.get("warnings"):
        parts += ["## Warnings", "", *[f"- {w}" for w in report["warnings"]], ""]
    parts += [f"Process peak RSS: {report['peak_rss_mb']:.0f} MB. {RSS_NOTE}", "",
              "![loss vs steps](loss_vs_steps.png) ![loss vs seconds](loss_vs_seconds.png) "
              "![gap vs seconds](gap_vs_seconds.png)", ""]
    return "\n".join(parts)


def _band(runs: list[dict[str, Any]], key: str, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ys = np.array([[interp(r["curve"], key, x) for x in grid] for r in runs])
    return ys.mean(0), ys.min(0), ys.max(0)


def plot(report: dict[str, Any], out: Path) -> list[str]:
    """``loss_vs_steps.png``, ``loss_vs_seconds.png`` (mean over seeds, min-max band) and
    ``gap_vs_seconds.png`` in ``out``; returns the file names."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names = list(dict.fromkeys(r["name"] for r in report["runs"]))
    groups = {n: [r for r in report["runs"] if r["name"] == n and len(r["curve"]) > 1] for n in names}
    files = []

    def save(fig: Any, fname: str) -> None:
        fig.tight_layout()
        tmp = out / f".{fname}.tmp.png"
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, out / fname)
        files.append(fname)

    seconds_label = ("seconds (steps x measured s/step)" if report["budget"]["steps"]
                     else "seconds (own clock, load-sensitive)")
    for key, label, fname in (("step", "training step", "loss_vs_steps.png"),
                              ("seconds", seconds_label, "loss_vs_seconds.png")):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for n, rs in groups.items():
            if not rs:
                continue
            end = min(r["curve"][-1][key] for r in rs)
            start = min(c[key] for c in rs[0]["curve"] if c["step"] > 0) if len(rs[0]["curve"]) > 1 else 0
            grid = np.linspace(start, end, 50)
            mean, lo, hi = _band(rs, key, grid)
            ax.plot(grid, mean, label=f"{n} ({len(rs)} seed{'s' if len(rs) > 1 else ''})")
            ax.fill_between(grid, lo, hi, alpha=0.2)
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"engram study: validation loss vs {key}")
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, fname)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ref = report["verdict"].get("reference")
    for c in report["verdict"]["comparisons"]:
        gaps = []
        end = c["equal_seconds"]["seconds"]
        grid = np.linspace(0, end, 50)
        for seed in c["seeds"]:
            r = next(x for x in groups[c["variant"]] if x.get("seed", 0) == seed)
            b = next(x for x in groups[ref] if x.get("seed", 0) == seed)
            gaps.append([interp(r["curve"], "seconds", x) - interp(b["curve"], "seconds", x) for x in grid])
        g = np.array(gaps)
        ax.plot(grid, g.mean(0), label=f"{c['variant']} - {ref}")
        ax.fill_between(grid, g.min(0), g.max(0), alpha=0.2)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel(seconds_label)
    ax.set_ylabel("gap in validation loss (negative = better)")
    ax.set_title("engram study: gap vs seconds (seeds: mean, min-max)")
    ax.grid(alpha=0.3)
    if report["verdict"]["comparisons"]:
        ax.legend()
    save(fig, "gap_vs_seconds.png")
    return files


def machine_info() -> dict[str, Any]:
    return {"description": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, "
                           f"torch {torch.__version__} with {torch.get_num_threads()} threads",
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "load_before": list(_load())}


def _load() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:  # not available on this platform
        return (float("nan"),) * 3


# ---------------------------------------------------------------------- command
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variants", default="baseline,engram",
                   help=f"comma-separated runs (default %(default)s); valid: {', '.join(VARIANTS)}")
    p.add_argument("--seeds", help=f"comma-separated seeds; every variant trains once per seed (default {DEFAULT_SEEDS}, "
                                   "or the one --seed given)")
    p.add_argument("--timing-rounds", type=int_at_least(1), default=TIMING_ROUNDS,
                   help="interleaved timed steps per variant after warm-up (default %(default)s)")
    p.add_argument("--out", default="engram-study", help="output directory (default %(default)s)")
    add_data_arguments(p)
    add_model_arguments(p)
    add_optim_arguments(p)
    p.set_defaults(threads=1)
    p.epilog = (f"Without --steps or --time-budget every model trains {DEFAULT_STEPS} steps per seed. Runs are "
                "interleaved step by step in one process; the loss curves depend on (seed, step) only, and "
                "seconds per step are timed separately in interleaved rounds. Threads default to 1 here "
                "(--threads to change): on a shared machine one intra-op thread times far more steadily.")


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds needs distinct integers >= 0, got {text!r}")
    return seeds


def run(args: argparse.Namespace) -> int:
    from engram.training.checkpoint import RunLock  # noqa: PLC0415

    try:
        with RunLock(args.out):  # checked and locked before any data or training work
            report = run_study(args)
    except (ValueError, TypeError, FloatingPointError) as e:
        return fail(str(e))
    return print_outcome(report, f"{args.out}/report.json, summary.md, loss_vs_steps.png, loss_vs_seconds.png, "
                                 "gap_vs_seconds.png")


def print_outcome(report: dict[str, Any], wrote: str) -> int:
    """Print the verdict, the warnings and what was written; the exit status (130 if interrupted)."""
    print("\n".join(verdict_lines(report)))
    for w in report["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    print(f"wrote {wrote}")
    return 130 if report.get("interrupted") else 0


class _Progress:
    """One bar over every training step of every seed and variant, then the timing rounds; the
    description says the phase, the postfix labels each model's last training loss."""

    def __init__(self, total: int | None, disable: bool) -> None:
        from tqdm.auto import tqdm  # noqa: PLC0415

        self.bar = tqdm(total=total, unit="step", disable=disable, dynamic_ncols=True)

    def phase(self, text: str) -> None:
        self.bar.set_description_str(text, refresh=True)

    def step(self, trainers: list[Any]) -> None:
        self.bar.update(1)
        self.bar.set_postfix_str("train loss " + ", ".join(f"{t.name} {t.losses[-1]:.3f}" for t in trainers if t.losses),
                                 refresh=False)

    def close(self) -> None:
        self.bar.close()


def time_steps(models: dict[str, Any], batcher: Any, tcfg: Any, rounds: int, progress: _Progress | None = None,
               warmup: int = TIMING_WARMUP, device: Any = None) -> dict[str, dict[str, float]]:
    """Seconds per training step of each model: ``warmup`` untimed steps each, then ``rounds``
    rounds of one timed step per model (order alternating), all on the same batches."""
    from engram.training.loop import Trainer  # noqa: PLC0415

    trainers = [Trainer(m, batcher, tcfg, name=n, device=device) for n, m in models.items()]
    for t in trainers:
        for _ in range(warmup):
            t.train_step()
            if progress:
                progress.bar.update(1)
    times: dict[str, list[float]] = {t.name: [] for t in trainers}
    for r in range(rounds):
        for t in (trainers if r % 2 == 0 else trainers[::-1]):
            t.train_step()
            t.sync()  # an accelerator's step time is read back here
            times[t.name].append(t.step_times[-1])
            if progress:
                progress.bar.update(1)
    out = {}
    for name, ts in times.items():
        q = np.quantile(ts, [0.25, 0.5, 0.75])
        out[name] = {"median": float(q[1]), "p25": float(q[0]), "p75": float(q[2]), "n": len(ts), "warmup": warmup}
    return out


def run_study(args: argparse.Namespace) -> dict[str, Any]:
    """Run the study the parsed ``args`` describe and write its outputs; returns the report."""
    from engram.training.data import reseeded  # noqa: PLC0415
    from engram.training.loop import (StopSignals, Trainer, build_model, peak_rss_mb, rss_mb,  # noqa: PLC0415
                                      write_json_atomic)

    variants = parse_variants(args.variants)
    seeds = parse_seeds(args.seeds if args.seeds else str(args.seed) if args.seed else DEFAULT_SEEDS)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps is None and args.time_budget is None:
        args.steps = DEFAULT_STEPS
    tcfg0 = train_config_from_args(args)
    device = device_from_args(args)
    for v in variants:  # every config is validated before the data work and before writing anything
        variant_config(v, args, args.vocab_size, 0)
    out = Path(args.out)
    machine = machine_info()

    t0 = time.perf_counter()
    runs: list[dict[str, Any]] = []
    interrupted = False
    total = len(seeds) * len(variants) * tcfg0.max_steps if tcfg0.max_steps and not tcfg0.time_budget else None
    if total is not None and len(variants) > 1:
        total += len(variants) * (TIMING_WARMUP + args.timing_rounds)
    progress = _Progress(total, args.no_progress)
    progress.phase("preparing data")
    tp = time.perf_counter()
    tokenizer, batcher0, evals, info = prepare_data(args, tcfg0.batch_size, tcfg0.seq_len, seeds[0])
    info["prepare_seconds"] = time.perf_counter() - tp
    ruled = args.table_size is None
    resolve_table_size(args, info)
    if ruled:
        print(f"table size: {args.table_size:,} rows per head ({info['table_size']['rule']})", file=sys.stderr)
    configs = {v: variant_config(v, args, len(tokenizer), pad_id_of(tokenizer)) for v in variants}
    with StopSignals() as stop:  # SIGINT / SIGTERM: stop between whole steps and report what was done
        for seed in seeds:
            tcfg = dataclasses.replace(tcfg0, seed=seed)
            batcher = reseeded(batcher0, seed)  # the same tokens, seed's stream of batches
            trainers, rss_delta = [], {}
            for v in variants:
                before = rss_mb()
                trainers.append(Trainer(build_model(configs[v], tokenizer, seed), batcher, tcfg, evals, name=v,
                                        device=device))
                rss_delta[v] = rss_mb() - before
            try:
                while not all(t.done for t in trainers):
                    if stop.signum is not None:
                        raise KeyboardInterrupt
                    for t in trainers:  # one step each, in turn
                        if t.eval_due():
                            progress.phase(f"seed {seed}: evaluating {t.name}")
                            t.evaluate()
                        if t.done:
                            continue
                        progress.phase(f"seed {seed}: training")
                        first = t.step == 0
                        before = rss_mb() if first else 0.0
                        t.train_step()
                        if first:
                            rss_delta[t.name] += rss_mb() - before
                        progress.step(trainers)
                for t in trainers:
                    if t.eval_due():
                        t.evaluate()
            except KeyboardInterrupt:
                interrupted = True
                print("\ninterrupted: writing the report of the steps done so far", file=sys.stderr)
                for t in trainers:
                    if t.step and (not t.curve or t.curve[-1].step != t.step):
                        t.evaluate()
            for t in trainers:
                s = t.summary()
                s["seed"] = seed
                s["rss_delta_mb"] = rss_delta[t.name]
                s["passes"] = s["tokens"] / max(info["train_tokens"], 1)
                for c in s["curve"]:
                    c["clock_seconds"] = c["seconds"]
                runs.append(s)
            del trainers
            if interrupted:
                break
        timing = None
        if tcfg0.max_steps and not tcfg0.time_budget and not interrupted and len(variants) > 1:
            progress.phase("timing steps (interleaved)")
            try:
                models = {v: build_model(cfg, tokenizer, seeds[0]) for v, cfg in configs.items()}
                timing = time_steps(models, batcher0, tcfg0, args.timing_rounds, progress, device=device)
            except KeyboardInterrupt:
                interrupted = True
            finally:
                models = {}
    progress.close()
    if timing:  # equal seconds = steps x measured seconds per step
        for r in runs:
            for c in r["curve"]:
                c["seconds"] = c["step"] * timing[r["name"]]["median"]

    report: dict[str, Any] = {
        "command": "engram study " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["study"] else "engram study",
        "variants": variants,
        "seeds": seeds,
        "seed": seeds[0],
        "budget": {"steps": tcfg0.max_steps if not tcfg0.time_budget else None, "time_budget": tcfg0.time_budget},
        "data": info,
        "machine": {**machine, "load_after": list(_load()), "device": str(device), "dtype": tcfg0.dtype},
        "runs": runs,
        "timing": timing,
        "peak_rss_mb": peak_rss_mb(),
        "rss_note": RSS_NOTE,
        "interrupted": interrupted,
        "total_seconds": time.perf_counter() - t0,
    }
    report["verdict"] = verdict(runs, timing=timing)
    report["warnings"] = warnings_for(report, tcfg0)
    out.mkdir(parents=True, exist_ok=True)
    plot(report, out)
    tmp = out / ".summary.md.tmp"
    tmp.write_text(summary_markdown(report))
    os.replace(tmp, out / "summary.md")
    write_json_atomic(out / "report.json", report)
    return report


def warnings_for(report: dict[str, Any], tcfg: Any) -> list[str]:
    """What a reader of the verdict must know: warmup, timing noise, passes, load-sensitive budgets."""
    out = []
    steps = [r["steps"] for r in report["runs"]]
    if steps and max(steps) <= tcfg.warmup_steps:
        out.append(f"every run ended inside the learning-rate warmup ({max(steps)} steps <= {tcfg.warmup_steps} "
                   "warmup steps): gaps this early say little about trained models")
    timing = report.get("timing") or {}
    for c in report["verdict"]["comparisons"]:
        t, ref = timing.get(c["variant"]), timing.get(report["verdict"]["reference"])
        if t and ref:
            noise = max((t["p75"] - t["p25"]) / t["median"], (ref["p75"] - ref["p25"]) / ref["median"])
            if noise > abs(c["step_time_overhead"]):
                out.append(f"{c['variant']}: timing noise (interquartile range {noise:.1%} of the median step) "
                           f"exceeds the measured step-time overhead ({c['step_time_overhead']:+.1%}); the "
                           "equal-seconds gap rests on an uncertain overhead (a quieter machine or more "
                           "--timing-rounds would settle it)")
    passes = max((r.get("passes", 0) for r in report["runs"]), default=0)
    if passes > 1:
        out.append(f"the models saw their training text {passes:.1f} times: an Engram table memorises training "
                   "n-grams and over-fits first, unlike the paper's one pass over far more data (give more text, "
                   "or fewer --steps)")
    if report["budget"]["time_budget"]:
        load = report["machine"]["load_before"][0]
        out.append(f"time budget: each model's step count depends on the machine's load (load average {load:.2f} "
                   "at the start); use --steps for a load-independent answer")
    return out


def load_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``report.json`` written by :func:`run_study`."""
    return json.loads(Path(path).read_text())
