"""B decoded tokens (one per sequence, each at its own position) through every int4 block in ONE
compiled call: `decode_blocks_batch`, the B-row twin of decode_step.decode_blocks.

Why: a batched step that runs B rows through each linear's prefill matmul, one linear at a time
from Python (Model._blocks_batch, the general path), pays ~120 kernel dispatches and parallel
regions per step and a kernel built for prefill's many rows; at B = 8 it was barely faster than B
single-stream tokens (BENCHMARKS.md, "Batched decoding"). Here, as in `decode_blocks`, one parallel
region per step: each of the T threads runs its share of every phase and meets the others at a
spin barrier (sync.py). What is new is the row kernels: a thread's share of a linear is a range of
row pairs, and each pair meets all B activation rows while its weights are in L1, so the weights
of a step are read from memory once for all B tokens (`_rows_batch`).

Per block l, for every row b (x: [B, D], float32):
    h[b]   = rms_norm(x[b]) ⊙ attn_norm[l]            (the thread that owns row b: b ≡ t mod T)
    qkv[b] = Wqkv[l] h[b] (+ bias)                      (threads split the row pairs; all B rows)
    RoPE of q and k heads at pos[b]; k, v into slot slots[b] of the pool at pos[b]
    attention of row b over positions 0..pos[b] of its slot (threads split each row's positions,
    as decode_blocks does; the owner of row b merges the parts)
    x[b] += Wo[l] att[b];  h[b] = rms_norm(x[b]) ⊙ mlp_norm[l]
    act[b] = silu(gate) ⊙ up of Wgu[l] h[b];  x[b] += Wdown[l] act[b]
Each row meets the arithmetic of its single-stream step: the same prologue (`quantize_vec` or
`split_x`, plus `q8_lane_zero` where a block has int8 rows), the same row-pair function body
(`dot2_q4_i8` / `dot2_q4_f32`, and for the int8 block linears (quantize --int8, decode.stack_q8)
`dot2_q8_i8` / `dot2_q8_f32`, here reading row b of the prologue buffers by offset), the same
attention parts split at the same positions for the same T, the same merge. So a row's logits are
the single-stream ones bit for bit (tests/test_batch.py, test_batch_step_rows_are_single_stream_bit_for_bit:
int4 and int4 + int8 folders, int8 and float32 activations; with fastmath's reassociation allowed this
holds because LLVM emits the same code for the same bodies, which is what that test watches).

Records: the stacks (Q4Stack), the int8 rows (Q8Stack, q8_tab) and Blocks of decode_step; the pool
(kp, vp [slots, L, Hkv, S, Dh]); BatchShared (every thread reads, parts written by each) and
BatchScratch (row t for thread t).
"""
from __future__ import annotations

from collections import namedtuple

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic, models, register_model

from .decode_step import (
    ADD,
    F32,
    I8,
    STORE,
    SWIGLU,
    _pair,
    _rms_norm_vec,
    _share,
    attend_part,
    merge_parts,
    silu_mul_span,
)
from .int8_dot import INT8_DOT, dpbusd
from .policy import FASTMATH_REDUCE, compile_time_choice, kernel, parallel_kernel
from .quant_f32 import split_x
from .quant_i8_matmul import i32x16
from .quant_i8_matvec import (
    _VB,
    _VI32,
    CHUNK,
    CHUNK_CHANNELS,
    _intp,
    _mask,
    _masked_load,
    q8_lane_zero,
    quantize_vec,
    salient_x,
)
from .quant_q6 import dot2_q6_f32
from .simd import (
    LANES,
    _elem_ptr,
    as_f32,
    fma32,
    prefetch,
    v_fma,
    v_hsum,
    v_load,
    v_load_i8,
    v_load_u8,
    v_mul,
    v_splat,
    v_unpack_q4,
    v_zeros,
)
from .sync import barrier, claim

if INT8_DOT:
    from .quant_i8_matvec import _lane_scales, v_dot_q4_i8, v_i2f, v_load_part, v_load_part_u8
    from .quant_q6 import dot2_q6_i8, dot2x4_q6_i8

class U8x64Type(types.Type):
    def __init__(self):
        super().__init__(name="U8x64")


u8x64 = U8x64Type()          # 64 unsigned bytes (one zmm): nibbles, the unsigned operand of int8_dot.dpbusd


@register_model(U8x64Type)
class _U8x64Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VB)


@intrinsic
def v_nibbles(typingctx, w, w_off, n):
    """The 64 packed bytes w.flat[w_off : w_off+64] (bytes past n read as 0) split into (low
    nibbles, high nibbles): the first half of quant_i8_matvec.v_dot_q4_i8, kept for several rows."""
    def codegen(context, builder, sig, args):
        w_t, woff_t, n_t = sig.args
        mask = _mask(builder, _intp(context, builder, args[2], n_t), CHUNK)
        v = _masked_load(builder, _elem_ptr(context, builder, w_t, args[0], woff_t, args[1], _VB), mask, _VB)
        lo = builder.and_(v, ir.Constant(_VB, [15] * CHUNK))
        hi = builder.and_(builder.lshr(v, ir.Constant(_VB, [4] * CHUNK)), ir.Constant(_VB, [15] * CHUNK))
        return context.make_tuple(builder, sig.return_type, [lo, hi])
    return types.UniTuple(u8x64, 2)(w, w_off, n), codegen


@intrinsic
def v_q8_bytes(typingctx, w, e_off, o_off, n):
    """The even and odd channels' bytes of a chunk of int8 rows (quant_i8_matvec.q8_rows):
    w.flat[e_off : e_off+n] and w.flat[o_off : o_off+n], bytes past n read as 0. The loads of
    quant_i8_matvec.v_dot_q8_i8, kept for several activation rows (`v_dot_bytes` does its dots:
    the same two dots on the same operands)."""
    def codegen(context, builder, sig, args):
        w_t, eoff_t, ooff_t, n_t = sig.args
        mask = _mask(builder, _intp(context, builder, args[3], n_t), CHUNK)
        we = _masked_load(builder, _elem_ptr(context, builder, w_t, args[0], eoff_t, args[1], _VB), mask, _VB)
        wo = _masked_load(builder, _elem_ptr(context, builder, w_t, args[0], ooff_t, args[2], _VB), mask, _VB)
        return context.make_tuple(builder, sig.return_type, [we, wo])
    return types.UniTuple(u8x64, 2)(w, e_off, o_off, n), codegen


def _v_dot_bytes(u_max, doc):
    def v_dot(typingctx, lo, hi, qe, qo, x_off):
        def codegen(context, builder, sig, args):
            _, _, qe_t, qo_t, xoff_t = sig.args
            xe = builder.load(_elem_ptr(context, builder, qe_t, args[2], xoff_t, args[4], _VB), align=1)
            xo = builder.load(_elem_ptr(context, builder, qo_t, args[3], xoff_t, args[4], _VB), align=1)
            acc = dpbusd(builder, ir.Constant(_VI32, [0] * LANES), args[0], xe, u_max)
            return dpbusd(builder, acc, args[1], xo, u_max)
        return i32x16(lo, hi, qe, qo, x_off), codegen
    v_dot.__name__ = "v_dot_nibbles" if u_max < 16 else "v_dot_bytes"
    v_dot.__doc__ = doc
    return intrinsic(v_dot)


