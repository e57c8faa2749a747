"""Numba kernels for int4 (minilm-q4 v1) and int8 (Q8Linear) linears: decode matvec, prefill matmul.

Shapes: W [N, K] (out, in), x [K], X [T, K], g = group size, G = K // g, m = salient columns,
m16 = m rounded up to a multiple of 16.

Decode (memory-bound; the hot spot of a token):
    y[n] = sum_g  s[n,g] * ( dot(q[n, g-th group], x_g) - z[n,g] * sum(x_g) )  +  salient_w[n] . x[salient_idx]
The zero-point term needs only the G per-group sums of x, computed once per call. The packed bytes
are read in the on-disk order (low nibble = even input channel), so x is split once per call into
x_even [K/2] and x_odd [K/2]; then 16 packed bytes give 16 low codes that meet x_even[j:j+16] and 16
high codes that meet x_odd[j:j+16] - no shuffles per weight, and no repack of the weights.

Why explicit vectors: written as plain loops, LLVM either left the 32-iteration group loop scalar
(runtime trip counts), or vectorised across groups with gathers, and it always reduced each group's
dot product horizontally before multiplying by the scale (BENCHMARKS.md has the numbers).
The vector form keeps a 16-lane accumulator per row across all groups (acc += s_g * d_g, lane-wise)
and reduces once per row. `F32x16` is an LLVM `<16 x float>`: on AVX-512 one zmm register, on AVX2
two ymm - LLVM legalises it, so the code stays portable.

Rows go in pairs (`dot2_q4_f32`, shared with the one-call decode step): two rows with separate
accumulators keep 8 FMA chains in flight instead of one latency-bound chain.
Per 16 packed bytes (32 weights) the inner loop is: vpmovzxbd (load + widen to 16 x i32), vpandd,
vpsrld, 2 x vcvtdq2ps, 2 x vfmadd. Check with
`_matvec_q4_f32.inspect_asm(_matvec_q4_f32.signatures[0])`.

Prefill (compute-bound): dequantize row tiles to float32 with the same vector code, and let BLAS
(numpy's `@`) multiply. Tiles are dequantized with even channels first then odd channels
("split" order, no shuffles), and X gets the same column permutation once per call.

Runtime form (`Q4Prepared`, built once at load by `prepare_q4`): Numba's CPU target has no float16,
so the fp16 scales are passed as their uint16 bits (`fp16_bits`: the file's own bytes, no copy) and
widened in the kernels as they are read (simd.as_f32, simd.load_f32: exact, so the same sums as from
a float32 copy, at half its bytes and none of its RSS); qweight and zeros are the same arrays as in
the Q4Linear (memory-maps stay memory-maps). Salient weights become float32, their columns padded
to a multiple of 16 with zero weights (index 0), so the fused salient dot runs in whole vectors.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import prange

from ..errors import UsageError
from ..formats.q4 import Q4Linear, Q8Linear
from .policy import FASTMATH_REDUCE, kernel, parallel_kernel
from .simd import (
    LANES,
    as_f32,
    fma32,
    v_fma,
    v_hsum,
    v_load,
    v_load_i8,
    v_load_u8,
    v_splat,
    v_store,
    v_unpack_q4,
    v_zeros,
)

# ----------------------------------------------------------------------------------------------
# Runtime forms, built once at load


@dataclass(frozen=True)
class Q4Prepared:
    """A Q4Linear in the form the kernels read (see module docstring). Build with `prepare_q4`."""
    qweight: np.ndarray    # uint8   [N, K/2]  same buffer as Q4Linear.qweight
    scales: np.ndarray     # uint16  [N, G]    fp16 bits (`fp16_bits`), same buffer as Q4Linear.scales
    zeros: np.ndarray      # uint8   [N, G]    same buffer as Q4Linear.zeros
    group_size: int
    sal_idx: np.ndarray    # int64   [m16]     salient channels, padded with 0
    sal_w: np.ndarray      # float32 [N, m16]  salient weights, padded with 0.0
    n_salient: int         # m

    @property
    def shape(self):
        return self.qweight.shape[0], 2 * self.qweight.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes the decode kernel reads per call (weights, scales, zeros, salient weights)."""
        return self.qweight.nbytes + self.scales.nbytes + self.zeros.nbytes + self.sal_w.nbytes

    @property
    def kernel_args(self):
        """Arguments of `_matvec_q4_f32(*kernel_args, x, out)` for callers inside @njit code."""
        return self.qweight, self.scales, self.zeros, self.group_size, self.sal_idx, self.sal_w


def fp16_bits(scales: np.ndarray) -> np.ndarray:
    """fp16 scales [N, G] as the kernels take them: their uint16 bits, C-contiguous (a view when they
    are, e.g. of the mapped file; simd.as_f32 widens them)."""
    return np.ascontiguousarray(scales, dtype=np.float16).view(np.uint16)


