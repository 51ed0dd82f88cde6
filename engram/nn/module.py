"""The Engram branch (DESIGN.md §3), written as the reference's formulas.

Shapes: B batch, T time, M residual branches (hc_mult), D hidden size, H heads per layer,
d head row width, E = d_mem = H * d, C = M * D conv channels, W = (kernel-1)*dilation conv history.

For every position the looked-up memory vector ``e`` (B, T, E) gives a shared value
``v = W_V e`` and, per branch i, a key ``k_i = W_K,i e``; the gate is
``a_i = sigmoid(signed_sqrt(<RMSNorm(k_i), RMSNorm(h_i)> / sqrt(D)))``; ``u_i = a_i v`` and the
output is ``Y_i = u_i + SiLU(DepthwiseCausalConv(RMSNorm(u_i)))`` (dilation N, zero-initialised).
The caller adds ``Y`` to the residual before the layer's attention (or ``forward(...,
residual=True)`` returns ``h + Y`` itself, rounded once).

DeepSeek-V4.1's production form is the same formula under four switches (docs/deepseek_v41.md):
``use_short_conv=False``, ``value_bias=False``, ``fused_kv=True`` (``[k_1..k_M, v] = W_KV e``, one
matrix) and ``gate_fp32=True`` with ``gate_eps=rms_norm_eps`` (the gate and ``a_i v`` in float32,
rounded to the hidden dtype once, after ``h + a_i v`` with ``residual=True``).

Nothing here is tuned for one backend: speed comes from ``torch.compile`` of these modules
(docs/performance.md) and from swapping the table storage (:mod:`engram.storage`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

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
    static: bool = False  # ``conv`` is a preallocated (B, W, M*D) buffer, updated in place (a static cache)

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search)."""
        if self.conv is None:
            return
        rows = self.conv.index_select(0, index.to(self.conv.device))
        if self.static:
            self.conv.copy_(rows)
        else:
            self.conv = rows


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_enabled()


def signed_sqrt(z: torch.Tensor, copysign: bool = False) -> torch.Tensor:
    """``sign(z) * sqrt(max(|z|, 1e-6))``, the reference's squashing of the gate logit.

    ``copysign=True``: ``copysign(sqrt(max(|z|, 1e-6)), z)``, DeepSeek-V4.1's kernel; it differs
    only at ``z = 0`` (``+-1e-3`` there, where ``sign`` gives 0).
    """
    root = z.abs().clamp_min(1e-6).sqrt()
    return torch.copysign(root, z) if copysign else root * z.sign()


class ContextGate(nn.Module):
    """``a = sigmoid(signed_sqrt(<RMSNorm(k) * w_k, RMSNorm(h) * w_q> / sqrt(D)))``, ``(B, T, M, 1)``.

    Parameter-free (the norm weights are the Engram module's, so checkpoints keep their names);
    a submodule of its own so the per-token gate values can be read with an ordinary forward
    hook (``engram inspect`` does): ``engram.context_gate.register_forward_hook(...)``.
    RMSNorm uses ``eps`` (``None``: torch's default for the input dtype, as the reference's
    ``nn.RMSNorm()``); ``copysign`` selects V4.1's signed sqrt (:func:`signed_sqrt`). The gate
    runs in the dtype of its inputs (the Engram module passes float32 ones for ``gate_fp32``).
    """

    def __init__(self, eps: float | None = None, copysign: bool = False):
        super().__init__()
        self.eps, self.copysign = eps, copysign

    def forward(self, k: torch.Tensor, h: torch.Tensor, key_norm_weight: torch.Tensor,
                query_norm_weight: torch.Tensor) -> torch.Tensor:
        D = h.shape[-1]
        k_hat = F.rms_norm(k, (D,), eps=self.eps) * key_norm_weight  # (B, T, M, D)
        h_hat = F.rms_norm(h, (D,), eps=self.eps) * query_norm_weight  # (B, T, M, D)
        z = (k_hat * h_hat).sum(-1, keepdim=True) / math.sqrt(D)  # (B, T, M, 1)
        return torch.sigmoid(signed_sqrt(z, self.copysign))

    def extra_repr(self) -> str:
        return f"eps={self.eps}, copysign={self.copysign}"


