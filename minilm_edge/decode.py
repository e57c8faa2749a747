"""Decode one token through every block in ONE compiled call.

A decode step of a small model is ~10 short kernels per block: called one by one from Python, their
dispatch (argument checks, allocation, unboxing) costs about as much as the int4 math of a 135M
model. When every block linear is int4 (minilm-q4), the weights of all L blocks are stacked at load
into [L, ...] arrays of one kind each (q|k|v fused by rows, o, gate|up fused, down), and
`_decode_blocks` runs the whole stack in a single Numba call: no Python between kernels, no
allocation (every buffer is preallocated in `DecodePlan`), and one parallel region: each of the T
threads runs every phase's share of rows or heads and meets the others at a spin barrier
(sync.py) after each phase, instead of a fork/join of the thread team per matrix product.

Per block l (x: [D] the residual stream, float32):
    h   = rms_norm(x) ⊙ attn_norm[l]
    qkv = Wqkv[l] h (+ bias)                        [(H + 2 Hkv) Dh]
    rotate q and k heads by RoPE at position pos; append k, v to the cache at pos
    x  += Wo[l] attention(q, cache[:pos+1])
    h   = rms_norm(x) ⊙ mlp_norm[l]
    gu  = Wgu[l] h                                   [2F] = gate | up
    x  += Wdown[l] (silu(gate) ⊙ up)
The per-kernel twins (and their tests) are those of kernels.py / kernels_q4.py; the whole step is
tested against the Python path (prefill of the same tokens) in tests/test_decode.py.
"""
from __future__ import annotations

import dataclasses

import numba
import numpy as np
from numba import prange

from .kernels_q4 import (LANES, Q4Prepared, _split_x, v_exp, v_fma, v_hsum, v_load, v_splat, v_store, v_unpack_q4,
                         v_zeros)
from .numba_policy import FASTMATH_REDUCE, kernel, parallel_kernel
from .sync import barrier, barrier_safe


@dataclasses.dataclass
class StackedQ4:
    """One kind of int4 linear across all L blocks, rows of fused parts stacked (see Q4Prepared)."""
    qweight: np.ndarray     # uint8   [L, N, K/2]
    scales: np.ndarray      # float32 [L, N, G]
    zeros: np.ndarray       # uint8   [L, N, G]
    group_size: int
    sal_idx: np.ndarray     # int64   [L, m16]   (padded with channel 0 / weight 0)
    sal_w: np.ndarray       # float32 [L, N, m16]
    n_salient: list         # L × m
    bias: np.ndarray        # float32 [L, N] (zeros when the layer has none)

    def args(self):
        return self.qweight, self.scales, self.zeros, self.group_size, self.sal_idx, self.sal_w

    def layer(self, l: int, r0: int = 0, r1: int | None = None):
        """A Q4 linear over rows r0:r1 of block l: views into the stack, no copy."""
        from .linear import Q4
        r = slice(r0, r1)
        p = Q4Prepared(self.qweight[l, r], self.scales[l, r], self.zeros[l, r], self.group_size,
                       self.sal_idx[l], self.sal_w[l, r], self.n_salient[l])
        lin = Q4.from_prepared(p)
        if np.any(self.bias[l, r]):
            lin.bias = self.bias[l, r]
        return lin


