"""One decoded token through every int4 block in ONE compiled call: `decode_blocks`.

A decode step of a small model is ~10 short kernels per block: called one by one from Python, their
dispatch (argument checks, allocation, unboxing) costs about as much as the int4 math of a 135M
model. So when every block linear is int4, the weights of all L blocks are stacked into [L, ...]
arrays of one kind each (runtime/decode.py: q|k|v fused by rows, o, gate|up fused, down) and this
step runs the whole stack in a single call: no Python between kernels, no allocation (every buffer
comes in), and one parallel region: each of the T threads runs every phase's share of rows or heads
and meets the others at a spin barrier (sync.py) after each phase, instead of a fork/join of the
thread team per matrix product.

Per block l (x: [D] the residual stream, float32):
    h   = rms_norm(x) ⊙ attn_norm[l]
    qkv = Wqkv[l] h (+ bias)                        [(H + 2 Hkv) Dh]
    rotate q and k heads by RoPE at position pos; append k, v to the cache at pos
    x  += Wo[l] attention(q, cache[:pos+1])
    h   = rms_norm(x) ⊙ mlp_norm[l]
    gu  = Wgu[l] h                                   [2F] = gate | up
    x  += Wdown[l] (silu(gate) ⊙ up)
The matvecs run with int8 activations where the target has an int8 dot (AVX512-VNNI, AVX-VNNI, AVX2:
int8_dot.py; quant_i8_matvec.py: the same quantizer as the
int8 prefill, so a decoded token meets the activations it would meet in a prompt), else in float32
(quant_f32.py). Their row functions are those of the standalone matvecs (`dot2_q4_f32`,
`dot2_q4_i8`), so the step's products are bit for bit theirs; the kernels' tests are theirs too.
The whole step is tested against the Python path (prefill of the same tokens) in tests/test_decode.py.

The arguments are records (namedtuples, built once by runtime/decode.DecodePlan):
    Q4Stack      one stacked linear kind, (L, N) axes merged into rows: row l·N + n (four of them:
                 q|k|v, o, gate|up, down)
    Q8Stack      the int8 block linears' rows of one kind (q|k|v, o, gate|up, down; quantize --int8),
                 computed in one pass where the int4 stack holds zero placeholders (`_rows_mixed`); a
                 block's int8 row pairs count Q8_COST to an int4 pair's Q4_COST when the threads share
                 a phase. A block with int8 gate or up rows takes two passes (`_rows_gate_up_mixed`)
    Blocks       the norms, eps and the head shape
    Shared       buffers every thread writes parts of and reads whole after a barrier
    KVCache      the cache the token joins (k, v) and the attention scores' scratch
    Scratch      per-thread buffers [P, ...], row t for thread t
Records are flat (arrays and scalars): Numba's parallel region does not take a record of records.
Each phase calls one row-range kernel (`_rows`) with the row loop inside, and passes it only the
stack and the prologue it reads: a call that is not inlined updates the reference count of every
array it is passed, a record's arrays included (policy.kernel).
"""
from __future__ import annotations

from collections import namedtuple

import numpy as np
from numba import prange

from .int8_dot import INT8_DOT
from .ops_f32 import sum_squares
from .policy import FASTMATH_REDUCE, compile_time_choice, kernel, parallel_kernel
from .quant_f32 import dot2_q4_f32, dot2_q8_f32, split_x
from .quant_i8_matvec import quantize_vec, salient_x
from .quant_q6 import dot2_q6_f32
from .simd import LANES, v_div, v_exp, v_fma, v_hsum, v_load, v_mul, v_splat, v_store, v_zeros
from .sync import barrier

if INT8_DOT:
    from .quant_i8_matvec import dot2_q4_i8, dot2_q8_i8, q8_lane_zero
    from .quant_q6 import dot2_q6_i8

# ----------------------------------------------------------------------------------------------
# The records. Shapes: L blocks, N rows of one block's stacked linear, K its inputs, G = K / g,
# m16 the salient channels padded to 16, P the most threads a call can use, S the cache positions.

