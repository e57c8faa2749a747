"""The one integer dot product of every int8-activation kernel, `dpbusd`, for the JIT target's
instruction set: unsigned bytes times signed bytes, each group of 4 products summed into an i32 lane,

    acc[i] += u[4i] s[4i] + u[4i+1] s[4i+1] + u[4i+2] s[4i+2] + u[4i+3] s[4i+3]      i < 16

(64 bytes u, 64 bytes s, 16 i32 lanes: one zmm each). The unsigned side is the weight (int4 codes
0..15, q6 codes, int8 codes + 128); the signed side the int8 activations (|s| <= 127).

    INT8_ISA      the instruction                                   a 64-byte dot costs
    avx512vnni    `vpdpbusd` zmm (AVX512-VNNI)                      1 instruction
    avxvnni       `vpdpbusd` ymm twice (AVX-VNNI: Alder Lake on)   2
    avx2          per ymm half: `vpmaddubsw` (u8 x s8 -> pairs      4 (u < 128), 8 (u up to 255)
                  summed to saturating i16), `vpmaddwd` with ones
                  (-> i32 quads), `vpaddd`
    None          no int8 dot (not x86-64 AVX2): the float32 kernels run instead (INT8_DOT False)

Exactness on AVX2: `vpmaddubsw` saturates a pair u0 s0 + u1 s1 to int16. For u < 128 and |s| <= 128 a
pair is at most 2 · 127 · 128 = 32512: never saturated (int4 codes, q6 codes + 32, the constant 96).
For u up to 255 (int8 codes + 128, q6 codes + 128) the bytes are split, u = (u & 0x7F) + (u & 0x80),
and each part takes its own pmaddubsw/pmaddwd, summed in i32: a pair of the high part (0 or 128 times
s) lies in [−32768, 32512] for any signed byte s, inside int16.
Two or more dots of bytes below 64 (`dpbusd_sum`) add their vpmaddubsw pairs in int16 before one
vpmaddwd: each int16 lane stays within 4 · 63 · 128 < 32767, so nothing saturates either.
So every ISA gives the same integers, bit for bit (tests/test_targets.py compiles the kernels for an
AVX2 target in a subprocess and compares). Callers say which case they are in: `u_max`.

The target is Numba's (numba.core.codegen.JITCPUCodegen): NUMBA_CPU_FEATURES when set; else, with
NUMBA_CPU_NAME set to a CPU other than the host, that CPU's features, which LLVM does not list here:
taken as none (the float32 kernels run everywhere); else the host's features.
"""
from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils

LANES = 16                                   # i32 lanes of a dot (simd.LANES)
_I8, _I16, _I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
_VI32 = ir.VectorType(_I32, LANES)           # <16 x i32>
_VB = ir.VectorType(_I8, 4 * LANES)          # <64 x i8>
_HI32 = ir.VectorType(_I32, LANES // 2)      # <8 x i32>: one ymm
_HB = ir.VectorType(_I8, 2 * LANES)          # <32 x i8>
_HI16 = ir.VectorType(_I16, LANES)           # <16 x i16>


def jit_target_features() -> frozenset[str]:
    """The features (`+avx2`, ...) Numba compiles for, by Numba's own rule (module docstring)."""
    from numba.core import config
    from numba.core.codegen import get_host_cpu_features
    if config.CPU_FEATURES is not None:
        features = config.CPU_FEATURES
    elif config.CPU_NAME not in (None, "host"):
        features = ""
    else:
        features = get_host_cpu_features()
    return frozenset(f for f in features.split(",") if f.startswith("+"))


def int8_isa(features) -> str | None:
    """The instruction set `dpbusd` uses on a target with these features (module docstring)."""
    if "+avx512vnni" in features:
        return "avx512vnni"
    if "+avxvnni" in features:
        return "avxvnni"
    if "+avx2" in features:
        return "avx2"
    return None


TARGET_FEATURES = jit_target_features()
INT8_ISA = int8_isa(TARGET_FEATURES)
INT8_DOT = INT8_ISA is not None              # the int8-activation kernels compile and run
AVX512 = "+avx512f" in TARGET_FEATURES       # zmm registers (32 of them; ymm targets have 16)


def _call(builder, name, ret, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _halves(builder, v, ty):
    """v (512 bits) bitcast to two 256-bit vectors of type ty."""
    n = ty.count
    w = builder.bitcast(v, ir.VectorType(ty.element, 2 * n))
    return [builder.shuffle_vector(w, w, ir.Constant(ir.VectorType(_I32, n), list(range(h * n, h * n + n))))
            for h in range(2)]


def _concat(builder, a, b):
    n = a.type.count
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, 2 * n), list(range(2 * n))))


