"""The decoder blocks of the architectures beyond plain Llama (runtime/architecture.py): q/k norm
(Qwen3, Gemma 3), norms after attention and MLP, GELU-tanh gating, embeddings scaled by √D and
sliding-window layers with their own RoPE base (Gemma 3). Plain Llama blocks stay in model.py,
with their fused decode; this is the per-layer path, kernel by kernel, for prefill and decode.

The readable twin is reference/gemma.py (which covers Qwen3's q/k norm as well).
"""
from __future__ import annotations

import numpy as np

from ..kernels import ops_f32 as kernels

MLP_ACTIVATIONS = {"silu": kernels.silu_mul, "gelu_tanh": kernels.gelu_tanh_mul}   # (g, u, out)


def rope_tables(inv_freq: np.ndarray, p0: int, T: int):
    """cos, sin of positions p0 .. p0+T-1 times inv_freq.                      -> 2 × [T, Dh/2]"""
    angle = np.arange(p0, p0 + T, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


def layer_inv_freqs(cfg, inv_freq_global: np.ndarray) -> list:
    """Each layer's RoPE frequencies: sliding-window layers use the local base (Gemma 3)."""
    if not cfg.arch.sliding_window:
        return [inv_freq_global] * cfg.num_hidden_layers
    local = 1.0 / cfg.rope_local_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
    return [local if s else inv_freq_global for s in cfg.sliding_layers]


def embed(model, ids: np.ndarray) -> np.ndarray:
    """Token embeddings, times √D in float32 where the architecture says so.      [T] -> [T, D]"""
    x = model.weights.embed[ids].astype(np.float32)
    if model.config.arch.embed_scale:
        x *= np.float32(np.sqrt(model.config.hidden_size))
    return x


def project_qkv(qkv, b, h, H, Hkv, Dh, rows: bool = False):
    """A block's q [T, H, Dh], k [T, Hkv, Dh] (contiguous: RoPE works in place) and v [T, Hkv Dh]
    from its normed input h [T, D]: one call of the fused q|k|v linear where there is one, else three.
    rows: the batched decode step's per-row formats (Linear.rows)."""
    call = (lambda lin: lin.rows(h)) if rows else (lambda lin: lin(h))
    T, nq, nkv = h.shape[0], H * Dh, Hkv * Dh
    if qkv is not None:
        y = call(qkv)                                                  # [T, (H + 2 Hkv) Dh]
        q, k, v = y[:, :nq], y[:, nq:nq + nkv], y[:, nq + nkv:]
    else:
        q, k, v = call(b.q), call(b.k), call(b.v)
    return np.ascontiguousarray(q).reshape(T, H, Dh), np.ascontiguousarray(k).reshape(T, Hkv, Dh), v


def run_blocks(model, ids: np.ndarray, cache) -> np.ndarray:
    """Every block over T new tokens appended after `cache`; returns the last block's output [T, D]."""
    c, T, p0 = model.config, len(ids), cache.length
    H, Hkv, Dh, F = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size
    arch, eps = c.arch, c.rms_norm_eps
    nq = H * Dh
    # Scores are q·k / √Dh in the kernels; a model asking for another scale has q scaled to match.
    q_scale = None
    if c.query_pre_attn_scalar is not None and c.query_pre_attn_scalar != Dh:
        q_scale = np.float32(np.sqrt(Dh / c.query_pre_attn_scalar))
    tables = {}                                    # id(inv_freq) -> (cos, sin), one per RoPE base
    for f in model._layer_inv_freq:
        tables.setdefault(id(f), rope_tables(f, p0, T))
    act_fn = MLP_ACTIVATIONS[arch.activation]
    x = embed(model, ids)                                              # [T, D]
    h = np.empty_like(x)                                               # [T, D] normed input
    att = np.empty((T, H, Dh), np.float32)                             # [T, H, Dh]
    act = np.empty((T, F), np.float32)                                 # [T, F]
    for layer, b in enumerate(model.weights.blocks):
        qkv, gate_up = model._fused[layer]
        cos, sin = tables[id(model._layer_inv_freq[layer])]
        window = c.sliding_window if arch.sliding_window and c.sliding_layers[layer] else 0
        kernels.rms_norm(x, b.attn_norm, eps, h)
        q, k, v = project_qkv(qkv, b, h, H, Hkv, Dh)
        if arch.qk_norm:                                               # per head, before RoPE
            kernels.rms_norm(q.reshape(T * H, Dh), b.q_norm, eps, q.reshape(T * H, Dh))
            kernels.rms_norm(k.reshape(T * Hkv, Dh), b.k_norm, eps, k.reshape(T * Hkv, Dh))
        kernels.rope_inplace(q, cos, sin)
        kernels.rope_inplace(k, cos, sin)
        if q_scale is not None:
            q *= q_scale
        cache.k[layer, :, p0:p0 + T] = k.transpose(1, 0, 2)           # [T, Hkv, Dh] -> [Hkv, T, Dh]
        cache.v[layer, :, p0:p0 + T] = np.asarray(v).reshape(T, Hkv, Dh).transpose(1, 0, 2)
        kernels.attention(q, cache.k[layer], cache.v[layer], p0, cache.scratch, att, window)
        _residual_add(x, b.o(att.reshape(T, nq)), b.attn_post_norm, eps)
        kernels.rms_norm(x, b.mlp_norm, eps, h)
        if gate_up is not None:
            y = gate_up(h)                                             # [T, 2F]
            act_fn(y[:, :F], y[:, F:], act)
        else:
            act_fn(b.gate(h), b.up(h), act)
        _residual_add(x, b.down(act), b.mlp_post_norm, eps)
    cache.tokens.extend(int(i) for i in ids)
    return x


def _residual_add(x: np.ndarray, y: np.ndarray, post_norm, eps: float) -> None:
    """x += post_norm(y) (Gemma's norms after attention and MLP), or x += y."""
    if post_norm is not None:
        y = np.ascontiguousarray(y)
        kernels.rms_norm(y, post_norm, eps, y)
    x += y