Q4Stack = namedtuple("Q4Stack", [
    "qweight",      # uint8   [L·N, K/2]
    "scales",       # uint16  [L·N, G]    fp16 bits (simd.as_f32 widens them as they are read)
    "zeros",        # uint8   [L·N, G]
    "sal_w",        # float32 [L·N, m16]
    "bias",         # float32 [L·N]      (zeros when the linear has none)
    "group_size",   # int
    "sal_idx",      # int64   [L, m16]   salient channels per block, padded with channel 0
    "n_salient",    # int64   [L]        salient channels per block
    "gpc",          # int     the int8 matvec's chunk -> group tables (quant_i8_matvec.group_index):
    "gidx",         # int32   [16]         groups per chunk, lane -> group, each chunk's first group
    "g0s",          # int64   [K/128 ↑]
])
Q8Stack = namedtuple("Q8Stack", [       # the int8 block linears' rows of one kind, all blocks (R rows)
    "qweight",      # uint8   [R, K]     quant_i8_matvec.q8_rows: u = q + 128, per 128 channels even then odd
    "scales",       # uint16  [R, K/g8]  fp16 bits
    "group_size",   # int     g8
    "gpc", "gidx", "g0s",   # quant_i8_matvec.group_index(g8, K)
    # the q6 block linears' rows of this kind (quant_q6.py: 6-bit codes, formats/q4.py pack_q6_rows)
    "q6w",          # uint8   [R6, 3K/4]
    "q6s",          # uint16  [R6, K/g6] fp16 bits
    "q6g",          # int     g6
    "q6gpc", "q6gidx", "q6g0s",   # quant_i8_matvec.group_index(g6, K)
])
Blocks = namedtuple("Blocks", [
    "attn_norm", "mlp_norm",         # float32 [L, D]
    "eps",                           # float32
    "n_heads", "n_kv_heads", "head_dim",
])
Shared = namedtuple("Shared", [
    "qkv",          # float32 [(H + 2 Hkv) Dh]
    "act",          # float32 [F]        silu(gate) ⊙ up
    "gu",           # float32 [2F]       gate | up before the product, in blocks with int8 gate or up rows
    "bar",          # int64   [8]        barrier counter (one cache line), zeroed before each call
])
KVCache = namedtuple("KVCache", [
    "k", "v",       # float32 [L, Hkv, S, Dh]
    "scores",       # float32 [H, S]     each thread writes its own positions
])
Scratch = namedtuple("Scratch", [
    "h",            # float32 [P, D]       the normed input
    "att",          # float32 [P, H Dh]    the attention output (each thread its own copy)
    "pm", "pl",     # float32 [P, H]       the thread's part of the attention: max score, Σ e^(s − max),
    "po",           # float32 [P, H, Dh]     Σ e^(s − max) v
    # the matvec prologue of the input at hand: float32 (quant_f32.split_x) ...
    "xe", "xo",     # float32 [P, K/2]     x's even and odd entries
    "xs",           # float32 [P, K/32]    per-group sums
    "xsal",         # float32 [P, m16]     salient entries (int8 too)
    # ... or int8 (quant_i8_matvec.quantize_vec)
    "xz",           # float32 [P, K]       x with the salient channels 0
    "qe", "qo",     # int8    [P, K/2 ↑ 64] even and odd channels' codes
    "sxl",          # float32 [P, K/8 ↑ 16] lane scales
    "nzt",          # float32 [P, G ↑ 16]  −zt
    "nzl",          # float32 [P, K/8 ↑ 16] the int8 rows' −128 · lane sums (quant_i8_matvec.q8_lane_zero)
])
Prologue = namedtuple("Prologue", "xe xo xs xsal xz qe qo sxl nzt nzl")   # one thread's row of those


# ----------------------------------------------------------------------------------------------
# Leaves: RMSNorm of one vector, attention split by positions


@kernel(fastmath=FASTMATH_REDUCE)
def _rms_norm_vec(x, w, eps, out):
    """out = x / sqrt(mean(x²) + eps) ⊙ w.                                   x, w, out: [D]
    The sum of squares as ops_f32.rms_norm's (`sum_squares`: the same on every target)."""
    ss = sum_squares(x)
    r = np.float32(1.0) / np.sqrt(ss / x.shape[0] + eps)
    for d in range(x.shape[0]):
        out[d] = x[d] * r * w[d]