def stack_q4(layers: list) -> StackedQ4 | None:
    """layers: L lists of Q4 linears to fuse by rows; None if they cannot share one stack."""
    first = layers[0][0].p
    K, g = first.shape[1], first.group_size
    for parts in layers:
        for lin in parts:
            if lin.kind != "q4" or lin.p.shape[1] != K or lin.p.group_size != g:
                return None
            if not np.array_equal(lin.p.sal_idx, parts[0].p.sal_idx) or lin.p.n_salient != parts[0].p.n_salient:
                return None
    L, N = len(layers), sum(lin.p.shape[0] for lin in layers[0])
    if any(sum(lin.p.shape[0] for lin in parts) != N for parts in layers):
        return None
    m16 = max(parts[0].p.sal_idx.shape[0] for parts in layers)
    st = StackedQ4(np.empty((L, N, K // 2), np.uint8), np.empty((L, N, K // g), np.float32),
                   np.empty((L, N, K // g), np.uint8), g, np.zeros((L, m16), np.int64),
                   np.zeros((L, N, m16), np.float32), [parts[0].p.n_salient for parts in layers],
                   np.zeros((L, N), np.float32))
    for l, parts in enumerate(layers):
        r = 0
        for lin in parts:
            p, n = lin.p, lin.p.shape[0]
            st.qweight[l, r:r + n], st.scales[l, r:r + n], st.zeros[l, r:r + n] = p.qweight, p.scales, p.zeros
            st.sal_w[l, r:r + n, :p.sal_w.shape[1]] = p.sal_w
            if lin.bias is not None:
                st.bias[l, r:r + n] = lin.bias
            r += n
        st.sal_idx[l, :parts[0].p.sal_idx.shape[0]] = parts[0].p.sal_idx
    return st


class DecodePlan:
    """Stacked int4 weights of every block plus the buffers of one decode step."""

    def __init__(self, cfg, blocks, qkv: StackedQ4, o: StackedQ4, gate_up: StackedQ4, down: StackedQ4):
        self.cfg = cfg
        self.qkv, self.o, self.gate_up, self.down = qkv, o, gate_up, down
        self.attn_norm = np.stack([b.attn_norm for b in blocks]).astype(np.float32)   # [L, D]
        self.mlp_norm = np.stack([b.mlp_norm for b in blocks]).astype(np.float32)     # [L, D]
        D, F = cfg.hidden_size, cfg.intermediate_size
        H, Hkv, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        P = numba.config.NUMBA_NUM_THREADS                        # most threads a call can use
        K = max(D, F, H * Dh)
        m16 = max(st.sal_idx.shape[1] for st in (qkv, o, gate_up, down))
        self.qkv_out = np.empty((H + 2 * Hkv) * Dh, np.float32)   # [(H + 2 Hkv) Dh]
        self.att = np.empty(H * Dh, np.float32)                   # [H Dh]
        self.act = np.empty(F, np.float32)                        # [F]
        self.bar = np.zeros(8, np.int64)                          # barrier counter (one cache line)
        # per thread: the normed input and the matvec prologue of the input at hand
        self.h = np.empty((P, D), np.float32)                     # [P, D]
        self.xe = np.empty((P, K // 2), np.float32)               # [P, K/2] x's even entries
        self.xo = np.empty((P, K // 2), np.float32)               # [P, K/2] x's odd entries
        self.xs = np.empty((P, K // 32), np.float32)              # [P, K/32] per-group sums
        self.xsal = np.empty((P, m16), np.float32)                # [P, m16] salient entries
        self._concurrent = None                                   # sync.barrier_safe(), once known

    @property
    def nbytes(self) -> int:
        return sum(s.qweight.nbytes + s.scales.nbytes + s.zeros.nbytes + s.sal_w.nbytes
                   for s in (self.qkv, self.o, self.gate_up, self.down))

    def run(self, x, cache, pos, cos, sin):
        """x [D] float32 (modified in place) through every block; writes the cache at `pos`."""
        c = self.cfg
        if self._concurrent is None:
            self._concurrent = barrier_safe()
        T = numba.get_num_threads() if self._concurrent else 1   # None (layer not chosen yet): 1
        self.bar[0] = 0
        _decode_blocks(T, self.bar, x, pos, cos, sin, np.float32(c.rms_norm_eps), c.num_attention_heads,
                       c.num_key_value_heads, c.head_dim, self.attn_norm, self.mlp_norm,
                       *self.qkv.args(), self.qkv.bias, *self.o.args(), *self.gate_up.args(),
                       *self.down.args(), cache.k, cache.v, cache.scratch,
                       self.h, self.qkv_out, self.att, self.act, self.xe, self.xo, self.xs, self.xsal)


def build_plan(cfg, blocks):
    """A DecodePlan when every block linear is int4 and the stacks line up, else None."""
    if not all(getattr(b, n).kind == "q4" for b in blocks for n in ("q", "k", "v", "o", "gate", "up", "down")):
        return None
    if cfg.head_dim % LANES or cfg.hidden_size % 2:   # whole 16-lane vectors; output rows in pairs
        return None
    if any(getattr(b, n).bias is not None for b in blocks for n in ("o", "gate", "up", "down")):
        return None
    stacks = [stack_q4([[b.q, b.k, b.v] for b in blocks]), stack_q4([[b.o] for b in blocks]),
              stack_q4([[b.gate, b.up] for b in blocks]), stack_q4([[b.down] for b in blocks])]
    if any(s is None for s in stacks):
        return None
    return DecodePlan(cfg, blocks, *stacks)


@kernel(fastmath=FASTMATH_REDUCE)
def _rms_norm_vec(x, w, eps, out):
    ss = np.float32(0.0)
    for d in range(x.shape[0]):
        ss += x[d] * x[d]
    r = np.float32(1.0) / np.sqrt(ss / x.shape[0] + eps)
    for d in range(x.shape[0]):
        out[d] = x[d] * r * w[d]


@kernel(fastmath=FASTMATH_REDUCE)
def _attend_head(q, k, v, n, scale, s, out):
    """One query head over the first n cached positions, in 16-lane vectors (Dh % 16 == 0).

    q, out: [Dh]; k, v: [S, Dh] (the head's cache); s: [S] scratch for the scores.
    out = softmax(q·kⱼ · scale, j < n) · v
    Shaped for throughput, not latency: the exponentials 16 at a time (v_exp), and the weighted
    sum of v rows four positions at a time (four independent FMA chains per 16 output lanes).
    """
    Dh = q.shape[0]
    m = np.float32(-np.inf)
    ones = v_splat(np.float32(1.0))
    for j in range(n):
        row = k[j]
        acc, acc2 = v_zeros(), v_zeros()           # two chains: even and odd 16-lane chunks
        for o in range(0, Dh - LANES, 2 * LANES):
            acc = v_fma(v_load(q, o), v_load(row, o), acc)
            acc2 = v_fma(v_load(q, o + LANES), v_load(row, o + LANES), acc2)
        if Dh % (2 * LANES):
            acc = v_fma(v_load(q, Dh - LANES), v_load(row, Dh - LANES), acc)
        sj = v_hsum(v_fma(acc, ones, acc2)) * scale
        s[j] = sj
        m = max(m, sj)
    n16 = n - n % LANES
    neg_m = v_splat(-m)
    tot = v_zeros()
    for j in range(0, n16, LANES):
        e = v_exp(v_fma(v_load(s, j), ones, neg_m))
        v_store(s, j, e)
        tot = v_fma(e, ones, tot)
    total = v_hsum(tot)
    for j in range(n16, n):
        e = np.exp(s[j] - m)
        s[j] = e
        total += e
    inv = v_splat(np.float32(1.0) / total)
    n4 = n - n % 4
    for o in range(0, Dh, LANES):
        a0, a1, a2, a3 = v_zeros(), v_zeros(), v_zeros(), v_zeros()
        for j in range(0, n4, 4):
            a0 = v_fma(v_splat(s[j]), v_load(v[j], o), a0)
            a1 = v_fma(v_splat(s[j + 1]), v_load(v[j + 1], o), a1)
            a2 = v_fma(v_splat(s[j + 2]), v_load(v[j + 2], o), a2)
            a3 = v_fma(v_splat(s[j + 3]), v_load(v[j + 3], o), a3)
        for j in range(n4, n):
            a0 = v_fma(v_splat(s[j]), v_load(v[j], o), a0)
        acc = v_fma(v_fma(a0, ones, a1), ones, v_fma(a2, ones, a3))
        v_store(out, o, v_fma(acc, inv, v_zeros()))


@kernel(fastmath=FASTMATH_REDUCE)
def _q4_row2(ra, rb, sa, sb, za, zb, group_size, swa, swb, x_even, x_odd, x_sum, x_sal):
    """Two outputs of the int4 matvec at once: the row loop body of kernels_q4._matvec_q4_f32 for
    rows ra and rb (per group: scale · (codes · x_g) − scale · zero · Σx_g; plus the salient dot).

    One row's loop is a chain of dependent FMAs (latency-bound at ~5 GB/s per core); two rows with
    separate low/high accumulators give 8 independent chains and share every x load.
    """
    h = group_size // 2
    acc_a, acc_a2, acc_b, acc_b2 = v_zeros(), v_zeros(), v_zeros(), v_zeros()
    zt_a = np.float32(0.0)
    zt_b = np.float32(0.0)
    for g in range(sa.shape[0]):
        da, ea, db, eb = v_zeros(), v_zeros(), v_zeros(), v_zeros()
        for o in range(g * h, g * h + h, LANES):
            xe = v_load(x_even, o)
            xo = v_load(x_odd, o)
            lo, hi = v_unpack_q4(ra, o)
            da = v_fma(lo, xe, da)
            ea = v_fma(hi, xo, ea)
            lo, hi = v_unpack_q4(rb, o)
            db = v_fma(lo, xe, db)
            eb = v_fma(hi, xo, eb)
        va, vb = v_splat(sa[g]), v_splat(sb[g])
        acc_a = v_fma(va, da, acc_a)
        acc_a2 = v_fma(va, ea, acc_a2)
        acc_b = v_fma(vb, db, acc_b)
        acc_b2 = v_fma(vb, eb, acc_b2)
        zt_a += sa[g] * np.float32(za[g]) * x_sum[g]
        zt_b += sb[g] * np.float32(zb[g]) * x_sum[g]
    for i in range(0, swa.shape[0], LANES):
        xs = v_load(x_sal, i)
        acc_a = v_fma(v_load(swa, i), xs, acc_a)
        acc_b = v_fma(v_load(swb, i), xs, acc_b)
    return v_hsum(acc_a) + v_hsum(acc_a2) - zt_a, v_hsum(acc_b) + v_hsum(acc_b2) - zt_b


@kernel()
def _share(n, t, T):
    """Thread t's part [a, b) of range(n) split evenly over T threads."""
    return n * t // T, n * (t + 1) // T


@kernel(fastmath=FASTMATH_REDUCE)
def _add_rows(x, a, b, qw, sc, z, g, sw, xe, xo, xs, xsal):
    """x[r] += (W h)[r] for the row pairs r = 2a .. 2b−1 of one int4 linear (the residual add fused
    in); h given by its matvec prologue xe, xo, xs, xsal (_split_x)."""
    for i in range(a, b):
        r = 2 * i
        ya, yb = _q4_row2(qw[r], qw[r + 1], sc[r], sc[r + 1], z[r], z[r + 1], g, sw[r], sw[r + 1], xe, xo, xs, xsal)
        x[r] += ya
        x[r + 1] += yb


@kernel(fastmath=FASTMATH_REDUCE)
def _decode_thread(t, T, bar, x, pos, cos, sin, eps, H, Hkv, Dh, attn_norm, mlp_norm,
                   a_qw, a_sc, a_z, a_g, a_si, a_sw, a_b,
                   o_qw, o_sc, o_z, o_g, o_si, o_sw,
                   u_qw, u_sc, u_z, u_g, u_si, u_sw,
                   d_qw, d_sc, d_z, d_g, d_si, d_sw,
                   kc, vc, scratch, h, qkv, att, act, xe, xo, xs, xsal):
    """Thread t of T: its share of every phase of every block, with a barrier after each phase.

    Shared (written by parts, read whole after a barrier): x, qkv, att, act, the cache.
    Private to the thread (row t of the [T, ...] scratch): h and the matvec prologue (xe, xo, xs,
    xsal). Each thread normalises and splits the whole input itself: cheaper than a barrier.
    """
    nq, nkv, half, F, D = H * Dh, Hkv * Dh, Dh // 2, act.shape[0], x.shape[0]
    rep = H // Hkv
    n = pos + 1
    scale = np.float32(1.0 / np.sqrt(Dh))
    h, xe, xo, xs, xsal = h[t], xe[t], xo[t], xs[t], xsal[t]
    k = 0                                         # barriers passed
    for l in range(attn_norm.shape[0]):
        # attention: h = norm(x); qkv = W h + b
        _rms_norm_vec(x, attn_norm[l], eps, h)
        _split_x(h, a_g, a_si[l], xe, xo, xs, xsal)
        a, b = _share(qkv.shape[0] // 2, t, T)   # rows in pairs (N is even: heads × even Dh)
        for i in range(a, b):
            r = 2 * i
            ya, yb = _q4_row2(a_qw[l, r], a_qw[l, r + 1], a_sc[l, r], a_sc[l, r + 1], a_z[l, r], a_z[l, r + 1],
                              a_g, a_sw[l, r], a_sw[l, r + 1], xe, xo, xs, xsal)
            qkv[r] = ya + a_b[l, r]
            qkv[r + 1] = yb + a_b[l, r + 1]
        k = barrier(bar, k, T)
        # RoPE on q and k heads (every T-th head); k and v of this position into the cache
        for head in range(t, H + Hkv, T):
            o = head * Dh
            for i in range(half):
                x1, x2 = qkv[o + i], qkv[o + i + half]
                qkv[o + i] = x1 * cos[i] - x2 * sin[i]
                qkv[o + i + half] = x2 * cos[i] + x1 * sin[i]
            if head >= H:
                hk = head - H
                for d in range(Dh):
                    kc[l, hk, pos, d] = qkv[nq + hk * Dh + d]
                    vc[l, hk, pos, d] = qkv[nq + nkv + hk * Dh + d]
        k = barrier(bar, k, T)
        # softmax(q·k) v per query head (every T-th head)
        for hq in range(t, H, T):
            _attend_head(qkv[hq * Dh:(hq + 1) * Dh], kc[l, hq // rep], vc[l, hq // rep], n, scale,
                         scratch[hq], att[hq * Dh:(hq + 1) * Dh])
        k = barrier(bar, k, T)
        _split_x(att, o_g, o_si[l], xe, xo, xs, xsal)
        a, b = _share(D // 2, t, T)
        _add_rows(x, a, b, o_qw[l], o_sc[l], o_z[l], o_g, o_sw[l], xe, xo, xs, xsal)    # x += Wo att
        k = barrier(bar, k, T)
        # MLP: h = norm(x); gate|up = W h; x += down(silu(gate) ⊙ up)
        _rms_norm_vec(x, mlp_norm[l], eps, h)
        _split_x(h, u_g, u_si[l], xe, xo, xs, xsal)
        a, b = _share(F, t, T)
        for f in range(a, b):                    # gate row f and up row F+f together, SiLU fused in
            g, u = _q4_row2(u_qw[l, f], u_qw[l, F + f], u_sc[l, f], u_sc[l, F + f], u_z[l, f], u_z[l, F + f],
                            u_g, u_sw[l, f], u_sw[l, F + f], xe, xo, xs, xsal)
            act[f] = g / (np.float32(1.0) + np.exp(-g)) * u
        k = barrier(bar, k, T)
        _split_x(act, d_g, d_si[l], xe, xo, xs, xsal)
        a, b = _share(D // 2, t, T)
        _add_rows(x, a, b, d_qw[l], d_sc[l], d_z[l], d_g, d_sw[l], xe, xo, xs, xsal)    # x += Wdown act
        k = barrier(bar, k, T)


# ONE parallel region per token: T threads, each running `_decode_thread` (sync.py says why).
@parallel_kernel()
def _decode_blocks(T, bar, x, pos, cos, sin, eps, H, Hkv, Dh, attn_norm, mlp_norm,
                   a_qw, a_sc, a_z, a_g, a_si, a_sw, a_b,
                   o_qw, o_sc, o_z, o_g, o_si, o_sw,
                   u_qw, u_sc, u_z, u_g, u_si, u_sw,
                   d_qw, d_sc, d_z, d_g, d_si, d_sw,
                   kc, vc, scratch, h, qkv, att, act, xe, xo, xs, xsal):
    """One token through all L blocks (see the module docstring). cos, sin: [Dh/2] at `pos`;
    bar: int64 [≥ 1] zeroed; h, xe, xo, xs, xsal: per-thread scratch [≥ T, ...]."""
    for t in prange(T):
        _decode_thread(t, T, bar, x, pos, cos, sin, eps, H, Hkv, Dh, attn_norm, mlp_norm,
                       a_qw, a_sc, a_z, a_g, a_si, a_sw, a_b,
                       o_qw, o_sc, o_z, o_g, o_si, o_sw,
                       u_qw, u_sc, u_z, u_g, u_si, u_sw,
                       d_qw, d_sc, d_z, d_g, d_si, d_sw,
                       kc, vc, scratch, h, qkv, att, act, xe, xo, xs, xsal)
