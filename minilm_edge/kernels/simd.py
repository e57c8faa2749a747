"""A 16-lane float32 vector for Numba (LLVM `<16 x float>`): the smallest SIMD vocabulary the
kernels need. On AVX-512 one zmm register, on AVX2 two ymm: LLVM legalises it, so the code stays
portable. None of these check bounds: kernels call them only with offsets their wrappers validated.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

LANES = 16
_F32 = ir.FloatType()
_VF = ir.VectorType(_F32, LANES)
_VI8 = ir.VectorType(ir.IntType(8), LANES)
_VI32 = ir.VectorType(ir.IntType(32), LANES)


class F32x16Type(types.Type):
    def __init__(self):
        super().__init__(name="F32x16")


f32x16 = F32x16Type()


@register_model(F32x16Type)
class _F32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VF)


def _elem_ptr(context, builder, arrty, arr, idxty, idx, vecty):
    """Pointer to arr.data[idx] (1-D contiguous array), typed as pointer to vecty."""
    a = context.make_array(arrty)(context, builder, arr)
    idx = context.cast(builder, idx, idxty, types.intp)
    return builder.bitcast(builder.gep(a.data, [idx]), vecty.as_pointer())


def load_f32(context, builder, arrty, arr, idxty, idx, n: int = LANES):
    """<n x float> from arr.flat[idx : idx+n]: float32 elements as they are, uint16 ones as fp16 bits
    widened exactly (`fpext`: one `vcvtph2ps` with F16C). Weight scales are fp16 in the file and the
    kernels read them there, memory-mapped, instead of from a float32 copy: the same values."""
    if arrty.dtype == types.uint16:
        vh = ir.VectorType(ir.HalfType(), n)
        p = _elem_ptr(context, builder, arrty, arr, idxty, idx, vh)
        return builder.fpext(builder.load(p, align=2), ir.VectorType(_F32, n))
    p = _elem_ptr(context, builder, arrty, arr, idxty, idx, ir.VectorType(_F32, n))
    return builder.load(p, align=4)


@intrinsic
def as_f32(typingctx, s):
    """A float32 scalar from a float32 (as it is) or from a uint16 holding fp16 bits (widened
    exactly): what a kernel writes for one weight scale, `as_f32(sc[r, g])`, so that it reads the
    file's fp16 scales in place (`load_f32`) or a float32 array alike."""
    if s not in (types.float32, types.uint16):
        return None

    def codegen(context, builder, sig, args):
        if sig.args[0] == types.float32:
            return args[0]
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), _F32)
    return types.float32(s), codegen


@intrinsic
def fma32(typingctx, a, b, c):
    """a * b + c for float32 scalars, one rounding, in exactly this order: a call, which fastmath's
    reassociation does not reorder (a sum of three-factor products written with `*` and `+` may come
    out in another order in another kernel, or for another array type: the rank LLVM gives each
    operand decides). Where two kernels must agree bit for bit, they write such sums with this."""
    def codegen(context, builder, sig, args):
        vals = [context.cast(builder, v, t, types.float32) for v, t in zip(args, sig.args)]
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32, [_F32] * 3), "llvm.fma.f32")
        return builder.call(fn, vals)
    return types.float32(a, b, c), codegen


@intrinsic
def v_zeros(typingctx):
    """A vector of 16 zeros."""
    def codegen(context, builder, sig, args):
        return ir.Constant(_VF, [0.0] * LANES)
    return f32x16(), codegen


@intrinsic
def v_splat(typingctx, s):
    """A vector of 16 copies of the scalar s."""
    def codegen(context, builder, sig, args):
        s = context.cast(builder, args[0], sig.args[0], types.float32)
        v = builder.insert_element(ir.Constant(_VF, ir.Undefined), s, ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(v, v, ir.Constant(_VI32, [0] * LANES))
    return f32x16(s), codegen


@intrinsic
def v_load(typingctx, x, off):
    """x[off : off+16] of a 1-D contiguous float32 array (or of fp16 bits, uint16: `load_f32`)."""
    def codegen(context, builder, sig, args):
        return load_f32(context, builder, sig.args[0], args[0], sig.args[1], args[1])
    return f32x16(x, off), codegen


@intrinsic
def v_store(typingctx, x, off, v):
    """x[off : off+16] = v for a 1-D contiguous float32 array."""
    def codegen(context, builder, sig, args):
        p = _elem_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1], _VF)
        builder.store(args[2], p, align=4)
        return context.get_dummy_value()
    return types.none(x, off, v), codegen


@intrinsic
def v_load_i8(typingctx, q, off):
    """q[off : off+16] of a 1-D contiguous int8 array, converted to float32."""
    def codegen(context, builder, sig, args):
        p = _elem_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1], _VI8)
        return builder.sitofp(builder.load(p, align=1), _VF)
    return f32x16(q, off), codegen


@intrinsic
def v_load_u8(typingctx, q, off):
    """q[off : off+16] of a 1-D contiguous uint8 array, converted to float32."""
    def codegen(context, builder, sig, args):
        p = _elem_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1], _VI8)
        return builder.uitofp(builder.load(p, align=1), _VF)
    return f32x16(q, off), codegen


