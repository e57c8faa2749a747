"""Prefill int4 x int8 matmul (AVX-512 VNNI, AVX-VNNI or AVX2): `matmul_q4_i8`, the compute-bound twin of
quant_f32.matmul_q4_f32 (same weights, `Q4Prepared`), in the manner of llama.cpp's Q4 x Q8_0; and
`matmul_q8_i8`, the same for the int8 lm_head (`Q8Prepared`, codes offset by 128, zero point 128).

Shapes: W [N, K] (out, in), X [T, K], g = group size, G = K // g, B = activation block (divides g),
nb = K // B, R = TILE_ROWS, TT = TILE_TOKENS.

Activations are quantized once per call, symmetric int8 per token and block of B input channels:
    sx[t, b] = max_{k in b} |X[t, k]| / 127,   qx[t, k] = round(X[t, k] / sx[t, b])      (|qx| <= 127)
and then, with qw the 4-bit codes, sw/zw the weight scale and zero point of group g(b):
    Y[t, n] = sum_b sw[n, g(b)] sx[t, b] ( sum_{k in b} qw[n, k] qx[t, k]  -  zw[n, g(b)] sum_{k in b} qx[t, k] )
            + salient_w[n] . X[t, salient_idx]                                       (float32)
The integer dot is exact (|partial sums| <= 15 * 127 * B, far below 2^24, so its float conversion is
exact too); the only approximation is the int8 rounding of X, at most sx/2 per entry. Salient
channels are set to 0 before quantizing: they are the large-activation channels AWQ chose, and would
otherwise set their block's scale; their codes equal the zero point, so the int4 part ignores them.
The zero-point term is gathered per group, zt[t, g] = sum_{b in g} sx[t, b] sum_{k in b} qx[t, k],
once per call, and applied once per output tile: Y[t, n] -= sum_g sw[n, g] zw[n, g] zt[t, g].

The integer dot is `vpdpbusd` (u8 x s8 -> i32, 4 products per 32-bit lane; on AVX2 its exact
equivalent, int8_dot.dpbusd): weight codes 0..15 are the unsigned operand, qx the signed one. The
kernel is GEMM-shaped (sizes for AVX-512; on AVX2 targets R = 16 and TT = 4, 16 ymm registers):
- a tile of R = 32 weight rows is unpacked (per thread, on the fly: no unpacked copy of the model)
  into "VNNI layout": for each quad s of input channels, 32 rows x 4 codes = two 16-lane i32 vectors;
- a register tile of 2 row vectors x TT = 6 tokens = 12 i32 accumulators; per quad, 2 vector loads,
  6 broadcasts of 4 qx bytes (`{1to16}` memory operands) and 12 `vpdpbusd`;
- at the end of each activation block, the 12 accumulators are converted to float and added into
  12 float accumulators with scale sw[n, g] * sx[t, b].
Each output's operations and their order do not depend on the tile's shape, so every target gives
the same floats.
Channel order: a 32-bit word of packed codes holds channels 8j..8j+7 (low nibble = even channel,
DESIGN §3). Its low nibbles are the quad (8j, 8j+2, 8j+4, 8j+6), its high nibbles (8j+1, ..+7), so a
mask and a shift give two quads and no weight shuffles. qx is stored in the same order once per
call: per octet of channels, evens then odds:

    X[t, 8j : 8j+8]   = x0 x1 x2 x3 x4 x5 x6 x7
    qx[t, 8j : 8j+8]  = q0 q2 q4 q6 q1 q3 q5 q7      (blocks are whole octets: sums are unchanged)

Use only where the JIT target has an int8 dot (`INT8_DOT`); `use_int8_activations` is the one place
that decides between this kernel and the float32 path.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

from ..errors import UsageError
from .int8_dot import AVX512, INT8_DOT, INT8_ISA, dpbusd_sum
from .policy import FASTMATH_REDUCE, kernel, parallel_kernel
from .quant_f32 import Q4Prepared, Q8Prepared, _check_mat, _check_out
from .simd import LANES, _elem_ptr, as_f32, f32x16, v_zeros

__all__ = ["INT8_DOT", "INT8_ISA"]     # the dispatch flags, defined in int8_dot.py


INT8_MIN_TOKENS = 4      # from this many tokens per call, int8 activations (BENCHMARKS.md: where they win)
ACT_BLOCK = 32           # B: input channels per activation scale (llama.cpp Q8_0); divides every g

# The register tile: 2 x 6 = 12 accumulators in zmm registers (32 of them) on AVX-512; on AVX2 a
# 16-lane vector is two ymm of 16, so 1 x 4 (8 ymm, plus the weights' 2 and their split halves).
ROW_VECS = 2 if AVX512 else 1         # row vectors of 16 rows in a register tile
TILE_ROWS = ROW_VECS * LANES          # R: weight rows unpacked at a time
TILE_TOKENS = 6 if AVX512 else 4      # TT: tokens in a register tile
_NACC = ROW_VECS * TILE_TOKENS

# q6 tiles (quant_q6.py) on AVX2 hold code + 32 (0..63) instead of code + 128: one vpmaddubsw per
# ymm instead of two (int8_dot.dpbusd), and two quads summed in int16. Each activation block's integer
# sums then start from 96 · (the block's sum of activation codes) (`tile_splat_i32`): the same integers.
Q6_PLUS32 = INT8_ISA == "avx2"
Q6_U_MAX = 63
KIND_Q8, KIND_Q4, KIND_Q6 = 0, 1, 2          # `_tile_products`: codes + 128, int4 codes, q6 codes + 32


def use_int8_activations(n_tokens: int) -> bool:
    """The dispatch rule: int8 activations for `n_tokens` >= INT8_MIN_TOKENS, where the target has an
    int8 dot (int8_dot.INT8_DOT: AVX512-VNNI, AVX-VNNI or AVX2)."""
    return INT8_DOT and n_tokens >= INT8_MIN_TOKENS


# ----------------------------------------------------------------------------------------------
# Register-tile vocabulary: a tile is a tuple of ROW_VECS x TILE_TOKENS 16-lane vectors, entry
# [v * TILE_TOKENS + t] for rows 16v..16v+15 of the weight tile and token t of the token tile. The
# Python loops below unroll at compile time; LLVM keeps the tuples in zmm registers. As in
# simd.py, no bounds checks: the kernel passes offsets the wrapper validated.

_I32 = ir.IntType(32)
_VI32 = ir.VectorType(_I32, LANES)
_VF = ir.VectorType(ir.FloatType(), LANES)
_VI8 = ir.VectorType(ir.IntType(8), LANES)


class I32x16Type(types.Type):
    def __init__(self):
        super().__init__(name="I32x16")


i32x16 = I32x16Type()


@register_model(I32x16Type)
class _I32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VI32)


_TILE_I32 = types.UniTuple(i32x16, _NACC)
_TILE_F32 = types.UniTuple(f32x16, _NACC)


def _splat_load(context, builder, arrty, arr, idxty, idx, elem):
    """A 16-lane vector of copies of arr[idx] (elem: the LLVM element type)."""
    a = context.make_array(arrty)(context, builder, arr)
    idx = context.cast(builder, idx, idxty, types.intp)
    s = builder.load(builder.bitcast(builder.gep(a.data, [idx]), elem.as_pointer()))
    v = builder.insert_element(ir.Constant(ir.VectorType(elem, LANES), ir.Undefined), s, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(_VI32, [0] * LANES))


def _offsets(builder, base, stride, n):
    """[base + i * stride for i < n] as LLVM intp values."""
    return [builder.add(base, builder.mul(stride, ir.Constant(base.type, i))) for i in range(n)]


@intrinsic
def tile_zeros_i32(typingctx):
    """An integer tile of zeros."""
    def codegen(context, builder, sig, args):
        return context.make_tuple(builder, sig.return_type, [ir.Constant(_VI32, [0] * LANES)] * _NACC)
    return _TILE_I32(), codegen


@intrinsic
def tile_zeros_f32(typingctx):
    """A float tile of zeros."""
    def codegen(context, builder, sig, args):
        return context.make_tuple(builder, sig.return_type, [ir.Constant(_VF, [0.0] * LANES)] * _NACC)
    return _TILE_F32(), codegen


def _tile_dpbusd(u_max, n_quads):
    def tile_dpbusd(typingctx, acc, wq, w_off, qx, x_off, x_stride):
        def codegen(context, builder, sig, args):
            _, wq_t, woff_t, qx_t, xoff_t, xs_t = sig.args
            accs = cgutils.unpack_tuple(builder, args[0], _NACC)
            w_off = context.cast(builder, args[2], woff_t, types.intp)
            x_off = context.cast(builder, args[4], xoff_t, types.intp)
            x_stride = context.cast(builder, args[5], xs_t, types.intp)
            w, x = [], []
            for j in range(n_quads):
                wj = builder.add(w_off, ir.Constant(w_off.type, j * TILE_ROWS))
                w.append([builder.load(_elem_ptr(context, builder, wq_t, args[1], types.intp, o, _VI32), align=4)
                          for o in _offsets(builder, wj, ir.Constant(w_off.type, LANES), ROW_VECS)])
                xj = builder.add(x_off, ir.Constant(x_off.type, j))
                x.append([_splat_load(context, builder, qx_t, args[3], types.intp, o, _I32)
                          for o in _offsets(builder, xj, x_stride, TILE_TOKENS)])
            out = [dpbusd_sum(builder, accs[v * TILE_TOKENS + t], [(w[j][v], x[j][t]) for j in range(n_quads)], u_max)
                   for v in range(ROW_VECS) for t in range(TILE_TOKENS)]
            return context.make_tuple(builder, sig.return_type, out)
        return _TILE_I32(acc, wq, w_off, qx, x_off, x_stride), codegen
    tile_dpbusd.__name__ = f"tile_dpbusd_u{u_max}_x{n_quads}"
    tile_dpbusd.__doc__ = f"""acc[v, t] += sum over j < {n_quads} of dpbusd(wq[w_off + j R + 16v : +16], 4 bytes
    qx[x_off + t * x_stride + j] in every lane): {n_quads} consecutive quads, the weight codes <= {u_max}
    (int8_dot.dpbusd_sum). wq, qx: 1-D int32 arrays holding 4 bytes per element (unsigned codes, signed
    activations)."""
    return intrinsic(tile_dpbusd)


# Quads a tile step takes: with more than one, on AVX2 the quads' vpmaddubsw pairs are summed in int16
# before one vpmaddwd (int8_dot.dpbusd_sum); must divide the quads of every activation block (4 does:
# B % 16 == 0, `_check_block`). One: 2 or 4 quads at a time need 4 or 8 ymm of weights on top of the
# tile's 8 accumulators and spill (16 ymm registers); BENCHMARKS.md, "AVX2 speed".
Q4_QUADS = 1
Q6_QUADS = 1
tile_dpbusd = _tile_dpbusd(255, 1)                  # int8 (and q6 elsewhere) tiles: codes + 128
tile_dpbusd_q4 = _tile_dpbusd(15, Q4_QUADS)         # int4 tiles: codes 0..15
tile_dpbusd_q6 = _tile_dpbusd(Q6_U_MAX, Q6_QUADS)   # q6 tiles on AVX2: codes + 32 (`Q6_PLUS32`)


@intrinsic
def tile_splat_i32(typingctx, qs, off, stride, m):
    """An integer tile with acc[v, t] = m * qs[off + t * stride] in every lane (qs a 1-D int32 array)."""
    def codegen(context, builder, sig, args):
        qs_t, off_t, stride_t, m_t = sig.args
        off = context.cast(builder, args[1], off_t, types.intp)
        stride = context.cast(builder, args[2], stride_t, types.intp)
        m = _splat_i32(builder, context.cast(builder, args[3], m_t, types.int32))
        x = [builder.mul(m, _splat_load(context, builder, qs_t, args[0], types.intp, o, _I32))
             for o in _offsets(builder, off, stride, TILE_TOKENS)]
        return context.make_tuple(builder, sig.return_type, [x[t] for v in range(ROW_VECS) for t in range(TILE_TOKENS)])
    return _TILE_I32(qs, off, stride, m), codegen


def _splat_i32(builder, x):
    v = builder.insert_element(ir.Constant(_VI32, ir.Undefined), x, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(_VI32, [0] * LANES))


@intrinsic
def tile_fma_i32(typingctx, acc, acc_i, sw, sw_off, sx, sx_off, sx_stride):
    """acc[v, t] += float(acc_i[v, t]) * sw[sw_off + 16v : +16] * sx[sx_off + t * sx_stride]."""
    def codegen(context, builder, sig, args):
        _, _, sw_t, swoff_t, sx_t, sxoff_t, sxs_t = sig.args
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VF, [_VF] * 3), "llvm.fma.v16f32")
        accs = cgutils.unpack_tuple(builder, args[0], _NACC)
        ints = cgutils.unpack_tuple(builder, args[1], _NACC)
        sw_off = context.cast(builder, args[3], swoff_t, types.intp)
        sx_off = context.cast(builder, args[5], sxoff_t, types.intp)
        sx_stride = context.cast(builder, args[6], sxs_t, types.intp)
        sw = [builder.load(_elem_ptr(context, builder, sw_t, args[2], types.intp, o, _VF), align=4)
              for o in _offsets(builder, sw_off, ir.Constant(sw_off.type, LANES), ROW_VECS)]
        sx = [_splat_load(context, builder, sx_t, args[4], types.intp, o, ir.FloatType())
              for o in _offsets(builder, sx_off, sx_stride, TILE_TOKENS)]
        out = []
        for v in range(ROW_VECS):
            for t in range(TILE_TOKENS):
                i = v * TILE_TOKENS + t
                d = builder.sitofp(ints[i], _VF)
                out.append(builder.call(fma, [d, builder.fmul(sw[v], sx[t]), accs[i]]))
        return context.make_tuple(builder, sig.return_type, out)
    return _TILE_F32(acc, acc_i, sw, sw_off, sx, sx_off, sx_stride), codegen


@intrinsic
def tile_axpy(typingctx, acc, c, c_off, e, e_off, e_stride):
    """acc[v, t] += c[c_off + 16v : +16] * e[e_off + t * e_stride]   (float32 arrays)."""
    def codegen(context, builder, sig, args):
        _, c_t, coff_t, e_t, eoff_t, es_t = sig.args
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VF, [_VF] * 3), "llvm.fma.v16f32")
        accs = cgutils.unpack_tuple(builder, args[0], _NACC)
        c_off = context.cast(builder, args[2], coff_t, types.intp)
        e_off = context.cast(builder, args[4], eoff_t, types.intp)
        e_stride = context.cast(builder, args[5], es_t, types.intp)
        c = [builder.load(_elem_ptr(context, builder, c_t, args[1], types.intp, o, _VF), align=4)
             for o in _offsets(builder, c_off, ir.Constant(c_off.type, LANES), ROW_VECS)]
        e = [_splat_load(context, builder, e_t, args[3], types.intp, o, ir.FloatType())
             for o in _offsets(builder, e_off, e_stride, TILE_TOKENS)]
        out = [builder.call(fma, [c[v], e[t], accs[v * TILE_TOKENS + t]])
               for v in range(ROW_VECS) for t in range(TILE_TOKENS)]
        return context.make_tuple(builder, sig.return_type, out)
    return _TILE_F32(acc, c, c_off, e, e_off, e_stride), codegen


@intrinsic
def tile_store(typingctx, acc, out, off, stride):
    """out[off + t * stride + 16v : +16] = acc[v, t]   (1-D float32 out)."""
    def codegen(context, builder, sig, args):
        _, out_t, off_t, stride_t = sig.args
        accs = cgutils.unpack_tuple(builder, args[0], _NACC)
        off = context.cast(builder, args[2], off_t, types.intp)
        stride = context.cast(builder, args[3], stride_t, types.intp)
        for t, row in enumerate(_offsets(builder, off, stride, TILE_TOKENS)):
            for v, o in enumerate(_offsets(builder, row, ir.Constant(row.type, LANES), ROW_VECS)):
                p = _elem_ptr(context, builder, out_t, args[1], types.intp, o, _VF)
                builder.store(accs[v * TILE_TOKENS + t], p, align=4)
        return context.get_dummy_value()
    return types.none(acc, out, off, stride), codegen


# Weight tile unpacking

@intrinsic
def v_gather_rows(typingctx, a, row0, col, n_rows):
    """a[min(row0 + i, n_rows - 1), col] for lanes i < 16 of a 2-D C-contiguous uint32 array, as 16 i32:
    one column of 16 consecutive rows; rows past the end repeat the last row (their results are
    never stored, and their scales are set to 0)."""
    def codegen(context, builder, sig, args):
        a_t, row0_t, col_t, n_t = sig.args
        i64 = ir.IntType(64)
        vi64 = ir.VectorType(i64, LANES)
        arr = context.make_array(a_t)(context, builder, args[0])
        stride = builder.extract_value(arr.strides, 0)                  # bytes per row
        row0 = context.cast(builder, args[1], row0_t, types.int64)
        col = context.cast(builder, args[2], col_t, types.int64)
        last = builder.sub(context.cast(builder, args[3], n_t, types.int64), ir.Constant(i64, 1))

        def splat(x):
            v = builder.insert_element(ir.Constant(vi64, ir.Undefined), x, ir.Constant(_I32, 0))
            return builder.shuffle_vector(v, v, ir.Constant(_VI32, [0] * LANES))
        rows = builder.add(splat(row0), ir.Constant(vi64, list(range(LANES))))
        rows = builder.select(builder.icmp_signed(">", rows, splat(last)), splat(last), rows)
        base = builder.add(builder.ptrtoint(arr.data, i64), builder.mul(col, ir.Constant(i64, 4)))
        addr = builder.add(splat(base), builder.mul(rows, splat(stride)))
        ptrs = builder.inttoptr(addr, ir.VectorType(_I32.as_pointer(), LANES))
        mask_t = ir.VectorType(ir.IntType(1), LANES)
        gather = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_VI32, [ptrs.type, _I32, mask_t, _VI32]), "llvm.masked.gather.v16i32.v16p0")
        return builder.call(gather, [ptrs, ir.Constant(_I32, 4), ir.Constant(mask_t, [1] * LANES),
                                     ir.Constant(_VI32, ir.Undefined)])
    return i32x16(a, row0, col, n_rows), codegen


@intrinsic
def v_store_nibbles(typingctx, w, wq, off_lo, off_hi):
    """Split 16 words of packed codes: wq[off_lo : +16] = w & 0x0F0F0F0F (low nibbles),
    wq[off_hi : +16] = (w >> 4) & 0x0F0F0F0F (high nibbles); wq a 1-D int32 array."""
    def codegen(context, builder, sig, args):
        _, wq_t, lo_t, hi_t = sig.args
        mask = ir.Constant(_VI32, [0x0F0F0F0F] * LANES)
        lo = builder.and_(args[0], mask)
        hi = builder.and_(builder.lshr(args[0], ir.Constant(_VI32, [4] * LANES)), mask)
        builder.store(lo, _elem_ptr(context, builder, wq_t, args[1], lo_t, args[2], _VI32), align=4)
        builder.store(hi, _elem_ptr(context, builder, wq_t, args[1], hi_t, args[3], _VI32), align=4)
        return context.get_dummy_value()
    return types.none(w, wq, off_lo, off_hi), codegen


@intrinsic
def v_store_octets_i8(typingctx, w0, w1, wq, off_even, off_odd):
    """int8 codes of one channel octet for 16 rows (w0: channels 8j..8j+3, w1: 8j+4..8j+7, one
    row per lane) -> unsigned codes q + 128 in VNNI octet order: wq[off_even : +16] = channels
    (8j, 8j+2, 8j+4, 8j+6) and wq[off_odd : +16] = (8j+1, 8j+3, 8j+5, 8j+7) of each row."""
    def codegen(context, builder, sig, args):
        _, _, wq_t, even_t, odd_t = sig.args
        vb = ir.VectorType(ir.IntType(8), 4 * LANES)
        b0, b1 = builder.bitcast(args[0], vb), builder.bitcast(args[1], vb)
        flip = ir.Constant(vb, [0x80] * (4 * LANES))                     # q + 128 = q xor 0x80
        for parity, off, off_t in ((0, args[3], even_t), (1, args[4], odd_t)):
            mask = [src + 4 * lane + parity + i for lane in range(LANES) for src, i in
                    ((0, 0), (0, 2), (4 * LANES, 0), (4 * LANES, 2))]
            v = builder.xor(builder.shuffle_vector(b0, b1, ir.Constant(ir.VectorType(_I32, 4 * LANES), mask)), flip)
            dst = _elem_ptr(context, builder, wq_t, args[2], off_t, off, _VI32)
            builder.store(builder.bitcast(v, _VI32), dst, align=4)
        return context.get_dummy_value()
    return types.none(w0, w1, wq, off_even, off_odd), codegen


# ----------------------------------------------------------------------------------------------
# Activation quantization, 16 channels at a time

# Per octet of channels: evens then odds (module docstring), for two octets = one 16-lane vector.
_OCTET_ORDER = [o + i for o in (0, 8) for i in (0, 2, 4, 6, 1, 3, 5, 7)]


@intrinsic
def v_absmax(typingctx, x, off, m):
    """Lane-wise max(m, |x[off : off+16]|) of a 1-D float32 array; reduce with `v_hmax`.

    Taken on the bit patterns with the sign cleared: for non-negative floats the integer order is the
    float order, and NaN and inf come out above every finite value, so one test (`< inf`) afterwards
    finds a non-finite block. A float max would need NaN handling in every step.
    """
    def codegen(context, builder, sig, args):
        v = builder.load(_elem_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1], _VI32), align=4)
        v = builder.and_(v, ir.Constant(_VI32, [0x7FFFFFFF] * LANES))
        mb = builder.bitcast(args[2], _VI32)
        return builder.bitcast(builder.select(builder.icmp_unsigned(">", v, mb), v, mb), _VF)
    return f32x16(x, off, m), codegen


@intrinsic
def v_hmax(typingctx, m):
    """The largest lane of a `v_absmax` result (compared as bit patterns, see there)."""
    def codegen(context, builder, sig, args):
        umax = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_I32, [_VI32]), "llvm.vector.reduce.umax.v16i32")
        return builder.bitcast(builder.call(umax, [builder.bitcast(args[0], _VI32)]), ir.FloatType())
    return types.float32(m), codegen


@intrinsic
def v_quantize_i8(typingctx, x, off, inv, q):
    """q[off : off+16] = rint(x[off : off+16] * inv) as int8, each octet stored evens then odds
    (`_OCTET_ORDER`); returns the sum of the 16 codes. The caller guarantees |x * inv| <= 127.5."""
    def codegen(context, builder, sig, args):
        x_t, off_t, inv_t, q_t = sig.args
        v = builder.load(_elem_ptr(context, builder, x_t, args[0], off_t, args[1], _VF), align=4)
        inv = context.cast(builder, args[2], inv_t, types.float32)
        inv = builder.insert_element(ir.Constant(_VF, ir.Undefined), inv, ir.Constant(_I32, 0))
        inv = builder.shuffle_vector(inv, inv, ir.Constant(_VI32, [0] * LANES))
        rint = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VF, [_VF]), "llvm.rint.v16f32")
        codes = builder.fptosi(builder.call(rint, [builder.fmul(v, inv)]), _VI32)
        perm = builder.shuffle_vector(codes, codes, ir.Constant(_VI32, _OCTET_ORDER))
        dst = _elem_ptr(context, builder, q_t, args[3], off_t, args[1], _VI8)
        builder.store(builder.trunc(perm, _VI8), dst, align=1)
        add = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I32, [_VI32]),
                                             "llvm.vector.reduce.add.v16i32")
        return builder.call(add, [codes])
    return types.int32(x, off, inv, q), codegen


# ----------------------------------------------------------------------------------------------
# Kernels


def _quantize_x(X, block, group_size, qx, sx, zt):
    """X float32 [T, K] -> qx int8 [Tp, K] (octets in VNNI order), sx float32 [Tp, nb], zt float32 [Tp, G].

        sx[t, b] = max|X[t, b-th block]| / 127,  qx[t, k] = round_half_even(X[t, k] * (1 / sx[t, b]))
        zt[t, g] = sum_{b in g} sx[t, b] * sum_{k in b} qx[t, k]
    qx, sx and zt must arrive zeroed (rows T..Tp-1 are token padding). A block holding NaN or inf
    gets sx = NaN (and qx = 0), so the token's outputs come out NaN, as in the float32 path.
    No fastmath: sx and the rounding must match reference/q4.py bit for bit (arcp would turn
    amax / 127 into amax * (1/127)).
    """
    for t in prange(X.shape[0]):
        x, q = X[t], qx[t]
        for b in range(X.shape[1] // block):
            k0 = b * block
            m = v_zeros()
            for o in range(k0, k0 + block, LANES):
                m = v_absmax(x, o, m)
            amax = v_hmax(m)
            if not amax < np.float32(np.inf):               # NaN or inf in the block
                sx[t, b] = np.nan
                zt[t, k0 // group_size] = np.nan
                continue
            d = amax / np.float32(127.0)
            inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
            s = 0
            for o in range(k0, k0 + block, LANES):
                s += v_quantize_i8(x, o, inv, q)
            sx[t, b] = d
            zt[t, k0 // group_size] += d * np.float32(s)


# Two builds of one loop nest (as ops_f32's attention): the rows of a batched decode step (a few
# tokens) take less time than a hand-off to the thread team, which on a busy machine can cost a
# scheduler time slice.
_quantize_x_i8 = parallel_kernel()(_quantize_x)
_quantize_x_i8_serial = kernel()(_quantize_x)
PARALLEL_QUANTIZE_MIN_TOKENS = 16


@kernel()
def _unpack_tile_q4(qw32, scales, zeros, n0, wq, sw, c):
    """Rows n0..n0+R-1 of an int4 weight into the scratch the register tile reads (rows past N:
    codes of the last row, scales 0):

        wq [K/4 * R] int32:  wq[s * R + r] = 4 codes of row n0+r for channel quad s (VNNI order)
        sw [G * R] float32:  sw[g * R + r] = scales[n0+r, g]
        c  [G * R] float32:  c[g * R + r]  = -scales[n0+r, g] * zeros[n0+r, g]   (zero-point term)
    qw32: the packed codes as uint32 [N, K/8] (word j = 8 codes = channels 8j..8j+7, 2 quads).
    """
    n_rows = qw32.shape[0]
    for j in range(qw32.shape[1]):
        for v in range(ROW_VECS):
            w = v_gather_rows(qw32, n0 + v * LANES, j, n_rows)
            v_store_nibbles(w, wq, 2 * j * TILE_ROWS + v * LANES, (2 * j + 1) * TILE_ROWS + v * LANES)
    for r in range(TILE_ROWS):
        for g in range(scales.shape[1]):
            live = n0 + r < n_rows
            s = as_f32(scales[n0 + r, g]) if live else np.float32(0.0)
            sw[g * TILE_ROWS + r] = s
            c[g * TILE_ROWS + r] = -s * np.float32(zeros[n0 + r, g]) if live else np.float32(0.0)


@kernel()
def _unpack_tile_q8(qw32, scales, n0, wq, sw, c):
    """As `_unpack_tile_q4` for an int8 weight (Q8Prepared): codes become q + 128 (vpdpbusd wants
    them unsigned), so the zero point is 128: c = -128 * scales. qw32: the int8 codes as uint32 [N, K/4]."""
    n_rows = qw32.shape[0]
    for j in range(qw32.shape[1] // 2):
        for v in range(ROW_VECS):
            w0 = v_gather_rows(qw32, n0 + v * LANES, 2 * j, n_rows)
            w1 = v_gather_rows(qw32, n0 + v * LANES, 2 * j + 1, n_rows)
            v_store_octets_i8(w0, w1, wq, 2 * j * TILE_ROWS + v * LANES, (2 * j + 1) * TILE_ROWS + v * LANES)
    for r in range(TILE_ROWS):
        for g in range(scales.shape[1]):
            live = n0 + r < n_rows
            sw[g * TILE_ROWS + r] = as_f32(scales[n0 + r, g]) if live else np.float32(0.0)
            c[g * TILE_ROWS + r] = np.float32(-128.0) * as_f32(scales[n0 + r, g]) if live else np.float32(0.0)


@kernel(fastmath=FASTMATH_REDUCE)
def _tile_products(wq, sw, c, group_size, qx32, sx, zt, qs, block, n0, n_rows, out, kind):
    """out[t, n0 : n0+R] for every token t, from one unpacked weight tile (see `_unpack_tile_q4`):
    the module docstring's sum, block by block in the register tile. kind: what the tile holds,
    KIND_Q4 int4 codes (0..15), KIND_Q8 codes + 128, KIND_Q6 q6 codes + 32 (`Q6_PLUS32`; each block
    starts from 96 · qs[t, b], the block's sum of activation codes). The dots for the smaller ranges
    are cheaper on AVX2 (int8_dot.py); all three give the integers of codes + 128 (or int4 codes).

    qx32 int32 [Tp * K/4] (4 qx bytes per element, Tp = T rounded up to TT); sx float32 [Tp * nb];
    zt float32 [Tp * G]; qs int32 [Tp * nb] (KIND_Q6 only); out float32 [T * N]. fastmath: the float
    epilogue is contracted and the per-block sums reassociate anyway; NaN/inf still propagate
    (FASTMATH_REDUCE).
    """
    n_tokens = out.shape[0] // n_rows
    quads = wq.shape[0] // TILE_ROWS                            # K/4
    n_groups = sw.shape[0] // TILE_ROWS
    nb = quads * 4 // block
    edge = np.empty(TILE_TOKENS * TILE_ROWS, np.float32)        # [TT, R] a tile that overhangs out
    for t0 in range(0, n_tokens, TILE_TOKENS):
        acc = tile_zeros_f32()
        for b in range(nb):
            acc_i = tile_zeros_i32()
            if kind == KIND_Q4:
                for s in range(b * block // 4, (b + 1) * block // 4, Q4_QUADS):
                    acc_i = tile_dpbusd_q4(acc_i, wq, s * TILE_ROWS, qx32, t0 * quads + s, quads)
            elif kind == KIND_Q6:
                acc_i = tile_splat_i32(qs, t0 * nb + b, nb, 96)
                for s in range(b * block // 4, (b + 1) * block // 4, Q6_QUADS):
                    acc_i = tile_dpbusd_q6(acc_i, wq, s * TILE_ROWS, qx32, t0 * quads + s, quads)
            else:
                for s in range(b * block // 4, (b + 1) * block // 4):
                    acc_i = tile_dpbusd(acc_i, wq, s * TILE_ROWS, qx32, t0 * quads + s, quads)
            acc = tile_fma_i32(acc, acc_i, sw, (b * block // group_size) * TILE_ROWS, sx, t0 * nb + b, nb)
        for g in range(n_groups):
            acc = tile_axpy(acc, c, g * TILE_ROWS, zt, t0 * n_groups + g, n_groups)
        if t0 + TILE_TOKENS <= n_tokens and n0 + TILE_ROWS <= n_rows:
            tile_store(acc, out, t0 * n_rows + n0, n_rows)
        else:
            tile_store(acc, edge, 0, TILE_ROWS)
            for t in range(min(TILE_TOKENS, n_tokens - t0)):
                for r in range(min(TILE_ROWS, n_rows - n0)):
                    out[(t0 + t) * n_rows + n0 + r] = edge[t * TILE_ROWS + r]


@parallel_kernel()
def _matmul_q4_i8(qw32, scales, zeros, group_size, qx32, sx, zt, block, out):
    """out [T * N] = the int4 x int8 product (module docstring, without the salient part); qw32 uint32
    [N, K/8]. Row tiles split across threads; each thread unpacks its tile into its own scratch."""
    n_rows, quads, n_groups = qw32.shape[0], 2 * qw32.shape[1], scales.shape[1]
    for tile in prange((n_rows + TILE_ROWS - 1) // TILE_ROWS):
        wq = np.empty(quads * TILE_ROWS, np.int32)              # [K/4, R]
        sw = np.empty(n_groups * TILE_ROWS, np.float32)         # [G, R]
        c = np.empty(n_groups * TILE_ROWS, np.float32)          # [G, R]
        _unpack_tile_q4(qw32, scales, zeros, tile * TILE_ROWS, wq, sw, c)
        _tile_products(wq, sw, c, group_size, qx32, sx, zt, qx32, block, tile * TILE_ROWS, n_rows, out, KIND_Q4)


@parallel_kernel()
def _matmul_q8_i8(qw32, scales, group_size, qx32, sx, zt, block, out):
    """out [T * N] = the int8 x int8 product (`matmul_q8_i8`); qw32 uint32 [N, K/4]. As `_matmul_q4_i8`."""
    n_rows, quads, n_groups = qw32.shape[0], qw32.shape[1], scales.shape[1]
    for tile in prange((n_rows + TILE_ROWS - 1) // TILE_ROWS):
        wq = np.empty(quads * TILE_ROWS, np.int32)              # [K/4, R]
        sw = np.empty(n_groups * TILE_ROWS, np.float32)         # [G, R]
        c = np.empty(n_groups * TILE_ROWS, np.float32)          # [G, R]
        _unpack_tile_q8(qw32, scales, tile * TILE_ROWS, wq, sw, c)
        _tile_products(wq, sw, c, group_size, qx32, sx, zt, qx32, block, tile * TILE_ROWS, n_rows, out, KIND_Q8)


# ----------------------------------------------------------------------------------------------
# Public wrappers: check, allocate, call the kernels.


def quantize_activations(X: np.ndarray, group_size: int, block: int = ACT_BLOCK):
    """X float32 [T, K] -> (qx int8 [Tp, K] in VNNI octet order, sx [Tp, K/B], zt [Tp, G]) with
    Tp = T rounded up to TILE_TOKENS; padding rows are zero. See `_quantize_x_i8`."""
    t, k = X.shape
    tp = -(-t // TILE_TOKENS) * TILE_TOKENS
    qx = np.zeros((tp, k), np.int8)
    sx = np.zeros((tp, k // block), np.float32)
    zt = np.zeros((tp, k // group_size), np.float32)
    (_quantize_x_i8 if t >= PARALLEL_QUANTIZE_MIN_TOKENS else _quantize_x_i8_serial)(X, block, group_size, qx, sx, zt)
    return qx, sx, zt


def _check_block(group_size, block):
    if group_size % block or block % LANES:        # activations are quantized 16 channels at a time
        raise UsageError(f"activation block {block} must be a multiple of {LANES} dividing the group size {group_size}")


def matmul_q4_i8(p: Q4Prepared, X: np.ndarray, out: np.ndarray | None = None,
                 block: int = ACT_BLOCK) -> np.ndarray:
    """Prefill: Y [T, N] = X W^T for X float32 [T, K], activations quantized to int8 per token and
    block of `block` channels (module docstring). Needs an int8 dot (`INT8_DOT`); callers dispatch with
    `use_int8_activations`."""
    assert INT8_DOT, "matmul_q4_i8 needs an int8 dot (AVX2 or VNNI); dispatch with use_int8_activations"
    n, k = p.shape
    _check_mat(X, k)
    t = X.shape[0]
    out = _check_out(out, (t, n))
    _check_block(p.group_size, block)
    m = p.n_salient
    Xq = X
    if m or not X.flags.c_contiguous:
        Xq = np.array(X, np.float32, order="C")
        Xq[:, p.sal_idx[:m]] = 0.0                   # salient channels are added in float32 below
    qx, sx, zt = quantize_activations(Xq, p.group_size, block)
    qw32 = p.qweight.view(np.uint32)                 # [N, K/8]: K is a multiple of 32
    _matmul_q4_i8(qw32, p.scales, p.zeros, p.group_size, qx.view(np.int32).reshape(-1),
                  sx.reshape(-1), zt.reshape(-1), block, out.reshape(-1))
    if m:
        out += X[:, p.sal_idx[:m]] @ p.sal_w[:, :m].T                               # [T, m] @ [m, N]
    return out


def matmul_q8_i8(p: Q8Prepared, X: np.ndarray, out: np.ndarray | None = None,
                 block: int = ACT_BLOCK) -> np.ndarray:
    """Prefill with an int8 weight (the optional lm_head): Y [T, N] = X W^T with X quantized as in
    `matmul_q4_i8`:  Y[t, n] = sum_b sw[n, g(b)] sx[t, b] sum_{k in b} q[n, k] qx[t, k].
    vpdpbusd multiplies unsigned by signed bytes, so the weight enters as q + 128 and the zero-point
    term subtracts 128 sum qx (|lane sums| <= 255 * 127 * B: exact in float for B <= 128)."""
    assert INT8_DOT, "matmul_q8_i8 needs an int8 dot (AVX2 or VNNI); dispatch with use_int8_activations"
    n, k = p.shape
    _check_mat(X, k)
    t = X.shape[0]
    out = _check_out(out, (t, n))
    _check_block(p.group_size, block)
    qx, sx, zt = quantize_activations(np.ascontiguousarray(X), p.group_size, block)
    _matmul_q8_i8(p.qweight.view(np.uint32), p.scales, p.group_size, qx.view(np.int32).reshape(-1),
                  sx.reshape(-1), zt.reshape(-1), block, out.reshape(-1))
    return out
