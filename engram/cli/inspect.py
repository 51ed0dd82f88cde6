"""``engram inspect``: what does a trained model's Engram do on a text?

Shapes: T tokens, L Engram layers, M residual branches, H hash heads per layer.

- the context gate of each Engram layer per token (averaged over the M branches), as a heatmap PNG
  (the paper's case-study figure): high where the looked-up N-gram memory is used;
- table usage: rows touched per layer and the collision rate (distinct N-grams that share a row
  with another distinct N-gram, per head, averaged);
- the loss on the text with Engram on and with every Engram branch's output zeroed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engram.models.gpt import EngramGPT
from engram.cli.flags import fail


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint (or `engram train --out` directory)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", help="text to inspect")
    src.add_argument("--text-file", metavar="FILE", help="read the text from FILE")
    p.add_argument("--out", default="engram-inspect.png", help="heatmap PNG (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens shown in the heatmap (default %(default)s)")


@torch.no_grad()
def gate_values(model: EngramGPT, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per-token gate of every gated Engram layer: ``{layer_id: (T,)}`` for ids ``(1, T)``.

    A forward hook on each branch's :class:`~engram.nn.module.ContextGate`; with hc_mult > 1 the
    M branches are averaged.
    """
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for block in model.blocks:
        eng = block.engram
        if eng is None or eng.config.lite or not eng.config.use_gate:
            continue

        def hook(mod: Any, inputs: Any, output: torch.Tensor, lid: int = block.layer_id) -> None:
            captured[lid] = output[0, :, :, 0].mean(-1).float()  # (B, T, M, 1) -> (T,)

        handles.append(eng.context_gate.register_forward_hook(hook))
    try:
        model.eval()
        model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return captured


@torch.no_grad()
def loss_with_and_without_engram(model: EngramGPT, ids: torch.Tensor) -> tuple[float, float]:
    """Mean next-token loss on ids ``(1, T)`` with Engram on, and with every branch output zeroed."""
    x, y = ids[:, :-1], ids[:, 1:]  # (1, T-1)
    model.eval()
    _, on = model(x, y)
    handles = [b.engram.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
               for b in model.blocks if b.engram is not None]
    try:
        _, off = model(x, y)
    finally:
        for h in handles:
            h.remove()
    return float(on), float(off)


@torch.no_grad()
def table_usage(model: EngramGPT, ids: torch.Tensor) -> dict[int, dict[str, float]]:
    """Rows touched and collision rate per Engram layer for ids ``(1, T)``.

    For head j of order n, the distinct N-grams (compressed ids, pad-filled history) of the text are
    compared with the distinct rows they hash to: ``collision_rate = 1 - rows / ngrams``.
    """
    hashing = model.hashing
    comp = hashing.compress(ids)  # (1, T)
    hashed = hashing.hash_compressed(comp)  # {layer: (1, T, H)}
    N, K = hashing.config.max_ngram_size, hashing.config.n_head_per_ngram
    full = torch.cat([hashing.initial_history(1), comp], dim=1)[0].tolist()  # (N-1+T,)
    out = {}
    for lid, h in hashed.items():
        rows = h[0].numpy()  # (T, H)
        rates, touched = [], 0
        for n in range(2, N + 1):
            grams = [tuple(full[t + N - n : t + N]) for t in range(len(full) - N + 1)]  # T n-grams ending at t
            for j in range(K):
                row_of = dict(zip(grams, rows[:, (n - 2) * K + j].tolist()))  # distinct n-gram -> its row
                n_rows = len(set(row_of.values()))
                touched += n_rows
                rates.append(1 - n_rows / len(row_of))
        table_rows = sum(sum(order) for order in hashing.table_sizes[lid])
        out[lid] = {"rows_touched": touched, "table_rows": table_rows,
                    "fraction_touched": touched / table_rows, "collision_rate": float(np.mean(rates))}
    return out