ATT_TILE = 16      # positions per tile: a tile of K or V rows is read from memory once, then from L1


# No fastmath: both steps call attend_part, and each compiled step links in its own copy, optimized again
# there; with reassoc the copies rounded differently, and which one a step ran depended on what the process
# had loaded first (BENCHMARKS.md, "Why the batched step's rows sometimes differ"). Its sums are explicit
# v_fma/v_hsum trees already; only the scalar tails lose reassociation (decode speed to re-measure).
@kernel()
def attend_part(qkv, hk, rep, Dh, k, v, j0, j1, scale, s, pm, pl, po):
    """Part of the attention of the rep query heads h = hk·rep + r that read kv head hk, over the
    cached positions j0 <= j < j1 only (the threads split the positions; `merge_parts` joins them):

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
def merge_parts(T, H, Dh, pm, pl, po, out):
    """The softmax attention of every head from the T threads' parts (`attend_part`):
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


# ----------------------------------------------------------------------------------------------
# Row kernels: one call per phase, the row loop inside


@kernel(fastmath=FASTMATH_REDUCE)
def _prologue_f32(x, st, l, p):
    split_x(x, st.group_size, st.sal_idx[l], p.xe, p.xo, p.xs, p.xsal)


@kernel(fastmath=FASTMATH_REDUCE)
def _prologue_i8(x, st, l, p):
    quantize_vec(x, st.sal_idx[l], st.n_salient[l], st.group_size, p.xz, p.qe, p.qo, p.sxl, p.nzt)
    salient_x(x, st.sal_idx[l], p.xsal)


@compile_time_choice(_prologue_f32, _prologue_i8)
def _prologue(i8, x, st, l, p):
    """The matvec prologue of input x for block l of stack st, into this thread's buffers p:
    float32 (split into even/odd entries, group sums) or int8 (quantized); the salient entries
    either way. i8 (F32 or I8) a compile-time constant: policy.compile_time_choice."""


# What a row kernel does with the outputs (ya, yb) of pair i:
STORE, ADD, SWIGLU = 0, 1, 2    # out[2i], out[2i+1] = ya + bias, yb + bias | out[2i] += ya, ... | out[i] = silu(ya)·yb


@kernel(inline=True)
def _pair(mode, base, up, i):
    """Stack rows of pair i: (base + 2i, base + 2i + 1), or for SWIGLU gate row i and up row i,
    (base + i, base + up + i)."""
    if mode == SWIGLU:
        return base + i, base + up + i
    return base + 2 * i, base + 2 * i + 1


@kernel(fastmath=FASTMATH_REDUCE, inline=True)
def _silu_mul(g, u):
    """silu(g)·u of one gate and one up output (`_put` spells the same formula out: called there, it
    made LLVM emit different code for the single-stream and the B-row SWIGLU, whose rows then
    differed in the last bit; tests/test_batch.py watches that)."""
    return g / (np.float32(1.0) + np.exp(-g)) * u


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
def _rows_f32(mode, st, base, up, i0, i1, p, out):
    """Row pairs i0 .. i1−1 of stack st in float32 (prologue `split_x`), to `out` as `mode` says."""
    for i in range(i0, i1):
        ra, rb = _pair(mode, base, up, i)
        ya, yb = dot2_q4_f32(st.qweight, st.scales, st.zeros, st.sal_w, ra, rb, st.group_size,
                             p.xe, p.xo, p.xs, p.xsal)
        _put(mode, out, i, ra, rb, ya, yb, st.bias)


if INT8_DOT:
    @kernel(fastmath=FASTMATH_REDUCE)
    def _rows_i8(mode, st, base, up, i0, i1, p, out):
        """`_rows_f32` with int8 activations (prologue `quantize_vec`). A separate function, not a
        branch of `_rows_f32`: `dot2_q4_i8` compiles only for a target with an int8 dot."""
        for i in range(i0, i1):
            ra, rb = _pair(mode, base, up, i)
            ya, yb = dot2_q4_i8(st.qweight, st.scales, st.zeros, st.sal_w, ra, rb, st.gpc, st.gidx, st.g0s,
                                p.qe, p.qo, p.sxl, p.nzt, p.xsal)
            _put(mode, out, i, ra, rb, ya, yb, st.bias)
