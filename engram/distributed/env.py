"""The process group of a run started by ``torchrun`` (its ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` /
``MASTER_ADDR`` environment), and the rank-aware helpers the rest of the package uses.

Backend: gloo on CPU (tested), nccl on CUDA (the code path; one GPU per local rank). Every
collective has a timeout (``ENGRAM_DIST_TIMEOUT`` seconds, default 300): a rank that died or hangs
makes the others fail with :class:`PeerFailure` instead of waiting for ever.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0


class PeerFailure(RuntimeError):
    """Another rank of the run died or stopped answering (a collective failed or timed out)."""


def launched_by_torchrun() -> bool:
    """True in a process started by ``torchrun`` (or anything that sets its environment) with more
    than one process, or when a process group is already up."""
    return (dist.is_available() and dist.is_initialized()) or int(os.environ.get("WORLD_SIZE", "1")) > 1


def timeout_seconds() -> float:
    raw = os.environ.get("ENGRAM_DIST_TIMEOUT", "")
    try:
        t = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"ENGRAM_DIST_TIMEOUT={raw!r} must be a number of seconds") from None
    if not t > 0:
        raise ValueError(f"ENGRAM_DIST_TIMEOUT={raw!r} must be > 0 seconds")
    return t


@dataclass
class DistEnv:
    """This process's place in the run: ``rank`` of ``world``, its device and the (world) process group."""

    rank: int
    world: int
    device: torch.device
    group: Any = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            guarded(dist.barrier, group=self.group)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        guarded(dist.broadcast_object_list, box, src=0, group=self.group)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        guarded(dist.all_gather_object, out, obj, group=self.group)
        return out

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def guarded(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a collective; a failure that means a peer is gone becomes :class:`PeerFailure`."""
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, ConnectionError) as e:  # DistBackendError / DistNetworkError subclass RuntimeError
        text = str(e)
        if isinstance(e, PeerFailure):
            raise
        raise PeerFailure(f"rank {dist.get_rank() if dist.is_initialized() else '?'}: a collective failed, "
                          f"another rank of this run died or stopped answering ({text.splitlines()[0] if text else type(e).__name__})") from e


def init_from_env(device: str | torch.device | None = None) -> DistEnv:
    """Join (or create) the process group torchrun described; a single process gets a world of 1
    without any process group. ``device``: ``"cuda"`` gives each rank ``cuda:LOCAL_RANK`` and nccl;
    anything else gloo on the CPU."""
    if not dist.is_available():
        raise ValueError("this torch build has no torch.distributed; run one process")
    want_cuda = device is not None and torch.device(device).type == "cuda"
    if not launched_by_torchrun():
        return DistEnv(0, 1, torch.device(device) if device is not None else torch.device("cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise ValueError(f"WORLD_SIZE is set but {var} is not: start the run with torchrun")
        dist.init_process_group("nccl" if want_cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_seconds()))
        owns = True
    return DistEnv(dist.get_rank(), dist.get_world_size(), dev, dist.group.WORLD, owns)
