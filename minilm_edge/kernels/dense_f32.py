"""Numba kernels for dense weights (float16 or float32) with float32 activations.

Decode matvecs are Numba kernels (rows split across threads) rather than BLAS gemv, so that one
thread pool does the parallel work of a decode step (see policy.blas_threads).

float16 (fp16 checkpoints, the fp16 lm_head):

Numba's CPU target has no float16 type, so fp16 weights are passed as their raw uint16 bits and
widened 16 at a time: an LLVM `fpext <16 x half> to <16 x float>` (one `vcvtph2ps` with F16C).
This keeps fp16 weights fp16 in RAM (half the bytes of a float32 copy, and half the bytes read per
decoded token) at no cost in accuracy: the products and sums are float32.

    decode   y[n] = sum_k W[n, k] x[k]             rows split across threads
    prefill  Y = X Wᵀ, W widened in tiles of rows to float32 and multiplied by BLAS

K must be a multiple of 16 (every real model's is); `linear.DenseF16` falls back to float32
otherwise.
"""
import numpy as np
from llvmlite import ir
from numba import prange
from numba.extending import intrinsic

from .policy import FASTMATH_REDUCE, parallel_kernel
from .simd import LANES, _elem_ptr, f32x16, v_fma, v_hsum, v_load, v_zeros

_VH = ir.VectorType(ir.HalfType(), LANES)
_VF = ir.VectorType(ir.FloatType(), LANES)
TILE_ROWS = 256   # prefill: 256 × K float32 rows widened at a time (576 KiB at K = 576)


@intrinsic
def v_load_f16(typingctx, w, off):
    """w[off : off+16] of a 1-D contiguous uint16 array holding fp16 bits, widened to float32."""
    def codegen(context, builder, sig, args):
        p = _elem_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1], _VH)
        return builder.fpext(builder.load(p, align=2), _VF)
    return f32x16(w, off), codegen


# fastmath: the 16-lane accumulation is a reassociated reduction anyway.
@parallel_kernel(fastmath=FASTMATH_REDUCE)
def _matvec_f16_f32(w_bits, x, out):
    """out[n] = sum_k W[n, k] x[k]; W: uint16 [N, K] fp16 bits, x: float32 [K], K % 16 == 0."""
    for n in prange(w_bits.shape[0]):
        row = w_bits[n]
        acc = v_zeros()
        for o in range(0, w_bits.shape[1], LANES):
            acc = v_fma(v_load_f16(row, o), v_load(x, o), acc)
        out[n] = v_hsum(acc)


@parallel_kernel(fastmath=FASTMATH_REDUCE)
def _matvec_f32_f32(w, x, out):
    """out[n] = sum_k W[n, k] x[k]; W: float32 [N, K], K % 16 == 0."""
    for n in prange(w.shape[0]):
        row = w[n]
        acc = v_zeros()
        for o in range(0, w.shape[1], LANES):
            acc = v_fma(v_load(row, o), v_load(x, o), acc)
        out[n] = v_hsum(acc)


def matvec_f32_f32(w: np.ndarray, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Decode: y [N] = W x for float32 W [N, K] (C-contiguous, K % 16 == 0) and x [K]."""
    n, k = w.shape
    assert w.dtype == np.float32 and w.flags.c_contiguous and k % LANES == 0 and x.shape == (k,)
    if out is None:
        out = np.empty(n, np.float32)
    _matvec_f32_f32(w, np.ascontiguousarray(x, dtype=np.float32), out)
    return out


def matvec_f16_f32(w_bits: np.ndarray, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Decode: y [N] = W x for fp16 W (as uint16 bits [N, K]) and float32 x [K]."""
    n, k = w_bits.shape
    assert w_bits.dtype == np.uint16 and k % LANES == 0 and x.shape == (k,) and x.dtype == np.float32
    if out is None:
        out = np.empty(n, np.float32)
    _matvec_f16_f32(w_bits, np.ascontiguousarray(x), out)
    return out


def matmul_f16_f32(w: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Prefill: Y [T, N] = X Wᵀ for fp16 W [N, K]; rows widened to float32 tile by tile for BLAS
    (one widened tile in memory at a time)."""
    return matmul_tiles(widened_tiles(w), X, w.shape[0])


def widened_tiles(w: np.ndarray):
    """fp16 W [N, K] as float32 row tiles [≤ TILE_ROWS, K], in order, made one at a time."""
    return (w[r0:r0 + TILE_ROWS].astype(np.float32) for r0 in range(0, w.shape[0], TILE_ROWS))


def matmul_tiles(tiles, X: np.ndarray, n: int) -> np.ndarray:
    """Y [T, N] = X Wᵀ from W's float32 row tiles in order (`widened_tiles`): one BLAS call per
    tile, so a caller that keeps the tiles gets the same bits as `matmul_f16_f32`."""
    out = np.empty((X.shape[0], n), np.float32)
    r0 = 0
    for tile in tiles:
        out[:, r0:r0 + len(tile)] = X @ tile.T                           # [T, K] @ [K, R]
        r0 += len(tile)
    return out
