"""Checkpoints of a sharded run: each rank writes only its rows (``torch.distributed.checkpoint``, DCP),
inside the usual run directory, manifest and atomic ``latest`` pointer (:mod:`engram.training.checkpoint`).

Save (every rank calls :func:`save_sharded_run_checkpoint` at the same step):

1. every rank writes its table rows and their optimizer moments into a staging directory
   ``DIR/checkpoints/.tmp-shards-...`` (``dcp.save``: one file per rank, rank 0 adds ``.metadata`` once
   all have written);
2. rank 0 writes the rest (``config.json``, dense ``model.safetensors``, tokenizer,
   ``training_state.pt``), moves the staging directory in as ``tables/``, writes the manifest
   (SHA-256 of every file, the shards included), renames the checkpoint into place and moves the
   pointer, exactly as a single-process save;
3. every rank learns the outcome from rank 0.

A rank that dies at any point leaves at most a ``.tmp-`` directory, which the next run removes; the
pointer always names a complete checkpoint. The format (:mod:`engram.training.shards`) records where
each rank's rows sit in each head's table, so a run resumes at any world size: one process reads
the tables whole (``load_checkpoint``), N processes read each their rows (:func:`load_shards`), from
a sharded checkpoint or from one written by a single process.
"""

from __future__ import annotations

import errno
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engram.distributed.env import DistEnv, PeerFailure
from engram.distributed.sharded import RowShardedEmbedding, engram_storages
from engram.training.checkpoint import CHECKPOINTS_DIR, WEIGHTS_FILE, CheckpointWriteError, save_run_checkpoint
from engram.training.shards import (MARKER, TABLES_DIR, check_pickle_safe, dcp_errors, dcp_reason, is_sharded,
                                    state_key, state_prefix, table_key)

STAGING_PREFIX = ".tmp-shards-"


def _mesh(env: DistEnv) -> Any:
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415

    mesh = getattr(env, "_mesh", None)
    if mesh is None:
        mesh = init_device_mesh(env.device.type, (env.world,))
        env._mesh = mesh  # type: ignore[attr-defined]
    return mesh


def _head_dtensors(local: torch.Tensor, storage: RowShardedEmbedding, env: DistEnv,
                   key: Any) -> dict[str, Any]:
    """``{key(j): DTensor}``: head j's rows of ``local`` (laid out like the shard) as a ``Shard(0)`` piece
    of the whole ``(s_j, d)`` tensor."""
    from torch.distributed.tensor import DTensor, Shard  # noqa: PLC0415

    out = {}
    d = local.shape[1]
    for view, j, _ in storage.head_slices(local):
        out[key(j)] = DTensor.from_local(view, _mesh(env), [Shard(0)], run_check=False,
                                         shape=torch.Size([storage.sizes[j], d]), stride=(d, 1))
    return out


def _layer_of(model: nn.Module) -> dict[int, tuple[int, RowShardedEmbedding]]:
    """``id(shard parameter) -> (layer id, storage)``."""
    return {id(mem.shard): (eng.layer_id, mem) for eng, mem in engram_storages(model)
            if isinstance(mem, RowShardedEmbedding)}