else:
    @kernel()
    def _rows_i8(mode, st, base, up, i0, i1, p, out):
        """Never called without an int8 dot (DecodePlan.int8_ok is False, so i8 is too), but `_rows`
        names it in a branch, and Numba types both branches: a function that does nothing."""
        return


@compile_time_choice(_rows_f32, _rows_i8)
def _rows(i8, mode, st, base, up, i0, i1, p, out):
    """Row pairs i0 .. i1−1 of stack st, float32 or int8 activations (i8 a compile-time constant)."""


@kernel(fastmath=FASTMATH_REDUCE)
def _rows_q8_f32(mode, q8, r0, st, base, i0, i1, p, out):
    """Output pairs i0 .. i1−1 from int8 rows r0 + 2i, r0 + 2i + 1 of q8 (float32 prologue); the
    bias from the int4 stack's rows (base + 2i, ...), where the linear sits (as a placeholder)."""
    for i in range(i0, i1):
        ya, yb = dot2_q8_f32(q8.qweight, q8.scales, r0 + 2 * i, r0 + 2 * i + 1, q8.group_size, p.xe, p.xo)
        _put(mode, out, i, base + 2 * i, base + 2 * i + 1, ya, yb, st.bias)


if INT8_DOT:
    @kernel(fastmath=FASTMATH_REDUCE)
    def _rows_q8_i8(mode, q8, r0, st, base, i0, i1, p, out):
        """`_rows_q8_f32` with int8 activations (prologue `quantize_vec`, then `q8_lane_zero`)."""
        q8_lane_zero(p.qe, p.qo, p.sxl, p.nzl)
        for i in range(i0, i1):
            ya, yb = dot2_q8_i8(q8.qweight, q8.scales, r0 + 2 * i, r0 + 2 * i + 1, q8.gpc, q8.gidx, q8.g0s,
                                p.qe, p.qo, p.sxl, p.nzl)
            _put(mode, out, i, base + 2 * i, base + 2 * i + 1, ya, yb, st.bias)
else:
    @kernel()
    def _rows_q8_i8(mode, q8, r0, st, base, i0, i1, p, out):
        """Never called without an int8 dot (see `_rows_i8`)."""
        return


@compile_time_choice(_rows_q8_f32, _rows_q8_i8)
def _rows_q8(i8, mode, q8, r0, st, base, i0, i1, p, out):
    """`_rows_q8_f32` or `_rows_q8_i8` (i8 a compile-time constant)."""


@kernel(fastmath=FASTMATH_REDUCE)
def _rows_q6_f32(mode, q8, r0, st, base, i0, i1, p, out):
    """`_rows_q8_f32` for q6 rows (q8.q6w: quant_q6.dot2_q6_f32, bit-identical to the int8 rows)."""
    for i in range(i0, i1):
        ya, yb = dot2_q6_f32(q8.q6w, q8.q6s, r0 + 2 * i, r0 + 2 * i + 1, q8.q6g, p.xe, p.xo, 0)
        _put(mode, out, i, base + 2 * i, base + 2 * i + 1, ya, yb, st.bias)


if INT8_DOT:
    @kernel(fastmath=FASTMATH_REDUCE)
    def _rows_q6_i8(mode, q8, r0, st, base, i0, i1, p, out):
        """`_rows_q8_i8` for q6 rows (q8.q6w: quant_q6.dot2_q6_i8, bit-identical to the int8 rows)."""
        q8_lane_zero(p.qe, p.qo, p.sxl, p.nzl)
        for i in range(i0, i1):
            ya, yb = dot2_q6_i8(q8.q6w, q8.q6s, r0 + 2 * i, r0 + 2 * i + 1, q8.q6gpc, q8.q6gidx, q8.q6g0s,
                                p.qe, p.qo, p.sxl, p.nzl, 0, 0, 0)
            _put(mode, out, i, base + 2 * i, base + 2 * i + 1, ya, yb, st.bias)
