"""``engram sweep``: the paper's directions at this scale, as one ``engram study`` per sweep.

One axis, several values, the baseline once: ``--axis table-size --values 1000,4000,16000`` trains
``baseline`` and ``engram@table-size=1000``, ``engram@table-size=4000``, ... interleaved in one
study (same seeds, same batches, one timing phase; see :mod:`engram.cli.study`), then plots each
value's gap to the baseline (variant - baseline, nats/token: negative = better) at equal steps and
at equal seconds, with the seeds' 95% interval.

Axes: ``table-size`` (memory scaling: rows per head), ``engram-layers`` (placement: which block;
``+`` joins several, e.g. ``1+3``), ``engram-dim``, ``ngram``, ``engram-heads``, and ``variant``
(the values are variant names: ``engram,lite,noconv,nogate``), and ``allocation`` (the paper's
U-curve: the values are Engram's share of a fixed total parameter count, the baseline's; each
share narrows the dense model to the widest width that leaves that share for tables, see
:func:`allocation_variant`). Outputs in ``--out``: the study's files plus ``sweep.json``,
``sweep.md`` and ``sweep.png``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from engram.cli.flags import fail
from engram.cli.study import OVERRIDABLE, SIGN, add_arguments as add_study_arguments, parse_variants

AXES = ("table-size", "engram-layers", "engram-dim", "ngram", "engram-heads", "variant", "allocation")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--axis", required=True, choices=AXES, help="what to vary")
    p.add_argument("--values", required=True, help="comma-separated values of the axis")
    add_study_arguments(p)
    p.set_defaults(out="engram-sweep")
    p.epilog = (f"Every value becomes a study variant; the baseline trains once per seed. {SIGN}.")


def dense_params(args: argparse.Namespace, dim: int, vocab_size: int) -> int:
    """Parameters of the study's GPT at width ``dim`` plus those of its Engram branch's dense part
    (projections, norms, conv; none for ``dim`` = the baseline), built on the meta device."""
    import torch  # noqa: PLC0415

    from engram.cli.flags import gpt_config_from_args  # noqa: PLC0415
    from engram.models.gpt import EngramGPT  # noqa: PLC0415

    with torch.device("meta"):
        model = EngramGPT(gpt_config_from_args(argparse.Namespace(**{**vars(args), "dim": dim}), vocab_size, None))
    return sum(p.numel() for p in model.parameters())


def allocation_variant(args: argparse.Namespace, share: float, vocab_size: int) -> tuple[str, dict[str, Any]]:
    """The variant giving Engram tables ``share`` of the baseline's parameter count P.

    The dense model (GPT + Engram's dense part) takes the width ``w`` (a multiple of 2 x heads,
    as rotary embeddings need) whose ``dense(w)`` is nearest ``(1 - share) * P``; the tables take
    the rest, ``P - dense(w)``, as base rows per head (``plan_tables``), so the share reached
    (``table_share``) is the nearest the width grid allows. Returns the variant name
    (``engram@dim=W:table-size=R``) and the plan's figures.
    """
    from engram.cli.flags import engram_config_from_args  # noqa: PLC0415
    from engram.training.sizing import plan_tables, projection_params  # noqa: PLC0415

    if not 0 < share < 1:
        raise ValueError(f"--axis allocation: each value is a table share in (0, 1), got {share}")
    total = dense_params(args, args.dim, vocab_size)
    step = 2 * args.heads
    options = []
    for w in range(step, args.dim + 1, step):
        ecfg = engram_config_from_args(argparse.Namespace(**{**vars(args), "dim": w, "table_size": 1000}))
        dense = dense_params(args, w, vocab_size) + projection_params(ecfg) * len(ecfg.layer_ids)
        if dense < total:
            options.append((abs(dense - (1 - share) * total), w, dense, ecfg))
    if not options:
        raise ValueError(f"--axis allocation: no width of --dim {args.dim} leaves room for tables")
    _, w, dense, ecfg = min(options, key=lambda o: o[0])
    plan = plan_tables(ecfg, table_params=total - dense)
    return (f"engram@dim={w}:table-size={plan.rows_per_head}",
            {"share": share, "table_share": plan.table_params / total, "dim": w, "rows_per_head": plan.rows_per_head,
             "total_params": total, "dense_params": dense, "table_params": plan.table_params})


def sweep_variants(axis: str, values: list[str], args: argparse.Namespace | None = None,
                   vocab_size: int | None = None) -> list[str]:
    """The study variants of a sweep: ``baseline`` first, then one per value."""
    if not values:
        raise ValueError("--values is empty")
    if axis == "allocation":
        if args is None or vocab_size is None:
            raise ValueError("--axis allocation needs the flags and the vocabulary size")
        names = [allocation_variant(args, float(v), vocab_size)[0] for v in values]
    elif axis == "variant":
        names = [v for v in values if v != "baseline"]
    else:
        if axis not in OVERRIDABLE:
            raise ValueError(f"--axis {axis!r} is not one of {', '.join(AXES)}")
        names = [f"engram@{axis}={v}" for v in values]
    return parse_variants(",".join(["baseline", *names]))


def sweep_table(report: dict[str, Any], axis: str, values: list[str] | None = None) -> list[dict[str, Any]]:
    rows = []
    by_name = {r["name"]: r for r in report["runs"]}
    for i, c in enumerate(report["verdict"]["comparisons"]):
        if axis == "variant":
            value = c["variant"]
        elif axis == "allocation":  # the share asked for (the variant name holds the width and rows)
            value = values[i]
        else:
            value = c["variant"].split("=", 1)[1]
        s, t = c["equal_steps"], c["equal_seconds"]
        rows.append({"value": value, "variant": c["variant"], "params_table": by_name[c["variant"]]["params_table"],
                     "params_dense": by_name[c["variant"]]["params_dense"],
                     "gap_steps": s["gap"], "low_steps": s["low"], "high_steps": s["high"], "verdict_steps": s["verdict"],
                     "gap_seconds": t["gap"], "low_seconds": t["low"], "high_seconds": t["high"],
                     "verdict_seconds": t["verdict"], "step_time_overhead": c["step_time_overhead"],
                     "passes": by_name[c["variant"]].get("passes")})
    return rows


def plot_sweep(rows: list[dict[str, Any]], axis: str, out: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    numeric = axis in ("table-size", "engram-dim", "ngram", "engram-heads", "allocation")
    xs = [float(r["value"]) for r in rows] if numeric else list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key, label in (("steps", "equal steps"), ("seconds", "equal seconds")):
        ys = [r[f"gap_{key}"] for r in rows]
        err = [[r[f"gap_{key}"] - r[f"low_{key}"] for r in rows], [r[f"high_{key}"] - r[f"gap_{key}"] for r in rows]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
    ax.axhline(0, color="k", lw=0.8)
    if axis == "table-size":
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(xs, [r["value"] for r in rows])
    ax.set_xlabel(axis)
    ax.set_ylabel("gap to baseline (nats/token; negative = better)")
    ax.set_title(f"engram sweep over {axis} (mean over seeds, 95% interval)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out / ".sweep.png.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out / "sweep.png")


def run(args: argparse.Namespace) -> int:
    from engram.cli.study import print_outcome, run_study  # noqa: PLC0415
    from engram.training.checkpoint import RunLock  # noqa: PLC0415
    from engram.training.loop import write_json_atomic  # noqa: PLC0415

    try:
        values = [v.strip() for v in args.values.split(",") if v.strip()]
        args.variants = ",".join(sweep_variants(args.axis, values, args, args.vocab_size))
        with RunLock(args.out):
            report = run_study(args)
            rows = sweep_table(report, args.axis, values)
            out = Path(args.out)
            write_json_atomic(out / "sweep.json", {"axis": args.axis, "values": values, "sign": SIGN, "rows": rows,
                                                   "seeds": report["seeds"], "budget": report["budget"]})
            lines = [f"# engram sweep over {args.axis}", "", f"Seeds {report['seeds']}; budget {report['budget']}; {SIGN}.",
                     "", f"| {args.axis} | variant | dense params | table params | gap at equal steps [95%] | "
                     "gap at equal seconds [95%] | step time | passes |", "|---|---|---:|---:|---:|---:|---:|---:|"]
            lines += [f"| {r['value']} | {r['variant']} | {r['params_dense']:,} | {r['params_table']:,} | {r['gap_steps']:+.4f} [{r['low_steps']:+.4f}, "
                      f"{r['high_steps']:+.4f}] {r['verdict_steps']} | {r['gap_seconds']:+.4f} [{r['low_seconds']:+.4f}, "
                      f"{r['high_seconds']:+.4f}] {r['verdict_seconds']} | {r['step_time_overhead']:+.1%} | "
                      f"{r['passes']:.2f} |" for r in rows]
            (out / "sweep.md").write_text("\n".join(lines + ["", "![sweep](sweep.png)", ""]))
            plot_sweep(rows, args.axis, out)
    except (ValueError, TypeError, FloatingPointError) as e:
        return fail(str(e))
    return print_outcome(report, f"{args.out}/sweep.md, sweep.json, sweep.png and the study's files")
