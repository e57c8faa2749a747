"""Numba leaf kernels of the float32 forward pass: RMSNorm, RoPE, attention over the KV cache,
SwiGLU's gate. Each writes into `out` (or in place) and allocates nothing; the readable twins are in
reference/llama.py (`rms_norm`, `rope`, `attention`, `silu`).

Shapes as in config.py. The KV cache of one block is k, v: [Hkv, S, Dh] (a head's keys contiguous,
so the score loop streams memory).
"""
import math

import numpy as np
from numba import prange

from .policy import FASTMATH_REDUCE, kernel, parallel_kernel
from .simd import LANES, v_div, v_exp, v_fma, v_hsum, v_load, v_splat, v_store, v_zeros


@kernel(fastmath=FASTMATH_REDUCE, inline=True)
def sum_squares(x):
    """sum_d x[d]² of a 1-D float32 array in 16 lanes (v_fma, then a v_hsum tree), the tail one by one.
    Why written out: a scalar loop with reassociation is vectorised at the target's width (16 lanes
    on AVX-512, 8 on AVX2), which sums in another order: each CPU would get its own last bits
    (tests/test_targets.py compares an AVX2 build's logits with the host's)."""
    D = x.shape[0]
    D16 = D - D % LANES
    acc = v_zeros()
    for d in range(0, D16, LANES):
        v = v_load(x, d)
        acc = v_fma(v, v, acc)
    ss = v_hsum(acc)
    for d in range(D16, D):
        ss += x[d] * x[d]
    return ss


@kernel(fastmath=FASTMATH_REDUCE, inline=True)
def dot16(a, b):
    """a · b of two 1-D float32 arrays of one length (unit stride), summed as `sum_squares`."""
    n = a.shape[0]
    n16 = n - n % LANES
    acc = v_zeros()
    for i in range(0, n16, LANES):
        acc = v_fma(v_load(a, i), v_load(b, i), acc)
    s = v_hsum(acc)
    for i in range(n16, n):
        s += a[i] * b[i]
    return s


@kernel(fastmath=FASTMATH_REDUCE)
def rms_norm(x, w, eps, out):
    """out[t] = x[t] / sqrt(mean(x[t]²) + eps) * w.          x, out: [T, D]; w: [D]"""
    T, D = x.shape
    for t in range(T):
        ss = sum_squares(x[t])
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


def _attention(q, kc, vc, pos0, scratch, out, window):
    """Causal grouped-query attention of T new queries over the cache.

    q: [T, H, Dh] (positions pos0 .. pos0+T-1); kc, vc: [Hkv, S, Dh] holding positions 0 .. pos0+T-1;
    scratch: [H, S] float32; out: [T, H, Dh].
    Query t sees keys j ≤ pos0 + t (the only masked entries are j > pos0 + t), and with window > 0
    only the last `window` of them: j > pos0 + t − window (sliding-window layers).
    """
    T, H, Dh = q.shape
    rep = H // kc.shape[0]
    scale = np.float32(1.0 / math.sqrt(Dh))
    for h in prange(H):          # heads are independent; each owns scratch[h]
        hk = h // rep
        s = scratch[h]
        for t in range(T):
            n = pos0 + t + 1
            j0 = max(0, n - window) if window > 0 else 0
            m = np.float32(-np.inf)
            for j in range(j0, n):
                acc = dot16(q[t, h], kc[hk, j]) * scale
                s[j] = acc
                m = max(m, acc)
            total = np.float32(0.0)
            for j in range(j0, n):
                e = np.exp(s[j] - m)
                s[j] = e
                total += e
            inv = np.float32(1.0) / total
            for d in range(Dh):
                out[t, h, d] = 0.0
            for j in range(j0, n):
                p = s[j] * inv
                for d in range(Dh):
                    out[t, h, d] += p * vc[hk, j, d]


# Two builds of one loop nest. A parallel region costs a thread hand-off (microseconds, far more on
# a busy machine): worth it for prefill, not for one decode token over a short cache.
# fastmath on the p·v sums (vectorisation; q·k in 16 lanes, `dot16`); exp and max stay exact.
attention_serial = kernel(fastmath=FASTMATH_REDUCE)(_attention)
attention_parallel = parallel_kernel(fastmath=FASTMATH_REDUCE)(_attention)
PARALLEL_ATTENTION_MIN_WORK = 1 << 17     # q·k multiply-adds below which one thread is faster


BLAS_ATTENTION_MIN_TOKENS = 32   # prefill of at least this many tokens: matrix products win


@kernel(fastmath=FASTMATH_REDUCE)
def _softmax_causal(S, first, scale, window):
    """In place, row by row: S[i, r, :] = softmax(scale · S[i, r, j] for j0 <= j <= first + i), and 0
    for the other keys.                         S [b, rep, n] float32: query i of the block sees
    keys j0 .. first + i, j0 = 0, or first + i + 1 − window when window > 0 (sliding window).
    One pass each for max, exponentials (16 lanes, v_exp) and the scaling."""
    b, rep, n = S.shape
    ones = v_splat(np.float32(1.0))
    for i in range(b):
        m_end = min(n, first + i + 1)
        j0 = max(0, first + i + 1 - window) if window > 0 else 0
        n16 = j0 + (m_end - j0) - (m_end - j0) % LANES
        for r in range(rep):
            row = S[i, r]
            for j in range(j0):
                row[j] = np.float32(0.0)
            m = np.float32(-np.inf)
            for j in range(j0, m_end):
                m = max(m, row[j])
            m *= scale
            sc, neg_m = v_splat(scale), v_splat(-m)
            tot = v_zeros()
            for j in range(j0, n16, LANES):
                e = v_exp(v_fma(v_load(row, j), sc, neg_m))
                v_store(row, j, e)
                tot = v_fma(e, ones, tot)
            total = v_hsum(tot)
            for j in range(n16, m_end):
                e = np.exp(row[j] * scale - m)
                row[j] = e
                total += e
            inv = np.float32(1.0) / total
            for j in range(j0, m_end):
                row[j] *= inv
            for j in range(m_end, n):
                row[j] = np.float32(0.0)