else:
    @kernel()
    def _rows_q6_i8(mode, q8, r0, st, base, i0, i1, p, out):
        """Never called without an int8 dot (see `_rows_i8`)."""
        return


@compile_time_choice(_rows_q6_f32, _rows_q6_i8)
def _rows_q6(i8, mode, q8, r0, st, base, i0, i1, p, out):
    """`_rows_q6_f32` or `_rows_q6_i8` (i8 a compile-time constant)."""


@kernel(fastmath=FASTMATH_REDUCE)
def _rows_mixed(i8, mode, st, q8, tab, base, a, b, p, out):
    """Output pairs a .. b−1 of one block of stack st (STORE or ADD) where the pairs
    tab[1] .. tab[2]−1 are int8 rows of q8 from row tab[0] on (tab[0] = −1: none): the int4 pairs
    before and after them by `_rows`, theirs by the int8 row kernels, one pass each; tab[3] > 0: they
    are q6 rows of q8.q6w (quant_q6.py)."""
    if tab[0] < 0:
        _rows(i8, mode, st, base, 0, a, b, p, out)
        return
    p0, p1 = tab[1], tab[2]
    _rows(i8, mode, st, base, 0, a, min(b, p0), p, out)
    i0, i1 = max(a, p0), min(b, p1)
    if i0 < i1:
        if tab[3] > 0:                  # q6 rows (q8.q6w)
            _rows_q6(i8, mode, q8, tab[0] - 2 * p0, st, base, i0, i1, p, out)
        else:
            _rows_q8(i8, mode, q8, tab[0] - 2 * p0, st, base, i0, i1, p, out)
    _rows(i8, mode, st, base, 0, max(a, p1), b, p, out)


@kernel(fastmath=FASTMATH_REDUCE)
def _rows_gate_up_mixed(i8, st, q8, tab, base, F, a, b, p, gu, act):
    """Gate and up rows 2a .. 2b−1 of one block of the gate|up stack st whose gate or up (or both) are
    int8 rows of q8 (tab), and act[f] = silu(gate f)·(up f) for those f. SWIGLU pairs gate row f with
    up row f in one row-pair call, which takes two rows of one format; here they may be of two. So
    two passes of `_rows_mixed` (STORE: pairs of adjacent rows, int4 or int8, as in q|k|v): the gate
    pairs a .. b−1, then the up pairs F/2 + a .. F/2 + b − 1, into gu [2F]; then the product. The
    thread reads back only what it wrote: no barrier. F even (decode._stack_mixed: whole row pairs)."""
    h = F // 2
    _rows_mixed(i8, STORE, st, q8, tab, base, a, b, p, gu)                      # gate rows 2a .. 2b−1
    _rows_mixed(i8, STORE, st, q8, tab, base, h + a, h + b, p, gu)              # up rows F + 2a ..
    silu_mul_span(gu, F, 2 * a, 2 * b, act)


@kernel(fastmath=FASTMATH_REDUCE)
def silu_mul_span(gu, F, f0, f1, act):
    """act[f] = silu(gu[f])·gu[F + f] for f0 <= f < f1, 16 lanes at a time (v_exp), the rest one by one.
    Vectorised: a scalar e^x per output, outside the row loop that hides it under memory reads in
    SWIGLU, cost ~1 ns each. Not inlined: the single-stream and B-row steps call this one compiled code,
    so their rows stay bit-identical."""
    one, m1 = v_splat(np.float32(1.0)), v_splat(np.float32(-1.0))
    f16 = f1 - (f1 - f0) % LANES
    for f in range(f0, f16, LANES):
        g = v_load(gu, f)
        v_store(act, f, v_mul(v_div(g, v_fma(v_exp(v_mul(g, m1)), one, one)), v_load(gu, F + f)))
    for f in range(f16, f1):
        act[f] = _silu_mul(gu[f], gu[F + f])


@kernel()
def _share(n, t, T):
    """Thread t's part [a, b) of range(n) split evenly over T threads."""
    return n * t // T, n * (t + 1) // T


