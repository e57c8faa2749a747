"""q6 weights read packed: 6 bits per weight in memory and per decoded token (issue 17).

The rows are in the in-memory layout of formats/q4.py `pack_q6_rows` (per 128 channels: a nibble
plane of the channel pairs, then the even and the odd channels' two-bit planes; u = code + 32). Every
kernel here rebuilds, in registers, exactly the operands its int8 twin reads and then runs the int8
twin's operations in the int8 twin's order, so a q6 linear computes bit for bit what an int8 linear
holding the same codes computes (tests/test_q6.py):

    int8 activations (int8_dot.dpbusd): `dot2_q6_i8` = quant_i8_matvec.dot2_q8_i8, the chunk's even and odd bytes
        u + 96 = code + 128 (quant_i8_matvec.q8_rows) rebuilt by `_q6_bytes`: a masked 64-byte load of
        nibbles, two 16-byte loads of two-bit planes spread by a dword permute and a dword rotate
        (`_q6_hi`), and/or/add; then the same two vpdpbusd. Both rows of a pair (`v_dot2_q6_i8`; full
        chunks, n = 64, `v_dot2_q6_i8_full`, load without masks) leave out the + 96: their vpdpbusd
        start from 96 · the activations' octet sums instead (integer lanes, so the same lanes; on AVX2
        bytes below 64 take a third of the instructions: int8_dot.dpbusd, dpbusd_sum).
        Prefill tiles on AVX2 hold code + 32 too (quant_i8_matmul.Q6_PLUS32).
    float32 activations: `dot2_q6_f32` = quant_f32.dot2_q8_f32 (split order, 32 channels a step),
        `_matvec_q6_f32` = quant_f32._matvec_q8_f32 (natural order, the head and the per-linear path),
        `matvec_rows_q6_f32` = decode_step_batch.matvec_rows_q8_f32 (the batched head).
    prefill: `matmul_q6_i8` = quant_i8_matmul.matmul_q8_i8 with the tile unpacked from q6 rows
        (`_unpack_tile_q6`, the same tile bytes), `matmul_q6_f32` = quant_f32.matmul_q8_f32.

Shapes: W [N, K] (K % 32 == 0), qweight uint8 [N, 3K/4], scales [N, G] fp16 bits, g % 32 == 0; a chunk
= 128 channels = 96 bytes (the last chunk: n channel pairs, n + n/2 bytes).
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..errors import UsageError
from ..formats.q4 import Q8Linear, pack_q6_rows
from .int8_dot import INT8_DOT, dpbusd, dpbusd_sum
from .policy import FASTMATH_REDUCE, kernel, parallel_kernel
from .quant_f32 import TILE_ROWS as F32_TILE_ROWS, _check_mat, _check_out, _check_vec, fp16_bits
from .quant_i8_matmul import (
    ACT_BLOCK,
    KIND_Q6,
    KIND_Q8,
    Q6_PLUS32,
    TILE_ROWS,
    _check_block,
    _tile_products,
    i32x16,
    quantize_activations,
)
from .quant_i8_matvec import (
    CHUNK,
    CHUNK_CHANNELS,
    _intp,
    _lane_scales,
    _load_bytes,
    _mask,
    group_index,
    padded,
    q8_lane_zero,
    quantize_vec,
    supports_i8,
    v_i2f,
)
from .simd import LANES, _elem_ptr, as_f32, f32x16, prefetch, v_fma, v_hsum, v_load, v_splat, v_store, v_zeros
from .sync import claim

CHUNK_BYTES = 3 * CHUNK_CHANNELS // 4        # 96 packed bytes per 128 channels
_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_VB = ir.VectorType(_I8, CHUNK)              # <64 x i8>
_VI32 = ir.VectorType(_I32, LANES)
_VF = ir.VectorType(ir.FloatType(), LANES)
_V16B = ir.VectorType(_I8, LANES)            # <16 x i8>


@dataclass(frozen=True)
class Q6Prepared:
    """A q6 linear as the kernels read it: qweight uint8 [N, 3K/4] (formats/q4.py pack_q6_rows),
    scales uint16 [N, G]: fp16 bits (quant_f32.fp16_bits, the file's own when it is mapped)."""
    qweight: np.ndarray
    scales: np.ndarray
    group_size: int

    @property
    def shape(self):
        return self.qweight.shape[0], 4 * self.qweight.shape[1] // 3

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes + self.scales.nbytes

    @property
    def kernel_args(self):
        return self.qweight, self.scales, self.group_size


def prepare_q6(rows: np.ndarray, scales: np.ndarray, group_size: int) -> Q6Prepared:
    """rows: uint8 [N, 3K/4] already in the in-memory layout; scales float16 [N, G]."""
    return Q6Prepared(np.ascontiguousarray(rows), fp16_bits(scales), group_size)


def prepare_q6_codes(q8: Q8Linear) -> Q6Prepared:
    """A Q8Linear whose codes are in -31..31 -> Q6Prepared (tests, and linears built in memory)."""
    return prepare_q6(pack_q6_rows(q8.qweight), q8.scales, q8.group_size)


def supports_q6(group_size: int, k: int) -> bool:
    """Whether the q6 kernels take K = k and this group size (whole 32-channel steps per group)."""
    return k % 32 == 0 and group_size % 32 == 0


# ----------------------------------------------------------------------------------------------
# Unpacking in registers


def _ptr(context, builder, w_t, w, off):
    """Pointer to w.flat[off] (off an intp IR value) as i8*."""
    a = context.make_array(w_t)(context, builder, w)
    return builder.gep(a.data, [off])


def _q6_spread(builder, d, base):
    """<64 x i8> from the dwords d (<4 or 8 x i32>) d[base:base+4]: byte j (= 16e + 4p + i) gets bits
    2p..2p+1 of dword base + e's byte i at bits 4..5, others 0."""
    s = builder.shuffle_vector(d, d, ir.Constant(_VI32, [base + k // 4 for k in range(LANES)]))
    fshl = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VI32, [_VI32] * 3), "llvm.fshl.v16i32")
    r = builder.call(fshl, [s, s, ir.Constant(_VI32, [(4 - 2 * (k % 4)) % 32 for k in range(LANES)])])
    return builder.and_(builder.bitcast(r, _VB), ir.Constant(_VB, [0x30] * CHUNK))


def _q6_hi(builder, ptr, n4):
    """The two-bit plane of n4 (≤ 16) bytes at ptr spread over the 64 bytes of a chunk's channels:
    byte j (= 16e + 4p + i) gets bits 2p..2p+1 of source byte 4e + i at bits 4..5, others 0."""
    v = _load_bytes(builder, ptr, n4, LANES)
    return _q6_spread(builder, builder.bitcast(v, ir.VectorType(_I32, 4)), 0)


def _q6_bytes(context, builder, w_t, w, off, n, full=False, plus96=True):
    """(even, odd) <64 x i8>: code + 128 of the chunk's even and odd channels (the bytes of
    quant_i8_matvec.q8_rows), bytes past the chunk's n pairs 0. off, n: intp IR values. full: the
    chunk has all 64 pairs (n ignored): plain loads, no masks, both two-bit planes in one 32-byte
    load. plus96=False: u = code + 32 instead (the caller adds 96 · the activations' sums)."""
    it = off.type
    lo_mask, c96 = ir.Constant(_VB, [15] * CHUNK), ir.Constant(_VB, [96] * CHUNK)
    if full:
        nib = builder.load(builder.bitcast(_ptr(context, builder, w_t, w, off), _VB.as_pointer()), align=1)
        v8 = ir.VectorType(_I32, 8)
        planes = builder.load(builder.bitcast(_ptr(context, builder, w_t, w, builder.add(off, ir.Constant(it, CHUNK))),
                                              v8.as_pointer()), align=1)
        he, ho = _q6_spread(builder, planes, 0), _q6_spread(builder, planes, 4)
    else:
        mask = _mask(builder, n, CHUNK)
        nib = _load_bytes(builder, _ptr(context, builder, w_t, w, off), n, CHUNK)
        n4 = builder.lshr(n, ir.Constant(it, 2))
        he = _q6_hi(builder, _ptr(context, builder, w_t, w, builder.add(off, n)), n4)
        ho = _q6_hi(builder, _ptr(context, builder, w_t, w, builder.add(builder.add(off, n), n4)), n4)
    lo = builder.and_(nib, lo_mask)
    hi = builder.and_(builder.lshr(nib, ir.Constant(_VB, [4] * CHUNK)), lo_mask)
    ue, uo = builder.or_(lo, he), builder.or_(hi, ho)
    if plus96:
        ue, uo = builder.add(ue, c96), builder.add(uo, c96)
    if not full:
        zero = ir.Constant(_VB, [0] * CHUNK)
        ue, uo = builder.select(mask, ue, zero), builder.select(mask, uo, zero)
    return ue, uo


def _args_intp(context, builder, sig, args, idx):
    return [_intp(context, builder, args[i], sig.args[i]) for i in idx]


def _x_pair(context, builder, sig, args, x_):
    """The chunk's even and odd activation bytes at qe.flat[x_:], qo.flat[x_:] (args 3, 4)."""
    xe = builder.load(_elem_ptr(context, builder, sig.args[3], args[3], types.intp, x_, _VB), align=1)
    xo = builder.load(_elem_ptr(context, builder, sig.args[4], args[4], types.intp, x_, _VB), align=1)
    return xe, xo


def _v_dot_q6_i8(full):
    def v_dot(typingctx, w, off, n, qe, qo, x_off):
        def codegen(context, builder, sig, args):
            off_, n_, xo_ = _args_intp(context, builder, sig, args, (1, 2, 5))
            ue, uo = _q6_bytes(context, builder, sig.args[0], args[0], off_, n_, full)
            xe, xo = _x_pair(context, builder, sig, args, xo_)
            return dpbusd(builder, dpbusd(builder, ir.Constant(_VI32, [0] * LANES), ue, xe), uo, xo)
        return i32x16(w, off, n, qe, qo, x_off), codegen
    v_dot.__name__ = "v_dot_q6_i8_full" if full else "v_dot_q6_i8"
    v_dot.__doc__ = ("`v_dot_q6_i8` of a full chunk (n = 64, not read): no masks." if full else
                     """quant_i8_matvec.v_dot_q8_i8 for the q6 chunk at w.flat[off:] with n channel pairs:
    lane i = sum over channel octet i of (code + 128) · qx, qx = qe.flat[x_off:+64] | qo.flat[x_off:+64].""")
    return intrinsic(v_dot)


v_dot_q6_i8, v_dot_q6_i8_full = _v_dot_q6_i8(False), _v_dot_q6_i8(True)


def _v_dot2_q6_i8(full):
    def v_dot2(typingctx, w, off_a, off_b, n, qe, qo, x_off):
        def codegen(context, builder, sig, args):
            oa, ob, n_, x_ = _args_intp(context, builder, sig, args, (1, 2, 3, 6))
            xe = builder.load(_elem_ptr(context, builder, sig.args[4], args[4], types.intp, x_, _VB), align=1)
            xo = builder.load(_elem_ptr(context, builder, sig.args[5], args[5], types.intp, x_, _VB), align=1)
            if not full:                    # activations past the n pairs count for nothing (as the bytes)
                mask, zero = _mask(builder, n_, CHUNK), ir.Constant(_VB, [0] * CHUNK)
                xe, xo = builder.select(mask, xe, zero), builder.select(mask, xo, zero)
            c96 = ir.Constant(_VB, [96] * CHUNK)
            init = dpbusd(builder, dpbusd(builder, ir.Constant(_VI32, [0] * LANES), c96, xe, 96), c96, xo, 96)
            out = []
            for off_ in (oa, ob):
                ue, uo = _q6_bytes(context, builder, sig.args[0], args[0], off_, n_, full, False)
                out.append(dpbusd_sum(builder, init, [(ue, xe), (uo, xo)], 63))
            return context.make_tuple(builder, sig.return_type, out)
        return types.UniTuple(i32x16, 2)(w, off_a, off_b, n, qe, qo, x_off), codegen
    v_dot2.__name__ = "v_dot2_q6_i8_full" if full else "v_dot2_q6_i8"
    v_dot2.__doc__ = ("`v_dot2_q6_i8` of two full chunks (n = 64, not read): no masks." if full else
                      """(`v_dot_q6_i8` at off_a, at off_b), n channel pairs: the rows' bytes u = code + 32 (no
    + 96), the 96 · (sum of the octet's activation codes) that u + 96 adds instead the starting value,
    computed once for both rows; on AVX2 each row's two vpdpbusd are summed in int16 (int8_dot.dpbusd_sum:
    u <= 63). Integer sums, so the lanes are those of `v_dot_q6_i8` exactly.""")
    return intrinsic(v_dot2)


v_dot2_q6_i8, v_dot2_q6_i8_full = _v_dot2_q6_i8(False), _v_dot2_q6_i8(True)


def _v_dot4_q6_i8(full):
    def v_dot4(typingctx, w, off, n, qe, qo, x0, x1, x2, x3):
        def codegen(context, builder, sig, args):
            off_, n_, *xs = _args_intp(context, builder, sig, args, (1, 2, 5, 6, 7, 8))
            ue, uo = _q6_bytes(context, builder, sig.args[0], args[0], off_, n_, full)
            out = []
            for x_ in xs:
                xe, xo = _x_pair(context, builder, sig, args, x_)
                out.append(dpbusd(builder, dpbusd(builder, ir.Constant(_VI32, [0] * LANES), ue, xe), uo, xo))
            return context.make_tuple(builder, sig.return_type, out)
        return types.UniTuple(i32x16, 4)(w, off, n, qe, qo, x0, x1, x2, x3), codegen
    v_dot4.__name__ = "v_dot4_q6_i8_full" if full else "v_dot4_q6_i8"
    v_dot4.__doc__ = ("`v_dot4_q6_i8` of a full chunk (n = 64, not read): no masks." if full else
                      "`v_dot_q6_i8` with four activation rows (offsets x0..x3), the chunk unpacked once.")
    return intrinsic(v_dot4)


v_dot4_q6_i8, v_dot4_q6_i8_full = _v_dot4_q6_i8(False), _v_dot4_q6_i8(True)


@intrinsic
def v_q6_quads(typingctx, w, off, n, buf):
    """The chunk's even and odd bytes (`_q6_bytes`) stored as 16 + 16 int32 quads: buf[0:16] the
    even channels' quads (quant_i8_matmul's VNNI order), buf[16:32] the odd ones'. code + 128, or
    code + 32 where the tile takes those (quant_i8_matmul.Q6_PLUS32: AVX2)."""
    def codegen(context, builder, sig, args):
        off_, n_ = _args_intp(context, builder, sig, args, (1, 2))
        ue, uo = _q6_bytes(context, builder, sig.args[0], args[0], off_, n_, plus96=not Q6_PLUS32)
        zero = ir.Constant(ir.IntType(64), 0)
        sixteen = ir.Constant(ir.IntType(64), LANES)
        for v, o in ((ue, zero), (uo, sixteen)):
            dst = _elem_ptr(context, builder, sig.args[3], args[3], types.intp, o, _VI32)
            builder.store(builder.bitcast(v, _VI32), dst, align=4)
        return context.get_dummy_value()
    return types.none(w, off, n, buf), codegen


def _dword_at(context, builder, w_t, w, off):
    """The little-endian 32-bit word at w.flat[off] (off an intp IR value)."""
    p = builder.bitcast(_ptr(context, builder, w_t, w, off), _I32.as_pointer())
    return builder.load(p, align=1)


def _splat_i32(builder, x):
    v = builder.insert_element(ir.Constant(_VI32, ir.Undefined), x, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(_VI32, [0] * LANES))


@intrinsic
def v_q6_split_f32(typingctx, w, off, n, j0):
    """(even, odd) f32x16: code + 128 of the chunk's channel pairs j0 .. j0+15 (j0 % 16 == 0), as
    floats: the operands quant_f32.dot2_q8_f32 loads with v_load_u8 (even bytes, odd bytes)."""
    def codegen(context, builder, sig, args):
        off_, n_, j0_ = _args_intp(context, builder, sig, args, (1, 2, 3))
        it = off_.type
        nib = builder.load(builder.bitcast(_ptr(context, builder, sig.args[0], args[0], builder.add(off_, j0_)),
                                           _V16B.as_pointer()), align=1)
        nib = builder.zext(nib, _VI32)
        lo = builder.and_(nib, ir.Constant(_VI32, [15] * LANES))
        hi = builder.lshr(nib, ir.Constant(_VI32, [4] * LANES))
        n4 = builder.lshr(n_, ir.Constant(it, 2))
        e4 = builder.lshr(j0_, ir.Constant(it, 2))                     # 4e: the dword of pairs j0..j0+15
        shifts = ir.Constant(_VI32, [8 * (l % 4) + 2 * (l // 4) for l in range(LANES)])
        outs = []
        for nibs, base in ((lo, builder.add(off_, n_)), (hi, builder.add(builder.add(off_, n_), n4))):
            d = _splat_i32(builder, _dword_at(context, builder, sig.args[0], args[0], builder.add(base, e4)))
            h = builder.and_(builder.lshr(d, shifts), ir.Constant(_VI32, [3] * LANES))
            u = builder.add(builder.or_(nibs, builder.shl(h, ir.Constant(_VI32, [4] * LANES))),
                            ir.Constant(_VI32, [96] * LANES))
            outs.append(builder.sitofp(u, _VF))
        return context.make_tuple(builder, sig.return_type, outs)
    return types.UniTuple(f32x16, 2)(w, off, n, j0), codegen


@intrinsic
def v_q6_natural_f32(typingctx, w, off, n, r):
    """f32x16: the codes (−31..31) of the chunk's channels r .. r+15 (r % 16 == 0) in natural order,
    as floats: what quant_f32._matvec_q8_f32 loads with v_load_i8."""
    def codegen(context, builder, sig, args):
        off_, n_, r_ = _args_intp(context, builder, sig, args, (1, 2, 3))
        it = off_.type
        j0 = builder.lshr(r_, ir.Constant(it, 1))                       # first pair (a multiple of 8)
        v8 = ir.VectorType(_I8, 8)
        nib = builder.load(builder.bitcast(_ptr(context, builder, sig.args[0], args[0], builder.add(off_, j0)),
                                           v8.as_pointer()), align=1)
        nib = builder.shuffle_vector(nib, nib, ir.Constant(_VI32, [l // 2 for l in range(LANES)]))
        nib = builder.lshr(builder.zext(nib, _VI32), ir.Constant(_VI32, [4 * (l % 2) for l in range(LANES)]))
        lo = builder.and_(nib, ir.Constant(_VI32, [15] * LANES))
        n4 = builder.lshr(n_, ir.Constant(it, 2))
        e4 = builder.shl(builder.lshr(j0, ir.Constant(it, 4)), ir.Constant(it, 2))     # 4 · (j0 // 16)
        base = builder.add(builder.add(off_, n_), e4)
        de = _dword_at(context, builder, sig.args[0], args[0], base)
        do = _dword_at(context, builder, sig.args[0], args[0], builder.add(base, n4))
        pair = builder.insert_element(ir.Constant(ir.VectorType(_I32, 2), ir.Undefined), de, ir.Constant(_I32, 0))
        pair = builder.insert_element(pair, do, ir.Constant(_I32, 1))
        d = builder.shuffle_vector(pair, pair, ir.Constant(_VI32, [l % 2 for l in range(LANES)]))
        # lane l: pair j = j0 + l // 2 -> byte j % 4, bit pair (j // 4) % 4 = p0 + l // 8
        p0 = builder.trunc(builder.and_(builder.lshr(j0, ir.Constant(it, 1)), ir.Constant(it, 6)), _I32)   # 2·p0
        sh = builder.add(ir.Constant(_VI32, [8 * ((l // 2) % 4) + 2 * (l // 8) for l in range(LANES)]),
                         _splat_i32(builder, p0))
        h = builder.and_(builder.lshr(d, sh), ir.Constant(_VI32, [3] * LANES))
        q = builder.sub(builder.or_(lo, builder.shl(h, ir.Constant(_VI32, [4] * LANES))),
                        ir.Constant(_VI32, [32] * LANES))
        return builder.sitofp(q, _VF)
    return f32x16(w, off, n, r), codegen


# ----------------------------------------------------------------------------------------------
# Row functions (two rows at a time, inlined), as their int8 twins


@kernel(fastmath=FASTMATH_REDUCE, inline=True)
def dot2_q6_f32(qw, sc, ra, rb, group_size, x_even, x_odd, ox):
    """quant_f32.dot2_q8_f32 for q6 rows ra, rb (qw uint8 [rows, 3K/4]) with x's even/odd entries at
    x_even.flat[ox:], x_odd.flat[ox:]: (y_a, y_b), the same operations in the same order."""
    W = qw.shape[-1]
    K = 4 * W // 3
    wa, wb = ra * W, rb * W
    ones, m128 = v_splat(np.float32(1.0)), v_splat(np.float32(-128.0))
    acc_a, acc_b = v_zeros(), v_zeros()
    da, db, cx = v_zeros(), v_zeros(), v_zeros()
    for k0 in range(0, K, 32):
        c0 = k0 - k0 % 128
        o = 3 * c0 // 4
        n = min(64, (K - c0) // 2)
        j0 = (k0 - c0) // 2
        xe, xo = v_load(x_even, ox + k0 // 2), v_load(x_odd, ox + k0 // 2)
        cx = v_fma(xe, ones, v_fma(xo, ones, cx))
        ea, oa = v_q6_split_f32(qw, wa + o, n, j0)
        eb, ob = v_q6_split_f32(qw, wb + o, n, j0)
        da = v_fma(ea, xe, v_fma(oa, xo, da))
        db = v_fma(eb, xe, v_fma(ob, xo, db))
        if (k0 + 32) % group_size == 0:
            g = k0 // group_size
            acc_a = v_fma(v_splat(as_f32(sc[ra, g])), v_fma(cx, m128, da), acc_a)
            acc_b = v_fma(v_splat(as_f32(sc[rb, g])), v_fma(cx, m128, db), acc_b)
            da, db, cx = v_zeros(), v_zeros(), v_zeros()
    return v_hsum(acc_a), v_hsum(acc_b)


@kernel(fastmath=FASTMATH_REDUCE, inline=True)
def dot2_q6_i8(qw, sc, ra, rb, gpc, gidx, g0s, qe, qo, sxl, nzl, oq, osx, onz):
    """quant_i8_matvec.dot2_q8_i8 for q6 rows ra, rb (qw uint8 [rows, 3K/4], sc [rows, G] float32 or fp16 bits;
    gpc, gidx, g0s: group_index(g, K)) with the int8 prologue at qe.flat[oq:], qo.flat[oq:],
    sxl.flat[osx:], nzl.flat[onz:] (q8_lane_zero): (y_a, y_b), the same operations in the same order."""
    W, G = qw.shape[-1], sc.shape[-1]
    K = 4 * W // 3
    wa, wb = ra * W, rb * W
    acc_a, acc_b = v_zeros(), v_zeros()
    for c in range(g0s.shape[0]):
        o = c * CHUNK_CHANNELS
        n = min(CHUNK, (K - o) // 2)
        if n == CHUNK:
            da, db = v_dot2_q6_i8_full(qw, wa + 3 * o // 4, wb + 3 * o // 4, n, qe, qo, oq + c * CHUNK)
        else:
            da, db = v_dot2_q6_i8(qw, wa + 3 * o // 4, wb + 3 * o // 4, n, qe, qo, oq + c * CHUNK)
        g0 = g0s[c]
        sx, nz = v_load(sxl, osx + c * LANES), v_load(nzl, onz + c * LANES)
        acc_a = v_fma(v_fma(v_i2f(da), sx, nz), _lane_scales(sc, ra, g0, gpc, gidx, G), acc_a)
        acc_b = v_fma(v_fma(v_i2f(db), sx, nz), _lane_scales(sc, rb, g0, gpc, gidx, G), acc_b)
    return v_hsum(acc_a), v_hsum(acc_b)


@kernel(fastmath=FASTMATH_REDUCE, inline=True)
def dot2x4_q6_i8(qw, sc, ra, rb, gpc, gidx, g0s, qe, qo, sxl, nzl, b0, b1, b2, b3):
    """decode_step_batch._dot2x4_q8_i8_at for q6 rows: activation rows b0..b3 of the [B, ·] prologue,
    each chunk of the two weight rows unpacked once. Returns (ra·b0, rb·b0, ..., rb·b3)."""
    W, G = qw.shape[-1], sc.shape[-1]
    K = 4 * W // 3
    wa, wb = ra * W, rb * W
    Sq, Ss, Sn = qe.shape[1], sxl.shape[1], nzl.shape[1]
    a0, a1, a2, a3 = v_zeros(), v_zeros(), v_zeros(), v_zeros()
    c0, c1, c2, c3 = v_zeros(), v_zeros(), v_zeros(), v_zeros()
    for c in range(g0s.shape[0]):
        o = c * CHUNK_CHANNELS
        n = min(CHUNK, (K - o) // 2)
        xq = c * CHUNK
        x0, x1, x2, x3 = b0 * Sq + xq, b1 * Sq + xq, b2 * Sq + xq, b3 * Sq + xq
        if n == CHUNK:
            da0, da1, da2, da3 = v_dot4_q6_i8_full(qw, wa + 3 * o // 4, n, qe, qo, x0, x1, x2, x3)
            db0, db1, db2, db3 = v_dot4_q6_i8_full(qw, wb + 3 * o // 4, n, qe, qo, x0, x1, x2, x3)
        else:
            da0, da1, da2, da3 = v_dot4_q6_i8(qw, wa + 3 * o // 4, n, qe, qo, x0, x1, x2, x3)
            db0, db1, db2, db3 = v_dot4_q6_i8(qw, wb + 3 * o // 4, n, qe, qo, x0, x1, x2, x3)
        g0 = g0s[c]
        swa = _lane_scales(sc, ra, g0, gpc, gidx, G)
        swb = _lane_scales(sc, rb, g0, gpc, gidx, G)
        cs = c * LANES
        sx, nz = v_load(sxl, b0 * Ss + cs), v_load(nzl, b0 * Sn + cs)
        a0 = v_fma(v_fma(v_i2f(da0), sx, nz), swa, a0)
        c0 = v_fma(v_fma(v_i2f(db0), sx, nz), swb, c0)
        sx, nz = v_load(sxl, b1 * Ss + cs), v_load(nzl, b1 * Sn + cs)
        a1 = v_fma(v_fma(v_i2f(da1), sx, nz), swa, a1)
        c1 = v_fma(v_fma(v_i2f(db1), sx, nz), swb, c1)
        sx, nz = v_load(sxl, b2 * Ss + cs), v_load(nzl, b2 * Sn + cs)
        a2 = v_fma(v_fma(v_i2f(da2), sx, nz), swa, a2)
        c2 = v_fma(v_fma(v_i2f(db2), sx, nz), swb, c2)
        sx, nz = v_load(sxl, b3 * Ss + cs), v_load(nzl, b3 * Sn + cs)
        a3 = v_fma(v_fma(v_i2f(da3), sx, nz), swa, a3)
        c3 = v_fma(v_fma(v_i2f(db3), sx, nz), swb, c3)
    return (v_hsum(a0), v_hsum(c0), v_hsum(a1), v_hsum(c1), v_hsum(a2), v_hsum(c2), v_hsum(a3), v_hsum(c3))


@kernel(fastmath=FASTMATH_REDUCE, inline=True)
def _q6_vec(qw, row_off, K, o):
    """The codes of channels o .. o+15 of the row at qw.flat[row_off:], as floats (natural order)."""
    c0 = o - o % 128
    return v_q6_natural_f32(qw, row_off + 3 * c0 // 4, min(64, (K - c0) // 2), o - c0)


# ----------------------------------------------------------------------------------------------
# Whole products


@parallel_kernel(fastmath=FASTMATH_REDUCE)
def _matvec_q6_f32(qweight, scales, group_size, x, out):
    """quant_f32._matvec_q8_f32 for q6 rows: out[n] = sum_g s[n, g] · dot(q[n, group g], x_g)."""
    W = qweight.shape[1]
    K = 4 * W // 3
    for n in prange(qweight.shape[0]):
        acc = v_zeros()
        for g in range(scales.shape[1]):
            d = v_zeros()
            for o in range(g * group_size, g * group_size + group_size, LANES):
                d = v_fma(_q6_vec(qweight, n * W, K, o), v_load(x, o), d)
            acc = v_fma(v_splat(as_f32(scales[n, g])), d, acc)
        out[n] = v_hsum(acc)


HEAD_TILE = 4
PREFETCH_PAIRS = 4      # as decode_step_batch.PREFETCH_PAIRS


@parallel_kernel(fastmath=FASTMATH_REDUCE)
def matvec_rows_q6_f32(qweight, scales, group_size, X, out):
    """decode_step_batch.matvec_rows_q8_f32 for q6 rows: out[b] = W X[b] for every row b of X [B, K],
    each 16 codes unpacked once per HEAD_TILE rows; per row the sums of `_matvec_q6_f32`."""
    W = qweight.shape[1]
    K = 4 * W // 3
    B, G = X.shape[0], scales.shape[1]
    for n in prange(qweight.shape[0]):
        wo = n * W
        for b0 in range(0, B, HEAD_TILE):
            o0, o1, o2, o3 = b0 * K, min(b0 + 1, B - 1) * K, min(b0 + 2, B - 1) * K, min(b0 + 3, B - 1) * K
            a0, a1, a2, a3 = v_zeros(), v_zeros(), v_zeros(), v_zeros()
            for g in range(G):
                d0, d1, d2, d3 = v_zeros(), v_zeros(), v_zeros(), v_zeros()
                for o in range(g * group_size, g * group_size + group_size, LANES):
                    wv = _q6_vec(qweight, wo, K, o)
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


@kernel(fastmath=FASTMATH_REDUCE)
def _dequant_q6(qweight, scales, group_size, row0, tile):
    """quant_f32._dequant_q8 for q6 rows: tile[r] = W[row0 + r] as float32, natural order."""
    W = qweight.shape[1]
    K = 4 * W // 3
    for r in range(tile.shape[0]):
        n = row0 + r
        dst = tile[r]
        for g in range(scales.shape[1]):
            s = v_splat(as_f32(scales[n, g]))
            for o in range(g * group_size, g * group_size + group_size, LANES):
                v_store(dst, o, v_fma(_q6_vec(qweight, n * W, K, o), s, v_zeros()))


@kernel()
def _unpack_tile_q6(qw, scales, n0, wq, sw, c, buf):
    """quant_i8_matmul._unpack_tile_q8 from q6 rows: the same tile (codes + 128 in VNNI octet order,
    or codes + 32 on AVX2: `v_q6_quads`; rows past N: the last row's codes, scales 0). buf: int32 [32]
    scratch."""
    n_rows, W = qw.shape
    K = 4 * W // 3
    for r in range(TILE_ROWS):
        row = min(n0 + r, n_rows - 1)
        for ch in range((K + CHUNK_CHANNELS - 1) // CHUNK_CHANNELS):
            o = ch * CHUNK_CHANNELS
            n = min(CHUNK, (K - o) // 2)
            v_q6_quads(qw, row * W + 3 * o // 4, n, buf)
            for i in range(n // 4):
                j = 16 * ch + i
                wq[2 * j * TILE_ROWS + r] = buf[i]
                wq[(2 * j + 1) * TILE_ROWS + r] = buf[LANES + i]
    for r in range(TILE_ROWS):
        for g in range(scales.shape[1]):
            live = n0 + r < n_rows
            sw[g * TILE_ROWS + r] = as_f32(scales[n0 + r, g]) if live else np.float32(0.0)
            c[g * TILE_ROWS + r] = np.float32(-128.0) * as_f32(scales[n0 + r, g]) if live else np.float32(0.0)


@kernel()
def _block_sums(qx, block, qs):
    """qs[t, b] = sum of the activation codes qx[t, b-th block of `block` channels] (int8 -> int32)."""
    for t in range(qx.shape[0]):
        for b in range(qs.shape[1]):
            s = np.int32(0)
            for k in range(b * block, b * block + block):
                s += np.int32(qx[t, k])
            qs[t, b] = s


@parallel_kernel()
def _matmul_q6_i8(qw, scales, group_size, qx32, sx, zt, qs, block, out):
    """quant_i8_matmul._matmul_q8_i8 for q6 rows (each thread unpacks its tile from the packed rows).
    qs int32 [Tp * nb]: the activation blocks' code sums (`_block_sums`), read where the tile holds
    codes + 32 (Q6_PLUS32)."""
    n_rows, n_groups = qw.shape[0], scales.shape[1]
    quads = 4 * qw.shape[1] // 3 // 4
    for tile in prange((n_rows + TILE_ROWS - 1) // TILE_ROWS):
        wq = np.empty(quads * TILE_ROWS, np.int32)
        sw = np.empty(n_groups * TILE_ROWS, np.float32)
        c = np.empty(n_groups * TILE_ROWS, np.float32)
        buf = np.empty(2 * LANES, np.int32)
        _unpack_tile_q6(qw, scales, tile * TILE_ROWS, wq, sw, c, buf)
        _tile_products(wq, sw, c, group_size, qx32, sx, zt, qs, block, tile * TILE_ROWS, n_rows, out,
                       KIND_Q6 if Q6_PLUS32 else KIND_Q8)


@parallel_kernel()
def _matvec_q6_i8(qw, sc, gpc, gidx, g0s, qe, qo, sxl, nzl, out):
    """out[n] = row n of q6 W times the int8 activations of one token (`dot2_q6_i8`, rows in pairs)."""
    n = qw.shape[0]
    for i in prange((n + 1) // 2):
        a, b = 2 * i, min(2 * i + 1, n - 1)
        ya, yb = dot2_q6_i8(qw, sc, a, b, gpc, gidx, g0s, qe, qo, sxl, nzl, 0, 0, 0)
        out[a] = ya
        out[b] = yb


HEAD_CLAIM = 16     # row pairs per claim of the batched head at its end (sync.claim): a few microseconds


@parallel_kernel()
def _matvec_rows_q6_i8(T, qw, sc, gpc, gidx, g0s, qe, qo, sxl, nzl, work, out):
    """out[b, n] for every activation row b (qe, qo, sxl, nzl [B, ·]): each pair of weight rows read
    once for four activation rows (`dot2x4_q6_i8`); per row the operations of `_matvec_q6_i8`. T
    threads claim chunks of pairs from work[0] (zero; sync.claim), so a slower core takes fewer."""
    n, B, W = qw.shape[0], out.shape[0], qw.shape[1]
    for _ in prange(T):
        while True:
            i0, i1 = claim(work, 0, (n + 1) // 2, T, HEAD_CLAIM)
            if i0 >= i1:
                break
            for i in range(i0, i1):
                _rows_pair_q6_i8(qw, sc, gpc, gidx, g0s, qe, qo, sxl, nzl, out, n, B, W, i)


@kernel(inline=True)
def _rows_pair_q6_i8(qw, sc, gpc, gidx, g0s, qe, qo, sxl, nzl, out, n, B, W, i):
    """Weight rows 2i, 2i + 1 of `_matvec_rows_q6_i8` for every activation row."""
    a, b = 2 * i, min(2 * i + 1, n - 1)
    for o in range((a + 2 * PREFETCH_PAIRS) * W, (a + 2 * PREFETCH_PAIRS + 2) * W, 64):
        prefetch(qw, o)                 # pairs ahead: the hardware prefetcher lags (simd.prefetch)
    for b0 in range(0, B, 4):
        y = dot2x4_q6_i8(qw, sc, a, b, gpc, gidx, g0s, qe, qo, sxl, nzl,
                         b0, min(b0 + 1, B - 1), min(b0 + 2, B - 1), min(b0 + 3, B - 1))
        out[b0, a] = y[0]
        out[b0, b] = y[1]
        if b0 + 1 < B:
            out[b0 + 1, a] = y[2]
            out[b0 + 1, b] = y[3]
        if b0 + 2 < B:
            out[b0 + 2, a] = y[4]
            out[b0 + 2, b] = y[5]
        if b0 + 3 < B:
            out[b0 + 3, a] = y[6]
            out[b0 + 3, b] = y[7]


@kernel()
def _prologue_rows(X, group_size, sal, xz, qe, qo, sxl, nzt, nzl):
    """Each row b of X [B, K]: quant_i8_matvec.quantize_vec into row b of qe, qo, sxl, nzt, then
    q8_lane_zero into nzl (the int8 prologue of the q6 rows)."""
    for b in range(X.shape[0]):
        quantize_vec(X[b], sal, 0, group_size, xz, qe[b], qo[b], sxl[b], nzt[b])
        q8_lane_zero(qe[b], qo[b], sxl[b], nzl[b])


# ----------------------------------------------------------------------------------------------
# Public wrappers


def i8_ok(p: Q6Prepared) -> bool:
    """Whether the int8-activation kernels take p (an int8 dot, int8_dot.INT8_DOT; blocks and chunks
    inside whole groups)."""
    return INT8_DOT and supports_i8(p.group_size, p.shape[1])


def _prologue(p: Q6Prepared, X: np.ndarray):
    """The int8 prologue of the rows of X [B, K] (quant_i8_matvec.quantize_vec, q8_lane_zero)."""
    B, k = X.shape
    c = padded(k // 2, CHUNK)
    qe, qo = np.zeros((B, c), np.int8), np.zeros((B, c), np.int8)
    sxl, nzl = np.zeros((B, padded(k // 8, LANES)), np.float32), np.zeros((B, padded(k // 8, LANES)), np.float32)
    nzt = np.zeros((B, padded(k // ACT_BLOCK, LANES)), np.float32)
    _prologue_rows(X, p.group_size, np.zeros(0, np.int64), np.empty(k, np.float32), qe, qo, sxl, nzt, nzl)
    return qe, qo, sxl, nzl


def matvec_q6_i8(p: Q6Prepared, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Decode with int8 activations (the head, the per-linear path): y [N] = W x, x quantized as
    quant_i8_matvec.quantize_vec quantizes it (as the one-call step's rows meet it). Needs `i8_ok`."""
    n, k = p.shape
    _check_vec(x, k)
    out = _check_out(out, (n,))
    qe, qo, sxl, nzl = _prologue(p, x[None])
    _matvec_q6_i8(p.qweight, p.scales, *group_index(p.group_size, k), qe[0], qo[0], sxl[0], nzl[0], out)
    return out


def matvec_rows_q6_i8(p: Q6Prepared, X: np.ndarray) -> np.ndarray:
    """`matvec_q6_i8` of every row of X [B, K] (the batched head), the weights read once per four rows;
    row b bit for bit `matvec_q6_i8(p, X[b])`."""
    _check_mat(X, p.shape[1])
    X = np.ascontiguousarray(X)
    qe, qo, sxl, nzl = _prologue(p, X)
    Y = np.empty((X.shape[0], p.shape[0]), np.float32)
    _matvec_rows_q6_i8(numba.get_num_threads(), p.qweight, p.scales, *group_index(p.group_size, p.shape[1]),
                       qe, qo, sxl, nzl, np.zeros(8, np.int64), Y)
    return Y


def matvec_q6_f32(p: Q6Prepared, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Decode (the head, the per-linear path): y [N] = W x, float32 activations."""
    n, k = p.shape
    _check_vec(x, k)
    out = _check_out(out, (n,))
    _matvec_q6_f32(*p.kernel_args, x, out)
    return out


def matmul_q6_f32(p: Q6Prepared, X: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Prefill, float32: Y [T, N] = X W^T, dequantized tiles x BLAS (quant_f32.matmul_q8_f32)."""
    n, k = p.shape
    _check_mat(X, k)
    t = X.shape[0]
    out = _check_out(out, (t, n))
    x_t = np.ascontiguousarray(X.T)
    y_t = np.empty((n, t), np.float32)
    tile = np.empty((min(F32_TILE_ROWS, n), k), np.float32)
    for r0 in range(0, n, F32_TILE_ROWS):
        w = tile[: min(F32_TILE_ROWS, n - r0)]
        _dequant_q6(p.qweight, p.scales, p.group_size, r0, w)
        np.dot(w, x_t, out=y_t[r0: r0 + len(w)])
    out[:] = y_t.T
    return out


def matmul_q6_i8(p: Q6Prepared, X: np.ndarray, out: np.ndarray | None = None,
                 block: int = ACT_BLOCK) -> np.ndarray:
    """Prefill with int8 activations (quant_i8_matmul.matmul_q8_i8, bit for bit). Needs `INT8_DOT`."""
    assert INT8_DOT, "matmul_q6_i8 needs an int8 dot (AVX2 or VNNI); dispatch with use_int8_activations"
    n, k = p.shape
    _check_mat(X, k)
    t = X.shape[0]
    out = _check_out(out, (t, n))
    _check_block(p.group_size, block)
    qx, sx, zt = quantize_activations(np.ascontiguousarray(X), p.group_size, block)
    qs = np.zeros(sx.shape if Q6_PLUS32 else (1, 1), np.int32)                 # [Tp, nb]
    if Q6_PLUS32:
        _block_sums(qx, block, qs)
    _matmul_q6_i8(p.qweight, p.scales, p.group_size, qx.view(np.int32).reshape(-1),
                  sx.reshape(-1), zt.reshape(-1), qs.reshape(-1), block, out.reshape(-1))
    return out


def matvec_rows_q6(p: Q6Prepared, X: np.ndarray) -> np.ndarray:
    """The batched head: `matvec_rows_q6_f32` into a new [B, N] array."""
    if p.shape[1] % 16 or p.group_size % 16:
        raise UsageError("q6 rows need K and the group size multiples of 16")
    Y = np.empty((X.shape[0], p.shape[0]), np.float32)
    matvec_rows_q6_f32(*p.kernel_args, X, Y)
    return Y
