"""Decode int4 x int8 matvec (AVX-512 VNNI, AVX-VNNI or AVX2: int8_dot.dpbusd): `matvec_q4_i8`.

The arithmetic of the prefill kernel of quant_i8_matmul.py (activations quantized to int8 per block of
B = 32 channels, integer dot products by `vpdpbusd`, weight and activation scales applied in float),
shaped for ONE token: no weight tile to unpack and share between tokens, so each weight row is read
once, straight from its packed bytes, 64 bytes at a time. That is the whole point: the float32
decode kernel (quant_f32.dot2_q4_f32) needs ~10 instructions per 16 packed bytes to widen,
convert and multiply the nibbles; here 64 packed bytes (128 weights) take a mask, a shift and two
`vpdpbusd` (BENCHMARKS.md compares the two). "vpdpbusd" below means int8_dot.dpbusd: the instruction
on VNNI targets, its exact equivalent elsewhere (on AVX2 `vpmaddubsw` + `vpmaddwd`, one pair per ymm
for the int4 codes, two for the int8 rows' bytes up to 255).

Shapes: W [N, K], x [K], g = group size, G = K // g, B = ACT_BLOCK; a "chunk" = 64 packed bytes =
128 channels = 16 i32 lanes of 8 channels each.

Packed byte j holds channel 2j (low nibble) and 2j+1 (high nibble), so lo = bytes & 0x0F are the
even channels and hi = bytes >> 4 the odd ones. x is quantized once per call and split the same way
into qe (even channels) and qo (odd channels): vpdpbusd(vpdpbusd(0, lo, qe), hi, qo) leaves in lane
i the integer dot of channel octet 8i..8i+7 of the chunk, with no shuffle of weights or activations.
Every lane's octet lies inside one activation block and one weight group (g % 128 == 0 or 128 % g
== 0, `supports_i8`), so per chunk

    acc += float(lane dots) * sw_lanes * sx_lanes

with sx_lanes (each lane's activation scale) prepared once per call and sw_lanes (each lane's weight
scale) made from the row's scales (`_lane_scales`). The zero points, per row, at the end, 16 groups
at a time: acc -= sw[g] zw[g] zt[g], zt[g] = sum_{b in g} sx[b] sum_{k in b} qx[k] (quant_i8_matmul's
zt). Salient columns are zeroed before quantizing and added in float32:

    y[n] = sum_b sw[n, g(b)] sx[b] ( sum_{k in b} q[n, k] qx[k] - zw[n, g(b)] sum_{k in b} qx[k] )
           + salient_w[n] . x[salient_idx]

which is reference/q4.matmul_q4_i8 for one token. Rows come in pairs (two accumulation chains
sharing every activation load; `dot2_q4_i8`, shared with the one-call decode step). The
quantization of x is bit-identical to quant_i8_matmul._quantize_x_i8: a decoded token meets the
int8 activations it would meet in a prompt.

Not here: an int8 x int8 twin for the int8 lm_head. It measured slower than the float32 int8 kernel
(quant_f32.matvec_q8_f32), which already runs at memory speed on the head.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..errors import UsageError
from .int8_dot import AVX512, INT8_DOT, dpbusd, dpbusd_sum
from .policy import FASTMATH_REDUCE, kernel, parallel_kernel
from .quant_f32 import Q4Prepared, _check_out, _check_vec
from .quant_i8_matmul import ACT_BLOCK, i32x16, v_absmax, v_hmax
from .simd import LANES, _elem_ptr, as_f32, f32x16, load_f32, v_fma, v_hsum, v_load, v_load_u8, v_mul, v_splat, v_zeros

CHUNK = 64                                   # packed bytes of weights per chunk (one zmm)
CHUNK_CHANNELS = 2 * CHUNK                   # input channels per chunk
_I32 = ir.IntType(32)
_VI32 = ir.VectorType(_I32, LANES)
_VF = ir.VectorType(ir.FloatType(), LANES)
_VB = ir.VectorType(ir.IntType(8), CHUNK)


def _mask(builder, n, width):
    """<width x i1>: lane i < n (n an intp value; n >= width gives all ones). Compared in bytes:
    n is clamped to [0, width] first (width <= 64)."""
    it = n.type
    n = builder.select(builder.icmp_signed("<", n, ir.Constant(it, width)), n, ir.Constant(it, width))
    n = builder.select(builder.icmp_signed("<", n, ir.Constant(it, 0)), ir.Constant(it, 0), n)
    i8 = ir.IntType(8)
    vb = ir.VectorType(i8, width)
    v = builder.insert_element(ir.Constant(vb, ir.Undefined), builder.trunc(n, i8), ir.Constant(_I32, 0))
    v = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, width), [0] * width))
    return builder.icmp_signed("<", ir.Constant(vb, list(range(width))), v)


def _masked_load(builder, ptr, mask, vecty):
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vecty, [ptr.type, _I32, mask.type, vecty]),
        f"llvm.masked.load.{_mangle(vecty)}.p0")
    return builder.call(fn, [ptr, ir.Constant(_I32, 1), mask, ir.Constant(vecty, None)])


def _load_part(builder, ptr, n, vecty):
    """vecty (16 lanes of i8 or i16) from ptr: lanes i < n (an intp value) as they are, the others 0 and
    not read. AVX-512 has masked loads of bytes and words; AVX2 does not (LLVM would test and load lane
    by lane): there the n elements are copied into a zeroed stack vector by a loop of n steps (the
    group tails these serve are short), then loaded whole. The same values."""
    if AVX512:
        return _masked_load(builder, ptr, _mask(builder, n, vecty.count), vecty)
    buf = cgutils.alloca_once(builder, vecty)
    builder.store(ir.Constant(vecty, None), buf)
    it = n.type
    n = builder.select(builder.icmp_signed("<", n, ir.Constant(it, vecty.count)), n, ir.Constant(it, vecty.count))
    src = builder.bitcast(ptr, vecty.element.as_pointer())
    dst = builder.bitcast(buf, vecty.element.as_pointer())
    with cgutils.for_range(builder, n) as loop:
        builder.store(builder.load(builder.gep(src, [loop.index])), builder.gep(dst, [loop.index]))
    return builder.load(buf)


def _load_bytes(builder, ptr, n, width):
    """<width x i8> from ptr (i8* or a vector pointer): bytes i < n as they are, the others 0 and not
    read. The caller guarantees n % 4 == 0 (every chunk tail here is whole 16-byte pieces). AVX2 has
    no byte-masked load (LLVM would load byte by byte, a `vpinsrb` and a branch each): there the mask
    is one per dword (`vpmaskmovd`), the same bytes read, the same values."""
    vb = ir.VectorType(ir.IntType(8), width)
    if AVX512:
        return _masked_load(builder, builder.bitcast(ptr, vb.as_pointer()), _mask(builder, n, width), vb)
    vd = ir.VectorType(_I32, width // 4)
    v = _masked_load(builder, builder.bitcast(ptr, vd.as_pointer()),
                     _mask(builder, builder.ashr(n, ir.Constant(n.type, 2)), width // 4), vd)
    return builder.bitcast(v, vb)


def _mangle(vecty):
    e = vecty.element
    return f"v{vecty.count}" + ("f32" if isinstance(e, ir.FloatType) else f"i{e.width}")


def _intp(context, builder, val, ty):
    return context.cast(builder, val, ty, types.intp)


@intrinsic
def v_dot_q4_i8(typingctx, w, w_off, n, qe, qo, x_off):
    """Lane i: the integer dot of channel octet i of the chunk w.flat[w_off : w_off+64] (packed
    int4; bytes past n read as 0) with the int8 activations qe[x_off : x_off+64] (even channels)
    and qo[x_off : x_off+64] (odd channels)."""
    def codegen(context, builder, sig, args):
        w_t, woff_t, n_t, qe_t, qo_t, xoff_t = sig.args
        w = _load_bytes(builder, _elem_ptr(context, builder, w_t, args[0], woff_t, args[1], _VB),
                        _intp(context, builder, args[2], n_t), CHUNK)
        lo = builder.and_(w, ir.Constant(_VB, [15] * CHUNK))
        hi = builder.and_(builder.lshr(w, ir.Constant(_VB, [4] * CHUNK)), ir.Constant(_VB, [15] * CHUNK))
        xe = builder.load(_elem_ptr(context, builder, qe_t, args[3], xoff_t, args[5], _VB), align=1)
        xo = builder.load(_elem_ptr(context, builder, qo_t, args[4], xoff_t, args[5], _VB), align=1)
        return dpbusd_sum(builder, ir.Constant(_VI32, [0] * LANES), [(lo, xe), (hi, xo)], 15)
    return i32x16(w, w_off, n, qe, qo, x_off), codegen


@intrinsic
def v_dot2_q4_i8_full(typingctx, w, off_a, off_b, qe, qo, x_off):
    """(`v_dot_q4_i8` of the full chunk at off_a, of the full chunk at off_b): plain 64-byte loads, no
    masks, the activation loads shared by the two rows. Integer sums: the lanes are `v_dot_q4_i8`'s."""
    def codegen(context, builder, sig, args):
        w_t, oa_t, ob_t, qe_t, qo_t, xoff_t = sig.args
        xe = builder.load(_elem_ptr(context, builder, qe_t, args[3], xoff_t, args[5], _VB), align=1)
        xo = builder.load(_elem_ptr(context, builder, qo_t, args[4], xoff_t, args[5], _VB), align=1)
        out = []
        for off, off_t in ((args[1], oa_t), (args[2], ob_t)):
            v = builder.load(_elem_ptr(context, builder, w_t, args[0], off_t, off, _VB), align=1)
            lo = builder.and_(v, ir.Constant(_VB, [15] * CHUNK))
            hi = builder.and_(builder.lshr(v, ir.Constant(_VB, [4] * CHUNK)), ir.Constant(_VB, [15] * CHUNK))
            out.append(dpbusd_sum(builder, ir.Constant(_VI32, [0] * LANES), [(lo, xe), (hi, xo)], 15))
        return context.make_tuple(builder, sig.return_type, out)
    return types.UniTuple(i32x16, 2)(w, off_a, off_b, qe, qo, x_off), codegen