def heatmap(gates: dict[int, torch.Tensor], tokens: list[str], path: Path) -> None:
    """Save the ``(L, T)`` gate heatmap with token labels to ``path``."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    layers = sorted(gates)
    data = np.stack([gates[lid][: len(tokens)].numpy() for lid in layers])  # (L, T)
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(tokens)), 1.2 + 0.6 * len(layers)), dpi=100)
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(layers)), [f"layer {lid}" for lid in layers])
    ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=7)
    ax.set_title("Engram gate per token")
    fig.colorbar(im, ax=ax, fraction=0.02)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def inspect(checkpoint: str, text: str, out: str | None = None, max_tokens: int = 64) -> dict[str, Any]:
    """Gate values, table usage and Engram-off loss of ``checkpoint`` on ``text`` (see module doc)."""
    from engram.training.checkpoint import load_checkpoint  # noqa: PLC0415

    ck = load_checkpoint(checkpoint)
    model, tok = ck.model, ck.tokenizer
    if model.hashing is None:
        raise ValueError(f"checkpoint {checkpoint!r} is a plain GPT without Engram; nothing to inspect")
    if tok is None:
        raise ValueError(f"checkpoint {checkpoint!r} has no tokenizer")
    ids = tok.encode(text, add_special_tokens=False)[: model.config.block_size + 1]
    if len(ids) < 2:
        raise ValueError("--text must encode to at least 2 tokens")
    x = torch.tensor([ids], dtype=torch.long)  # (1, T+1)
    on, off = loss_with_and_without_engram(model, x)
    gates = gate_values(model, x[:, : model.config.block_size])
    result: dict[str, Any] = {
        "tokens": len(ids), "loss": on, "loss_engram_off": off,
        "table_usage": table_usage(model, x[:, : model.config.block_size]),
        "gate_mean": {lid: float(g.mean()) for lid, g in gates.items()},
    }
    if out and gates:
        shown = [tok.decode([i]) for i in ids[:max_tokens]]
        path = heatmap_path(out)
        heatmap(gates, shown, path)
        result["heatmap"] = str(path)
    return result


def heatmap_path(out: str | Path) -> Path:
    """Where the heatmap goes: ``out`` itself if it names a file (``.png`` added when it has no
    suffix), ``out/engram-inspect.png`` if it is a directory; the path reported is the one written."""
    path = Path(out)
    if path.is_dir():
        return path / "engram-inspect.png"
    if not path.suffix:
        path = path.with_suffix(".png")
    if not path.parent.is_dir():
        raise ValueError(f"--out {str(out)!r}: the folder {str(path.parent)!r} does not exist")
    return path


def run(args: argparse.Namespace) -> int:
    try:
        if args.text_file:
            p = Path(args.text_file)
            if not p.is_file():
                raise ValueError(f"--text-file {str(p)!r} does not exist")
            text = p.read_text(encoding="utf-8", errors="replace")
        elif args.text:
            text = args.text
        else:
            raise ValueError("give --text or --text-file")
        r = inspect(args.checkpoint, text, args.out, args.max_tokens)
    except (ValueError, TypeError) as e:
        return fail(str(e))
    print(f"tokens: {r['tokens']}")
    print(f"loss: {r['loss']:.4f} with Engram, {r['loss_engram_off']:.4f} with Engram switched off "
          f"(gap with - without {r['loss'] - r['loss_engram_off']:+.4f}; negative = Engram better)")
    for lid, u in r["table_usage"].items():
        g = r["gate_mean"].get(lid)
        print(f"layer {lid}: rows touched {u['rows_touched']:,} of {u['table_rows']:,} "
              f"({u['fraction_touched']:.3%}), collision rate {u['collision_rate']:.2%}"
              + (f", mean gate {g:.3f}" if g is not None else ""))
    if "heatmap" in r:
        print(f"gate heatmap: {r['heatmap']}")
    return 0
