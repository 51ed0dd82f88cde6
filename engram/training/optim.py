"""Optimizers for Engram models: dense parameters and tables in separate groups.

Following the paper, tables use Adam with ``table_lr_mult`` (5x) the base learning rate and no
weight decay; dense parameters use AdamW (weight decay on matrices only).

A step must cost what the touched rows cost (DESIGN.md §4). Tables built with
``EngramConfig(sparse_grad=True)`` give sparse row gradients, and :func:`build_optimizer` then
uses :class:`RowSparseAdam`: ``torch.optim.SparseAdam``'s lazy Adam (only rows present in the
gradient are read or written), same math and state, run as dense row ops (1.75x faster on CPU).
On rows touched at every step it equals dense Adam; a row skipped at a step keeps its moments
and value there, where dense Adam would decay the moments and still move the row by its
momentum (tests/test_optim.py pins both facts). One more convention differs: Adam adds
``eps`` after bias-correcting ``v``, SparseAdam before, which matters only for gradients near
``eps``. Dense-gradient tables keep ``torch.optim.Adam``.
Both keep two fp32 moments per table entry: ``2 * d * 4`` bytes of optimizer state per row
(:func:`optimizer_state_bytes` measures it).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Collection, Iterable
from typing import Any, Callable

import torch
from torch import nn

from engram.nn.memory import TableStorage


def _closure_loss(closure: Callable[[], Any] | None) -> Any:
    """The loss of an optimizer ``step(closure)``: the closure re-evaluated with gradients on."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class RowSparseAdam(torch.optim.SparseAdam):
    """``torch.optim.SparseAdam`` with the same update, state and hyper-parameters, in row ops.

    SparseAdam applies each moment update as a sparse tensor (``sparse_mask``, dense += sparse),
    which costs 15 ms per step for 16k touched rows of width 32 on a 2-core CPU (over half of
    Engram's training-step overhead in the study model). Here the touched rows are gathered with
    ``index_select``, updated densely in the same order of operations and written back with
    ``index_add_`` (unique rows after coalescing, so each is one plain add): 8.6 ms for the same
    step, bit-identical to SparseAdam (tests/test_optim.py), and its state dict loads into
    SparseAdam and back.
    Parameters must get row-sparse gradients (``sparse_dim() == 1``: ``nn.Embedding(sparse=True)``).
    """

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = _closure_loss(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            eps, lr, maximize = group["eps"], float(group["lr"]), group.get("maximize", False)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse or p.grad.sparse_dim() != 1:
                    raise RuntimeError(
                        "RowSparseAdam needs row-sparse gradients (nn.Embedding(sparse=True)); "
                        "use torch.optim.Adam for dense ones"
                    )
                state = self.state[p]
                if not state:  # as SparseAdam: an int step and two moments shaped like p
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                # unique rows (the update is non-linear): (n,), (n, d), and (n, 1) live slots or None
                rows, values, live = summed_rows(-p.grad if maximize else p.grad)
                if values.numel() == 0:
                    continue
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                # old <- b * old + (1 - b) * new, written as old += (1 - b) * (new - old), as SparseAdam
                old_m = exp_avg.index_select(0, rows)  # (n, d)
                upd_m = values.sub(old_m).mul_(1 - beta1)
                if live is not None:  # unused slots (row 0, value 0) add exactly nothing
                    upd_m.mul_(live)
                exp_avg.index_add_(0, rows, upd_m)
                old_v = exp_avg_sq.index_select(0, rows)
                upd_v = values.pow(2).sub_(old_v).mul_(1 - beta2)
                if live is not None:
                    upd_v.mul_(live)
                exp_avg_sq.index_add_(0, rows, upd_v)
                numer = upd_m.add_(old_m)
                denom = upd_v.add_(old_v).sqrt_().add_(eps)
                step = state["step"]
                step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
                delta = numer.div_(denom).mul_(-step_size)
                if live is not None:
                    delta.mul_(live)
                p.index_add_(0, rows, delta)
        return loss


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


def sparse_grad_parameters(model: nn.Module) -> set[int]:
    """``id`` of every parameter that receives sparse gradients: Engram tables whose storage says so
    (:class:`~engram.nn.memory.TableStorage`) and embeddings built ``sparse=True``."""
    ids: set[int] = set()
    for m in model.modules():
        if isinstance(m, TableStorage) and m.sparse_grad and m.table_weight is not None:
            ids.add(id(m.table_weight))
        elif isinstance(m, nn.Embedding) and m.sparse:
            ids.add(id(m.weight))
    return ids


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1, table_lr_mult: float = 5.0,
                    betas: tuple[float, float] = (0.9, 0.95)) -> list[torch.optim.Optimizer]:
    """Optimizers for ``model``: AdamW for dense params, Adam (no decay, ``table_lr_mult`` x lr) for tables.

    Returns a list (one optimizer per kind): ``AdamW`` (dense), then :class:`RowSparseAdam` for tables
    with sparse gradients and/or ``Adam`` for tables with dense ones. Every group records
    ``base_lr`` so schedulers scale all groups together.
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
        sparse_ids = sparse_grad_parameters(model)
        sparse = [p for p in tables if id(p) in sparse_ids]
        dense = [p for p in tables if id(p) not in sparse_ids]
        if sparse:  # lazy Adam: O(rows touched) per step; it has no weight decay, as tables want
            opts.append(RowSparseAdam([{"params": sparse, "base_lr": tlr}], lr=tlr, betas=betas))
        if dense:
            opts.append(torch.optim.Adam([{"params": dense, "base_lr": tlr}], lr=tlr, betas=betas, weight_decay=0.0))
    return opts


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers stepped as one (``build_optimizer``'s list, for code that takes one).

    For trainers that accept a single ``torch.optim.Optimizer`` (the transformers ``Trainer``, an
    LR scheduler): ``param_groups`` is the concatenation of the inner optimizers' groups (the
    same dict objects, so a scheduler's ``lr`` writes reach them), ``step`` / ``zero_grad`` run
    each in turn, and ``state_dict`` holds one state dict per inner optimizer, in order.

    Args:
        optimizers: the optimizers, e.g. ``build_optimizer(model, lr)``.
    """

    def __init__(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        self.optimizers = list(optimizers)
        if not self.optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in self.optimizers):
            raise TypeError("CombinedOptimizer needs a non-empty list of torch.optim.Optimizer")
        # Not Optimizer.__init__ (it would copy the groups): share the inner groups and state.
        self.defaults = {}
        self._optimizer_step_pre_hooks = collections.OrderedDict()
        self._optimizer_step_post_hooks = collections.OrderedDict()
        self._optimizer_state_dict_pre_hooks = collections.OrderedDict()
        self._optimizer_state_dict_post_hooks = collections.OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = collections.OrderedDict()
        self._optimizer_load_state_dict_post_hooks = collections.OrderedDict()

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:  # type: ignore[override]
        return {k: v for o in self.optimizers for k, v in o.state.items()}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise NotImplementedError("add the group to one of CombinedOptimizer.optimizers")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = _closure_loss(closure)
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        inner = state_dict.get("optimizers") if isinstance(state_dict, dict) else None
        if not isinstance(inner, list) or len(inner) != len(self.optimizers):
            raise ValueError(
                f"not a CombinedOptimizer state of {len(self.optimizers)} optimizers "
                f"({[type(o).__name__ for o in self.optimizers]})"
            )
        for o, sd in zip(self.optimizers, inner):
            o.load_state_dict(sd)

    def __repr__(self) -> str:
        return f"CombinedOptimizer({', '.join(type(o).__name__ for o in self.optimizers)})"