def _spread(context, builder, sig, args, parts):
    """Lanes of 16 // parts consecutive copies each of a.flat[off], ..., a.flat[off + parts − 1]
    (a float32 array or fp16 bits, simd.load_f32: args[0], offset args[1]), read by one plain load."""
    a_t, off_t = sig.args
    v = load_f32(context, builder, a_t, args[0], off_t, args[1], parts)
    return builder.shuffle_vector(v, v, ir.Constant(_VI32, [i * parts // LANES for i in range(LANES)]))


@intrinsic
def v_splat_at(typingctx, a, off):
    """16 copies of a.flat[off] (float32): no negative-index guard (the caller's offset is >= 0)."""
    return f32x16(a, off), lambda context, builder, sig, args: _spread(context, builder, sig, args, 1)


@intrinsic
def v_halves_at(typingctx, a, off):
    """Lanes 0-7 = a.flat[off], lanes 8-15 = a.flat[off + 1] (both read: a full chunk's two groups)."""
    return f32x16(a, off), lambda context, builder, sig, args: _spread(context, builder, sig, args, 2)


@intrinsic
def v_quads_at(typingctx, a, off):
    """Lanes 4j .. 4j+3 = a.flat[off + j], j < 4 (a full chunk's four groups of 32 channels)."""
    return f32x16(a, off), lambda context, builder, sig, args: _spread(context, builder, sig, args, 4)


@intrinsic
def v_dot_q8_i8(typingctx, w, e_off, o_off, n, qe, qo, x_off):
    """Lane i: the integer dot of channel octet i of a chunk of int8 rows (`q8_rows`: u = q + 128,
    the chunk's even channels at w.flat[e_off : e_off+n], its odd ones at w.flat[o_off : o_off+n];
    bytes past n read as 0) with the int8 activations qe[x_off : x_off+64] and qo[x_off : x_off+64]:
    sum_k u_k qx_k, the + 128 left for the caller (`q8_lane_zero`)."""
    def codegen(context, builder, sig, args):
        w_t, eoff_t, ooff_t, n_t, qe_t, qo_t, xoff_t = sig.args
        n = _intp(context, builder, args[3], n_t)
        we = _load_bytes(builder, _elem_ptr(context, builder, w_t, args[0], eoff_t, args[1], _VB), n, CHUNK)
        wo = _load_bytes(builder, _elem_ptr(context, builder, w_t, args[0], ooff_t, args[2], _VB), n, CHUNK)
        xe = builder.load(_elem_ptr(context, builder, qe_t, args[4], xoff_t, args[6], _VB), align=1)
        xo = builder.load(_elem_ptr(context, builder, qo_t, args[5], xoff_t, args[6], _VB), align=1)
        acc = dpbusd(builder, ir.Constant(_VI32, [0] * LANES), we, xe)
        return dpbusd(builder, acc, wo, xo)
    return i32x16(w, e_off, o_off, n, qe, qo, x_off), codegen


@intrinsic
def v_quantize_split(typingctx, x, off, inv, qe, qo, q_off):
    """The 32 channels x[off : off+32] -> rint(x · inv) as int8, even channels to qe[q_off : +16],
    odd channels to qo[q_off : +16]; returns the sum of the 32 codes. The caller guarantees
    |x · inv| <= 127.5. Same operations as quant_i8_matmul.v_quantize_i8 (fmul, rint), so the same codes."""
    def codegen(context, builder, sig, args):
        x_t, off_t, inv_t, qe_t, qo_t, qoff_t = sig.args
        v32 = ir.VectorType(ir.FloatType(), 2 * LANES)
        v = builder.load(_elem_ptr(context, builder, x_t, args[0], off_t, args[1], v32), align=4)
        inv = context.cast(builder, args[2], inv_t, types.float32)
        inv = builder.insert_element(ir.Constant(v32, ir.Undefined), inv, ir.Constant(_I32, 0))
        inv = builder.shuffle_vector(inv, inv, ir.Constant(ir.VectorType(_I32, 2 * LANES), [0] * (2 * LANES)))
        rint = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v32, [v32]), "llvm.rint.v32f32")
        codes = builder.fptosi(builder.call(rint, [builder.fmul(v, inv)]), ir.VectorType(_I32, 2 * LANES))
        vb = ir.VectorType(ir.IntType(8), LANES)
        for parity, q, q_t in ((0, args[3], qe_t), (1, args[4], qo_t)):
            half = builder.shuffle_vector(codes, codes, ir.Constant(_VI32, list(range(parity, 2 * LANES, 2))))
            builder.store(builder.trunc(half, vb), _elem_ptr(context, builder, q_t, q, qoff_t, args[5], vb), align=1)
        add = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_I32, [ir.VectorType(_I32, 2 * LANES)]), "llvm.vector.reduce.add.v32i32")
        return builder.call(add, [codes])
    return types.int32(x, off, inv, qe, qo, q_off), codegen


