"""How far a bf16 Engram layer's update is from the exact one: the demo form vs DeepSeek-V4.1's.

The exact update is ``a * v`` computed in float64 from the same bf16 hidden states, rows and
weights, with V4.1's gate (eps 1e-6, copysign). Forms compared (same weights, no conv, fused
projection): the demo's (bf16 gate, torch's default eps, branch returned and added by the
caller), the demo's with ``gate_eps=1e-6``, and V4.1's (``gate_fp32``, ``gate_eps=1e-6``,
``residual=True``). Prints the relative L2 error of ``out - h`` per hidden-state scale.
docs/deepseek_v41.md has the figures. Usage:

    OMP_NUM_THREADS=1 python benchmarks/v41_gate_error.py
"""

from __future__ import annotations

import torch

from engram.config import EngramConfig
from engram.core.hashing import head_table_sizes
from engram.nn.module import Engram

D, M = 256, 4


def build(**changes) -> Engram:
    cfg = EngramConfig(hidden_size=D, hc_mult=M, layer_ids=[0], max_ngram_size=3, n_embed_per_ngram=256,
                       n_head_per_ngram=4, engram_vocab_size=[101, 103], use_short_conv=False, value_bias=False,
                       fused_kv=True, **changes)
    torch.manual_seed(0)
    eng = Engram(cfg, 0, head_table_sizes(cfg)[0])
    with torch.no_grad():
        eng.wkv.weight.normal_(0, cfg.memory_dim**-0.5)
        eng.key_norm_weight.uniform_(0.5, 1.5)
        eng.query_norm_weight.uniform_(0.5, 1.5)
    return eng.to(torch.bfloat16)


def exact_update(eng: Engram, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``a * v`` in float64, V4.1's gate: (B, T, M, D)."""
    e = eng.lookup(ids).double()  # (B, T, E)
    kv = e @ eng.wkv.weight.double().T  # (B, T, (M+1)*D)
    k, v = kv[..., : M * D].unflatten(-1, (M, D)), kv[..., M * D :].unsqueeze(2)
    hd = h.double()
    hn = hd / (hd.square().mean(-1, keepdim=True) + 1e-6).sqrt() * eng.query_norm_weight.double()
    kn = k / (k.square().mean(-1, keepdim=True) + 1e-6).sqrt() * eng.key_norm_weight.double()
    z = (hn * kn).sum(-1, keepdim=True) / D**0.5  # (B, T, M, 1)
    return torch.sigmoid(torch.copysign(z.abs().clamp_min(1e-6).sqrt(), z)) * v


def main() -> None:
    torch.set_num_threads(1)
    demo = build()
    eps = build(gate_eps=1e-6)
    v41 = build(gate_eps=1e-6, gate_fp32=True)
    for other in (eps, v41):
        other.load_state_dict(demo.state_dict())
    g = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randint(0, s, (4, 64), generator=g) for s in demo.memory.sizes], -1)  # (B, T, H)
    print("hidden std | demo form | demo + gate_eps=1e-6 | V4.1 form   (relative L2 error of the update)")
    for scale in (1.0, 0.1, 0.01, 3e-3, 1e-3, 3e-4):
        h = (torch.randn(4, 64, M, D, generator=g) * scale).to(torch.bfloat16)
        with torch.no_grad():
            want = exact_update(demo, h, ids)
            outs = [h + demo(h, ids), h + eps(h, ids), v41(h, ids, residual=True)]
        errs = [((o.double() - h.double() - want).norm() / want.norm()).item() for o in outs]
        print(f"{scale:10g} | " + " | ".join(f"{e:.2%}" for e in errs))


if __name__ == "__main__":
    main()