def attention_blas(q, kc, vc, pos0, out, block=64, window=0):
    """The same causal GQA as `_attention`, as BLAS matrix products per key/value head, for
    prefill: S = Q Kᵀ (only the keys the block can see), P = softmax(S/sqrt(Dh)) masked
    (`_softmax_causal`), O = P V; per kv head and block of `block` queries. With window > 0 the
    keys before the block's first visible one (sliding window) are left out of the products.

    q: [T, H, Dh]; kc, vc: [Hkv, S, Dh] (positions 0 .. pos0+T-1 valid); out: [T, H, Dh].
    The (kv head, block) products stay on this thread: spread over Python threads they were
    slower, as the Numba thread team still spins on the other core after each parallel kernel.
    """
    T, H, Dh = q.shape
    Hkv = kc.shape[0]
    rep = H // Hkv
    scale = np.float32(1.0 / math.sqrt(Dh))
    for t0 in range(0, T, block):
        t1 = min(T, t0 + block)
        b, n = t1 - t0, pos0 + t1                                        # queries, visible keys
        k0 = max(0, pos0 + t0 + 1 - window) if window > 0 else 0       # first key any query sees
        for hk in range(Hkv):
            Q = q[t0:t1, hk * rep:(hk + 1) * rep].reshape(b * rep, Dh)  # [b rep, Dh]
            S = (Q @ kc[hk, k0:n].T).reshape(b, rep, n - k0)             # [b, rep, n - k0]
            _softmax_causal(S, pos0 + t0 - k0, scale, window)
            out[t0:t1, hk * rep:(hk + 1) * rep] = (S.reshape(b * rep, n - k0) @ vc[hk, k0:n]).reshape(b, rep, Dh)


def attention(q, kc, vc, pos0, scratch, out, window=0):
    """Causal grouped-query attention of T new queries over the cache (see `_attention`);
    window > 0: each query sees only the last `window` positions (its own included)."""
    T, H, Dh = q.shape
    if T >= BLAS_ATTENTION_MIN_TOKENS:
        attention_blas(q, kc, vc, pos0, out, window=window)
        return
    work = T * (pos0 + T) * H * Dh
    (attention_parallel if work >= PARALLEL_ATTENTION_MIN_WORK else attention_serial)(
        q, kc, vc, pos0, scratch, out, window)


def _silu_mul(g, u, out):
    """out = silu(g) ⊙ u = g / (1 + exp(-g)) · u.            g, u, out: [T, F] (rows contiguous)

    Tokens split across threads, 16 lanes at a time (v_exp; exp(-g) clamps at e^88.4, where
    g / (1 + e^-g) is ~0 anyway)."""
    T, F = g.shape
    F16 = F - F % LANES
    one = v_splat(np.float32(1.0))
    for t in prange(T):
        gt, ut, ot = g[t], u[t], out[t]
        for f in range(0, F16, LANES):
            x = v_load(gt, f)
            e = v_exp(v_fma(x, v_splat(np.float32(-1.0)), v_zeros()))
            v_store(ot, f, v_div(v_fma(x, v_load(ut, f), v_zeros()), v_fma(e, one, one)))
        for f in range(F16, F):
            x = gt[f]
            ot[f] = x / (np.float32(1.0) + np.exp(-x)) * ut[f]


GELU_C = math.sqrt(2.0 / math.pi)


# no fastmath: tanh and the cubic stay as written (PyTorch's "tanh" GELU, to float32 rounding).
@parallel_kernel()
def gelu_tanh_mul(g, u, out):
    """out = gelu_tanh(g) ⊙ u, gelu_tanh(x) = x/2 · (1 + tanh(√(2/π) · (x + 0.044715 x³))).
    g, u, out: [T, F] (Gemma's GeGLU gate; tokens split across threads)."""
    T, F = g.shape
    c = np.float32(GELU_C)
    for t in prange(T):
        for f in range(F):
            x = g[t, f]
            out[t, f] = np.float32(0.5) * x * (np.float32(1.0) + np.tanh(c * (x + np.float32(0.044715) * x * x * x))) \
                * u[t, f]

# A batched decode step's few rows take less time than a hand-off to the thread team (see attention).
_silu_mul_parallel = parallel_kernel(fastmath=FASTMATH_REDUCE)(_silu_mul)
_silu_mul_serial = kernel(fastmath=FASTMATH_REDUCE)(_silu_mul)
PARALLEL_SILU_MIN_TOKENS = 16


def silu_mul(g, u, out):
    """out = silu(g) ⊙ u (see `_silu_mul`), on the thread team from PARALLEL_SILU_MIN_TOKENS rows."""
    (_silu_mul_parallel if g.shape[0] >= PARALLEL_SILU_MIN_TOKENS else _silu_mul_serial)(g, u, out)