def prepare_q4(q4: Q4Linear) -> Q4Prepared:
    """Q4Linear (validated at construction) -> Q4Prepared; copies only the salient weights."""
    n, _ = q4.shape
    m = q4.n_salient
    m16 = -(-m // LANES) * LANES
    sal_idx = np.zeros(m16, np.int64)
    sal_w = np.zeros((n, m16), np.float32)
    if m:
        sal_idx[:m] = q4.salient_idx
        sal_w[:, :m] = q4.salient_w
    return Q4Prepared(np.ascontiguousarray(q4.qweight), fp16_bits(q4.scales),
                      np.ascontiguousarray(q4.zeros), q4.group_size, sal_idx, sal_w, m)


@dataclass(frozen=True)
class Q8Prepared:
    """A Q8Linear as the kernels read it (scales as fp16 bits). Build with `prepare_q8`."""
    qweight: np.ndarray    # int8    [N, K]   same buffer as Q8Linear.qweight
    scales: np.ndarray     # uint16  [N, G]   fp16 bits (`fp16_bits`), same buffer as Q8Linear.scales
    group_size: int

    @property
    def shape(self):
        return self.qweight.shape

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes + self.scales.nbytes

    @property
    def kernel_args(self):
        return self.qweight, self.scales, self.group_size


def prepare_q8(q8: Q8Linear) -> Q8Prepared:
    return Q8Prepared(np.ascontiguousarray(q8.qweight), fp16_bits(q8.scales), q8.group_size)


# ----------------------------------------------------------------------------------------------
# int4 kernels
# fastmath (FASTMATH_REDUCE) on all of them: the reductions are reassociated anyway (16 lanes,
# then a tree), and the scalar zero-point sums gain from it; NaN/inf still propagate.


@kernel(fastmath=FASTMATH_REDUCE)
def split_x(x, group_size, sal_idx, x_even, x_odd, x_sum, x_sal):
    """The per-call prologue of the int4 matvec: x's even/odd halves, per-group sums for the zero
    points, the salient entries. Writes into the given scratch (no allocation).
    x [K] -> x_even, x_odd [≥ K/2], x_sum [≥ G], x_sal [m16]."""
    half = x.shape[0] // 2
    for j in range(half):
        x_even[j] = x[2 * j]
        x_odd[j] = x[2 * j + 1]
    for g in range(x.shape[0] // group_size):
        s = np.float32(0.0)
        for k in range(g * group_size, g * group_size + group_size):
            s += x[k]
        x_sum[g] = s
    for i in range(sal_idx.shape[0]):
        x_sal[i] = x[sal_idx[i]]


@kernel(fastmath=FASTMATH_REDUCE, inline=True)
def dot2_q4_f32(qw, sc, z, sw, ra, rb, group_size, x_even, x_odd, x_sum, x_sal):
    """Rows ra and rb of the int4 matvec (module docstring), from x's prologue (`split_x`): (y_a, y_b).

    qw [rows, K/2], sc and z [rows, G], sw [rows, m16], C-contiguous (a stack [L, N, ·] passes its
    (L, N) axes merged). Rows are addressed by offset, never sliced, and the function is inlined
    (policy.kernel: a call or a slice per row costs reference-count updates on every array).
    One row alone is one chain of dependent FMAs (latency-bound); two rows with separate
    accumulators for the low and high nibbles give 8 independent chains and share every x load.
    A row's result does not depend on its partner: ra == rb gives a single row.
    """
    half, G, m16 = qw.shape[-1], sc.shape[-1], sw.shape[-1]
    h = group_size // 2                     # packed bytes per group (a multiple of 16)
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
        s_a, s_b = as_f32(sc[ra, g]), as_f32(sc[rb, g])
        va, vb = v_splat(s_a), v_splat(s_b)
        acc_a = v_fma(va, da, acc_a)
        acc_a2 = v_fma(va, ea, acc_a2)
        acc_b = v_fma(vb, db, acc_b)
        acc_b2 = v_fma(vb, eb, acc_b2)
        zt_a = fma32(s_a * np.float32(z[ra, g]), x_sum[g], zt_a)     # this order in every kernel (simd.fma32)
        zt_b = fma32(s_b * np.float32(z[rb, g]), x_sum[g], zt_b)
    for i in range(0, m16, LANES):
        xs = v_load(x_sal, i)
        acc_a = v_fma(v_load(sw, ra * m16 + i), xs, acc_a)
        acc_b = v_fma(v_load(sw, rb * m16 + i), xs, acc_b)
    return v_hsum(acc_a) + v_hsum(acc_a2) - zt_a, v_hsum(acc_b) + v_hsum(acc_b2) - zt_b


@kernel(fastmath=FASTMATH_REDUCE, inline=True)
def dot2_q8_f32(qw, sc, ra, rb, group_size, x_even, x_odd):
    """Rows ra and rb of int8 weights in the one-call decode step's layout (quant_i8_matvec.q8_rows:
    uint8 u = q + 128, per chunk of 128 channels the even ones first) times float32 x, split as
    `split_x` splits it: (y_a, y_b), y[n] = sum_g s[n, g] · ( sum_{k in g} u[n, k] x[k] − 128 sum_{k in g} x[k] ).
    qw uint8 [rows, K], sc [rows, G] float32 or fp16 bits; group_size % 32 == 0. 32 channels a step: 16 even
    bytes and 16 odd ones per row, the x loads (and their sum) shared by the pair."""
    K = qw.shape[-1]
    wa, wb = ra * K, rb * K
    ones, m128 = v_splat(np.float32(1.0)), v_splat(np.float32(-128.0))
    acc_a, acc_b = v_zeros(), v_zeros()
    da, db, cx = v_zeros(), v_zeros(), v_zeros()
    for k0 in range(0, K, 32):
        c0 = k0 - k0 % 128                          # the chunk's first channel (and byte)
        e = c0 + (k0 - c0) // 2                     # the 16 even channels' bytes; the odd ones n later
        n = min(64, (K - c0) // 2)
        xe, xo = v_load(x_even, k0 // 2), v_load(x_odd, k0 // 2)
        cx = v_fma(xe, ones, v_fma(xo, ones, cx))
        da = v_fma(v_load_u8(qw, wa + e), xe, v_fma(v_load_u8(qw, wa + e + n), xo, da))
        db = v_fma(v_load_u8(qw, wb + e), xe, v_fma(v_load_u8(qw, wb + e + n), xo, db))
        if (k0 + 32) % group_size == 0:
            g = k0 // group_size
            acc_a = v_fma(v_splat(as_f32(sc[ra, g])), v_fma(cx, m128, da), acc_a)
            acc_b = v_fma(v_splat(as_f32(sc[rb, g])), v_fma(cx, m128, db), acc_b)
            da, db, cx = v_zeros(), v_zeros(), v_zeros()
    return v_hsum(acc_a), v_hsum(acc_b)


@parallel_kernel(fastmath=FASTMATH_REDUCE)
def _matvec_q4_f32(qweight, scales, zeros, group_size, sal_idx, sal_w, x, out):
    """out[n] = sum_k W[n, k] x[k] for W in minilm-q4 form; row pairs split across threads."""
    n, half = qweight.shape
    x_even = np.empty(half, np.float32)             # [K/2] x[0::2] meets the low nibbles
    x_odd = np.empty(half, np.float32)              # [K/2] x[1::2] meets the high nibbles
    x_sum = np.empty(scales.shape[1], np.float32)   # [G] per-group sums of x for the zero points
    x_sal = np.empty(sal_idx.shape[0], np.float32)  # [m16]
    split_x(x, group_size, sal_idx, x_even, x_odd, x_sum, x_sal)
    for i in prange((n + 1) // 2):
        a, b = 2 * i, min(2 * i + 1, n - 1)         # odd N: the last row pairs with itself
        ya, yb = dot2_q4_f32(qweight, scales, zeros, sal_w, a, b, group_size, x_even, x_odd, x_sum, x_sal)
        out[a] = ya
        out[b] = yb


@kernel(fastmath=FASTMATH_REDUCE)
def _dequant_q4_split(qweight, scales, zeros, group_size, row0, tile):
    """tile[r] = W[row0 + r] as float32 in split order: [even channels (K/2) | odd channels (K/2)].

    Salient columns come out as 0 (their codes equal the zero point); the caller adds them.
    Serial on purpose: BLAS multiplies each tile with its own threads right after, and two thread
    pools taking turns on 2 cores cost more than dequantizing (1/T of the multiply's work) saves.
    """
    half = qweight.shape[1]
    h = group_size // 2
    for r in range(tile.shape[0]):
        n = row0 + r
        row = qweight[n]
        dst = tile[r]
        for g in range(scales.shape[1]):
            s = v_splat(as_f32(scales[n, g]))
            zs = v_splat(-as_f32(scales[n, g]) * np.float32(zeros[n, g]))
            for o in range(g * h, g * h + h, LANES):
                lo, hi = v_unpack_q4(row, o)
                v_store(dst, o, v_fma(lo, s, zs))
                v_store(dst, half + o, v_fma(hi, s, zs))


# ----------------------------------------------------------------------------------------------
# int8 kernels


@parallel_kernel(fastmath=FASTMATH_REDUCE)
def _matvec_q8_f32(qweight, scales, group_size, x, out):
    """out[n] = sum_g s[n, g] * dot(q[n, g-th group], x_g); rows split across threads."""
    for n in prange(qweight.shape[0]):
        row = qweight[n]
        acc = v_zeros()
        for g in range(scales.shape[1]):
            d = v_zeros()
            for o in range(g * group_size, g * group_size + group_size, LANES):
                d = v_fma(v_load_i8(row, o), v_load(x, o), d)
            acc = v_fma(v_splat(as_f32(scales[n, g])), d, acc)
        out[n] = v_hsum(acc)


@kernel(fastmath=FASTMATH_REDUCE)
def _dequant_q8(qweight, scales, group_size, row0, tile):
    """tile[r] = W[row0 + r] as float32 (natural channel order); serial, as _dequant_q4_split."""
    for r in range(tile.shape[0]):
        n = row0 + r
        row = qweight[n]
        dst = tile[r]
        for g in range(scales.shape[1]):
            s = v_splat(as_f32(scales[n, g]))
            for o in range(g * group_size, g * group_size + group_size, LANES):
                v_store(dst, o, v_fma(v_load_i8(row, o), s, v_zeros()))


# ----------------------------------------------------------------------------------------------
# Public wrappers: check, allocate, call the kernel.

TILE_ROWS = 256   # prefill dequant tile: 256 x K float32 (576 KiB at K = 576) stays in L2


def _check_vec(x, k, name="x"):
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.shape != (k,) \
            or not x.flags.c_contiguous:
        raise UsageError(f"{name}: expected contiguous float32 [{k}], got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")


def _check_out(out, shape):
    if out is None:
        return np.empty(shape, np.float32)
    if out.dtype != np.float32 or out.shape != shape or not out.flags.c_contiguous:
        raise UsageError(f"out: expected contiguous float32 {shape}, got {out.dtype} {out.shape}")
    return out


def _check_mat(X, k):
    if not isinstance(X, np.ndarray) or X.dtype != np.float32 or X.ndim != 2 or X.shape[1] != k:
        raise UsageError(f"X: expected float32 [T, {k}], got "
                         f"{getattr(X, 'dtype', type(X).__name__)} {getattr(X, 'shape', '')}")


def matvec_q4_f32(p: Q4Prepared, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Decode: y [N] = W x for x float32 [K]; W given as Q4Prepared."""
    n, k = p.shape
    _check_vec(x, k)
    out = _check_out(out, (n,))
    _matvec_q4_f32(*p.kernel_args, x, out)
    return out


def matmul_q4_f32(p: Q4Prepared, X: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Prefill: Y [T, N] = X W^T for X float32 [T, K]; dequantized tiles of TILE_ROWS rows x BLAS."""
    n, k = p.shape
    _check_mat(X, k)
    t = X.shape[0]
    out = _check_out(out, (t, n))
    xp_t = np.ascontiguousarray(np.concatenate([X[:, 0::2], X[:, 1::2]], axis=1).T)  # [K, T] split order
    y_t = np.empty((n, t), np.float32)                                              # [N, T]
    tile = np.empty((min(TILE_ROWS, n), k), np.float32)                             # [R, K]
    for r0 in range(0, n, TILE_ROWS):
        w = tile[: min(TILE_ROWS, n - r0)]
        _dequant_q4_split(p.qweight, p.scales, p.zeros, p.group_size, r0, w)
        np.dot(w, xp_t, out=y_t[r0: r0 + len(w)])                                   # [R, K] @ [K, T]
    out[:] = y_t.T
    if p.n_salient:
        m = p.n_salient
        out += X[:, p.sal_idx[:m]] @ p.sal_w[:, :m].T                               # [T, m] @ [m, N]
    return out


def matvec_q8_f32(p: Q8Prepared, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Decode with an int8 weight (e.g. lm_head): y [N] = W x."""
    n, k = p.shape
    _check_vec(x, k)
    out = _check_out(out, (n,))
    _matvec_q8_f32(*p.kernel_args, x, out)
    return out


def matmul_q8_f32(p: Q8Prepared, X: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Prefill with an int8 weight: Y [T, N] = X W^T, dequantized tiles x BLAS."""
    n, k = p.shape
    _check_mat(X, k)
    t = X.shape[0]
    out = _check_out(out, (t, n))
    x_t = np.ascontiguousarray(X.T)                                                  # [K, T]
    y_t = np.empty((n, t), np.float32)                                               # [N, T]
    tile = np.empty((min(TILE_ROWS, n), k), np.float32)
    for r0 in range(0, n, TILE_ROWS):
        w = tile[: min(TILE_ROWS, n - r0)]
        _dequant_q8(p.qweight, p.scales, p.group_size, r0, w)
        np.dot(w, x_t, out=y_t[r0: r0 + len(w)])
    out[:] = y_t.T
    return out
