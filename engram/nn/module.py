"""The Engram branch (DESIGN.md §3).

Shapes: B batch, T time, M residual branches (hc_mult), D hidden size, H heads per layer,
d head row width, E = d_mem = (N-1) * n_embed_per_ngram, W = (kernel-1)*dilation conv history.

For every position the looked-up memory vector ``e`` (B, T, E) gives a shared value
``v = W_V e`` and, per branch i, a key ``k_i = W_K,i e``; the gate is
``a_i = sigmoid(signed_sqrt(<RMSNorm(k_i), RMSNorm(h_i)> / sqrt(D)))``; ``u_i = a_i v`` and the
output is ``Y_i = u_i + SiLU(DepthwiseCausalConv(RMSNorm(u_i)))`` (dilation N, zero-initialised).
The caller adds ``Y`` to the residual before the layer's attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from engram.ops import cpu as cpu_kernels
from engram.config import EngramConfig
from engram.nn.memory import MultiHeadEmbedding


@dataclass
class EngramLayerState:
    """Decode state of one Engram layer: the last W normalised conv inputs ``(B, W, M*D)``.

    The caller owns it (a cache) and passes it to every forward of one sequence batch; the module
    reads the last W rows as left context and replaces ``conv`` with the updated tail. With
    ``keep`` set (a cache recording its past for a later ``crop``, as assisted decoding does)
    every new row is appended instead, so ``conv`` is ``(B, >= W, M*D)`` until the cache trims it.
    """

    conv: torch.Tensor | None = None
    keep: bool = False

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search)."""
        if self.conv is not None:
            self.conv = self.conv.index_select(0, index.to(self.conv.device))


_CONV_METHODS = ("taps", "conv")
# Up to this many tokens a CPU step is dispatch-bound: the lean RMSNorm composite below is used.
_SMALL_TOKENS = 64
_CONSTS: dict[tuple[float, torch.dtype, torch.device, bool], torch.Tensor] = {}