@intrinsic
def v_halves(typingctx, a, b):
    """Lanes 0-7 = a, lanes 8-15 = b (two scalars)."""
    def codegen(context, builder, sig, args):
        a = context.cast(builder, args[0], sig.args[0], types.float32)
        b = context.cast(builder, args[1], sig.args[1], types.float32)
        va = builder.insert_element(ir.Constant(_VF, ir.Undefined), a, ir.Constant(_I32, 0))
        va = builder.insert_element(va, b, ir.Constant(_I32, 1))
        return builder.shuffle_vector(va, va, ir.Constant(_VI32, [0] * 8 + [1] * 8))
    return f32x16(a, b), codegen


@intrinsic
def v_i2f(typingctx, v):
    """int32 lanes -> float32 lanes (exact below 2^24)."""
    def codegen(context, builder, sig, args):
        return builder.sitofp(args[0], _VF)
    return f32x16(v), codegen


@intrinsic
def v_load_part(typingctx, x, off, n):
    """x[off : off+16] of a 1-D float32 array (or fp16 bits, uint16: simd.load_f32), lanes i >= n read
    as 0 (and not touched)."""
    def codegen(context, builder, sig, args):
        x_t, off_t, n_t = sig.args
        n = _intp(context, builder, args[2], n_t)
        if x_t.dtype == types.uint16:
            vh = ir.VectorType(ir.IntType(16), LANES)
            h = _load_part(builder, _elem_ptr(context, builder, x_t, args[0], off_t, args[1], vh), n, vh)
            return builder.fpext(builder.bitcast(h, ir.VectorType(ir.HalfType(), LANES)), _VF)
        mask = _mask(builder, n, LANES)
        return _masked_load(builder, _elem_ptr(context, builder, x_t, args[0], off_t, args[1], _VF), mask, _VF)
    return f32x16(x, off, n), codegen


