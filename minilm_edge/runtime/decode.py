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
The matvecs run with int8 activations on AVX512-VNNI (kernels_vnni_matvec.py: the same quantizer
as the int8 prefill, so a decoded token meets the activations it would meet in a prompt), else in
float32 (kernels_q4.py; also with Model.set_int8_activations(False)). Each phase calls one row-range
kernel (`_rows`), the row loop inside: per-row calls measured slower than the rows' arithmetic
(every call updates the reference count of every array argument).
The per-kernel twins (and their tests) are those of kernels.py / kernels_q4.py /
kernels_vnni_matvec.py; the whole step is tested against the Python path (prefill of the same
tokens) in tests/test_decode.py, in float32 and with int8 activations.
"""
from __future__ import annotations

import dataclasses

import numba
import numpy as np
from numba import prange

from ..kernels.simd import LANES, v_exp, v_fma, v_hsum, v_load, v_splat, v_store, v_unpack_q4, v_zeros
from ..kernels.quant_f32 import Q4Prepared, _split_x
from ..kernels.quant_i8_matmul import ACT_BLOCK, VNNI
from ..kernels.quant_i8_matvec import CHUNK, _quantize_vec, _salient_x, group_index, padded, supports_i8
from ..kernels.policy import FASTMATH_REDUCE, kernel, parallel_kernel
from ..kernels.sync import barrier, barrier_safe

if VNNI:
    from ..kernels.quant_i8_matvec import _q4_i8_row2


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

    @property
    def shape(self):
        return self.qweight.shape[1], 2 * self.qweight.shape[2]

    def args(self):
        """The stack as `_decode_blocks` takes it: the arrays with (L, N) merged into rows, then the int8 matvec's tables (gidx,
        g0s: kernels_vnni_matvec.group_index) and the salient counts per block."""
        gpc, gidx, g0s = group_index(self.group_size, self.shape[1])
        rows = lambda a: a.reshape(a.shape[0] * a.shape[1], a.shape[2])   # [L, N, ·] -> [L·N, ·], a view
        return (rows(self.qweight), rows(self.scales), rows(self.zeros), self.group_size, self.sal_idx,
                rows(self.sal_w), gpc, gidx, g0s, np.array(self.n_salient, np.int64))

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
        self.act = np.empty(F, np.float32)                        # [F]
        self.bar = np.zeros(8, np.int64)                          # barrier counter (one cache line)
        # per thread: the normed input and the matvec prologue of the input at hand
        self.h = np.empty((P, D), np.float32)                     # [P, D]
        self.att = np.empty((P, H * Dh), np.float32)              # [P, H Dh] attention output (each its own)
        self.pm = np.empty((P, H), np.float32)                    # [P, H] the thread's part: max score,
        self.pl = np.empty((P, H), np.float32)                    # [P, H]   sum of exponentials,
        self.po = np.empty((P, H, Dh), np.float32)                # [P, H, Dh] weighted sum of v
        self.xe = np.empty((P, K // 2), np.float32)               # [P, K/2] x's even entries
        self.xo = np.empty((P, K // 2), np.float32)               # [P, K/2] x's odd entries
        self.xs = np.empty((P, K // 32), np.float32)              # [P, K/32] per-group sums
        self.xsal = np.empty((P, m16), np.float32)                # [P, m16] salient entries
        # per thread, the int8 activations of the input at hand (kernels_vnni_matvec._quantize_vec)
        self.xz = np.empty((P, K), np.float32)                    # [P, K] x with salient channels 0
        self.qe = np.zeros((P, padded(K // 2, CHUNK)), np.int8)   # [P, K/2 ↑ 64] even channels
        self.qo = np.zeros((P, padded(K // 2, CHUNK)), np.int8)   # [P, K/2 ↑ 64] odd channels
        self.sxl = np.zeros((P, padded(K // 8, LANES)), np.float32)          # [P, K/8 ↑ 16] lane scales
        self.nzt = np.zeros((P, padded(K // ACT_BLOCK, LANES)), np.float32)  # [P, G ↑ 16] −zt
        # int8 activations in the block matvecs (VNNI; Model.set_int8_activations turns them off)
        self.int8_ok = VNNI and all(supports_i8(st.group_size, st.shape[1]) for st in (qkv, o, gate_up, down))
        self.int8 = self.int8_ok
        self._concurrent = None                                   # sync.barrier_safe(), once known
        self._args = (*qkv.args(), qkv.bias.reshape(-1), *o.args(), *gate_up.args(), *down.args())

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
        _decode_blocks(T, self.bar, self.int8 and self.int8_ok, x, pos, cos, sin, np.float32(c.rms_norm_eps),
                       c.num_attention_heads, c.num_key_value_heads, c.head_dim, self.attn_norm, self.mlp_norm,
                       *self._args, cache.k, cache.v, cache.scratch, self.h, self.qkv_out, self.att, self.pm,
                       self.pl, self.po, self.act,
                       self.xe, self.xo, self.xs, self.xsal, self.xz, self.qe, self.qo, self.sxl, self.nzt)


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


ATT_TILE = 16      # positions per tile: a tile of K or V rows is read from memory once, then from L1


@kernel(fastmath=FASTMATH_REDUCE)
def _attend_part(qkv, hk, rep, Dh, k, v, j0, j1, scale, s, pm, pl, po):
    """Part of the attention of the rep query heads h = hk·rep + r that read kv head hk, over the
    cached positions j0 <= j < j1 only (the threads split the positions; `_merge_parts` joins them):

        s[h, j] = q_h · k_j · scale,   pm[h] = max_j s[h, j],   pl[h] = Σ_j e^(s[h, j] − pm[h]),
        po[h] = Σ_j e^(s[h, j] − pm[h]) v_j                     (an empty part: −inf, 0, 0)

    qkv: the q vectors at h·Dh; k, v [S, Dh] the kv head's cache; s [H, S] scratch (each part its
    own positions); pm, pl [H], po [H, Dh]: this thread's part. Dh % 16 == 0.
    Positions go in tiles of ATT_TILE with the heads inside, so under GQA each K and V row is read
    from memory once for its rep heads. The exponentials 16 at a time (v_exp); the weighted sums of
    v rows four positions at a time (four FMA chains per 16 output lanes).
    """
    ones = v_splat(np.float32(1.0))
    h0 = hk * rep
    for r in range(rep):
        pm[h0 + r] = -np.inf
        pl[h0 + r] = np.float32(0.0)
        for d in range(Dh):
            po[h0 + r, d] = np.float32(0.0)
    if j1 <= j0:
        return
    for jt in range(j0, j1, ATT_TILE):
        je = min(jt + ATT_TILE, j1)
        for r in range(rep):
            h = h0 + r
            qo = h * Dh
            m = pm[h]
            for j in range(jt, je):
                acc, acc2 = v_zeros(), v_zeros()       # two chains: even and odd 16-lane chunks
                for o in range(0, Dh - LANES, 2 * LANES):
                    acc = v_fma(v_load(qkv, qo + o), v_load(k[j], o), acc)
                    acc2 = v_fma(v_load(qkv, qo + o + LANES), v_load(k[j], o + LANES), acc2)
                if Dh % (2 * LANES):
                    acc = v_fma(v_load(qkv, qo + Dh - LANES), v_load(k[j], Dh - LANES), acc)
                sj = v_hsum(v_fma(acc, ones, acc2)) * scale
                s[h, j] = sj
                m = max(m, sj)
            pm[h] = m
    n16 = j0 + (j1 - j0) - (j1 - j0) % LANES
    for r in range(rep):
        h = h0 + r
        sh = s[h]
        neg_m = v_splat(-pm[h])
        tot = v_zeros()
        for j in range(j0, n16, LANES):
            e = v_exp(v_fma(v_load(sh, j), ones, neg_m))
            v_store(sh, j, e)
            tot = v_fma(e, ones, tot)
        total = v_hsum(tot)
        for j in range(n16, j1):
            e = np.exp(sh[j] - pm[h])
            sh[j] = e
            total += e
        pl[h] = total
    for jt in range(j0, j1, ATT_TILE):
        je = min(jt + ATT_TILE, j1)
        j4 = je - (je - jt) % 4
        for r in range(rep):
            h = h0 + r
            sh, oh = s[h], po[h]
            for o in range(0, Dh, LANES):
                a0, a1, a2, a3 = v_load(oh, o), v_zeros(), v_zeros(), v_zeros()
                for j in range(jt, j4, 4):
                    a0 = v_fma(v_splat(sh[j]), v_load(v[j], o), a0)
                    a1 = v_fma(v_splat(sh[j + 1]), v_load(v[j + 1], o), a1)
                    a2 = v_fma(v_splat(sh[j + 2]), v_load(v[j + 2], o), a2)
                    a3 = v_fma(v_splat(sh[j + 3]), v_load(v[j + 3], o), a3)
                for j in range(j4, je):
                    a0 = v_fma(v_splat(sh[j]), v_load(v[j], o), a0)
                v_store(oh, o, v_fma(v_fma(a0, ones, a1), ones, v_fma(a2, ones, a3)))


@kernel(fastmath=FASTMATH_REDUCE)
def _merge_parts(T, H, Dh, pm, pl, po, out):
    """The softmax attention of every head from the T threads' parts (`_attend_part`):
    out[h·Dh : (h+1)·Dh] = Σ_t e^(pm[t,h] − M) po[t,h] / Σ_t e^(pm[t,h] − M) pl[t,h],  M = max_t pm[t,h].
    pm, pl [P, H], po [P, H, Dh]; out [H·Dh]."""
    for h in range(H):
        M = pm[0, h]
        for t in range(1, T):
            M = max(M, pm[t, h])
        den = np.float32(0.0)
        for d in range(Dh):
            out[h * Dh + d] = np.float32(0.0)
        for t in range(T):
            w = np.exp(pm[t, h] - M) if pl[t, h] != 0 else np.float32(0.0)     # empty part: 0 (NaN stays)
            den += w * pl[t, h]
            for d in range(Dh):
                out[h * Dh + d] += w * po[t, h, d]
        inv = np.float32(1.0) / den if den != 0 else np.float32(0.0)     # den = 0: no position at all
        for d in range(Dh):
            out[h * Dh + d] *= inv


@kernel(fastmath=FASTMATH_REDUCE, inline=True)
def _q4_row2(qw, sc, z, sw, ra, rb, group_size, x_even, x_odd, x_sum, x_sal):
    """Two outputs of the int4 matvec at once: the row loop body of kernels_q4._matvec_q4_f32 for
    rows ra and rb (per group: scale · (codes · x_g) − scale · zero · Σx_g; plus the salient dot).

    qw [L·N, K/2], sc, z [L·N, G], sw [L·N, m16]: a stack with its (L, N) axes merged (row l·N + n). Rows are addressed by flat offset, never sliced: a slice per row costs a
    reference-count update per array (an atomic add and a call), which measured as slow as the
    row's arithmetic (decode blocks at 6 GB/s instead of 12 on one core).
    One row's loop is a chain of dependent FMAs (latency-bound at ~5 GB/s per core); two rows with
    separate low/high accumulators give 8 independent chains and share every x load.
    """
    half, G, m16 = qw.shape[-1], sc.shape[-1], sw.shape[-1]
    h = group_size // 2
    wa, wb = ra * half, rb * half
    acc_a, acc_a2, acc_b, acc_b2 = v_zeros(), v_zeros(), v_zeros(), v_zeros()
    zt_a = np.float32(0.0)
    zt_b = np.float32(0.0)
    for g in range(G):
        da, ea, db, eb = v_zeros(), v_zeros(), v_zeros(), v_zeros()
        for o in range(g * h, g * h + h, LANES):
            xe = v_load(x_even, o)
            xo = v_load(x_odd, o)
            lo, hi = v_unpack_q4(qw, wa + o)
            da = v_fma(lo, xe, da)
            ea = v_fma(hi, xo, ea)
            lo, hi = v_unpack_q4(qw, wb + o)
            db = v_fma(lo, xe, db)
            eb = v_fma(hi, xo, eb)
        s_a, s_b = sc[ra, g], sc[rb, g]
        va, vb = v_splat(s_a), v_splat(s_b)
        acc_a = v_fma(va, da, acc_a)
        acc_a2 = v_fma(va, ea, acc_a2)
        acc_b = v_fma(vb, db, acc_b)
        acc_b2 = v_fma(vb, eb, acc_b2)
        zt_a += s_a * np.float32(z[ra, g]) * x_sum[g]
        zt_b += s_b * np.float32(z[rb, g]) * x_sum[g]
    for i in range(0, m16, LANES):
        xs = v_load(x_sal, i)
        acc_a = v_fma(v_load(sw, ra * m16 + i), xs, acc_a)
        acc_b = v_fma(v_load(sw, rb * m16 + i), xs, acc_b)
    return v_hsum(acc_a) + v_hsum(acc_a2) - zt_a, v_hsum(acc_b) + v_hsum(acc_b2) - zt_b


@kernel(fastmath=FASTMATH_REDUCE)
def _prologue(i8, x, g, sal_idx, n_sal, xe, xo, xs, xsal, xz, qe, qo, sxl, nzt):
    """The matvec prologue of input x for this thread: float32 (split into even/odd entries, group
    sums) or int8 (quantized as in kernels_vnni_matvec); the salient entries either way."""
    if i8:
        _quantize_vec(x, sal_idx, n_sal, g, xz, qe, qo, sxl, nzt)
        _salient_x(x, sal_idx, xsal)
    else:
        _split_x(x, g, sal_idx, xe, xo, xs, xsal)


# What a row kernel does with its pair of outputs (ya, yb) of pair i:
STORE, ADD, SWIGLU = 0, 1, 2    # out[2i], out[2i+1] = ya + bias, yb + bias | out[2i] += ya, ... | out[i] = silu(ya)·yb


@kernel(fastmath=FASTMATH_REDUCE, inline=True)
def _put(mode, out, i, ra, rb, ya, yb, bias):
    if mode == SWIGLU:
        out[i] = ya / (np.float32(1.0) + np.exp(-ya)) * yb
    elif mode == ADD:
        out[2 * i] += ya
        out[2 * i + 1] += yb
    else:
        out[2 * i] = ya + bias[ra]
        out[2 * i + 1] = yb + bias[rb]


@kernel(fastmath=FASTMATH_REDUCE)
def _rows_f32(mode, qw, sc, z, sw, base, up, i0, i1, g, xe, xo, xs, xsal, bias, out):
    """Row pairs i0 .. i1−1 of one stacked int4 linear in float32 (prologue `_split_x`): pair i is
    stack rows (base + 2i, base + 2i + 1), or (base + i, base + up + i) for SWIGLU (gate row i and
    up row i); the outputs go to `out` as `mode` says. One call per phase, the row loop inside:
    a call per row would pay reference-count updates for every array argument."""
    for i in range(i0, i1):
        ra = base + i if mode == SWIGLU else base + 2 * i
        rb = ra + up if mode == SWIGLU else ra + 1
        ya, yb = _q4_row2(qw, sc, z, sw, ra, rb, g, xe, xo, xs, xsal)
        _put(mode, out, i, ra, rb, ya, yb, bias)


if VNNI:
    @kernel(fastmath=FASTMATH_REDUCE)
    def _rows_i8(mode, qw, sc, z, sw, base, up, i0, i1, gpc, gidx, g0s, qe, qo, sxl, nzt, xsal, bias, out):
        """`_rows_f32` with int8 activations (prologue `_quantize_vec`; kernels_vnni_matvec)."""
        for i in range(i0, i1):
            ra = base + i if mode == SWIGLU else base + 2 * i
            rb = ra + up if mode == SWIGLU else ra + 1
            ya, yb = _q4_i8_row2(qw, sc, z, sw, ra, rb, gpc, gidx, g0s, qe, qo, sxl, nzt, xsal)
            _put(mode, out, i, ra, rb, ya, yb, bias)
else:
    _rows_i8 = None         # never called: DecodePlan.int8_ok is False without VNNI


@kernel(fastmath=FASTMATH_REDUCE)
def _rows(i8, mode, qw, sc, z, sw, base, up, i0, i1, g, gpc, gidx, g0s, xe, xo, xs, xsal, qe, qo, sxl, nzt,
          bias, out):
    """Row pairs i0 .. i1−1 of one stacked int4 linear, float32 or int8 activations."""
    if i8:
        _rows_i8(mode, qw, sc, z, sw, base, up, i0, i1, gpc, gidx, g0s, qe, qo, sxl, nzt, xsal, bias, out)
    else:
        _rows_f32(mode, qw, sc, z, sw, base, up, i0, i1, g, xe, xo, xs, xsal, bias, out)


@kernel()
def _share(n, t, T):
    """Thread t's part [a, b) of range(n) split evenly over T threads."""
    return n * t // T, n * (t + 1) // T