v_dot_nibbles = _v_dot_bytes(15, """The second half of v_dot_q4_i8: lane i = the integer dot of channel octet i of the
    chunk (lo, hi from `v_nibbles`) with the int8 activations qe.flat[x_off : +64], qo.flat[x_off : +64].""")
v_dot_bytes = _v_dot_bytes(255, """`v_dot_nibbles` for the bytes of int8 rows (`v_q8_bytes`: codes + 128, up to 255;
    int8_dot.dpbusd's wider case on AVX2).""")


# Shapes: B rows (sequences), P the most threads, K the largest linear input, m16 salient channels.
BatchShared = namedtuple("BatchShared", [
    "qkv",          # float32 [B, (H + 2 Hkv) Dh]
    "act",          # float32 [B, F]          silu(gate) ⊙ up
    "gu",           # float32 [B, 2F]         gate | up before the product, in blocks with int8 gate or up rows
    "bar",          # int64   [8]             barrier counter, zeroed before each call
    "work",         # int64   [L·WORK_PHASES·8] claim counters of the linears' chunks, zeroed before each call
    # each row's matvec prologue (written by the row's owner, read by every thread after a barrier):
    "xe", "xo",     # float32 [B, K/2]        float32 activations (quant_f32.split_x)
    "xs",           # float32 [B, K/32]
    "xsal",         # float32 [B, m16]
    "xz",           # float32 [B, K]          int8 activations (quant_i8_matvec.quantize_vec)
    "qe", "qo",     # int8    [B, K/2 ↑ 64]
    "sxl",          # float32 [B, K/8 ↑ 16]
    "nzt",          # float32 [B, G ↑ 16]
    "nzl",          # float32 [B, K/8 ↑ 16]   the int8 rows' −128 · lane sums (quant_i8_matvec.q8_lane_zero)
    "pm", "pl",     # float32 [B, P, H]       each thread's part of each row's attention
    "po",           # float32 [B, P, H, Dh]
])
BatchScratch = namedtuple("BatchScratch", [
    "h",            # float32 [P, D]          a normed input
    "att",          # float32 [P, H Dh]       a merged attention output
    "scores",       # float32 [P, H, S]       attention scores
])


# ----------------------------------------------------------------------------------------------
# Row-pair functions with the activations of row b (offsets into [B, ·] prologue buffers): the
# bodies of quant_f32.dot2_q4_f32 and quant_i8_matvec.dot2_q4_i8 with every activation read
# shifted to row b. Inlined (policy.kernel), rows by offset, never sliced.


@kernel(fastmath=FASTMATH_REDUCE, inline=True)
def _dot2_q4_f32_at(qw, sc, z, sw, ra, rb, group_size, xe, xo, xs, xsal, b):
    """dot2_q4_f32 of rows ra, rb with row b of the float32 prologue (xe, xo [B, ·], xs, xsal)."""
    half, G, m16 = qw.shape[-1], sc.shape[-1], sw.shape[-1]
    h = group_size // 2
    wa, wb = ra * half, rb * half
    ox, osal = b * xe.shape[1], b * xsal.shape[1]
    acc_a, acc_a2, acc_b, acc_b2 = v_zeros(), v_zeros(), v_zeros(), v_zeros()
    zt_a = np.float32(0.0)
    zt_b = np.float32(0.0)
    for g in range(G):
        da, ea, db, eb = v_zeros(), v_zeros(), v_zeros(), v_zeros()
        for o in range(g * h, g * h + h, LANES):
            x_e = v_load(xe, ox + o)
            x_o = v_load(xo, ox + o)
            lo, hi = v_unpack_q4(qw, wa + o)
            da = v_fma(lo, x_e, da)
            ea = v_fma(hi, x_o, ea)
            lo, hi = v_unpack_q4(qw, wb + o)
            db = v_fma(lo, x_e, db)
            eb = v_fma(hi, x_o, eb)
        s_a, s_b = as_f32(sc[ra, g]), as_f32(sc[rb, g])
        va, vb = v_splat(s_a), v_splat(s_b)
        acc_a = v_fma(va, da, acc_a)
        acc_a2 = v_fma(va, ea, acc_a2)
        acc_b = v_fma(vb, db, acc_b)
        acc_b2 = v_fma(vb, eb, acc_b2)
        zt_a = fma32(s_a * np.float32(z[ra, g]), xs[b, g], zt_a)     # this order in every kernel (simd.fma32)
        zt_b = fma32(s_b * np.float32(z[rb, g]), xs[b, g], zt_b)
    for i in range(0, m16, LANES):
        x_s = v_load(xsal, osal + i)
        acc_a = v_fma(v_load(sw, ra * m16 + i), x_s, acc_a)
        acc_b = v_fma(v_load(sw, rb * m16 + i), x_s, acc_b)
    return v_hsum(acc_a) + v_hsum(acc_a2) - zt_a, v_hsum(acc_b) + v_hsum(acc_b2) - zt_b


if INT8_DOT:
    @kernel(fastmath=FASTMATH_REDUCE, inline=True)
    def _dot2_q4_i8_at(qw, sc, z, sw, ra, rb, gpc, gidx, g0s, qe, qo, sxl, nzt, xsal, b):
        """dot2_q4_i8 of rows ra, rb with row b of the int8 prologue (qe, qo, sxl, nzt, xsal [B, ·])."""
        nbytes, G, m16 = qw.shape[-1], sc.shape[-1], sw.shape[-1]
        wa, wb = ra * nbytes, rb * nbytes
        oq, osx, oz, osal = b * qe.shape[1], b * sxl.shape[1], b * nzt.shape[1], b * xsal.shape[1]
        acc_a, acc_b = v_zeros(), v_zeros()
        for c in range(g0s.shape[0]):
            o = c * CHUNK
            da = v_dot_q4_i8(qw, wa + o, nbytes - o, qe, qo, oq + o)
            db = v_dot_q4_i8(qw, wb + o, nbytes - o, qe, qo, oq + o)
            g0 = g0s[c]
            sx = v_load(sxl, osx + c * LANES)
            acc_a = v_fma(v_i2f(da), v_mul(_lane_scales(sc, ra, g0, gpc, gidx, G), sx), acc_a)
            acc_b = v_fma(v_i2f(db), v_mul(_lane_scales(sc, rb, g0, gpc, gidx, G), sx), acc_b)
        for g0 in range(0, G, LANES):
            zt = v_load(nzt, oz + g0)
            acc_a = v_fma(v_mul(v_load_part(sc, ra * G + g0, G - g0), v_load_part_u8(z, ra * G + g0, G - g0)), zt,
                          acc_a)
            acc_b = v_fma(v_mul(v_load_part(sc, rb * G + g0, G - g0), v_load_part_u8(z, rb * G + g0, G - g0)), zt,
                          acc_b)
        for i in range(0, m16, LANES):
            xs = v_load(xsal, osal + i)
            acc_a = v_fma(v_load(sw, ra * m16 + i), xs, acc_a)
            acc_b = v_fma(v_load(sw, rb * m16 + i), xs, acc_b)
        return v_hsum(acc_a), v_hsum(acc_b)


