"""One Llama-family decoder block in plain NumPy + BLAS, batched over samples: what the quantizer
runs in full precision. The block variants of runtime/architecture.py (q/k norm, post-norms,
GELU-tanh, sliding window: Qwen3, Gemma 3) are switches of `BlockShape`.

Two users, one implementation: AWQ runs whole calibration sequences through a block (positions
0..T-1, no cache) and measures its scale losses on the pieces (`attention`, `mlp`); self-generated
calibration decodes B sequences in lock step, one position at a time, over a KV cache. The
runtime's Numba forward (runtime/model.py) is not used here: the quantizer needs the block's
intermediate activations, and the AWQ losses are differences of two such forwards, which float32
NumPy computes the same way every time and on every thread.

    y = x + o(attention(rope(q(h)), rope(k(h)), v(h))),   h = rms_norm(x) · attn_norm
    out = y + down(silu(gate(h')) ⊙ up(h')),               h' = rms_norm(y) · mlp_norm
    (Gemma 3: q, k RMS-normed per head before RoPE, window per layer, o(...) and down(...) RMS-normed
    before their residual adds, gelu_tanh for silu; norm weights as multiplied, i.e. 1 + w)

Shapes (as in runtime/config.py): B samples, T positions of this call, S = p0 + T positions seen
so far (cache included), D, H, Hkv, Dh, F; rep = H / Hkv query heads per key/value head.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class BlockShape:
    H: int          # query heads
    Hkv: int        # key/value heads
    Dh: int         # head size
    eps: float      # RMSNorm epsilon
    qk_norm: bool = False       # q, k RMS-normed per head (q_norm, k_norm) before RoPE
    post_norms: bool = False    # attention and MLP outputs RMS-normed (attn_post_norm, mlp_post_norm)
    activation: str = "silu"    # of the gated MLP: silu or gelu_tanh
    window: int = 0             # this block's sliding window (0: full causal attention)
    q_scale: float = 1.0        # q × this after RoPE: scores scale by query_pre_attn_scalar^-1/2

    @classmethod
    def of(cls, cfg, layer: int = 0):
        a = cfg.arch
        window = cfg.sliding_window if a.sliding_window and cfg.sliding_layers[layer] else 0
        scalar = cfg.query_pre_attn_scalar or cfg.head_dim
        return cls(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps,
                   a.qk_norm, a.post_norms, a.activation, window, math.sqrt(cfg.head_dim / scalar))


def load_block(src, cfg, i) -> dict:
    """Block i's fp weights by short names: attn_norm, mlp_norm, q, k, v, o, gate, up, down,
    and q_bias/k_bias/v_bias, q_norm/k_norm, attn_post_norm/mlp_post_norm when the architecture has
    them. Norm weights as the block multiplies by them (Gemma: 1 + w; `stored_norm` undoes it)."""
    from ..formats.tensors import BIASED, block_linears, block_norms
    off = np.float32(cfg.arch.norm_offset)
    w = {k: src.float32(name, shape) + off for k, name, shape in block_norms(cfg, i)}
    for _, k, prefix, shape in block_linears(cfg, i):
        w[k] = np.array(src.float32(prefix + ".weight", shape), np.float32)
        if cfg.attention_bias and k in BIASED:
            w[k + "_bias"] = src.float32(prefix + ".bias", (shape[0],))
    return w


def stored_norm(cfg, w: np.ndarray) -> np.ndarray:
    """A norm weight as the checkpoint stores it (Gemma: w, the block multiplying by 1 + w)."""
    return (w - np.float32(cfg.arch.norm_offset)).astype(np.float32)


def embed_rows(cfg, embed, ids=None) -> np.ndarray:
    """The blocks' input: embedding rows, × √D where the architecture scales them (Gemma).
    `ids` None: `embed` holds the looked-up rows already."""
    x = (embed if ids is None else embed[ids]).astype(np.float32)
    return x * np.float32(math.sqrt(cfg.hidden_size)) if cfg.arch.embed_scale else x


def rope_tables(cfg, T: int, layer: int = 0):
    """cos, sin [T, Dh/2] float32 for positions 0..T-1 (slice rows p0..p0+T-1 for later positions),
    with block `layer`'s RoPE base (Gemma's sliding layers have their own)."""
    from ..runtime.blocks import layer_inv_freqs
    from ..runtime.model import rope_inv_freq
    inv = layer_inv_freqs(cfg, rope_inv_freq(cfg))[layer]
    angle = np.arange(T, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


def rms_norm(x, w, eps):
    """x / sqrt(mean(x²) + eps) · w per token.                            [..., D] -> [..., D]"""
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps))
    return (x * r) * w


def rope(x, cos, sin):
    """Rotate-half RoPE.                              x [B, T, nh, Dh]; cos, sin [T, Dh/2]"""
    half = x.shape[-1] // 2
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def linear(x, w, b=None):
    """x·wᵀ (+ b).                                                         [..., K] -> [..., N]"""
    y = x @ w.T
    return y if b is None else y + b


def silu(x):
    return x / (1.0 + np.exp(-x))


def gelu_tanh(x):
    """x/2 · (1 + tanh(√(2/π) · (x + 0.044715 x³)))"""
    c = np.float32(math.sqrt(2.0 / math.pi))
    return np.float32(0.5) * x * (1.0 + np.tanh(c * (x + np.float32(0.044715) * x ** 3)))


ACTIVATIONS = {"silu": silu, "gelu_tanh": gelu_tanh}


def attention(w, bs: BlockShape, h, cos, sin, cache=None, p0: int = 0):
    """Causal GQA attention of h through q, k, v (no o).          h [B, T, D] -> [B, T, H·Dh]

    h holds positions p0..p0+T-1 and cos, sin [T, Dh/2] their rows of the RoPE tables. Without a
    cache (then p0 = 0) the keys and values are this call's own. With cache = (K, V), each
    [B, Hkv, S_max, Dh], this call's keys and values are written at positions p0..p0+T-1 and the
    queries attend over positions 0..p0+T-1 of the cache.
    """
    B, T, _ = h.shape
    H, Hkv, Dh = bs.H, bs.Hkv, bs.Dh
    rep = H // Hkv
    q = linear(h, w["q"], w.get("q_bias")).reshape(B, T, H, Dh)
    k = linear(h, w["k"], w.get("k_bias")).reshape(B, T, Hkv, Dh)
    if bs.qk_norm:
        q, k = rms_norm(q, w["q_norm"], bs.eps), rms_norm(k, w["k_norm"], bs.eps)
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    if bs.q_scale != 1.0:
        q = q * np.float32(bs.q_scale)
    v = linear(h, w["v"], w.get("v_bias")).reshape(B, T, Hkv, Dh)
    if cache is None:
        keys, values = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)          # [B, Hkv, T, Dh]
    else:
        K, V = cache
        K[:, :, p0:p0 + T] = k.transpose(0, 2, 1, 3)
        V[:, :, p0:p0 + T] = v.transpose(0, 2, 1, 3)
        keys, values = K[:, :, :p0 + T], V[:, :, :p0 + T]                        # [B, Hkv, S, Dh]
    S = keys.shape[2]
    # query head h = kv·rep + r reads kv head kv: group the rep query heads of one kv head as rows
    qg = q.reshape(B, T, Hkv, rep, Dh).transpose(0, 2, 3, 1, 4).reshape(B, Hkv, rep * T, Dh)
    scores = qg @ keys.transpose(0, 1, 3, 2)                    # [B, Hkv, rep·T, S]
    scores *= np.float32(1.0 / math.sqrt(Dh))
    t_q = p0 + np.tile(np.arange(T), rep)                       # query position of each row
    masked = np.arange(S)[None, :] > t_q[:, None]               # key j > query t
    if bs.window:
        masked |= np.arange(S)[None, :] <= t_q[:, None] - bs.window   # ... or out of the window
    scores[:, :, masked] = -np.inf
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    out = scores @ values                                       # [B, Hkv, rep·T, Dh]
    return out.reshape(B, Hkv, rep, T, Dh).transpose(0, 3, 1, 2, 4).reshape(B, T, H * Dh)


def mlp(w, h, activation: str = "silu"):
    """act(h·gateᵀ) ⊙ (h·upᵀ): the input of down.                h [B, T, D] -> [B, T, F]"""
    return ACTIVATIONS[activation](h @ w["gate"].T) * (h @ w["up"].T)


def block_forward(w, bs: BlockShape, x, cos, sin, cache=None, p0: int = 0) -> dict:
    """The block, keeping every scale group's input (cache, p0: as in `attention`).
                                                                        x [B, T, D] -> dict
    attn_in [B,T,D] (q,k,v input), o_in [B,T,H·Dh], mlp_in [B,T,D] (gate,up input), down_in
    [B,T,F], out [B,T,D] (the next block's input).
    """
    h1 = rms_norm(x, w["attn_norm"], bs.eps)
    a = attention(w, bs, h1, cos, sin, cache, p0)
    y = a @ w["o"].T
    x2 = x + (rms_norm(y, w["attn_post_norm"], bs.eps) if bs.post_norms else y)
    h2 = rms_norm(x2, w["mlp_norm"], bs.eps)
    act = mlp(w, h2, bs.activation)
    m = act @ w["down"].T
    out = x2 + (rms_norm(m, w["mlp_post_norm"], bs.eps) if bs.post_norms else m)
    return {"attn_in": h1, "o_in": a, "mlp_in": h2, "down_in": act, "out": out}
