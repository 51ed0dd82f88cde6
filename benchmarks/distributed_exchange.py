"""Costs behind the choices of engram.distributed (docs/distributed.md), measured under torchrun:

1. the row exchange of one sharded lookup (forward + backward): ``all_to_all_single`` (what
   ``RowShardedEmbedding`` does) against an all-gather design (every rank gathers every rank's ids,
   answers with the rows it owns, zeros elsewhere, and an all-reduce sums the answers: what a
   row-sharded DTensor embedding does with replicated ids);
2. the dense weights of the study model: ``DistributedDataParallel`` against FSDP2 ``fully_shard``
   (forward, backward, AdamW step).

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 benchmarks/distributed_exchange.py

Prints one JSON object (rank 0).
"""

from __future__ import annotations

import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from engram.distributed.env import init_from_env
from engram.distributed.sharded import RowShardedEmbedding


def timed(fn, reps: int = 15) -> float:
    for _ in range(3):
        fn()
    out = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def exchange(env, B: int = 8, T: int = 128, H: int = 8, d: int = 32, rows: int = 20011) -> dict:
    torch.manual_seed(env.rank)
    sizes = [rows + 2 * j for j in range(H)]
    st = RowShardedEmbedding(sizes, d, env)
    torch.nn.init.normal_(st.shard)
    ids = torch.stack([torch.randint(0, s, (B, T)) for s in sizes], -1)  # (B, T, H) this rank's slice

    def a2a():
        st.shard.grad = None
        st(ids).sum().backward()

    def gather():  # the all-gather design, forward + backward volumes
        owner, local = st.route(ids)
        span = max(st.local_rows) + 1
        keys, inv = torch.unique((owner * span + local).reshape(-1), return_inverse=True)
        n = torch.tensor([keys.numel()])
        ns = [torch.zeros(1, dtype=torch.long) for _ in range(env.world)]
        dist.all_gather(ns, n)
        U = int(max(int(x) for x in ns))
        pad = torch.full((U,), -1, dtype=torch.long)
        pad[: keys.numel()] = keys
        allk = [torch.empty(U, dtype=torch.long) for _ in range(env.world)]
        dist.all_gather(allk, pad)
        ans = torch.zeros(env.world, U, d)
        for r, k in enumerate(allk):
            mine = (k >= 0) & (k // span == env.rank)
            ans[r, mine] = st.shard.detach()[k[mine] % span]
        dist.all_reduce(ans)  # forward: every rank's answers summed
        grads = torch.randn(env.world, U, d)
        dist.all_reduce(grads)  # backward: the row gradients to the owners, same volume
        return ans[env.rank, inv]

    t_a2a = timed(a2a)
    before = st.exchange_bytes
    a2a()
    sent = st.exchange_bytes - before
    return {"lookup_ids_per_rank": ids.numel(), "all_to_all_ms": 1e3 * t_a2a, "all_to_all_bytes_sent": sent,
            "all_gather_allreduce_ms": 1e3 * timed(gather)}


def dense(env) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from engram.models.gpt import EngramGPT, GPTConfig

    cfg = GPTConfig(vocab_size=4096, n_layer=4, n_head=4, n_embd=128, block_size=128)
    x = torch.randint(0, 4096, (8, 128))
    out = {}

    def bench(model, name):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step():
            _, loss = model(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        out[f"{name}_step_ms"] = 1e3 * timed(step, reps=8)

    torch.manual_seed(0)
    bench(DDP(EngramGPT(cfg)), "ddp")
    try:
        from torch.distributed.fsdp import fully_shard

        torch.manual_seed(0)
        m = EngramGPT(cfg)
        for b in m.blocks:
            fully_shard(b)
        fully_shard(m)
        bench(m, "fsdp2")
    except Exception as e:  # noqa: BLE001 - recorded, it is the finding
        out["fsdp2_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return out


def main() -> None:
    env = init_from_env("cpu")
    res = {"world": env.world, "threads": torch.get_num_threads(), "load_avg": os.getloadavg()}
    res.update(exchange(env))
    res.update(dense(env))
    if env.is_main:
        print(json.dumps(res, indent=1))
    env.close()


if __name__ == "__main__":
    main()