@intrinsic
def v_load_part_u8(typingctx, z, off, n):
    """z[off : off+16] of a 1-D uint8 array as float32, lanes i >= n read as 0."""
    def codegen(context, builder, sig, args):
        z_t, off_t, n_t = sig.args
        vb = ir.VectorType(ir.IntType(8), LANES)
        v = _load_part(builder, _elem_ptr(context, builder, z_t, args[0], off_t, args[1], vb),
                       _intp(context, builder, args[2], n_t), vb)
        return builder.uitofp(v, _VF)
    return f32x16(z, off, n), codegen


@intrinsic
def v_permute(typingctx, v, idx):
    """Lane i of the result = lane idx[i] of v (idx: a 1-D int32 array of 16 lane numbers)."""
    def codegen(context, builder, sig, args):
        _, idx_t = sig.args
        i = builder.load(_elem_ptr(context, builder, idx_t, args[1], types.intp, ir.Constant(ir.IntType(64), 0), _VI32),
                         align=4)
        if AVX512:
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_VF, [_VF, _VI32]), "llvm.x86.avx512.permvar.sf.512")
            return builder.call(fn, [args[0], i])
        return _permute_ymm(builder, args[0], i)
    return f32x16(v, idx), codegen


def _permute_ymm(builder, v, idx):
    """`v_permute` from 8-lane `vpermps` (AVX2): each half of the result picks lane idx & 7 from both
    halves of v and keeps the one idx points into. The same lanes as the 16-lane permute."""
    v8i, v8f = ir.VectorType(_I32, 8), ir.VectorType(ir.FloatType(), 8)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8f, [v8f, v8i]), "llvm.x86.avx2.permps")

    def half(x, h):
        return builder.shuffle_vector(x, x, ir.Constant(v8i, list(range(8 * h, 8 * h + 8))))
    out = []
    for h in range(2):
        ih = half(idx, h)
        lo, hi = builder.call(fn, [half(v, 0), ih]), builder.call(fn, [half(v, 1), ih])
        out.append(builder.select(builder.icmp_signed(">", ih, ir.Constant(v8i, [7] * 8)), hi, lo))
    return builder.shuffle_vector(out[0], out[1], ir.Constant(_VI32, list(range(LANES))))