if INT8_DOT:
    @kernel(fastmath=FASTMATH_REDUCE, inline=True)
    def _tail_i8(acc, sc, z, sw, r, nzt, oz, xsal, osal):
        """The end of dot2_q4_i8 for one row r and one activation row: zero points, salient, sum."""
        G, m16 = sc.shape[-1], sw.shape[-1]
        for g0 in range(0, G, LANES):
            acc = v_fma(v_mul(v_load_part(sc, r * G + g0, G - g0), v_load_part_u8(z, r * G + g0, G - g0)),
                        v_load(nzt, oz + g0), acc)
        for i in range(0, m16, LANES):
            acc = v_fma(v_load(sw, r * m16 + i), v_load(xsal, osal + i), acc)
        return v_hsum(acc)

    @kernel(fastmath=FASTMATH_REDUCE, inline=True)
    def _dot2x4_q4_i8_at(qw, sc, z, sw, ra, rb, gpc, gidx, g0s, qe, qo, sxl, nzt, xsal, b0, b1, b2, b3):
        """dot2_q4_i8 of rows ra, rb with the activation rows b0..b3 at once: each chunk of the two
        weight rows is loaded and split into nibbles once, then meets the four rows (8 accumulators
        in registers). Per (weight row, activation row) the operations and their order are
        dot2_q4_i8's. Returns (ra·b0, rb·b0, ra·b1, rb·b1, ..., rb·b3)."""
        nbytes, G = qw.shape[-1], sc.shape[-1]
        wa, wb = ra * nbytes, rb * nbytes
        Sq, Ss = qe.shape[1], sxl.shape[1]
        a0, a1, a2, a3 = v_zeros(), v_zeros(), v_zeros(), v_zeros()
        c0, c1, c2, c3 = v_zeros(), v_zeros(), v_zeros(), v_zeros()
        for c in range(g0s.shape[0]):
            o = c * CHUNK
            la, ha = v_nibbles(qw, wa + o, nbytes - o)
            lb, hb = v_nibbles(qw, wb + o, nbytes - o)
            g0 = g0s[c]
            swa = _lane_scales(sc, ra, g0, gpc, gidx, G)
            swb = _lane_scales(sc, rb, g0, gpc, gidx, G)
            cs = c * LANES
            sx = v_load(sxl, b0 * Ss + cs)
            a0 = v_fma(v_i2f(v_dot_nibbles(la, ha, qe, qo, b0 * Sq + o)), v_mul(swa, sx), a0)
            c0 = v_fma(v_i2f(v_dot_nibbles(lb, hb, qe, qo, b0 * Sq + o)), v_mul(swb, sx), c0)
            sx = v_load(sxl, b1 * Ss + cs)
            a1 = v_fma(v_i2f(v_dot_nibbles(la, ha, qe, qo, b1 * Sq + o)), v_mul(swa, sx), a1)
            c1 = v_fma(v_i2f(v_dot_nibbles(lb, hb, qe, qo, b1 * Sq + o)), v_mul(swb, sx), c1)
            sx = v_load(sxl, b2 * Ss + cs)
            a2 = v_fma(v_i2f(v_dot_nibbles(la, ha, qe, qo, b2 * Sq + o)), v_mul(swa, sx), a2)
            c2 = v_fma(v_i2f(v_dot_nibbles(lb, hb, qe, qo, b2 * Sq + o)), v_mul(swb, sx), c2)
            sx = v_load(sxl, b3 * Ss + cs)
            a3 = v_fma(v_i2f(v_dot_nibbles(la, ha, qe, qo, b3 * Sq + o)), v_mul(swa, sx), a3)
            c3 = v_fma(v_i2f(v_dot_nibbles(lb, hb, qe, qo, b3 * Sq + o)), v_mul(swb, sx), c3)
        Sz, Sl = nzt.shape[1], xsal.shape[1]
        return (_tail_i8(a0, sc, z, sw, ra, nzt, b0 * Sz, xsal, b0 * Sl),
                _tail_i8(c0, sc, z, sw, rb, nzt, b0 * Sz, xsal, b0 * Sl),
                _tail_i8(a1, sc, z, sw, ra, nzt, b1 * Sz, xsal, b1 * Sl),
                _tail_i8(c1, sc, z, sw, rb, nzt, b1 * Sz, xsal, b1 * Sl),
                _tail_i8(a2, sc, z, sw, ra, nzt, b2 * Sz, xsal, b2 * Sl),
                _tail_i8(c2, sc, z, sw, rb, nzt, b2 * Sz, xsal, b2 * Sl),
                _tail_i8(a3, sc, z, sw, ra, nzt, b3 * Sz, xsal, b3 * Sl),
                _tail_i8(c3, sc, z, sw, rb, nzt, b3 * Sz, xsal, b3 * Sl))