Q4_COST, Q8_COST = 5, 8      # a row pair's relative cost in `_share_mixed`: about its bytes (int4 g32 vs int8 g64)
Q6_COST = 6                  # q6 g64/g128: 6.1–6.25 bits (its unpacking makes it a little more)


@kernel()
def _share_mixed(n, t, T, tab):
    """`_share` of n row pairs where pairs tab[1] .. tab[2]−1 (tab[0] >= 0) are int8 rows, which cost
    Q8_COST to an int4 pair's Q4_COST: the split evens out the cost, not the count."""
    if tab[0] < 0:
        return _share(n, t, T)
    p0, p1 = tab[1], tab[2]
    cost = Q6_COST if tab[3] > 0 else Q8_COST
    total = Q4_COST * (n - (p1 - p0)) + cost * (p1 - p0)
    return _pair_at(total * t // T, p0, p1, cost), _pair_at(total * (t + 1) // T, p0, p1, cost)


@kernel(inline=True)
def _pair_at(c, p0, p1, cost):
    """The first pair whose cost before it reaches c (`_share_mixed`'s costs; monotone in c)."""
    c8 = Q4_COST * p0 + cost * (p1 - p0)             # the cost before pair p1
    if c <= Q4_COST * p0:
        return c // Q4_COST
    if c <= c8:
        return p0 + (c - Q4_COST * p0) // cost
    return p1 + (c - c8) // Q4_COST


# ----------------------------------------------------------------------------------------------
# The step


@kernel(fastmath=FASTMATH_REDUCE)
def _decode_thread(t, T, i8, x, pos, cos, sin, w, qkv_w, o_w, gate_up_w, down_w, qkv_q8, o_q8, gate_up_q8,
                   down_q8, q8_tab, kv, sh, sc):
    """Thread t of T: its share of every phase of every block, with a barrier after each phase.

    Shared (written by parts, read whole after a barrier): x, sh.qkv, sh.act, the cache.
    Private to the thread (row t of the scratch): h, att and the matvec prologue. Each thread
    normalises and prepares the whole input itself: cheaper than a barrier. The stacks' N:
    (H + 2 Hkv) Dh, D, 2F, D. qkv_q8, o_q8, gate_up_q8, down_q8 (Q8Stack): the int8 linears' rows,
    q8_tab [4, L, 3] where they go in each block (`_rows_mixed`); the int8 pairs are shared out by cost
    (`_share_mixed`), except gate|up's: a thread's gate rows and up rows are the same f, so each f costs
    the same and an even split of the pairs is even.
    """
    H, Hkv, Dh = w.n_heads, w.n_kv_heads, w.head_dim
    nq, nkv, half, F, D = H * Dh, Hkv * Dh, Dh // 2, sh.act.shape[0], x.shape[0]
    rep = H // Hkv
    n = pos + 1
    scale = np.float32(1.0 / np.sqrt(Dh))
    qkv, act, bar = sh.qkv, sh.act, sh.bar
    h, att = sc.h[t], sc.att[t]
    p = Prologue(sc.xe[t], sc.xo[t], sc.xs[t], sc.xsal[t], sc.xz[t], sc.qe[t], sc.qo[t], sc.sxl[t], sc.nzt[t],
                 sc.nzl[t])
    Na, Nu = qkv.shape[0], 2 * F                  # rows per block of the q|k|v and gate|up stacks
    k = 0                                         # barriers passed
    for l in range(w.attn_norm.shape[0]):
        # attention: h = norm(x); qkv = W h + b
        _rms_norm_vec(x, w.attn_norm[l], w.eps, h)
        _prologue(i8, h, qkv_w, l, p)
        a, b = _share_mixed(Na // 2, t, T, q8_tab[0, l])   # rows in pairs (N is even: heads × even Dh)
        _rows_mixed(i8, STORE, qkv_w, qkv_q8, q8_tab[0, l], l * Na, a, b, p, qkv)         # qkv = W h + b
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
                    kv.k[l, hk, pos, d] = qkv[nq + hk * Dh + d]
                    kv.v[l, hk, pos, d] = qkv[nq + nkv + hk * Dh + d]
        k = barrier(bar, k, T)
        # softmax(q·k) v: every head over this thread's share of the positions, then all the parts
        # joined by every thread into its own copy of the attention output
        j0, j1 = _share(n, t, T)
        for hk in range(Hkv):
            attend_part(qkv, hk, rep, Dh, kv.k[l, hk], kv.v[l, hk], j0, j1, scale, kv.scores,
                        sc.pm[t], sc.pl[t], sc.po[t])
        k = barrier(bar, k, T)
        merge_parts(T, H, Dh, sc.pm, sc.pl, sc.po, att)
        _prologue(i8, att, o_w, l, p)
        a, b = _share_mixed(D // 2, t, T, q8_tab[1, l])
        _rows_mixed(i8, ADD, o_w, o_q8, q8_tab[1, l], l * D, a, b, p, x)                   # x += Wo att
        k = barrier(bar, k, T)
        # MLP: h = norm(x); gate|up = W h; x += down(silu(gate) ⊙ up)
        _rms_norm_vec(x, w.mlp_norm[l], w.eps, h)
        _prologue(i8, h, gate_up_w, l, p)
        if q8_tab[2, l, 0] < 0:
            a, b = _share(F, t, T)               # gate row f and up row F+f together, SiLU fused in
            _rows(i8, SWIGLU, gate_up_w, l * Nu, F, a, b, p, act)
        else:                                    # int8 gate or up rows: in row pairs, two passes
            a, b = _share(F // 2, t, T)
            _rows_gate_up_mixed(i8, gate_up_w, gate_up_q8, q8_tab[2, l], l * Nu, F, a, b, p, sh.gu, act)
        k = barrier(bar, k, T)
        _prologue(i8, act, down_w, l, p)
        a, b = _share_mixed(D // 2, t, T, q8_tab[3, l])
        _rows_mixed(i8, ADD, down_w, down_q8, q8_tab[3, l], l * D, a, b, p, x)             # x += Wdown act
        k = barrier(bar, k, T)


def _entry(i8):
    """The step compiled for one activation kind, a constant here, so the kernels of the other kind
    are never compiled (policy.compile_time_choice). The thread index t is a uint64, the type the
    parallel region gives it: Numba types the body once before it makes the region and once inside,
    and with an int64 t there it compiled `_decode_thread` and every kernel that takes t a second
    time, for code that never runs (BENCHMARKS.md, "The first answer under 5 minutes")."""
    # ONE parallel region per token: T threads, each running `_decode_thread` (sync.py says why).
    @parallel_kernel()
    def decode_blocks(T, x, pos, cos, sin, w, qkv_w, o_w, gate_up_w, down_w, qkv_q8, o_q8, gate_up_q8, down_q8, q8_tab,
                      kv, sh, sc):
        for t in prange(np.uint64(T)):     # t typed as the parallel region types it: see `_entry`
            _decode_thread(t, T, i8, x, pos, cos, sin, w, qkv_w, o_w, gate_up_w, down_w, qkv_q8, o_q8, gate_up_q8,
                           down_q8, q8_tab, kv, sh, sc)
    return decode_blocks


F32, I8 = 0, 1                     # the activation kinds: float32, int8 (int8_dot.INT8_DOT)
ENTRIES = (_entry(F32), _entry(I8))


def decode_blocks(T, i8, *args):
    """decode_blocks(T, i8, x, pos, cos, sin, w, qkv_w, o_w, gate_up_w, down_w, qkv_q8, o_q8, gate_up_q8,
    down_q8, q8_tab, kv, sh, sc):
    x [D] float32 (modified in place) through all L blocks (w: Blocks; the linears: Q4Stack
    each, plus the int8 linears' rows: Q8Stack per kind and q8_tab [4, L, 3], `_rows_mixed`); writes the cache
    kv at `pos`. cos, sin: [Dh/2] at `pos`; i8: int8 activations (needs INT8_DOT) or float32 in the
    block matvecs, the entry point compiled for it (`ENTRIES`); T threads, each at most the scratch's P and
    running concurrently (sync.py); sh.bar zeroed."""
    ENTRIES[i8](T, *args)