# ----------------------------------------------------------------------------------------------
# Per-call prologue: quantize x (serial; each decode thread runs its own)


def padded(n: int, m: int) -> int:
    """n rounded up to a multiple of m."""
    return -(-n // m) * m


@kernel()
def quantize_vec(x, sal_idx, n_sal, group_size, xz, qe, qo, sxl, nzt):
    """x float32 [K] -> its int8 activations, as quant_i8_matmul._quantize_x_i8 makes them for one
    token (the same operations, no fastmath: bit-identical codes and scales):

        qe[k/2], qo[k/2]: the codes of the even and odd channels    [≥ padded(K/2, 64)] int8
        sxl[i]: the activation scale of lane i (channel octet i)    [≥ padded(K/8, 16)]
        nzt[g] = −zt[g] = −sum_{b in g} sx[b] sum_{k in b} qx[k]    [≥ padded(G, 16)]
    Padding comes out 0 (the buffers are reused for other K). xz [K]: scratch, x with the salient
    channels zeroed. A block holding NaN or inf gets scale NaN, so the outputs come out NaN.
    """
    K = x.shape[0]
    for k in range(K):
        xz[k] = x[k]
    for i in range(n_sal):
        xz[sal_idx[i]] = np.float32(0.0)
    for i in range(nzt.shape[0]):
        nzt[i] = np.float32(0.0)
    for b in range(K // ACT_BLOCK):                         # ACT_BLOCK = 32: two 16-lane vectors
        k0 = b * ACT_BLOCK
        amax = v_hmax(v_absmax(xz, k0 + LANES, v_absmax(xz, k0, v_zeros())))
        finite = amax < np.float32(np.inf)                # false for NaN and inf (v_absmax)
        d = amax / np.float32(127.0) if finite else np.float32(np.nan)
        inv = np.float32(1.0) / d if finite and d > 0 else np.float32(0.0)
        s = v_quantize_split(xz, k0, inv, qe, qo, k0 // 2)
        for i in range(k0 // 8, (k0 + ACT_BLOCK) // 8):
            sxl[i] = d
        nzt[k0 // group_size] -= d * np.float32(s)
    for i in range(K // 8, sxl.shape[0]):
        sxl[i] = np.float32(0.0)
    for i in range(K // 2, qe.shape[0]):
        qe[i] = 0
        qo[i] = 0


@kernel()
def salient_x(x, sal_idx, x_sal):
    for i in range(sal_idx.shape[0]):
        x_sal[i] = x[sal_idx[i]]


def group_index(group_size: int, k: int):
    """The chunk -> group tables for K = k: (gpc: groups per chunk, 1 when a group spans one or
    more chunks; gidx int32 [16]: lane i -> its group counted from the chunk's first; g0s int64
    [chunks]: each chunk's first group)."""
    gpc = max(1, CHUNK_CHANNELS // group_size)
    gidx = (np.arange(LANES) * 8 // group_size).astype(np.int32)
    g0s = np.arange(0, k, CHUNK_CHANNELS, dtype=np.int64) // group_size
    return gpc, gidx, g0s


# ----------------------------------------------------------------------------------------------
# Row kernels (two rows at a time) and the standalone matvecs


@kernel(fastmath=FASTMATH_REDUCE, inline=True)
def _lane_scales(sc, r, g0, gpc, gidx, G):
    """The weight scale of every lane of a chunk whose first group is g0, row r of sc [rows, G]:
    one broadcast when the chunk lies in one group (gpc = 1), two halves for two groups (the
    common g = 64 of int4), else a masked load and a permute by gidx. In a last, partial chunk the
    groups past G are clamped to G − 1 (their lanes' dots are 0)."""
    if gpc == 1:
        return v_splat(as_f32(sc[r, g0]))
    if gpc == 2:
        return v_halves(as_f32(sc[r, g0]), as_f32(sc[r, min(g0 + 1, G - 1)]))
    return v_permute(v_load_part(sc, r * G + g0, G - g0), gidx)


@kernel(fastmath=FASTMATH_REDUCE, inline=True)
def _full_chunk(qw, wa, wb, qe, qo, sxl, c, la, lb, acc_a, acc_b):
    """Whole chunk c of the rows at byte offsets wa, wb, added to (acc_a, acc_b): each row's integer dot
    times its lane scales (la, lb) times the activation's."""
    o = c * CHUNK
    da, db = v_dot2_q4_i8_full(qw, wa + o, wb + o, qe, qo, o)
    sx = v_load(sxl, c * LANES)
    return v_fma(v_i2f(da), v_mul(la, sx), acc_a), v_fma(v_i2f(db), v_mul(lb, sx), acc_b)


@kernel(fastmath=FASTMATH_REDUCE, inline=True)
def dot2_q4_i8(qw, sc, z, sw, ra, rb, gpc, gidx, g0s, qe, qo, sxl, nzt, x_sal):
    """Rows ra and rb of the int4 x int8 product (module docstring): (y_a, y_b).

    qw [rows, K/2], sc and z [rows, G], sw [rows, m16], C-contiguous (a stack [L, N, ·] passes
    its (L, N) axes merged). gpc: groups per chunk (1 when g >= 128); gidx, g0s: `group_index`.

    Rows are addressed by offset, never sliced, and the function is inlined (policy.kernel: a call
    or a slice per row costs reference-count updates on every array). Whole chunks run without
    masks, in one loop per groups-per-chunk case (gpc is 1, 2 or 4: `supports_i8`), their lane scales
    read by one plain load (`v_splat_at`, `v_halves_at`, `v_quads_at`: the values `_lane_scales`
    gives), two chunks a pass when gpc = 1; a last partial chunk (K % 128 = 64) runs masked, as every
    chunk did before. The same integer lanes and the same float operations in the same order: bit for
    bit the masked loop's (BENCHMARKS.md, "The int4 x int8 row loop without masks").
    """
    nbytes, G, m16 = qw.shape[-1], sc.shape[-1], sw.shape[-1]
    wa, wb = ra * nbytes, rb * nbytes
    sa, sb = ra * G, rb * G
    nf = nbytes // CHUNK
    acc_a, acc_b = v_zeros(), v_zeros()
    if gpc == 1:
        for c in range(0, nf - 1, 2):       # two chunks a pass (LLVM unrolls the other cases itself)
            g0, g1 = g0s[c], g0s[c + 1]
            acc_a, acc_b = _full_chunk(qw, wa, wb, qe, qo, sxl, c, v_splat_at(sc, sa + g0),
                                       v_splat_at(sc, sb + g0), acc_a, acc_b)
            acc_a, acc_b = _full_chunk(qw, wa, wb, qe, qo, sxl, c + 1, v_splat_at(sc, sa + g1),
                                       v_splat_at(sc, sb + g1), acc_a, acc_b)
        if nf % 2:
            g0 = g0s[nf - 1]
            acc_a, acc_b = _full_chunk(qw, wa, wb, qe, qo, sxl, nf - 1, v_splat_at(sc, sa + g0),
                                       v_splat_at(sc, sb + g0), acc_a, acc_b)
    elif gpc == 2:
        for c in range(nf):
            g0 = g0s[c]
            acc_a, acc_b = _full_chunk(qw, wa, wb, qe, qo, sxl, c, v_halves_at(sc, sa + g0),
                                       v_halves_at(sc, sb + g0), acc_a, acc_b)
    else:
        for c in range(nf):
            g0 = g0s[c]
            acc_a, acc_b = _full_chunk(qw, wa, wb, qe, qo, sxl, c, v_quads_at(sc, sa + g0),
                                       v_quads_at(sc, sb + g0), acc_a, acc_b)
    for c in range(nf, g0s.shape[0]):
        o = c * CHUNK
        da = v_dot_q4_i8(qw, wa + o, nbytes - o, qe, qo, o)
        db = v_dot_q4_i8(qw, wb + o, nbytes - o, qe, qo, o)
        g0 = g0s[c]
        sx = v_load(sxl, c * LANES)
        acc_a = v_fma(v_i2f(da), v_mul(_lane_scales(sc, ra, g0, gpc, gidx, G), sx), acc_a)
        acc_b = v_fma(v_i2f(db), v_mul(_lane_scales(sc, rb, g0, gpc, gidx, G), sx), acc_b)
    g16 = G - G % LANES                      # whole 16-group blocks: plain loads (the same values)
    for g0 in range(0, g16, LANES):
        zt = v_load(nzt, g0)
        acc_a = v_fma(v_mul(v_load(sc, sa + g0), v_load_u8(z, sa + g0)), zt, acc_a)
        acc_b = v_fma(v_mul(v_load(sc, sb + g0), v_load_u8(z, sb + g0)), zt, acc_b)
    for g0 in range(g16, G, LANES):
        zt = v_load(nzt, g0)
        acc_a = v_fma(v_mul(v_load_part(sc, ra * G + g0, G - g0), v_load_part_u8(z, ra * G + g0, G - g0)), zt, acc_a)
        acc_b = v_fma(v_mul(v_load_part(sc, rb * G + g0, G - g0), v_load_part_u8(z, rb * G + g0, G - g0)), zt, acc_b)
    for i in range(0, m16, LANES):
        xs = v_load(x_sal, i)
        acc_a = v_fma(v_load(sw, ra * m16 + i), xs, acc_a)
        acc_b = v_fma(v_load(sw, rb * m16 + i), xs, acc_b)
    return v_hsum(acc_a), v_hsum(acc_b)


# ----------------------------------------------------------------------------------------------
# int8 weight rows (Q8Linear) in the one-call decode step: one pass, no nibble split


def q8_rows(qweight: np.ndarray) -> np.ndarray:
    """int8 codes [N, K] (K % 32 == 0) -> the rows as `dot2_q8_i8` and quant_f32.dot2_q8_f32 read them:
    uint8 u = q + 128 (vpdpbusd multiplies unsigned by signed bytes), and in every chunk of 128
    channels (the last may be shorter: n = its channels / 2) the even channels first, then the odd:

        byte 128c + j      = u[128c + 2j]        j < n   (meets qe[64c + j])
        byte 128c + n + j  = u[128c + 2j + 1]            (meets qo[64c + j])

    so a chunk meets the activations in the int4 kernels' even/odd split, lane i = channel octet i."""
    n_rows, k = qweight.shape
    u = qweight.view(np.uint8) ^ np.uint8(0x80)                                   # q + 128
    out = np.empty((n_rows, k), np.uint8)
    for c in range(0, k, CHUNK_CHANNELS):
        part = u[:, c:c + CHUNK_CHANNELS]
        h = part.shape[1] // 2
        out[:, c:c + h], out[:, c + h:c + 2 * h] = part[:, 0::2], part[:, 1::2]
    return out


@kernel()
def q8_lane_zero(qe, qo, sxl, nzl):
    """nzl[i] = −128 · sxl[i] · (sum of the activation codes of channel octet i): the + 128 of the
    uint8 rows (`q8_rows`) taken back, per lane. Zero past K (qe, qo, sxl are zero there)."""
    for i in range(sxl.shape[0]):
        s = np.int32(0)
        for m in range(4 * i, 4 * i + 4):
            s += np.int32(qe[m]) + np.int32(qo[m])
        nzl[i] = np.float32(-128.0) * sxl[i] * np.float32(s)


@kernel(fastmath=FASTMATH_REDUCE, inline=True)
def dot2_q8_i8(qw, sc, ra, rb, gpc, gidx, g0s, qe, qo, sxl, nzl):
    """Rows ra and rb of int8 weights (`q8_rows`) times int8 activations (`quantize_vec`): (y_a, y_b),

        y[n] = sum_lanes sw[n, g(lane)] · ( sx[lane] · sum_{k in lane} u[n, k] qx[k] + nzl[lane] )

    with u = q + 128 and nzl from `q8_lane_zero`, i.e. sum_k W[n, k] · sx · qx[k]. qw uint8 [rows, K],
    sc [rows, G] (float32, or fp16 bits: simd.as_f32) (G = K / g, g the int8 group size, `supports_i8`); gpc, gidx, g0s:
    `group_index(g, K)`. Per 128 channels: two masked 64-byte loads and two vpdpbusd per row, the
    activation loads shared by the pair (twice the bytes of `dot2_q4_i8`, no nibble unpacking)."""
    K, G = qw.shape[-1], sc.shape[-1]
    wa, wb = ra * K, rb * K
    acc_a, acc_b = v_zeros(), v_zeros()
    for c in range(g0s.shape[0]):
        o = c * CHUNK_CHANNELS
        n = min(CHUNK, (K - o) // 2)
        da = v_dot_q8_i8(qw, wa + o, wa + o + n, n, qe, qo, c * CHUNK)
        db = v_dot_q8_i8(qw, wb + o, wb + o + n, n, qe, qo, c * CHUNK)
        g0 = g0s[c]
        sx, nz = v_load(sxl, c * LANES), v_load(nzl, c * LANES)
        acc_a = v_fma(v_fma(v_i2f(da), sx, nz), _lane_scales(sc, ra, g0, gpc, gidx, G), acc_a)
        acc_b = v_fma(v_fma(v_i2f(db), sx, nz), _lane_scales(sc, rb, g0, gpc, gidx, G), acc_b)
    return v_hsum(acc_a), v_hsum(acc_b)


@parallel_kernel()
def _matvec_q4_i8(qweight, scales, zeros, gpc, gidx, g0s, sal_w, qe, qo, sxl, nzt, x_sal, out):
    n = qweight.shape[0]
    for i in prange((n + 1) // 2):
        a, b = 2 * i, min(2 * i + 1, n - 1)
        ya, yb = dot2_q4_i8(qweight, scales, zeros, sal_w, a, b, gpc, gidx, g0s, qe, qo, sxl, nzt, x_sal)
        out[a] = ya
        out[b] = yb


# ----------------------------------------------------------------------------------------------
# Scratch and public wrappers


class VecScratch:
    """The per-call buffers of `quantize_vec` for inputs of up to k channels."""

    def __init__(self, k: int, m16: int = 0):
        self.xz = np.empty(k, np.float32)                               # [K]
        self.qe = np.zeros(padded(k // 2, CHUNK), np.int8)              # [K/2 ↑ 64]
        self.qo = np.zeros(padded(k // 2, CHUNK), np.int8)              # [K/2 ↑ 64]
        self.sxl = np.zeros(padded(k // 8, LANES), np.float32)          # [K/8 ↑ 16]
        self.nzt = np.zeros(padded(k // ACT_BLOCK, LANES), np.float32)  # [G ↑ 16], G <= K / 32
        self.x_sal = np.zeros(m16, np.float32)                          # [m16]


def supports_i8(group_size: int, k: int) -> bool:
    """Whether `matvec_q4_i8` takes a weight of input size k and this group size: blocks of
    ACT_BLOCK channels inside groups, and every chunk's lanes inside whole groups."""
    c = CHUNK_CHANNELS
    return not (group_size % ACT_BLOCK or k % ACT_BLOCK or (group_size % c and c % group_size))


def matvec_q4_i8(p: Q4Prepared, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Decode: y [N] = W x with x quantized to int8 (module docstring). Needs an int8 dot (`INT8_DOT`)."""
    assert INT8_DOT, "matvec_q4_i8 needs an int8 dot (AVX2 or VNNI)"
    n, k = p.shape
    _check_vec(x, k)
    out = _check_out(out, (n,))
    if not supports_i8(p.group_size, k):
        raise UsageError(f"int8-activation matvec needs group size and K multiples of {ACT_BLOCK}, and a "
                         f"group size dividing or a multiple of {CHUNK_CHANNELS}; got g={p.group_size}, K={k}")
    s = VecScratch(k, p.sal_idx.shape[0])
    quantize_vec(x, p.sal_idx, p.n_salient, p.group_size, s.xz, s.qe, s.qo, s.sxl, s.nzt)
    salient_x(x, p.sal_idx, s.x_sal)
    _matvec_q4_i8(p.qweight, p.scales, p.zeros, *group_index(p.group_size, k), p.sal_w,
                  s.qe, s.qo, s.sxl, s.nzt, s.x_sal, out)
    return out
