"""``engram generate``: sample text from a checkpoint written by ``engram train``."""

from __future__ import annotations

import argparse

import torch

from engram.cli.flags import fail


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint (or `engram train --out` directory)")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100, help="default %(default)s")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default %(default)s)")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k likeliest tokens, 0 = all (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default %(default)s)")


def generate_text(checkpoint: str, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8,
                  top_k: int | None = 50, seed: int = 0) -> str:
    """Prompt plus up to ``max_new_tokens`` sampled tokens, decoded."""
    from engram.training.checkpoint import load_checkpoint  # noqa: PLC0415

    if max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"--top-k must be >= 0, got {top_k}")
    ck = load_checkpoint(checkpoint)
    if ck.tokenizer is None:
        raise ValueError(f"checkpoint {checkpoint!r} has no tokenizer to encode the prompt")
    model, tok = ck.model.eval(), ck.tokenizer
    ids = tok.encode(prompt, add_special_tokens=False) if prompt else []
    if not ids:  # start from end-of-text, as the model saw document boundaries
        ids = [tok.eos_token_id if tok.eos_token_id is not None else 0]
    block = model.config.block_size
    ids = ids[-(block - 1):]  # keep room for at least one new token
    x = torch.tensor([ids], dtype=torch.long)  # (1, T)
    g = torch.Generator().manual_seed(seed)
    out = model.generate(x, min(max_new_tokens, block - len(ids)), temperature=temperature,
                         top_k=top_k or None, generator=g)  # (1, T + new)
    return prompt + tok.decode(out[0, len(ids):].tolist())


def run(args: argparse.Namespace) -> int:
    try:
        text = generate_text(args.checkpoint, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed)
    except (ValueError, TypeError) as e:
        return fail(str(e))
    print(text)
    return 0