def _const(value: float, like: torch.Tensor) -> torch.Tensor:
    """A cached 0-d tensor on ``like``'s device and dtype (a Python float operand costs a tensor wrap per op).

    Keyed by inference mode too: a constant made under ``torch.inference_mode`` (``generate``)
    is an inference tensor, which autograd refuses to save in a later training step.
    """
    key = (value, like.dtype, like.device, torch.is_inference_mode_enabled())
    c = _CONSTS.get(key)
    if c is None:
        c = _CONSTS[key] = torch.tensor(value, dtype=like.dtype, device=like.device)
    return c


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of ``x`` (..., D) times ``weight`` (broadcast to ``x``, e.g. (M, D)).

    ``F.rms_norm`` for most inputs; for a few float32/64 CPU tokens (decode) a four-op composite
    with the same math (``F.rms_norm`` on CPU is a composite of ~7 ops there, dispatch-bound).
    """
    D = x.shape[-1]
    if x.device.type == "cpu" and x.numel() <= _SMALL_TOKENS * D and x.dtype in (torch.float32, torch.float64):
        ss = (x * x).sum(-1, keepdim=True)  # (..., 1)
        r = torch.addcmul(_const(eps, x), ss, _const(1.0 / D, x)).rsqrt_()  # 1 / sqrt(mean(x^2) + eps)
        y = x * r
        return y if weight is None else y * weight
    if weight is not None and weight.dim() == 1:
        return F.rms_norm(x, (D,), weight, eps=eps)
    y = F.rms_norm(x, (D,), eps=eps)
    return y if weight is None else y * weight


class ShortConv(nn.Module):
    """Per-branch RMSNorm, then a causal depthwise dilated conv over time, then SiLU.

    ``forward(x (B, T, M, D), state) -> (B, T, M, D)``. With ``state`` the conv continues from
    the stored inputs, so running a sequence in pieces equals running it whole.
    """

    def __init__(self, hidden_size: int, hc_mult: int, kernel_size: int, dilation: int, eps: float,
                 method: str = "taps"):
        super().__init__()
        if method not in _CONV_METHODS:
            raise ValueError(f"method={method!r} must be one of {_CONV_METHODS}")
        # "taps": kernel_size shifted multiply-adds (no im2col/oneDNN set-up: ~5x cheaper per
        # decode step on CPU); "conv": F.conv1d, the plain path. Same math; tests compare them.
        self.method = method
        self.hidden_size, self.hc_mult = hidden_size, hc_mult
        self.kernel_size, self.dilation = kernel_size, dilation
        self.eps = eps
        channels = hidden_size * hc_mult
        self.norm_weight = nn.Parameter(torch.ones(hc_mult, hidden_size))
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False, dilation=dilation)
        nn.init.zeros_(self.conv.weight)  # zero-initialised: the branch starts as Y = u

    @property
    def state_len(self) -> int:
        return (self.kernel_size - 1) * self.dilation

    def forward(self, x: torch.Tensor, state: EngramLayerState | None = None,
                token_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, M, D = x.shape
        if T == 0:  # nothing new: the state stays as it is
            return x.new_zeros(B, 0, M, D)
        xn = rms_norm(x, self.norm_weight.view(D) if M == 1 else self.norm_weight, self.eps)  # (B, T, M, D)
        if token_mask is not None:  # padding must not leak into real tokens through the conv
            xn = torch.where(token_mask[:, :, None, None], xn, 0.0)
        xn = xn.reshape(B, T, M * D)  # (B, T, C)
        W = self.state_len
        if state is not None and state.conv is not None:
            past = state.conv if state.conv.dtype == xn.dtype else state.conv.to(xn.dtype)  # (B, >= W, C)
        else:
            past = xn.new_zeros(B, W, M * D)  # zero padding == the conv's causal padding
        keep = state is not None and state.keep  # recording: keep every row until the cache crops
        if not keep and past.shape[1] != W:
            past = past[:, past.shape[1] - W :]  # (B, W, C)
        rows = torch.cat([past, xn], dim=1)  # (B, >= W+T, C)
        full = rows if rows.shape[1] == W + T else rows[:, rows.shape[1] - W - T :]  # (B, W+T, C)
        if state is not None:
            new = rows if keep else full[:, T:]  # (B, >= W, C)
            state.conv = new.detach() if new.requires_grad else new
        w = self.conv.weight.view(M * D, self.kernel_size)  # (C, K)
        d = self.dilation
        if self.method == "taps" and T == 1:
            # One decode step: the K taps are rows 0, d, .., (K-1)d of the window.
            y = (full[:, ::d] * w.t()).sum(1, keepdim=True)  # (B, 1, C)
        elif self.method == "taps":
            y = full[:, :T] * w[:, 0]  # (B, T, C): tap k reads the input k*d steps after the window start
            for k in range(1, self.kernel_size):
                y = y.addcmul_(full[:, k * d : k * d + T], w[:, k])
        else:
            y = F.conv1d(full.transpose(1, 2), self.conv.weight, dilation=d, groups=M * D).transpose(1, 2)  # (B, T, C)
        return F.silu(y).view(B, T, M, D)


class Engram(nn.Module):
    """One Engram branch.

    Args:
        config: the Engram config.
        layer_id: the block this branch belongs to (selects its hash heads).
        table_sizes: per-order lists of per-head table sizes for this layer (from
            ``NgramHashMapping.table_sizes[layer_id]``), or a flat list of per-head sizes.

    ``forward(hidden_states, hash_ids, state=None)``: hidden states ``(B, T, D)`` or
    ``(B, T, M, D)``, hash ids ``(B, T, H)`` -> branch output of the same shape as the hidden
    states. Add it to the residual.
    """

    def __init__(self, config: EngramConfig, layer_id: int, table_sizes: list[list[int]] | list[int],
                 device: torch.device | str | None = None, table_device: torch.device | str | None = None):
        super().__init__()
        # Tables may be built elsewhere than the dense part, e.g. on "meta" to be offloaded or
        # loaded later without ever allocating them (DESIGN.md §4).
        table_device = device if table_device is None else table_device
        self.config, self.layer_id = config, layer_id
        flat = [int(s) for order in table_sizes for s in (order if isinstance(order, (list, tuple)) else [order])]
        if len(flat) != config.n_heads_total:
            raise ValueError(
                f"table_sizes gives {len(flat)} heads but the config has {config.n_heads_total} "
                f"({config.n_orders} orders x {config.n_head_per_ngram} heads)"
            )
        D, M, E = config.hidden_size, config.hc_mult, config.memory_dim
        if config.lite:
            self.memory = MultiHeadEmbedding(flat, D, sparse=config.sparse_grad, init_std=0.0, device=table_device)
            self.lite_scale = nn.Parameter(torch.full((), float(config.lite_scale_init), device=device))
            return
        self.memory = MultiHeadEmbedding(flat, config.head_dim, sparse=config.sparse_grad, device=table_device)
        self.value_proj = nn.Linear(E, D, bias=config.value_bias, device=device)
        if config.use_gate:
            # All M keys in one matmul: (B, T, E) -> (B, T, M*D).
            self.key_proj = nn.Linear(E, M * D, bias=config.value_bias, device=device)
            self.key_norm_weight = nn.Parameter(torch.ones(M, D, device=device))
            self.query_norm_weight = nn.Parameter(torch.ones(M, D, device=device))
        if config.use_short_conv:
            self.short_conv = ShortConv(D, M, config.kernel_size, config.conv_dilation, config.conv_norm_eps).to(device)
        if config.zero_init_output:
            nn.init.zeros_(self.value_proj.weight)
            if self.value_proj.bias is not None:
                nn.init.zeros_(self.value_proj.bias)

    def lookup(self, hash_ids: torch.Tensor) -> torch.Tensor:
        """``(B, T, H)`` hash ids -> memory vector ``(B, T, H*d)``."""
        return self.memory(hash_ids).flatten(-2)  # (B, T, H*d)

    def gate(self, e: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """Context gate ``a`` ``(B, T, M, 1)`` from memory ``e`` (B, T, E) and hidden states (B, T, M, D).

        A method of its own so tools (``engram inspect``) can hook the per-token gate values.

        ``z = <RMSNorm(k) * w_k, RMSNorm(h) * w_q> / sqrt(D)`` is computed factored, without
        materialising either normalised vector: with ``s_x = sum(x**2)`` and RMSNorm's
        ``eps``, ``z = sum(k * w_k * w_q * h) * sqrt(D) / sqrt((s_k + D*eps) * (s_h + D*eps))``.
        Same math in fewer, smaller ops (decode on CPU is dispatch-bound) and less saved for
        backward; tests compare it with the normalise-then-dot form, gradients included.
        """
        B, T, M, D = hidden_states.shape
        k = self.key_proj(e).view(B, T, M, D)  # (B, T, M, D)
        q = hidden_states
        if k.dtype in (torch.float16, torch.bfloat16):
            k, q = k.float(), q.float()  # sums of squares overflow float16
        kq = torch.stack([k, q])  # (2, B, T, M, D)
        ss = torch.linalg.vecdot(kq, kq)  # (2, B, T, M): s_k, s_h
        dot = torch.linalg.vecdot(k * self.key_norm_weight, q * self.query_norm_weight)  # (B, T, M)
        # rsqrt((s + D*eps) / sqrt(D)) = D**-0.25 / rms; the product of the two is z's scale.
        eps = torch.finfo(hidden_states.dtype).eps  # RMSNorm's default eps for the input dtype
        r = torch.addcmul(_const(math.sqrt(D) * eps, ss), ss, _const(D**-0.5, ss)).rsqrt_()  # (2, B, T, M)
        z = dot * r.prod(0)  # (B, T, M)
        a = torch.sigmoid(z.abs().clamp_min(1e-6).sqrt() * z.sign())  # signed sqrt, as in the demo
        return a.unsqueeze(-1).to(hidden_states.dtype)  # (B, T, M, 1)

    def forward(self, hidden_states: torch.Tensor, hash_ids: torch.Tensor,
                state: EngramLayerState | None = None, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Branch output, same shape as ``hidden_states``.

        Args:
            hidden_states: ``(B, T, D)`` (hc_mult 1) or ``(B, T, M, D)``.
            hash_ids: ``(B, T, H)`` per-head rows from :meth:`NgramHashMapping.hash`.
            state: decode state; when given, the conv continues from it and it is updated.
            token_mask: ``(B, T)`` bool, False at padding (kept out of the conv history).
        """
        cfg = self.config
        squeeze = hidden_states.ndim == 3
        if squeeze:
            if cfg.hc_mult != 1:
                raise ValueError(f"hidden_states (B, T, D) given but hc_mult={cfg.hc_mult}; pass (B, T, M, D)")
            hidden_states = hidden_states.unsqueeze(2)  # (B, T, 1, D)
        if hidden_states.ndim != 4:
            raise ValueError(f"hidden_states must be (B, T, D) or (B, T, M, D), got {tuple(hidden_states.shape)}")
        B, T, M, D = hidden_states.shape
        if (M, D) != (cfg.hc_mult, cfg.hidden_size):
            raise ValueError(
                f"hidden_states has (M, D)=({M}, {D}) but the config has hc_mult={cfg.hc_mult}, "
                f"hidden_size={cfg.hidden_size}"
            )
        if hash_ids.ndim != 3 or hash_ids.shape[:2] != (B, T):
            raise ValueError(f"hash_ids must be (B, T, H)=({B}, {T}, H), got {tuple(hash_ids.shape)}")
        if T == 1 and not cfg.lite and not torch.is_grad_enabled():  # a decode step: one fused C call if it applies
            fused = cpu_kernels.engram_step(self, hidden_states, hash_ids, state, token_mask, self.lookup)  # (B, 1, M, D)
            if fused is not None:
                return fused.squeeze(2) if squeeze else fused
        rows = self.memory(hash_ids)  # (B, T, H, d)
        dtype = hidden_states.dtype
        if cfg.lite:
            out = (self.lite_scale * rows.sum(2)).to(dtype).unsqueeze(2).expand(B, T, M, D)  # (B, T, M, D)
            return out.squeeze(2) if squeeze else out
        e = rows.flatten(-2).to(dtype)  # (B, T, E)
        v = self.value_proj(e).unsqueeze(2)  # (B, T, 1, D)
        if cfg.use_gate:
            u = self.gate(e, hidden_states) * v  # (B, T, M, D)
        else:
            u = v.expand(B, T, M, D)
        if cfg.use_short_conv:
            u = u + self.short_conv(u, state, token_mask)  # (B, T, M, D)
        return u.squeeze(2) if squeeze else u