@kernel(fastmath=FASTMATH_REDUCE, inline=True)
def _dot2_q8_f32_at(qw, sc, ra, rb, group_size, xe, xo, b):
    """quant_f32.dot2_q8_f32 of int8 rows ra, rb (q8_rows) with row b of the float32 prologue (xe, xo [B, ·])."""
    K = qw.shape[-1]
    wa, wb = ra * K, rb * K
    ox = b * xe.shape[1]
    ones, m128 = v_splat(np.float32(1.0)), v_splat(np.float32(-128.0))
    acc_a, acc_b = v_zeros(), v_zeros()
    da, db, cx = v_zeros(), v_zeros(), v_zeros()
    for k0 in range(0, K, 32):
        c0 = k0 - k0 % 128                          # the chunk's first channel (and byte)
        e = c0 + (k0 - c0) // 2                     # the 16 even channels' bytes; the odd ones n later
        n = min(64, (K - c0) // 2)
        x_e, x_o = v_load(xe, ox + k0 // 2), v_load(xo, ox + k0 // 2)
        cx = v_fma(x_e, ones, v_fma(x_o, ones, cx))
        da = v_fma(v_load_u8(qw, wa + e), x_e, v_fma(v_load_u8(qw, wa + e + n), x_o, da))
        db = v_fma(v_load_u8(qw, wb + e), x_e, v_fma(v_load_u8(qw, wb + e + n), x_o, db))
        if (k0 + 32) % group_size == 0:
            g = k0 // group_size
            acc_a = v_fma(v_splat(as_f32(sc[ra, g])), v_fma(cx, m128, da), acc_a)
            acc_b = v_fma(v_splat(as_f32(sc[rb, g])), v_fma(cx, m128, db), acc_b)
            da, db, cx = v_zeros(), v_zeros(), v_zeros()
    return v_hsum(acc_a), v_hsum(acc_b)


if INT8_DOT:
    @kernel(fastmath=FASTMATH_REDUCE, inline=True)
    def _dot2_q8_i8_at(qw, sc, ra, rb, gpc, gidx, g0s, qe, qo, sxl, nzl, b):
        """quant_i8_matvec.dot2_q8_i8 of int8 rows ra, rb with row b of the int8 prologue
        (qe, qo, sxl, nzl [B, ·])."""
        K, G = qw.shape[-1], sc.shape[-1]
        wa, wb = ra * K, rb * K
        oq, osx, onz = b * qe.shape[1], b * sxl.shape[1], b * nzl.shape[1]
        acc_a, acc_b = v_zeros(), v_zeros()
        for c in range(g0s.shape[0]):
            o = c * CHUNK_CHANNELS
            n = min(CHUNK, (K - o) // 2)
            ea, oa = v_q8_bytes(qw, wa + o, wa + o + n, n)
            eb, ob = v_q8_bytes(qw, wb + o, wb + o + n, n)
            da = v_dot_bytes(ea, oa, qe, qo, oq + c * CHUNK)
            db = v_dot_bytes(eb, ob, qe, qo, oq + c * CHUNK)
            g0 = g0s[c]
            sx, nz = v_load(sxl, osx + c * LANES), v_load(nzl, onz + c * LANES)
            acc_a = v_fma(v_fma(v_i2f(da), sx, nz), _lane_scales(sc, ra, g0, gpc, gidx, G), acc_a)
            acc_b = v_fma(v_fma(v_i2f(db), sx, nz), _lane_scales(sc, rb, g0, gpc, gidx, G), acc_b)
        return v_hsum(acc_a), v_hsum(acc_b)

    @kernel(fastmath=FASTMATH_REDUCE, inline=True)
    def _dot2x4_q8_i8_at(qw, sc, ra, rb, gpc, gidx, g0s, qe, qo, sxl, nzl, b0, b1, b2, b3):
        """`_dot2_q8_i8_at` for the activation rows b0..b3 at once: each chunk of the two weight rows
        is loaded once, then meets the four rows (8 accumulators in registers). Per (weight row,
        activation row) the operations and their order are dot2_q8_i8's. Returns (ra·b0, rb·b0,
        ra·b1, rb·b1, ..., rb·b3)."""
        K, G = qw.shape[-1], sc.shape[-1]
        wa, wb = ra * K, rb * K
        Sq, Ss, Sn = qe.shape[1], sxl.shape[1], nzl.shape[1]
        a0, a1, a2, a3 = v_zeros(), v_zeros(), v_zeros(), v_zeros()
        c0, c1, c2, c3 = v_zeros(), v_zeros(), v_zeros(), v_zeros()
        for c in range(g0s.shape[0]):
            o = c * CHUNK_CHANNELS
            n = min(CHUNK, (K - o) // 2)
            ea, oa = v_q8_bytes(qw, wa + o, wa + o + n, n)
            eb, ob = v_q8_bytes(qw, wb + o, wb + o + n, n)
            g0 = g0s[c]
            swa = _lane_scales(sc, ra, g0, gpc, gidx, G)
            swb = _lane_scales(sc, rb, g0, gpc, gidx, G)
            cs, xq = c * LANES, c * CHUNK
            sx, nz = v_load(sxl, b0 * Ss + cs), v_load(nzl, b0 * Sn + cs)
            a0 = v_fma(v_fma(v_i2f(v_dot_bytes(ea, oa, qe, qo, b0 * Sq + xq)), sx, nz), swa, a0)
            c0 = v_fma(v_fma(v_i2f(v_dot_bytes(eb, ob, qe, qo, b0 * Sq + xq)), sx, nz), swb, c0)
            sx, nz = v_load(sxl, b1 * Ss + cs), v_load(nzl, b1 * Sn + cs)
            a1 = v_fma(v_fma(v_i2f(v_dot_bytes(ea, oa, qe, qo, b1 * Sq + xq)), sx, nz), swa, a1)
            c1 = v_fma(v_fma(v_i2f(v_dot_bytes(eb, ob, qe, qo, b1 * Sq + xq)), sx, nz), swb, c1)
            sx, nz = v_load(sxl, b2 * Ss + cs), v_load(nzl, b2 * Sn + cs)
            a2 = v_fma(v_fma(v_i2f(v_dot_bytes(ea, oa, qe, qo, b2 * Sq + xq)), sx, nz), swa, a2)
            c2 = v_fma(v_fma(v_i2f(v_dot_bytes(eb, ob, qe, qo, b2 * Sq + xq)), sx, nz), swb, c2)
            sx, nz = v_load(sxl, b3 * Ss + cs), v_load(nzl, b3 * Sn + cs)
            a3 = v_fma(v_fma(v_i2f(v_dot_bytes(ea, oa, qe, qo, b3 * Sq + xq)), sx, nz), swa, a3)
            c3 = v_fma(v_fma(v_i2f(v_dot_bytes(eb, ob, qe, qo, b3 * Sq + xq)), sx, nz), swb, c3)
        return (v_hsum(a0), v_hsum(c0), v_hsum(a1), v_hsum(c1), v_hsum(a2), v_hsum(c2), v_hsum(a3), v_hsum(c3))


PREFETCH_PAIRS = 4   # the row kernels ask for the weight rows this many pairs ahead (simd.prefetch)


@kernel(inline=True)
def _prefetch_row(w, r):
    """Row r of w [rows, n] (a stack's merged axes) on its way to the cache."""
    n = w.shape[-1]
    for o in range(0, n, 64):
        prefetch(w, r * n + o)


@kernel(fastmath=FASTMATH_REDUCE, inline=True)
def _put_at(mode, out, b, i, ra, rb, ya, yb, bias):
    """decode_step._put into row b of out [B, ·]."""
    if mode == SWIGLU:
        out[b, i] = ya / (np.float32(1.0) + np.exp(-ya)) * yb
    elif mode == ADD:
        out[b, 2 * i] += ya
        out[b, 2 * i + 1] += yb
    else:
        out[b, 2 * i] = ya + bias[ra]
        out[b, 2 * i + 1] = yb + bias[rb]


@kernel(fastmath=FASTMATH_REDUCE)
def _rows_batch_f32(mode, st, base, up, i0, i1, sh, out):
    """Row pairs i0 .. i1−1 of stack st for every row b of out [B, ·] (float32 prologue): each pair's
    weights come from memory for b = 0 and from L1 for the other rows."""
    for i in range(i0, i1):
        ra, rb = _pair(mode, base, up, i)
        for b in range(out.shape[0]):
            ya, yb = _dot2_q4_f32_at(st.qweight, st.scales, st.zeros, st.sal_w, ra, rb, st.group_size,
                                     sh.xe, sh.xo, sh.xs, sh.xsal, b)
            _put_at(mode, out, b, i, ra, rb, ya, yb, st.bias)


if INT8_DOT:
    @kernel(fastmath=FASTMATH_REDUCE)
    def _rows_batch_i8_naive(mode, st, base, up, i0, i1, sh, out):
        """`_rows_batch_f32` with int8 activations (separate: `v_dot_q4_i8` compiles only with an int8 dot)."""
        for i in range(i0, i1):
            ra, rb = _pair(mode, base, up, i)
            for b in range(out.shape[0]):
                ya, yb = _dot2_q4_i8_at(st.qweight, st.scales, st.zeros, st.sal_w, ra, rb, st.gpc, st.gidx,
                                        st.g0s, sh.qe, sh.qo, sh.sxl, sh.nzt, sh.xsal, b)
                _put_at(mode, out, b, i, ra, rb, ya, yb, st.bias)

    @kernel(fastmath=FASTMATH_REDUCE)
    def _rows_batch_i8(mode, st, base, up, i0, i1, sh, out):
        """`_rows_batch_f32` with int8 activations, four activation rows per pass (`_dot2x4_q4_i8_at`;
        a short last tile repeats row B − 1 and drops its results). Separate from the float32
        kernel: the int8 dot compiles only for a target that has one (int8_dot.INT8_DOT)."""
        B = out.shape[0]
        for i in range(i0, i1):
            ra, rb = _pair(mode, base, up, i)
            pa, pb = _pair(mode, base, up, i + PREFETCH_PAIRS)
            _prefetch_row(st.qweight, pa)
            _prefetch_row(st.qweight, pb)
            for b0 in range(0, B, 4):
                y = _dot2x4_q4_i8_at(st.qweight, st.scales, st.zeros, st.sal_w, ra, rb, st.gpc, st.gidx, st.g0s,
                                     sh.qe, sh.qo, sh.sxl, sh.nzt, sh.xsal,
                                     b0, min(b0 + 1, B - 1), min(b0 + 2, B - 1), min(b0 + 3, B - 1))
                _put_at(mode, out, b0, i, ra, rb, y[0], y[1], st.bias)
                if b0 + 1 < B:
                    _put_at(mode, out, b0 + 1, i, ra, rb, y[2], y[3], st.bias)
                if b0 + 2 < B:
                    _put_at(mode, out, b0 + 2, i, ra, rb, y[4], y[5], st.bias)
                if b0 + 3 < B:
                    _put_at(mode, out, b0 + 3, i, ra, rb, y[6], y[7], st.bias)
else:
    @kernel()
    def _rows_batch_i8(mode, st, base, up, i0, i1, sh, out):
        """Never called without an int8 dot (i8 is False there); typed by `_rows_batch`'s branch."""
        return

    _rows_batch_i8_naive = _rows_batch_i8


@compile_time_choice(_rows_batch_f32, _rows_batch_i8, _rows_batch_i8_naive)
def _rows_batch(i8, mode, st, base, up, i0, i1, sh, out):
    """Row pairs i0 .. i1−1 of stack st for every row of out, by the row kernel of activation kind i8
    (F32, I8, I8_PER_ROW: a compile-time constant, policy.compile_time_choice)."""


@kernel(fastmath=FASTMATH_REDUCE)
def _rows_batch_q8_f32(mode, q8, r0, st, base, i0, i1, sh, out):
    """Output pairs i0 .. i1−1 of every row b of out [B, ·] from int8 rows r0 + 2i, r0 + 2i + 1 of q8
    (float32 prologue); the bias from the int4 stack's rows (base + 2i, ...), as decode_step._rows_q8_f32."""
    for i in range(i0, i1):
        ra, rb = r0 + 2 * i, r0 + 2 * i + 1
        for b in range(out.shape[0]):
            ya, yb = _dot2_q8_f32_at(q8.qweight, q8.scales, ra, rb, q8.group_size, sh.xe, sh.xo, b)
            _put_at(mode, out, b, i, base + 2 * i, base + 2 * i + 1, ya, yb, st.bias)


if INT8_DOT:
    @kernel(fastmath=FASTMATH_REDUCE)
    def _rows_batch_q8_i8_naive(mode, q8, r0, st, base, i0, i1, sh, out):
        """`_rows_batch_q8_f32` with int8 activations (prologue `quantize_vec`, then `q8_lane_zero`),
        one activation row per pass."""
        for i in range(i0, i1):
            ra, rb = r0 + 2 * i, r0 + 2 * i + 1
            for b in range(out.shape[0]):
                ya, yb = _dot2_q8_i8_at(q8.qweight, q8.scales, ra, rb, q8.gpc, q8.gidx, q8.g0s,
                                        sh.qe, sh.qo, sh.sxl, sh.nzl, b)
                _put_at(mode, out, b, i, base + 2 * i, base + 2 * i + 1, ya, yb, st.bias)

    @kernel(fastmath=FASTMATH_REDUCE)
    def _rows_batch_q8_i8(mode, q8, r0, st, base, i0, i1, sh, out):
        """`_rows_batch_q8_i8_naive` four activation rows per pass (`_dot2x4_q8_i8_at`; a short last
        tile repeats row B − 1 and drops its results)."""
        B = out.shape[0]
        for i in range(i0, i1):
            ra, rb = r0 + 2 * i, r0 + 2 * i + 1
            sa, sb = base + 2 * i, base + 2 * i + 1
            _prefetch_row(q8.qweight, ra + 2 * PREFETCH_PAIRS)
            _prefetch_row(q8.qweight, rb + 2 * PREFETCH_PAIRS)
            for b0 in range(0, B, 4):
                y = _dot2x4_q8_i8_at(q8.qweight, q8.scales, ra, rb, q8.gpc, q8.gidx, q8.g0s,
                                     sh.qe, sh.qo, sh.sxl, sh.nzl,
                                     b0, min(b0 + 1, B - 1), min(b0 + 2, B - 1), min(b0 + 3, B - 1))
                _put_at(mode, out, b0, i, sa, sb, y[0], y[1], st.bias)
                if b0 + 1 < B:
                    _put_at(mode, out, b0 + 1, i, sa, sb, y[2], y[3], st.bias)
                if b0 + 2 < B:
                    _put_at(mode, out, b0 + 2, i, sa, sb, y[4], y[5], st.bias)
                if b0 + 3 < B:
                    _put_at(mode, out, b0 + 3, i, sa, sb, y[6], y[7], st.bias)
else:
    @kernel()
    def _rows_batch_q8_i8(mode, q8, r0, st, base, i0, i1, sh, out):
        """Never called without an int8 dot (i8 is False there); typed by `_rows_batch_mixed`'s branch."""
        return

    _rows_batch_q8_i8_naive = _rows_batch_q8_i8


@compile_time_choice(_rows_batch_q8_f32, _rows_batch_q8_i8, _rows_batch_q8_i8_naive)
def _rows_batch_q8(i8, mode, q8, r0, st, base, i0, i1, sh, out):
    """The int8 rows' kernel of activation kind i8 (a compile-time constant)."""


@kernel(fastmath=FASTMATH_REDUCE)
def _rows_batch_q6_f32(mode, q8, r0, st, base, i0, i1, sh, out):
    """`_rows_batch_q8_f32` for q6 rows (q8.q6w, quant_q6.dot2_q6_f32)."""
    S = sh.xe.shape[1]
    for i in range(i0, i1):
        ra, rb = r0 + 2 * i, r0 + 2 * i + 1
        for b in range(out.shape[0]):
            ya, yb = dot2_q6_f32(q8.q6w, q8.q6s, ra, rb, q8.q6g, sh.xe, sh.xo, b * S)
            _put_at(mode, out, b, i, base + 2 * i, base + 2 * i + 1, ya, yb, st.bias)


if INT8_DOT:
    @kernel(fastmath=FASTMATH_REDUCE)
    def _rows_batch_q6_i8_naive(mode, q8, r0, st, base, i0, i1, sh, out):
        """`_rows_batch_q8_i8_naive` for q6 rows (quant_q6.dot2_q6_i8), one activation row per pass."""
        Sq, Ss, Sn = sh.qe.shape[1], sh.sxl.shape[1], sh.nzl.shape[1]
        for i in range(i0, i1):
            ra, rb = r0 + 2 * i, r0 + 2 * i + 1
            for b in range(out.shape[0]):
                ya, yb = dot2_q6_i8(q8.q6w, q8.q6s, ra, rb, q8.q6gpc, q8.q6gidx, q8.q6g0s,
                                    sh.qe, sh.qo, sh.sxl, sh.nzl, b * Sq, b * Ss, b * Sn)
                _put_at(mode, out, b, i, base + 2 * i, base + 2 * i + 1, ya, yb, st.bias)

    @kernel(fastmath=FASTMATH_REDUCE)
    def _rows_batch_q6_i8(mode, q8, r0, st, base, i0, i1, sh, out):
        """`_rows_batch_q8_i8` for q6 rows (quant_q6.dot2x4_q6_i8): four activation rows per pass."""
        B = out.shape[0]
        for i in range(i0, i1):
            ra, rb = r0 + 2 * i, r0 + 2 * i + 1
            sa, sb = base + 2 * i, base + 2 * i + 1
            _prefetch_row(q8.q6w, ra + 2 * PREFETCH_PAIRS)
            _prefetch_row(q8.q6w, rb + 2 * PREFETCH_PAIRS)
            for b0 in range(0, B, 4):
                y = dot2x4_q6_i8(q8.q6w, q8.q6s, ra, rb, q8.q6gpc, q8.q6gidx, q8.q6g0s,
                                 sh.qe, sh.qo, sh.sxl, sh.nzl,
                                 b0, min(b0 + 1, B - 1), min(b0 + 2, B - 1), min(b0 + 3, B - 1))
                _put_at(mode, out, b0, i, sa, sb, y[0], y[1], st.bias)
                if b0 + 1 < B:
                    _put_at(mode, out, b0 + 1, i, sa, sb, y[2], y[3], st.bias)
                if b0 + 2 < B:
                    _put_at(mode, out, b0 + 2, i, sa, sb, y[4], y[5], st.bias)
                if b0 + 3 < B:
                    _put_at(mode, out, b0 + 3, i, sa, sb, y[6], y[7], st.bias)
else:
    @kernel()
    def _rows_batch_q6_i8(mode, q8, r0, st, base, i0, i1, sh, out):
        """Never called without an int8 dot (i8 is False there); typed by `_rows_batch_mixed`'s branch."""
        return

    _rows_batch_q6_i8_naive = _rows_batch_q6_i8


@compile_time_choice(_rows_batch_q6_f32, _rows_batch_q6_i8, _rows_batch_q6_i8_naive)
def _rows_batch_q6(i8, mode, q8, r0, st, base, i0, i1, sh, out):
    """The q6 rows' kernel of activation kind i8 (a compile-time constant)."""


@kernel(fastmath=FASTMATH_REDUCE)
def _rows_batch_mixed(i8, mode, st, q8, tab, base, a, e, sh, out):
    """decode_step._rows_mixed for B rows: output pairs a .. e−1 of one block of stack st where the
    pairs tab[1] .. tab[2]−1 are int8 rows of q8 from row tab[0] on (tab[0] = −1: none)."""
    if tab[0] < 0:
        _rows_batch(i8, mode, st, base, 0, a, e, sh, out)
        return
    p0, p1 = tab[1], tab[2]
    _rows_batch(i8, mode, st, base, 0, a, min(e, p0), sh, out)
    i0, i1 = max(a, p0), min(e, p1)
    if i0 < i1:
        r0 = tab[0] - 2 * p0
        if tab[3] > 0:                  # q6 rows (q8.q6w)
            _rows_batch_q6(i8, mode, q8, r0, st, base, i0, i1, sh, out)
        else:
            _rows_batch_q8(i8, mode, q8, r0, st, base, i0, i1, sh, out)
    _rows_batch(i8, mode, st, base, 0, max(a, p1), e, sh, out)


@kernel(fastmath=FASTMATH_REDUCE)
def _rows_batch_gate_up_mixed(i8, st, q8, tab, base, F, a, e, sh):
    """decode_step._rows_gate_up_mixed for B rows: gate and up rows 2a .. 2e−1 of a block with int8
    gate or up rows into sh.gu (two passes of `_rows_batch_mixed`), then sh.act = silu(gate)·up there."""
    h = F // 2
    _rows_batch_mixed(i8, STORE, st, q8, tab, base, a, e, sh, sh.gu)            # gate rows 2a .. 2e−1
    _rows_batch_mixed(i8, STORE, st, q8, tab, base, h + a, h + e, sh, sh.gu)    # up rows F + 2a ..
    for b in range(sh.act.shape[0]):
        silu_mul_span(sh.gu[b], F, 2 * a, 2 * e, sh.act[b])


@kernel(fastmath=FASTMATH_REDUCE)
def _prologue_row_f32(x, st, tab, l, sh, b):
    split_x(x, st.group_size, st.sal_idx[l], sh.xe[b], sh.xo[b], sh.xs[b], sh.xsal[b])


@kernel(fastmath=FASTMATH_REDUCE)
def _prologue_row_i8(x, st, tab, l, sh, b):
    quantize_vec(x, st.sal_idx[l], st.n_salient[l], st.group_size, sh.xz[b], sh.qe[b], sh.qo[b], sh.sxl[b],
                 sh.nzt[b])
    salient_x(x, st.sal_idx[l], sh.xsal[b])
    if tab[0] >= 0:
        q8_lane_zero(sh.qe[b], sh.qo[b], sh.sxl[b], sh.nzl[b])


@compile_time_choice(_prologue_row_f32, _prologue_row_i8, _prologue_row_i8)
def _prologue_row_mixed(i8, x, st, tab, l, sh, b):
    """decode_step._prologue of input x for block l of stack st, into row b of the shared buffers; with
    int8 activations also the int8 rows' lane sums (`q8_lane_zero`) where block l of the stack has
    int8 rows (tab = q8_tab[kind, l]). i8 a compile-time constant."""


@kernel(fastmath=FASTMATH_REDUCE)
def _rope_store(t, T, l, qkv, pos, slots, cos, sin, H, Hkv, Dh, kp, vp):
    """RoPE of every row's q and k heads (thread t takes every T-th (row, head)); k, v to the pool."""
    half, nq, nkv = Dh // 2, H * Dh, Hkv * Dh
    for item in range(t, qkv.shape[0] * (H + Hkv), T):
        b, head = item // (H + Hkv), item % (H + Hkv)
        o = head * Dh
        for i in range(half):
            x1, x2 = qkv[b, o + i], qkv[b, o + i + half]
            qkv[b, o + i] = x1 * cos[b, i] - x2 * sin[b, i]
            qkv[b, o + i + half] = x2 * cos[b, i] + x1 * sin[b, i]
        if head >= H:
            hk, s, p = head - H, slots[b], pos[b]
            for d in range(Dh):
                kp[s, l, hk, p, d] = qkv[b, nq + hk * Dh + d]
                vp[s, l, hk, p, d] = qkv[b, nq + nkv + hk * Dh + d]


# ----------------------------------------------------------------------------------------------
# The step


# A row pair's relative cost in the B-row step, for `_share_rows` (the float32-activation step's split):
# there the products bound a pair,
# not its bytes (decode_step.Q4_COST's rule, right for one row). At B = 8 an int4 g32 pair took about
# 1.25 q6 pairs (the q|k|v phase on the q6 default, 2 threads: 259 int4 pairs 1.80 ms against 29 int4
# and 192 q6 pairs 1.29 ms; BENCHMARKS.md "B = 8 at 4x"); int8 pairs as q6 ones (the same products).
ROW_Q4_COST, ROW_Q8_COST = 5, 4


@kernel()
def _share_rows(n, t, T, tab):
    """decode_step._share_mixed with the B-row step's costs (ROW_Q4_COST, ROW_Q8_COST): thread t's
    pairs [a, b) of n row pairs where pairs tab[1] .. tab[2]−1 (tab[0] >= 0) are int8 or q6 rows."""
    if tab[0] < 0:
        return _share(n, t, T)
    p0, p1 = tab[1], tab[2]
    total = ROW_Q4_COST * (n - (p1 - p0)) + ROW_Q8_COST * (p1 - p0)
    return _row_pair_at(total * t // T, p0, p1), _row_pair_at(total * (t + 1) // T, p0, p1)


@kernel(inline=True)
def _row_pair_at(c, p0, p1):
    """The first pair whose cost before it reaches c (`_share_rows`'s costs; monotone in c)."""
    c8 = ROW_Q4_COST * p0 + ROW_Q8_COST * (p1 - p0)             # the cost before pair p1
    if c <= ROW_Q4_COST * p0:
        return c // ROW_Q4_COST
    if c <= c8:
        return p0 + (c - ROW_Q4_COST * p0) // ROW_Q8_COST
    return p1 + (c - c8) // ROW_Q4_COST


I8_PER_ROW = 2                     # int8 activations, one activation row per pass: the row kernels' A/B

# The smallest chunk of row pairs (of gate|up units) a thread claims is CLAIM_ROWS // B of them (at
# least 2): about the same work at every B, a few microseconds, against ~0.1 µs for a claim.
CLAIM_ROWS = 16
WORK_PHASES = 4         # claim counters per block: q|k|v, o, gate|up, down; each on its own cache line


@kernel(inline=True)
def _work_slot(l, phase):
    """Block l's claim counter for `phase` (0 q|k|v, 1 o, 2 gate|up, 3 down) in BatchShared.work."""
    return (WORK_PHASES * l + phase) * 8


@kernel(fastmath=FASTMATH_REDUCE, inline=True)
def _rows_phase_static(mode, st, q8, tab, base, n, t, T, work, slot, c, sh, out):
    """`_rows_phase` of the float32-activation step: thread t's pairs by cost (`_share_rows`), as
    before the claims. Why not claims there: with the row kernels called from a claim loop, LLVM
    reassociated the float32 int8-row sums (`_dot2_q8_f32_at`) unlike the single-stream step's, in
    their last bits (test_batch_step_rows_are_single_stream_bit_for_bit, q4-int8-f32act); the
    default int8-activation step is the one that has to be fast."""
    a, e = _share_rows(n, t, T, tab)
    _rows_batch_mixed(F32, mode, st, q8, tab, base, a, e, sh, out)


@kernel(fastmath=FASTMATH_REDUCE, inline=True)
def _gate_up_static(st, q8, tab, base, F, t, T, work, slot, c, sh):
    """`_gate_up_phase` of the float32-activation step: an even static split (see `_rows_phase_static`)."""
    if tab[0] < 0:
        a, e = _share(F, t, T)
        _rows_batch(F32, SWIGLU, st, base, F, a, e, sh, sh.act)                  # act = silu(g) ⊙ u
    else:                                                                 # int8 gate or up rows
        a, e = _share(F // 2, t, T)
        _rows_batch_gate_up_mixed(F32, st, q8, tab, base, F, a, e, sh)


def _claims(i8):
    """The phases by claims for the int8 activation kind i8 (a constant here: policy.compile_time_choice)."""
    @kernel(fastmath=FASTMATH_REDUCE, inline=True)
    def rows_phase(mode, st, q8, tab, base, n, t, T, work, slot, c, sh, out):
        """`_rows_phase` by claims: chunks of the n pairs from work[slot] (sync.claim, smallest c)
        until none is left, so a slower thread takes fewer."""
        while True:
            a, e = claim(work, slot, n, T, c)
            if a >= e:
                return
            _rows_batch_mixed(i8, mode, st, q8, tab, base, a, e, sh, out)

    @kernel(fastmath=FASTMATH_REDUCE, inline=True)
    def gate_up_phase(st, q8, tab, base, F, t, T, work, slot, c, sh):
        """`_gate_up_phase` by claims: units are gate|up rows, or pairs of them where the block has
        int8 gate or up rows."""
        n = F if tab[0] < 0 else F // 2
        while True:
            a, e = claim(work, slot, n, T, c)
            if a >= e:
                return
            if tab[0] < 0:
                _rows_batch(i8, SWIGLU, st, base, F, a, e, sh, sh.act)           # act = silu(g) ⊙ u
            else:                                                         # int8 gate or up rows
                _rows_batch_gate_up_mixed(i8, st, q8, tab, base, F, a, e, sh)
    return rows_phase, gate_up_phase


_CLAIMS_I8, _CLAIMS_I8_PER_ROW = _claims(I8), _claims(I8_PER_ROW)


@compile_time_choice(_rows_phase_static, _CLAIMS_I8[0], _CLAIMS_I8_PER_ROW[0])
def _rows_phase(i8, mode, st, q8, tab, base, n, t, T, work, slot, c, sh, out):
    """Thread t's part of the n output pairs of one linear (`_rows_batch_mixed`'s arguments) for the
    activation kind i8 (a compile-time constant)."""


@compile_time_choice(_gate_up_static, _CLAIMS_I8[1], _CLAIMS_I8_PER_ROW[1])
def _gate_up_phase(i8, st, q8, tab, base, F, t, T, work, slot, c, sh):
    """Thread t's part of act = silu(gate) ⊙ up (gate|up stack st, int8 rows per tab) for kind i8."""


@kernel(fastmath=FASTMATH_REDUCE)
def _batch_thread(t, T, i8, x, pos, slots, cos, sin, w, qkv_w, o_w, gate_up_w, down_w, qkv_q8, o_q8, gate_up_q8,
                  down_q8, q8_tab, kp, vp, sh, sc):
    """Thread t of T: its share of every phase of every block for all B rows, a barrier after each.
    The linears' output pairs are claimed in chunks with int8 activations (`_rows_phase`, sync.claim:
    a slower thread takes fewer; by cost with float32 ones), the rows' prologues and merges go by row
    (b ≡ t mod T), attention by position (as the single-stream step splits it, so its parts and their
    merge are that step's). The int8 linears' rows (qkv_q8, o_q8, gate_up_q8, down_q8, q8_tab:
    decode_step._decode_thread's) are computed where the int4 stacks hold placeholders
    (`_rows_batch_mixed`; gate|up's in two passes: `_rows_batch_gate_up_mixed`)."""
    B, D = x.shape
    H, Hkv, Dh = w.n_heads, w.n_kv_heads, w.head_dim
    F, Na = sh.act.shape[1], sh.qkv.shape[1]
    rep = H // Hkv
    scale = np.float32(1.0 / np.sqrt(Dh))
    h, att, s = sc.h[t], sc.att[t], sc.scores[t]
    bar, work = sh.bar, sh.work
    c = max(2, CLAIM_ROWS // B)                                           # the smallest chunk a thread claims
    k = 0
    for l in range(w.attn_norm.shape[0]):
        for b in range(t, B, T):                                          # h = norm(x), prologue
            _rms_norm_vec(x[b], w.attn_norm[l], w.eps, h)
            _prologue_row_mixed(i8, h, qkv_w, q8_tab[0, l], l, sh, b)
        k = barrier(bar, k, T)
        _rows_phase(i8, STORE, qkv_w, qkv_q8, q8_tab[0, l], l * Na, Na // 2, t, T, work, _work_slot(l, 0), c, sh,
                    sh.qkv)                                               # qkv = W h + b
        k = barrier(bar, k, T)
        _rope_store(t, T, l, sh.qkv, pos, slots, cos, sin, H, Hkv, Dh, kp, vp)
        k = barrier(bar, k, T)
        for b in range(B):                                                # this thread's positions
            j0, j1 = _share(pos[b] + 1, t, T)
            for hk in range(Hkv):
                attend_part(sh.qkv[b], hk, rep, Dh, kp[slots[b], l, hk], vp[slots[b], l, hk], j0, j1, scale, s,
                            sh.pm[b, t], sh.pl[b, t], sh.po[b, t])
        k = barrier(bar, k, T)
        for b in range(t, B, T):                                          # merge, prologue
            merge_parts(T, H, Dh, sh.pm[b], sh.pl[b], sh.po[b], att)
            _prologue_row_mixed(i8, att, o_w, q8_tab[1, l], l, sh, b)
        k = barrier(bar, k, T)
        _rows_phase(i8, ADD, o_w, o_q8, q8_tab[1, l], l * D, D // 2, t, T, work, _work_slot(l, 1), c, sh,
                    x)                                                    # x += Wo att
        k = barrier(bar, k, T)
        for b in range(t, B, T):
            _rms_norm_vec(x[b], w.mlp_norm[l], w.eps, h)
            _prologue_row_mixed(i8, h, gate_up_w, q8_tab[2, l], l, sh, b)
        k = barrier(bar, k, T)
        _gate_up_phase(i8, gate_up_w, gate_up_q8, q8_tab[2, l], l * 2 * F, F, t, T, work, _work_slot(l, 2), c, sh)
        k = barrier(bar, k, T)
        for b in range(t, B, T):
            _prologue_row_mixed(i8, sh.act[b], down_w, q8_tab[3, l], l, sh, b)
        k = barrier(bar, k, T)
        _rows_phase(i8, ADD, down_w, down_q8, q8_tab[3, l], l * D, D // 2, t, T, work, _work_slot(l, 3), c, sh,
                    x)                                                    # x += Wdown act
        k = barrier(bar, k, T)


def _entry(i8):
    """The step compiled for one activation kind, a constant here (policy.compile_time_choice); t a
    uint64 as in decode_step._entry."""
    @parallel_kernel()
    def decode_blocks_batch(T, x, pos, slots, cos, sin, w, qkv_w, o_w, gate_up_w, down_w, qkv_q8, o_q8, gate_up_q8,
                            down_q8, q8_tab, kp, vp, sh, sc):
        for t in prange(np.uint64(T)):     # t typed as the parallel region types it: see `_entry`
            _batch_thread(t, T, i8, x, pos, slots, cos, sin, w, qkv_w, o_w, gate_up_w, down_w, qkv_q8, o_q8,
                          gate_up_q8, down_q8, q8_tab, kp, vp, sh, sc)
    return decode_blocks_batch


ENTRIES = (_entry(F32), _entry(I8), _entry(I8_PER_ROW))


def decode_blocks_batch(T, i8, *args):
    """decode_blocks_batch(T, i8, x, pos, slots, cos, sin, w, qkv_w, o_w, gate_up_w, down_w, qkv_q8, o_q8,
    gate_up_q8, down_q8, q8_tab, kp, vp, sh, sc):
    x [B, D] float32 (modified in place) through all L blocks; row b is a token at position pos[b]
    of pool slot slots[b] (kp, vp [slots, L, Hkv, S, Dh]; its k, v written there). cos, sin
    [B, Dh/2] at pos; i8: the activation kind, F32, I8 (int8, INT8_DOT) or I8_PER_ROW, the entry point compiled
    for it (`ENTRIES`); the linears: Q4Stack each, plus the int8 linears' rows (Q8Stack per kind) and
    q8_tab [4, L, 3], as decode_step.decode_blocks takes them; T threads running concurrently (sync.py), at
    most the scratch's P; the shared buffers' first dimension is B; sh.bar and sh.work zeroed."""
    ENTRIES[i8](T, *args)


# ----------------------------------------------------------------------------------------------
# The int8 head for B rows


HEAD_TILE = 4      # activation rows per pass over a weight row: 4 × 2 accumulators stay in registers


@parallel_kernel(fastmath=FASTMATH_REDUCE)
def matvec_rows_q8_f32(qweight, scales, group_size, X, out):
    """out[b] = W X[b] for every row b of X [B, K] float32; W int8 [N, K] with per-(row, group) scales
    (a Q8 head). Each row of W is read from memory once for all B rows and each 16 weights are
    converted to float once per HEAD_TILE rows. Per row b the sums run in the order of
    quant_f32._matvec_q8_f32 (the single-stream head): d = Σ_o w·x within a group, acc += s_g d,
    out = hsum(acc); so a row's logits are its single-stream ones. out: [B, N]."""
    N, K = qweight.shape
    B, G = X.shape[0], scales.shape[1]
    for n in prange(N):
        wo = n * K
        for b0 in range(0, B, HEAD_TILE):
            # rows b0..b0+3, clamped to B − 1 (a short tile repeats the last row; its result is dropped)
            o0, o1, o2, o3 = b0 * K, min(b0 + 1, B - 1) * K, min(b0 + 2, B - 1) * K, min(b0 + 3, B - 1) * K
            a0, a1, a2, a3 = v_zeros(), v_zeros(), v_zeros(), v_zeros()
            for g in range(G):
                d0, d1, d2, d3 = v_zeros(), v_zeros(), v_zeros(), v_zeros()
                for o in range(g * group_size, g * group_size + group_size, LANES):
                    wv = v_load_i8(qweight, wo + o)
                    d0 = v_fma(wv, v_load(X, o0 + o), d0)
                    d1 = v_fma(wv, v_load(X, o1 + o), d1)
                    d2 = v_fma(wv, v_load(X, o2 + o), d2)
                    d3 = v_fma(wv, v_load(X, o3 + o), d3)
                sg = v_splat(as_f32(scales[n, g]))
                a0 = v_fma(sg, d0, a0)
                a1 = v_fma(sg, d1, a1)
                a2 = v_fma(sg, d2, a2)
                a3 = v_fma(sg, d3, a3)
            out[b0, n] = v_hsum(a0)
            if b0 + 1 < B:
                out[b0 + 1, n] = v_hsum(a1)
            if b0 + 2 < B:
                out[b0 + 2, n] = v_hsum(a2)
            if b0 + 3 < B:
                out[b0 + 3, n] = v_hsum(a3)