class ShortConv(nn.Module):
    """``SiLU(DepthwiseCausalConv(RMSNorm(x)))``: per-branch RMSNorm, a causal depthwise conv over
    time (kernel K, dilation d, no bias), then SiLU.

    ``forward(x (B, T, M, D), state, token_mask) -> (B, T, M, D)``. With ``state`` the conv reads
    the W stored inputs as its left context and stores the new last W, so running a sequence in
    pieces equals running it whole; without, the left context is zeros (the causal padding).
    """

    def __init__(self, hidden_size: int, hc_mult: int, kernel_size: int, dilation: int, eps: float):
        super().__init__()
        self.hidden_size, self.hc_mult = hidden_size, hc_mult
        self.kernel_size, self.dilation = kernel_size, dilation
        self.eps = eps
        channels = hidden_size * hc_mult
        self.norm_weight = nn.Parameter(torch.ones(hc_mult, hidden_size))
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False, dilation=dilation)
        self.reset_parameters()

    def reset_parameters(self, init: Any = nn.init) -> None:
        """Zero conv (the branch starts as ``Y = u``), unit norm weight. ``init``: a namespace of
        ``torch.nn.init``-named functions (transformers passes ``transformers.initialization``)."""
        init.zeros_(self.conv.weight)
        init.ones_(self.norm_weight)

    @property
    def state_len(self) -> int:
        return (self.kernel_size - 1) * self.dilation

    def forward(self, x: torch.Tensor, state: EngramLayerState | None = None,
                token_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, M, D = x.shape
        C, W = M * D, self.state_len
        if T == 0:  # nothing new: the state stays as it is
            return x.new_zeros(B, 0, M, D)
        xn = F.rms_norm(x, (D,), eps=self.eps) * self.norm_weight  # (B, T, M, D)
        if token_mask is not None:  # padding must not leak into real tokens through the conv
            xn = torch.where(token_mask[:, :, None, None], xn, 0.0)
        xn = xn.reshape(B, T, C)  # (B, T, C)
        if state is not None and state.conv is not None:
            past = state.conv.to(xn.dtype)  # (B, >= W, C)
        else:
            past = xn.new_zeros(B, W, C)
        window = torch.cat([past[:, past.shape[1] - W :], xn], dim=1)  # (B, W+T, C)
        if state is not None and state.static:  # a static cache: the last W, in place
            state.conv.copy_(window[:, T:])
        elif state is not None:  # recording (keep): every row until the cache crops; else the last W
            new = torch.cat([past, xn], dim=1) if state.keep else window[:, T:]
            state.conv = new.detach()
        # The depthwise dilated causal conv by its definition (what F.conv1d(groups=C) computes):
        # y_t = sum_k w_k * x_{t-(K-1-k)d}, tap k reading window rows k*d .. k*d+T. Written out,
        # torch.compile fuses it into one loop; F.conv1d would be an opaque oneDNN call per step.
        w, d = self.conv.weight.view(C, self.kernel_size), self.dilation  # (C, K)
        y = sum(window[:, k * d : k * d + T] * w[:, k] for k in range(self.kernel_size))  # (B, T, C)
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
    states. Add it to the residual (or pass ``residual=True`` to get ``h + Y``).

    Projections: ``key_proj`` ``E -> M*D`` and ``value_proj`` ``E -> D``, or with ``fused_kv`` one
    ``wkv`` ``E -> (M+1)*D`` whose output rows are the M keys and then the value.
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
        if config.fused_kv:
            # Keys and value in one matmul: (B, T, E) -> (B, T, (M+1)*D), keys first (V4.1's wkv).
            self.wkv = nn.Linear(E, (M + 1) * D, bias=config.value_bias, device=device)
        else:
            self.value_proj = nn.Linear(E, D, bias=config.value_bias, device=device)
        if config.use_gate:
            if not config.fused_kv:
                # All M keys in one matmul: (B, T, E) -> (B, T, M*D).
                self.key_proj = nn.Linear(E, M * D, bias=config.value_bias, device=device)
            self.key_norm_weight = nn.Parameter(torch.ones(M, D, device=device))
            self.query_norm_weight = nn.Parameter(torch.ones(M, D, device=device))
            self.context_gate = ContextGate(config.gate_eps, copysign=config.gate_fp32)
        if config.use_short_conv:
            self.short_conv = ShortConv(D, M, config.kernel_size, config.conv_dilation, config.conv_norm_eps).to(device)
        self.reset_parameters()

    def reset_parameters(self, init: Any = nn.init) -> None:
        """(Re)initialise this branch's own weights (the table and the conv have their own
        ``reset_parameters``): projections as ``nn.Linear`` does, the value projection at zero
        with ``zero_init_output``, unit norm weights, ``lite_scale_init``. ``init`` is a namespace of
        ``torch.nn.init``-named functions; transformers passes ``transformers.initialization``,
        whose functions leave weights loaded from a checkpoint alone (engram.hf)."""
        cfg = self.config
        if cfg.lite:
            init.constant_(self.lite_scale, float(cfg.lite_scale_init))
            return
        for lin in self._projections():  # nn.Linear's own init
            init.kaiming_uniform_(lin.weight, a=math.sqrt(5))
            if lin.bias is not None:
                bound = 1 / math.sqrt(lin.in_features)
                init.uniform_(lin.bias, -bound, bound)
        if cfg.zero_init_output and cfg.fused_kv:  # the value's rows of wkv: the last D
            value_rows = cfg.hc_mult * cfg.hidden_size
            with torch.no_grad():
                init.zeros_(self.wkv.weight[value_rows:])
                if self.wkv.bias is not None:
                    init.zeros_(self.wkv.bias[value_rows:])
        elif cfg.zero_init_output:
            init.zeros_(self.value_proj.weight)
            if self.value_proj.bias is not None:
                init.zeros_(self.value_proj.bias)
        if cfg.use_gate:
            init.ones_(self.key_norm_weight)
            init.ones_(self.query_norm_weight)

    @torch.no_grad()
    def fuse_projections(self) -> bool:
        """Swap ``key_proj`` and ``value_proj`` for one ``wkv`` holding both (``fused_kv=True``'s
        layout: the M keys' rows, then the value's), so a step runs one matmul instead of two.

        An inference swap, like diffusers' ``fuse_qkv_projections``: the same formula with one
        ``E -> (M+1)*D`` matmul (equal to the two up to float summation order). The new weight
        is a new parameter (an optimizer built before no longer holds it); ``self.config`` becomes
        ``config.replace(fused_kv=True)``, so a saved model loads in the fused layout. Returns
        whether anything changed (``False`` when already fused, lite, or without the gate: one
        projection only).
        """
        cfg = self.config
        if cfg.fused_kv or cfg.lite or not cfg.use_gate:
            return False
        k, v = self.key_proj, self.value_proj
        wkv = nn.Linear(k.in_features, k.out_features + v.out_features, bias=k.bias is not None,
                        device=k.weight.device, dtype=k.weight.dtype)
        wkv.weight.copy_(torch.cat([k.weight, v.weight]))  # ((M+1)*D, E): keys first, then the value
        if wkv.bias is not None:
            wkv.bias.copy_(torch.cat([k.bias, v.bias]))
        wkv.requires_grad_(k.weight.requires_grad)
        del self.key_proj, self.value_proj
        self.wkv = wkv
        self.config = cfg.replace(fused_kv=True)
        return True

    def _projections(self) -> list[nn.Linear]:
        if self.config.fused_kv:
            return [self.wkv]
        return [self.value_proj] + ([self.key_proj] if self.config.use_gate else [])

    def project(self, e: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Memory vector ``e`` ``(B, T, E)`` -> keys ``(B, T, M, D)`` (``None`` without the gate)
        and the shared value ``(B, T, 1, D)``."""
        cfg = self.config
        B, T, _ = e.shape
        M, D = cfg.hc_mult, cfg.hidden_size
        if cfg.fused_kv:
            kv = self.wkv(e)  # (B, T, (M+1)*D)
            k, v = kv.split([M * D, D], dim=-1)  # (B, T, M*D), (B, T, D)
            return k.unflatten(-1, (M, D)), v.unsqueeze(2)  # (B, T, M, D), (B, T, 1, D)
        v = self.value_proj(e).unsqueeze(2)  # (B, T, 1, D)
        k = self.key_proj(e).view(B, T, M, D) if cfg.use_gate else None  # (B, T, M, D)
        return k, v

    def lookup(self, hash_ids: torch.Tensor) -> torch.Tensor:
        """``(B, T, H)`` hash ids -> memory vector ``e`` ``(B, T, H*d)``."""
        return self.memory(hash_ids).flatten(-2)  # (B, T, E)

    def forward(self, hidden_states: torch.Tensor, hash_ids: torch.Tensor,
                state: EngramLayerState | None = None, token_mask: torch.Tensor | None = None,
                residual: bool = False) -> torch.Tensor:
        """Branch output ``Y`` (or ``h + Y`` with ``residual``), same shape as ``hidden_states``.

        Args:
            hidden_states: ``(B, T, D)`` (hc_mult 1) or ``(B, T, M, D)``.
            hash_ids: ``(B, T, H)`` per-head rows from :meth:`NgramHashMapping.hash`.
            state: decode state; when given, the conv continues from it and it is updated.
            token_mask: ``(B, T)`` bool, False at padding (kept out of the conv history).
            residual: return ``h + Y``, added before the one rounding to the hidden dtype (with
                ``gate_fp32``, V4.1's ``(h + a v)`` in float32 then rounded: one rounding where
                adding the returned branch costs two).
        """
        cfg = self.config
        h = self._check(hidden_states, hash_ids)  # (B, T, M, D)
        B, T, M, D = h.shape
        e = self.lookup(hash_ids).to(h.dtype)  # (B, T, E)
        if cfg.lite:
            y = (self.lite_scale * e.view(B, T, -1, D).sum(2)).unsqueeze(2).expand(B, T, M, D)  # (B, T, M, D)
            return (h + y if residual else y).reshape(hidden_states.shape)
        k, v = self.project(e)  # (B, T, M, D) or None, (B, T, 1, D)
        if cfg.gate_fp32:  # V4.1: from here on float32, rounded to the hidden dtype once at the end
            h, v = h.float(), v.float()
            k = k.float() if k is not None else None
        if cfg.use_gate:
            a = self.context_gate(k, h, self.key_norm_weight, self.query_norm_weight)  # (B, T, M, 1)
            u = a * v  # (B, T, M, D)
        else:
            u = v.expand(B, T, M, D)
        y = u + self.short_conv(u, state, token_mask) if cfg.use_short_conv else u  # (B, T, M, D)
        if residual:
            y = h + y  # (B, T, M, D)
        if cfg.gate_fp32:
            y = y.to(hidden_states.dtype)  # the one rounding
        return y.reshape(hidden_states.shape)

    def _check(self, hidden_states: torch.Tensor, hash_ids: torch.Tensor) -> torch.Tensor:
        """Shape checks; ``hidden_states`` as ``(B, T, M, D)``."""
        cfg = self.config
        if hidden_states.ndim == 3:
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
        weight = self.lite_scale if cfg.lite else self._projections()[0].weight
        if hidden_states.dtype != weight.dtype and not _autocast_on(hidden_states.device.type):
            raise TypeError(
                f"hidden_states are {hidden_states.dtype} but the Engram weights are {weight.dtype}: cast one to "
                "the other (module.to(dtype)) or run under torch.autocast"
            )
        return hidden_states


def fuse_layer_projections(layers: list[Engram]) -> EngramConfig | None:
    """:meth:`Engram.fuse_projections` on every layer of one model, which then share one config
    object again (as when built). Returns that config, or ``None`` if no layer changed. The one
    implementation behind ``EngramGPT.fuse_projections`` and ``EngramForCausalLM.fuse_projections``."""
    if not any([e.fuse_projections() for e in layers]):  # a list: every layer fuses
        return None
    cfg = layers[0].config
    for e in layers:
        e.config = cfg
    return cfg
