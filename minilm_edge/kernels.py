"""Numba leaf kernels of the float32 forward pass: RMSNorm, RoPE, attention over the KV cache,
SwiGLU's gate. Each writes into `out` (or in place) and allocates nothing; the readable twins are in
reference/llama.py (`rms_norm`, `rope`, `attention`, `silu`).

Shapes as in config.py. The KV cache of one block is k, v: [Hkv, S, Dh] (a head's keys contiguous,
so the score loop streams memory).
"""
import math

import numpy as np
from numba import prange

from .numba_policy import FASTMATH_REDUCE, kernel, parallel_kernel


# fastmath: the sum of squares is a reduction; reassociation lets LLVM vectorise it.
@kernel(fastmath=FASTMATH_REDUCE)
def rms_norm(x, w, eps, out):
    """out[t] = x[t] / sqrt(mean(x[t]²) + eps) * w.          x, out: [T, D]; w: [D]"""
    T, D = x.shape
    for t in range(T):
        ss = np.float32(0.0)
        for d in range(D):
            ss += x[t, d] * x[t, d]
        r = np.float32(1.0) / np.sqrt(ss / D + np.float32(eps))
        for d in range(D):
            out[t, d] = x[t, d] * r * w[d]


@kernel()
def rope_inplace(x, cos, sin):
    """Rotate pairs (i, i + Dh/2) of every head of x by the angles whose cos/sin are given.

    x: [T, nh, Dh] (modified in place); cos, sin: [T, Dh/2] for the tokens' positions.
    """
    T, nh, Dh = x.shape
    half = Dh // 2
    for t in range(T):
        for h in range(nh):
            for i in range(half):
                x1 = x[t, h, i]
                x2 = x[t, h, i + half]
                x[t, h, i] = x1 * cos[t, i] - x2 * sin[t, i]
                x[t, h, i + half] = x2 * cos[t, i] + x1 * sin[t, i]


def _attention(q, kc, vc, pos0, scratch, out):
    """Causal grouped-query attention of T new queries over the cache.

    q: [T, H, Dh] (positions pos0 .. pos0+T-1); kc, vc: [Hkv, S, Dh] holding positions 0 .. pos0+T-1;
    scratch: [H, S] float32; out: [T, H, Dh].
    Query t sees keys j ≤ pos0 + t (the only masked entries are j > pos0 + t).
    """
    T, H, Dh = q.shape
    rep = H // kc.shape[0]
    scale = np.float32(1.0 / math.sqrt(Dh))
    for h in prange(H):          # heads are independent; each owns scratch[h]
        hk = h // rep
        s = scratch[h]
        for t in range(T):
            n = pos0 + t + 1
            m = np.float32(-np.inf)
            for j in range(n):
                acc = np.float32(0.0)
                for d in range(Dh):
                    acc += q[t, h, d] * kc[hk, j, d]
                acc *= scale
                s[j] = acc
                m = max(m, acc)
            total = np.float32(0.0)
            for j in range(n):
                e = np.exp(s[j] - m)
                s[j] = e
                total += e
            inv = np.float32(1.0) / total
            for d in range(Dh):
                out[t, h, d] = 0.0
            for j in range(n):
                p = s[j] * inv
                for d in range(Dh):
                    out[t, h, d] += p * vc[hk, j, d]


# Two builds of one loop nest. A parallel region costs a thread hand-off (microseconds, far more on
# a busy machine): worth it for prefill, not for one decode token over a short cache.
# fastmath on the q·k and p·v reductions (vectorisation); exp and max stay exact.
attention_serial = kernel(fastmath=FASTMATH_REDUCE)(_attention)
attention_parallel = parallel_kernel(fastmath=FASTMATH_REDUCE)(_attention)
PARALLEL_ATTENTION_MIN_WORK = 1 << 17     # q·k multiply-adds below which one thread is faster


BLAS_ATTENTION_MIN_TOKENS = 32   # prefill of at least this many tokens: matrix products win


def attention_blas(q, kc, vc, pos0, out, block=256):
    """The same causal GQA as `_attention`, as BLAS matrix products per key/value head, for
    prefill: S = Q Kᵀ/sqrt(Dh) (masked), P = softmax(S), O = P V, over query blocks of `block`
    tokens so the score matrix stays ≤ block·rep × S floats.

    q: [T, H, Dh]; kc, vc: [Hkv, S, Dh] (positions 0 .. pos0+T-1 valid); out: [T, H, Dh].
    """
    T, H, Dh = q.shape
    Hkv = kc.shape[0]
    rep = H // Hkv
    scale = np.float32(1.0 / math.sqrt(Dh))
    for t0 in range(0, T, block):
        t1 = min(T, t0 + block)
        b, n = t1 - t0, pos0 + t1                                        # queries, visible keys
        future = np.arange(n)[None, :] > (pos0 + np.arange(t0, t1))[:, None]   # [b, n] masked
        for hk in range(Hkv):
            Q = q[t0:t1, hk * rep:(hk + 1) * rep].reshape(b * rep, Dh)  # [b rep, Dh]
            S = (Q @ kc[hk, :n].T).reshape(b, rep, n)                    # [b, rep, n]
            S *= scale
            S[np.broadcast_to(future[:, None, :], S.shape)] = -np.inf
            S -= S.max(axis=-1, keepdims=True)
            np.exp(S, out=S)
            S /= S.sum(axis=-1, keepdims=True)
            out[t0:t1, hk * rep:(hk + 1) * rep] = (S.reshape(b * rep, n) @ vc[hk, :n]).reshape(b, rep, Dh)


def attention(q, kc, vc, pos0, scratch, out):
    """Causal grouped-query attention of T new queries over the cache (see `_attention`)."""
    T, H, Dh = q.shape
    if T >= BLAS_ATTENTION_MIN_TOKENS:
        attention_blas(q, kc, vc, pos0, out)
        return
    work = T * (pos0 + T) * H * Dh
    (attention_parallel if work >= PARALLEL_ATTENTION_MIN_WORK else attention_serial)(
        q, kc, vc, pos0, scratch, out)


@kernel()
def silu_mul(g, u, out):
    """out = silu(g) ⊙ u = g / (1 + exp(-g)) · u.            g, u, out: [T, F]"""
    T, F = g.shape
    for t in range(T):
        for f in range(F):
            x = g[t, f]
            out[t, f] = x / (np.float32(1.0) + np.exp(-x)) * u[t, f]