def _maddubs_quads(builder, u, s):
    """<8 x i32>: the sums of 4 products u·s of 32 bytes (`vpmaddubsw` then `vpmaddwd` with ones)."""
    pairs = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _HI16, [u, s])
    return _call(builder, "llvm.x86.avx2.pmadd.wd", _HI32, [pairs, ir.Constant(_HI16, [1] * LANES)])


def dpbusd(builder, acc, u, s, u_max=255):
    """acc (<16 x i32>) + the quad sums of u (64 unsigned bytes, each <= u_max) times s (64 signed
    bytes, |s| <= 127); u and s of any 512-bit vector type. The module docstring's table."""
    if INT8_ISA == "avx512vnni":
        # Declared with <16 x i32> operands (the form of LLVM <= 20); newer LLVMs upgrade it to their
        # <64 x i8> form when parsing, so one declaration serves both.
        return _call(builder, "llvm.x86.avx512.vpdpbusd.512", _VI32,
                     [acc, builder.bitcast(u, _VI32), builder.bitcast(s, _VI32)])
    if INT8_ISA == "avxvnni":
        parts = [_call(builder, "llvm.x86.avx512.vpdpbusd.256", _HI32, [a, b, c]) for a, b, c in
                 zip(_halves(builder, acc, _HI32), _halves(builder, u, _HI32), _halves(builder, s, _HI32))]
        return _concat(builder, *parts)
    assert INT8_ISA == "avx2", "no int8 dot on this target: dispatch with INT8_DOT"
    u = builder.bitcast(u, _VB)
    if u_max < 128:
        splits = [u]
    else:                                                   # u = (u & 0x7F) + (u & 0x80): no saturation
        splits = [builder.and_(u, ir.Constant(_VB, [0x7F] * 4 * LANES)),
                  builder.and_(u, ir.Constant(_VB, [0x80] * 4 * LANES))]
    sh = _halves(builder, s, _HB)
    quads = []
    for h in range(2):
        q = None
        for part in splits:
            d = _maddubs_quads(builder, _halves(builder, part, _HB)[h], sh[h])
            q = d if q is None else builder.add(q, d)
        quads.append(q)
    return builder.add(acc, _concat(builder, *quads))


def int16_terms(u_max: int) -> int:
    """How many dpbusd terms of unsigned bytes <= u_max `dpbusd_sum` may add up in int16 on AVX2:
    each int16 lane then holds 2 · terms products, |u s| <= u_max · 128, and must stay within 32767
    (int4 codes: 8, q6 codes + 32: 2, bytes up to 255: 1, i.e. no int16 sums)."""
    return max(1, 32767 // (2 * u_max * 128))


def dpbusd_sum(builder, acc, terms, u_max):
    """acc + dpbusd(u1, s1) + dpbusd(u2, s2) + ... for terms [(u1, s1), ...] (as `dpbusd`): the same
    integers. On AVX2, with len(terms) <= int16_terms(u_max), the `vpmaddubsw` pairs of all terms are
    added in int16 (`vpaddw`, exact: no lane leaves int16) before ONE `vpmaddwd` and `vpaddd` per ymm
    half, instead of one of each per term: 4 instructions for two terms of q6 rows where `dpbusd` twice
    takes 6. Elsewhere (or with more terms) a chain of `dpbusd`."""
    if INT8_ISA != "avx2" or len(terms) == 1 or len(terms) > int16_terms(u_max):
        for u, s in terms:
            acc = dpbusd(builder, acc, u, s, u_max)
        return acc
    halves = [(_halves(builder, builder.bitcast(u, _VB), _HB), _halves(builder, builder.bitcast(s, _VB), _HB))
              for u, s in terms]
    quads = []
    for h in range(2):
        p = None
        for uh, sh in halves:
            d = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _HI16, [uh[h], sh[h]])
            p = d if p is None else builder.add(p, d)
        quads.append(_call(builder, "llvm.x86.avx2.pmadd.wd", _HI32, [p, ir.Constant(_HI16, [1] * LANES)]))
    return builder.add(acc, _concat(builder, *quads))