def sums_by_sort(grad: torch.Tensor) -> bool:
    """Whether :func:`summed_rows` sums ``grad``'s duplicate rows with a sort (static shapes: an
    accelerator, where ``coalesce()`` would stall the host) rather than by coalescing (a CPU)."""
    return grad.device.type != "cpu"


def summed_rows(grad: torch.Tensor, static_shape: bool | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The touched rows of a row-sparse gradient with duplicate rows summed.

    Returns ``(rows (n,), values (n, d), live)``. On a CPU (default) this is ``coalesce()``:
    n unique rows and ``live=None``. Coalescing makes n depend on the data, which on an
    accelerator means a host stall per table per step; there (``static_shape=True``) the
    duplicates are summed into slots by a sort instead, keeping n = the gradient's entry count:
    slot s holds the s-th distinct row and its summed values, slots past the distinct rows hold
    row 0 with values 0, and ``live`` (n, 1) is 1.0 for the slots in use, 0.0 after them.
    """
    if static_shape is None:
        static_shape = sums_by_sort(grad)
    if not static_shape or grad.is_coalesced():
        g = grad.coalesce()
        return g._indices()[0], g._values(), None
    idx, vals = grad._indices()[0], grad._values()  # (n,), (n, d): one entry per lookup
    n = idx.numel()
    if n == 0:
        return idx, vals, None
    order = torch.argsort(idx, stable=True)
    idx_sorted = idx[order]  # (n,)
    new_row = torch.ones_like(idx_sorted, dtype=torch.bool)
    new_row[1:] = idx_sorted[1:] != idx_sorted[:-1]
    slot = new_row.cumsum(0) - 1  # (n,) slot of each entry: its row's rank among distinct rows
    values = torch.zeros_like(vals).index_add_(0, slot, vals[order])  # (n, d), sums in row order
    rows = torch.zeros_like(idx_sorted).scatter_(0, slot, idx_sorted)  # (n,) every writer agrees
    live = (torch.arange(n, device=idx.device) <= slot[-1]).to(vals.dtype).unsqueeze(1)  # (n, 1)
    return rows, values, live


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0,
                    sharded: Collection[int] = (), shard_sum: Callable[[torch.Tensor], torch.Tensor] | None = None
                    ) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` that also accepts sparse (table) gradients.

    The total norm counts every stored value of a sparse gradient once after coalescing
    (duplicate rows summed, as the optimizer will apply them); all gradients, dense and sparse,
    are scaled by the same factor. Returns the total norm before clipping.
    With ``shard_sum`` (several processes, ``engram.distributed``): the parameters whose ``id`` is
    in ``sharded`` hold disjoint rows on each process, so their ``sum |g|^p`` is summed over the
    processes by ``shard_sum`` (an all-reduce, called on every process); the others are the same
    everywhere and count once.
    """
    params = [p for p in parameters if p.grad is not None]
    if not params and shard_sum is None:
        return torch.zeros(())
    norms = []
    for p in params:
        if p.grad.is_sparse:
            if not sums_by_sort(p.grad):  # coalesced once here; the optimizer then finds it so
                p.grad = p.grad.coalesce()
            norms.append(torch.linalg.vector_norm(summed_rows(p.grad)[1], norm_type))
        else:
            norms.append(torch.linalg.vector_norm(p.grad, norm_type))
    if shard_sum is None:
        total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), norm_type)
    else:  # total^p = sum_replicated |g|^p + sum over processes of sum_sharded |g|^p
        rep = [n.pow(norm_type) for p, n in zip(params, norms) if id(p) not in sharded]
        mine = [n.pow(norm_type) for p, n in zip(params, norms) if id(p) in sharded]
        dev = norms[0].device if norms else torch.device("cpu")
        part = torch.stack([n.to(dev) for n in mine]).sum() if mine else torch.zeros((), device=dev)
        total = (sum((n.to(dev) for n in rep), torch.zeros((), device=dev)) + shard_sum(part)).pow(1.0 / norm_type)
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad.is_sparse:
            p.grad._values().mul_(scale.to(p.grad.device))
        else:
            p.grad.mul_(scale.to(p.grad.device))
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in ``optimizer.state`` tensors (moments, step counters)."""
    return sum(v.numel() * v.element_size() for st in optimizer.state.values()
               for v in st.values() if isinstance(v, torch.Tensor))