@intrinsic
def prefetch(typingctx, a, off):
    """Ask for the cache line holding a.flat[off] (1-D view of a contiguous array) ahead of its use,
    into L2 (x86 `prefetcht1`; never faults, so off may lie past the end). Why: the batched step's
    row kernels stay on a pair of weight rows for B activation rows, long enough that the hardware
    prefetcher falls behind; into L2, not L1, because a B-row tile's activations fill most of L1
    (BENCHMARKS.md, "B = 8 at 4x": 576 x 1536 q6 rows from memory 4.1 ns per unit without,
    2.9 with prefetcht0, 1.9 with prefetcht1)."""
    def codegen(context, builder, sig, args):
        arr = context.make_array(sig.args[0])(context, builder, args[0])
        i = context.cast(builder, args[1], sig.args[1], types.intp)
        p = builder.bitcast(builder.gep(arr.data, [i]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [p.type, i32, i32, i32]),
                                            "llvm.prefetch.p0")
        builder.call(fn, [p, ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])   # read, L2, data
        return context.get_dummy_value()
    return types.none(a, off), codegen


@intrinsic
def v_unpack_q4(typingctx, q, off):
    """16 packed bytes q[off : off+16] -> (low nibbles, high nibbles) as two float32 vectors.

    The bytes are widened to 32-bit lanes first and split there: one widening instead of two.
    """
    def codegen(context, builder, sig, args):
        p = _elem_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1], _VI8)
        w = builder.zext(builder.load(p, align=1), _VI32)
        lo = builder.and_(w, ir.Constant(_VI32, [15] * LANES))
        hi = builder.lshr(w, ir.Constant(_VI32, [4] * LANES))
        return context.make_tuple(builder, sig.return_type,
                                  [builder.sitofp(lo, _VF), builder.sitofp(hi, _VF)])
    return types.UniTuple(f32x16, 2)(q, off), codegen


@intrinsic
def v_fma(typingctx, a, b, c):
    """a * b + c, lane-wise, one rounding."""
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_VF, [_VF] * 3), "llvm.fma.v16f32")
        return builder.call(fn, args)
    return f32x16(a, b, c), codegen


def _binary(op, doc):
    @intrinsic
    def vop(typingctx, a, b):
        def codegen(context, builder, sig, args):
            return getattr(builder, op)(args[0], args[1])
        return f32x16(a, b), codegen
    vop.__doc__ = doc
    return vop


v_mul = _binary("fmul", "a * b, lane-wise.")
v_div = _binary("fdiv", "a / b, lane-wise.")


@intrinsic
def v_hsum(typingctx, v):
    """Sum of the 16 lanes (pairwise tree)."""
    def codegen(context, builder, sig, args):
        v, n = args[0], LANES
        while n > 1:
            n //= 2
            mask = ir.VectorType(ir.IntType(32), n)
            a = builder.shuffle_vector(v, v, ir.Constant(mask, list(range(n))))
            b = builder.shuffle_vector(v, v, ir.Constant(mask, list(range(n, 2 * n))))
            v = builder.fadd(a, b)
        return builder.extract_element(v, ir.Constant(ir.IntType(32), 0))
    return types.float32(v), codegen


# exp(x) = 2^n · e^r with n = round(x / ln 2), r = x − n·ln 2 (ln 2 in two parts, so r is exact
# enough), e^r by Cephes' degree-6 polynomial for expf; relative error ~1e-7 for x in [−87.3, 88.3].
_EXP_LO, _EXP_HI = -87.33654, 88.37626
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
             5.0000001201e-1)


@intrinsic
def v_exp(typingctx, x):
    """e^x lane-wise (x clamped to [−87.3, 88.3]: below, ~1e-38 instead of a denormal or 0)."""
    def codegen(context, builder, sig, args):
        def splat(c):
            return ir.Constant(_VF, [float(c)] * LANES)

        def vcall(name, *a):
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VF, [_VF] * len(a)), name)
            return builder.call(fn, list(a))
        x = vcall("llvm.maxnum.v16f32", vcall("llvm.minnum.v16f32", args[0], splat(_EXP_HI)), splat(_EXP_LO))
        n = vcall("llvm.rint.v16f32", builder.fmul(x, splat(1.4426950408889634)))
        r = vcall("llvm.fma.v16f32", n, splat(-_LN2_HI), x)
        r = vcall("llvm.fma.v16f32", n, splat(-_LN2_LO), r)
        p = splat(_EXP_POLY[0])
        for c in _EXP_POLY[1:]:
            p = vcall("llvm.fma.v16f32", p, r, splat(c))
        y = builder.fadd(vcall("llvm.fma.v16f32", p, builder.fmul(r, r), r), splat(1.0))
        e = builder.shl(builder.add(builder.fptosi(n, _VI32), ir.Constant(_VI32, [127] * LANES)),
                        ir.Constant(_VI32, [23] * LANES))
        return builder.fmul(y, builder.bitcast(e, _VF))
    return f32x16(x), codegen
