"""The on-disk form of row-sharded tables (written by ``engram.distributed.checkpoint``), read back
whole in one process.

A checkpoint saved by N processes keeps its dense weights in ``model.safetensors`` as usual and its
tables in ``tables/``, a ``torch.distributed.checkpoint`` (DCP) directory: one ``__R_0.distcp`` file per
rank and a ``.metadata`` index. Every head's table is one tensor ``(s_j, d)`` named
:func:`table_key`, saved as a DTensor ``Shard(0)`` across the ranks; the row-shaped optimizer state of
the tables (Adam's moments) likewise under :func:`state_key`. In ``training_state.pt`` those
moments are replaced by a marker string ``"dcp:<prefix>"``. DCP records where each rank's rows sit
in the whole tensor, so a checkpoint loads at any world size: here whole (one process), or per rank
(``engram.distributed.checkpoint``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

TABLES_DIR = "tables"
MARKER = "dcp:"


def table_key(layer_id: int, head: int) -> str:
    return f"tables.{layer_id}.head{head}"


def state_key(prefix: str, head: int) -> str:
    """Key of head ``head`` of a row-shaped optimizer tensor whose marker prefix is ``prefix``."""
    return f"{prefix}.head{head}"


def state_prefix(layer_id: int, name: str) -> str:
    return f"optim.{layer_id}.{name}"


def head_views(flat: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Views of each head's rows ``(s_j, d)`` of a flat table ``(sum(sizes), d)``."""
    out, at = [], 0
    for s in sizes:
        out.append(flat[at: at + s])
        at += s
    return out


def is_sharded(meta: dict[str, Any]) -> bool:
    """Whether a checkpoint's ``config.json`` contents say its tables are in ``tables/`` (DCP)."""
    return bool((meta.get("extra") or {}).get("table_shards"))


def _engram_memories(model: nn.Module) -> dict[int, Any]:
    return {e.layer_id: e.memory for e in model.engram_layers()}


def dcp_errors() -> tuple[type[BaseException], ...]:
    """What DCP raises: its ``CheckpointException`` derives from ``BaseException``, not ``Exception``."""
    from torch.distributed.checkpoint.api import CheckpointException  # noqa: PLC0415

    return (Exception, CheckpointException)


def dcp_reason(e: BaseException) -> str:
    """The first line of the first rank's failure inside a DCP exception (or of ``e`` itself)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        e = next(iter(failures.values()))
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_pickle_safe(root: Path) -> None:
    """``ValueError`` unless the table shards of checkpoint ``root`` are safe to unpickle.

    DCP's ``.metadata`` index is a plain pickle (``FileSystemReader.read_metadata``), and unpickling
    runs code. So it is read only where no other user could have written it: the checkpoint
    directory, its ``tables/`` directory and every file in it (the index, the shards, which may hold
    pickled objects too) must be owned by this user (or root) and not writable by the group or others. (The manifest's SHA-256s cannot vouch for it: whoever
    can write the index can rewrite the manifest too.)
    """
    import stat  # noqa: PLC0415

    me = os.getuid()
    tables = root / TABLES_DIR
    files = sorted(tables.iterdir()) if tables.is_dir() and not tables.is_symlink() else []  # index and shards
    for p in (root, tables, *files):
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue  # a missing index is reported by the reader
        if stat.S_ISLNK(st.st_mode) or st.st_uid not in (me, 0) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ValueError(f"checkpoint {str(root)!r}: refusing to read its table shards: {str(p)!r} is a link, "
                             "another user's, or writable by other users, and their index is a pickle that runs "
                             "code when read; copy the checkpoint to a directory only you can write")


def _dcp_load(state: dict[str, torch.Tensor], root: Path) -> None:
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415

    check_pickle_safe(root)
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(root / TABLES_DIR), no_dist=True)
    except dcp_errors() as e:
        raise ValueError(f"checkpoint {str(root)!r}: cannot read its table shards ({TABLES_DIR}/): {dcp_reason(e)}") from e


def load_full_tables(model: nn.Module, root: Path) -> None:
    """Fill every in-memory Engram table of ``model`` (one process) from the shards in ``root/tables``."""
    state = {}
    for layer_id, mem in _engram_memories(model).items():
        w = mem.table_weight
        if w is None:
            raise ValueError(f"Engram layer {layer_id} has no in-memory table to load the shards into")
        with torch.no_grad():
            for j, view in enumerate(head_views(w.data, mem.sizes)):
                state[table_key(layer_id, j)] = view
    _dcp_load(state, root)


def fill_full_state(training_state: dict[str, Any], model: nn.Module, root: Path) -> None:
    """Replace every ``"dcp:..."`` marker in ``training_state["optimizers"]`` by the whole tensor
    ``(sum(sizes), d)`` read from the shards (one process)."""
    mems = _engram_memories(model)
    wanted: dict[str, torch.Tensor] = {}
    for slot, prefix in _markers(training_state):
        layer_id = int(prefix.split(".")[1])
        mem = mems.get(layer_id)
        if mem is None:
            raise ValueError(f"checkpoint {str(root)!r}: optimizer state names Engram layer {layer_id}, which the model lacks")
        full = torch.zeros(mem.num_rows, mem.embedding_dim)
        for j, view in enumerate(head_views(full, mem.sizes)):
            wanted[state_key(prefix, j)] = view
        slot[0][slot[1]] = full
    if wanted:
        _dcp_load(wanted, root)


def _markers(training_state: dict[str, Any]) -> list[tuple[tuple[dict, str], str]]:
    """``[((dict, key), prefix)]`` of every marker string in the optimizers' state."""
    out = []
    for sd in training_state.get("optimizers", []):
        for st in (sd.get("state") or {}).values():
            for k, v in st.items():
                if isinstance(v, str) and v.startswith(MARKER):
                    out.append(((st, k), v[len(MARKER):]))
    return out