def _row_state(optimizers: list[torch.optim.Optimizer], shards: dict[int, tuple[int, RowShardedEmbedding]]
               ) -> list[tuple[int, int, str, torch.Tensor, int, RowShardedEmbedding]]:
    """``[(optimizer k, param index i, state name, tensor, layer id, storage)]`` of every optimizer
    state tensor shaped like a table shard (Adam's moments)."""
    out = []
    for k, opt in enumerate(optimizers):
        params = [p for g in opt.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            if id(p) not in shards:
                continue
            layer_id, mem = shards[id(p)]
            for name, v in opt.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape:
                    out.append((k, i, name, v, layer_id, mem))
    return out


def sharded_state(model: nn.Module, optimizers: list[torch.optim.Optimizer], training_state: dict[str, Any],
                  env: DistEnv) -> dict[str, Any]:
    """The DCP state of this rank (its table rows and row-shaped optimizer state, as DTensors); replaces
    those optimizer tensors in ``training_state["optimizers"]`` by marker strings."""
    shards = _layer_of(model)
    state: dict[str, Any] = {}
    for layer_id, mem in shards.values():
        state.update(_head_dtensors(mem.shard.detach(), mem, env, lambda j, lid=layer_id: table_key(lid, j)))
    for k, i, name, v, layer_id, mem in _row_state(optimizers, shards):
        prefix = state_prefix(layer_id, f"o{k}.{name}")
        state.update(_head_dtensors(v, mem, env, lambda j, pre=prefix: state_key(pre, j)))
        saved = training_state["optimizers"][k]["state"]
        saved[i] = dict(saved[i])  # Optimizer.state_dict shares these dicts with the live state: never edit them
        saved[i][name] = MARKER + prefix
    return state


def save_sharded_run_checkpoint(env: DistEnv, run_dir: str | Path, model: nn.Module, optimizers: list[torch.optim.Optimizer],
                                tokenizer: Any, step: int, training_state: dict[str, Any],
                                extra: dict[str, Any], keep_last: int = 2) -> Path:
    """Save a checkpoint of a sharded run (module docstring); every rank calls it. Returns its path."""
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415

    root = Path(run_dir) / CHECKPOINTS_DIR
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
    staging = Path(env.broadcast_object(str(root / f"{STAGING_PREFIX}{step:08d}-{uuid.uuid4().hex[:12]}")))
    state = sharded_state(model, optimizers, training_state, env)
    try:
        dcp.save(state, checkpoint_id=str(staging))
    except dcp_errors() as e:  # DCP wraps every rank's failure in CheckpointException
        raise PeerFailure(f"rank {env.rank}: writing the table shards of step {step} failed ({dcp_reason(e)}); "
                          "the previous checkpoint is intact") from e
    failure, path = None, None
    if env.is_main:
        extra = dict(extra, table_shards={"world_size": env.world, "format": "torch.distributed.checkpoint",
                                          "dir": TABLES_DIR, "layout": "rows of each head in torch.chunk pieces"})
        try:
            path = save_run_checkpoint(run_dir, model, tokenizer, step, training_state, extra=extra,
                                       keep_last=keep_last, extra_dirs={TABLES_DIR: staging})
        except Exception as e:  # noqa: BLE001 - told to every rank, then raised here
            failure = e
    told = env.broadcast_object(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    if told is not None:
        raise CheckpointWriteError(errno.EIO, f"rank 0 could not save the checkpoint of step {step}: {told}")
    return Path(env.broadcast_object(str(path)))


def load_shards(model: nn.Module, root: Path, meta: dict[str, Any], env: DistEnv) -> None:
    """Fill this rank's table shards of ``model`` (already swapped in, :func:`shard_tables`) from a checkpoint:
    its ``tables/`` (DCP, written at any world size) or the whole tables of a single-process
    ``model.safetensors`` (this rank's rows only are read)."""
    shards = _layer_of(model)
    if is_sharded(meta):
        state: dict[str, Any] = {}
        for layer_id, mem in shards.values():
            state.update(_head_dtensors(mem.shard.data, mem, env, lambda j, lid=layer_id: table_key(lid, j)))
        _dcp_load(state, root, env)
        return
    from safetensors import safe_open  # noqa: PLC0415

    names = {id(p): n for n, p in _named_table_params(model)}
    with safe_open(str(root / WEIGHTS_FILE), framework="pt") as f:
        keys = set(f.keys())
        for pid, (layer_id, mem) in shards.items():
            name = names[pid].replace(".shard", ".embedding.weight")
            if name not in keys:
                raise ValueError(f"checkpoint {str(root)!r} has no table {name!r} for Engram layer {layer_id}")
            sl, offs = f.get_slice(name), mem.offsets.tolist()
            with torch.no_grad():
                for view, j, (lo, hi) in mem.head_slices(mem.shard.data):
                    view.copy_(sl[offs[j] + lo: offs[j] + hi])


def _named_table_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    ids = {id(m.shard) for _, m in engram_storages(model) if isinstance(m, RowShardedEmbedding)}
    return [(n, p) for n, p in model.named_parameters() if id(p) in ids]


def _dcp_load(state: dict[str, Any], root: Path, env: DistEnv) -> None:
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415

    check_pickle_safe(root)
    try:
        dcp.load(state, checkpoint_id=str(root / TABLES_DIR))
    except dcp_errors() as e:
        raise ValueError(f"rank {env.rank}: checkpoint {str(root)!r}: cannot read its table shards ({dcp_reason(e)})") from e


def localize_training_state(training_state: dict[str, Any], model: nn.Module,
                            optimizers: list[torch.optim.Optimizer], root: Path, meta: dict[str, Any],
                            env: DistEnv) -> dict[str, Any]:
    """The training state with this rank's rows of every row-shaped table optimizer tensor: read from
    the shards (markers, sharded checkpoint) or cut from whole tensors (single-process checkpoint)."""
    shards = _layer_of(model)
    wanted: dict[str, Any] = {}
    for k, opt in enumerate(optimizers):
        params = [p for g in opt.param_groups for p in g["params"]]
        try:
            saved = training_state["optimizers"][k]["state"]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"checkpoint {str(root)!r}: its training state has no optimizer {k}") from None
        for i, p in enumerate(params):
            if id(p) not in shards or i not in saved:
                continue
            layer_id, mem = shards[id(p)]
            for name, v in list(saved[i].items()):
                if isinstance(v, str) and v.startswith(MARKER):
                    local = torch.zeros_like(mem.shard.data)
                    wanted.update(_head_dtensors(local, mem, env, lambda j, pre=v[len(MARKER):]: state_key(pre, j)))
                    saved[i][name] = local
                elif isinstance(v, torch.Tensor) and v.shape == (mem.num_rows, mem.embedding_dim):
                    saved[i][name] = mem.take_rows(v).clone()
    if wanted:
        _dcp_load(wanted, root, env)
    return training_state


def check_reshardable(meta: dict[str, Any], root: Path, model: nn.Module) -> None:
    """``ValueError`` (before any rank reads a row) unless the checkpoint's tables can be cut for this run:
    a sharded checkpoint must hold every table the model has, with the model's sizes."""
    if not is_sharded(meta):
        if not (root / WEIGHTS_FILE).is_file():
            raise ValueError(f"checkpoint {str(root)!r} has no {WEIGHTS_FILE}")
        return
    from torch.distributed.checkpoint import FileSystemReader  # noqa: PLC0415

    check_pickle_safe(root)
    try:
        md = FileSystemReader(str(root / TABLES_DIR)).read_metadata()
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"checkpoint {str(root)!r} cannot be resharded: its {TABLES_DIR}/ index is unreadable "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    have = md.state_dict_metadata
    for eng, mem in engram_storages(model):
        for j, s in enumerate(mem.sizes):
            key = table_key(eng.layer_id, j)
            if key not in have:
                raise ValueError(f"checkpoint {str(root)!r} cannot be resharded: its shards lack {key!r} "
                                 f"(Engram layer {eng.layer_id}, head {j})")
            shape = tuple(getattr(have[key], "size", ()))
            if shape != (s, mem.embedding_dim):
                raise ValueError(f"checkpoint {str(root)!r} cannot be resharded: {key!r} is {shape} in its shards, "
                                 f"the model's table is {(s, mem.embedding_dim)}")
