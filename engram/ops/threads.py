"""CPU threading helpers shared by the compression and the hash.

On a small, shared CPU, waking intra-op threads for each millisecond-sized op costs more than it
saves (measured in docs/performance.md); large hashes are instead split over a worker pool whose
threads each run single-threaded ops (the ops release the GIL).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide worker pool for the hash (created once, grown if torch's thread count grows)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < workers:
            # Each worker runs its ops single-threaded; set once per worker (setting it per call costs
            # more than the slice). OpenMP's thread count is per thread: the caller keeps its own.
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="engram-hash",
                                       initializer=torch.set_num_threads, initargs=(1,))
        return _POOL


@contextlib.contextmanager
def single_thread(device: torch.device, numel: int | None = None) -> Iterator[None]:
    """Run CPU ops on the calling thread only.

    The fast hash is a few ms of cache-resident elementwise passes; on a small, shared machine
    waking intra-op threads for each costs more than it saves (measured in docs/performance.md).
    ``torch.set_num_threads`` sets OpenMP's per-thread ICV, so other Python threads are unaffected.
    """
    if device.type != "cpu" or (numel is not None and numel < 32768):  # small ops never fork anyway
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
