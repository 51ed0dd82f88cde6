"""Optimizers for Engram models: dense parameters and tables in separate groups.

Following the paper, tables use Adam with ``table_lr_mult`` (5x) the base learning rate and no
weight decay; dense parameters use AdamW (weight decay on matrices only).
"""

from __future__ import annotations

import torch
from torch import nn


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
    """``(tables, dense_decay, dense_no_decay)`` of a model exposing ``table_parameters()``."""
    tables = [p for p in model.table_parameters() if p.requires_grad]
    table_ids = {id(p) for p in tables}
    decay, no_decay = [], []
    for p in model.parameters():
        if id(p) in table_ids or not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    return tables, decay, no_decay


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1, table_lr_mult: float = 5.0,
                    betas: tuple[float, float] = (0.9, 0.95)) -> list[torch.optim.Optimizer]:
    """Optimizers for ``model``: AdamW for dense params, Adam (no decay, ``table_lr_mult`` x lr) for tables.

    Returns a list (one optimizer per kind) so sparse-gradient tables can use their own class.
    Every group records ``base_lr`` so schedulers scale all groups together.
    """
    tables, decay, no_decay = split_parameters(model)
    opts: list[torch.optim.Optimizer] = []
    dense_groups = [g for g in (
        {"params": decay, "weight_decay": weight_decay, "base_lr": lr},
        {"params": no_decay, "weight_decay": 0.0, "base_lr": lr},
    ) if g["params"]]
    if dense_groups:
        opts.append(torch.optim.AdamW(dense_groups, lr=lr, betas=betas))
    if tables:
        tlr = lr * table_lr_mult
        opts.append(torch.optim.Adam([{"params": tables, "base_lr": tlr}], lr=tlr, betas=betas, weight_decay=0.0))
    return opts