@kernel(fastmath=FASTMATH_REDUCE)
def _decode_thread(t, T, bar, i8, x, pos, cos, sin, eps, H, Hkv, Dh, attn_norm, mlp_norm,
                   a_qw, a_sc, a_z, a_g, a_si, a_sw, a_gp, a_gi, a_g0, a_ns, a_b,
                   o_qw, o_sc, o_z, o_g, o_si, o_sw, o_gp, o_gi, o_g0, o_ns,
                   u_qw, u_sc, u_z, u_g, u_si, u_sw, u_gp, u_gi, u_g0, u_ns,
                   d_qw, d_sc, d_z, d_g, d_si, d_sw, d_gp, d_gi, d_g0, d_ns,
                   kc, vc, scratch, h, qkv, att, pm, pl, po, act, xe, xo, xs, xsal, xz, qe, qo, sxl, nzt):
    """Thread t of T: its share of every phase of every block, with a barrier after each phase.

    Shared (written by parts, read whole after a barrier): x, qkv, att, act, the cache.
    Private to the thread (row t of the [T, ...] scratch): h and the matvec prologue (xe, xo, xs,
    xsal; xz, qe, qo, sxl, nzt with int8 activations). Each thread normalises and prepares the
    whole input itself: cheaper than a barrier.
    """
    nq, nkv, half, F, D = H * Dh, Hkv * Dh, Dh // 2, act.shape[0], x.shape[0]
    rep = H // Hkv
    n = pos + 1
    scale = np.float32(1.0 / np.sqrt(Dh))
    h, xe, xo, xs, xsal, att = h[t], xe[t], xo[t], xs[t], xsal[t], att[t]
    xz, qe, qo, sxl, nzt = xz[t], qe[t], qo[t], sxl[t], nzt[t]
    Na, Nu = qkv.shape[0], 2 * F                  # rows per block of the q|k|v and gate|up stacks
    k = 0                                         # barriers passed
    for l in range(attn_norm.shape[0]):
        # attention: h = norm(x); qkv = W h + b
        _rms_norm_vec(x, attn_norm[l], eps, h)
        _prologue(i8, h, a_g, a_si[l], a_ns[l], xe, xo, xs, xsal, xz, qe, qo, sxl, nzt)
        a, b = _share(Na // 2, t, T)             # rows in pairs (N is even: heads × even Dh)
        _rows(i8, STORE, a_qw, a_sc, a_z, a_sw, l * Na, 0, a, b, a_g, a_gp, a_gi, a_g0, xe, xo, xs, xsal,
              qe, qo, sxl, nzt, a_b, qkv)                                              # qkv = W h + b
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
        # softmax(q·k) v: every head over this thread's share of the positions, then all the parts
        # joined by every thread into its own copy of the attention output
        j0, j1 = _share(n, t, T)
        for hk in range(Hkv):
            _attend_part(qkv, hk, rep, Dh, kc[l, hk], vc[l, hk], j0, j1, scale, scratch, pm[t], pl[t], po[t])
        k = barrier(bar, k, T)
        _merge_parts(T, H, Dh, pm, pl, po, att)
        _prologue(i8, att, o_g, o_si[l], o_ns[l], xe, xo, xs, xsal, xz, qe, qo, sxl, nzt)
        a, b = _share(D // 2, t, T)
        _rows(i8, ADD, o_qw, o_sc, o_z, o_sw, l * D, 0, a, b, o_g, o_gp, o_gi, o_g0, xe, xo, xs, xsal,
              qe, qo, sxl, nzt, a_b, x)                                                # x += Wo att
        k = barrier(bar, k, T)
        # MLP: h = norm(x); gate|up = W h; x += down(silu(gate) ⊙ up)
        _rms_norm_vec(x, mlp_norm[l], eps, h)
        _prologue(i8, h, u_g, u_si[l], u_ns[l], xe, xo, xs, xsal, xz, qe, qo, sxl, nzt)
        a, b = _share(F, t, T)                   # gate row f and up row F+f together, SiLU fused in
        _rows(i8, SWIGLU, u_qw, u_sc, u_z, u_sw, l * Nu, F, a, b, u_g, u_gp, u_gi, u_g0, xe, xo, xs, xsal,
              qe, qo, sxl, nzt, a_b, act)
        k = barrier(bar, k, T)
        _prologue(i8, act, d_g, d_si[l], d_ns[l], xe, xo, xs, xsal, xz, qe, qo, sxl, nzt)
        a, b = _share(D // 2, t, T)
        _rows(i8, ADD, d_qw, d_sc, d_z, d_sw, l * D, 0, a, b, d_g, d_gp, d_gi, d_g0, xe, xo, xs, xsal,
              qe, qo, sxl, nzt, a_b, x)                                                # x += Wdown act
        k = barrier(bar, k, T)


# ONE parallel region per token: T threads, each running `_decode_thread` (sync.py says why).
@parallel_kernel()
def _decode_blocks(T, bar, i8, x, pos, cos, sin, eps, H, Hkv, Dh, attn_norm, mlp_norm,
                   a_qw, a_sc, a_z, a_g, a_si, a_sw, a_gp, a_gi, a_g0, a_ns, a_b,
                   o_qw, o_sc, o_z, o_g, o_si, o_sw, o_gp, o_gi, o_g0, o_ns,
                   u_qw, u_sc, u_z, u_g, u_si, u_sw, u_gp, u_gi, u_g0, u_ns,
                   d_qw, d_sc, d_z, d_g, d_si, d_sw, d_gp, d_gi, d_g0, d_ns,
                   kc, vc, scratch, h, qkv, att, pm, pl, po, act, xe, xo, xs, xsal, xz, qe, qo, sxl, nzt):
    """One token through all L blocks (see the module docstring). cos, sin: [Dh/2] at `pos`;
    bar: int64 [≥ 1] zeroed; i8: int8 activations (VNNI) or float32 in the block matvecs;
    h and the prologue buffers: per-thread scratch [≥ T, ...]."""
    for t in prange(T):
        _decode_thread(t, T, bar, i8, x, pos, cos, sin, eps, H, Hkv, Dh, attn_norm, mlp_norm,
                       a_qw, a_sc, a_z, a_g, a_si, a_sw, a_gp, a_gi, a_g0, a_ns, a_b,
                       o_qw, o_sc, o_z, o_g, o_si, o_sw, o_gp, o_gi, o_g0, o_ns,
                       u_qw, u_sc, u_z, u_g, u_si, u_sw, u_gp, u_gi, u_g0, u_ns,
                       d_qw, d_sc, d_z, d_g, d_si, d_sw, d_gp, d_gi, d_g0, d_ns,
                       kc, vc, scratch, h, qkv, att, pm, pl, po, act, xe, xo, xs, xsal, xz, qe, qo, sxl, nzt)
