"""Reference (plain NumPy, written to be read) for GPTQ with static groups, the twin of
minilm_edge/quant/gptq.py (Frantar et al. 2023, "GPTQ", ICLR; docs/DESIGN.md §5.1). Never imports minilm_edge.

The quantizer of every (row, group) is fixed beforehand (by AWQ's clip search); GPTQ only picks the
codes, column after column, and moves each column's rounding error into the columns still to come,
weighted by the inverse Hessian of the layer's inputs, so that ||(Ŵ − W) X||² stays small:

    H = mean_t x xᵀ + λ I,  λ = damp · mean(diag H)           [K, K]
    U = upper Cholesky factor of H⁻¹                          (H⁻¹ = Uᵀ U)
    for j in 0 … K−1:
        ŵ_j = Q_j(W[:, j])
        e   = (W[:, j] − ŵ_j) / U[j, j]
        W[:, j:] −= e ⊗ U[j, j:]

Why U: eliminating column j from the quadratic ||(Ŵ−W)X||² leaves the rest with the Hessian's Schur
complement; the rows of the Cholesky factor of H⁻¹ hold exactly the optimal update of the remaining
columns for each eliminated one (the paper's §3 "Cholesky reformulation"). Here every column is
updated at every step (no lazy blocks): slower, the same result up to floating-point order.
"""
import numpy as np


def inverse_hessian_factor(h, damp=0.01):
    """U with (H + λI)⁻¹ = Uᵀ U, λ = damp · mean(diag H); channels with diag H = 0 get H_jj = 1.
    Returns (U [K, K], dead [K] bool)."""
    h = np.array(h, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h += damp * np.mean(np.diag(h)) * np.eye(len(h))
    return np.linalg.cholesky(np.linalg.inv(h)).T, dead


def int4_quantizer(w_clipped, bits, group_size):
    """Per (row, group) of the clipped weights: step = fp16(max(max − min, 1e-5) / (2^bits − 1)),
    zero = clamp(−round(min / step), 0, 2^bits − 1) (docs/DESIGN.md §4).  -> (step [N, G], zero [N, G])"""
    qmax = 2 ** bits - 1
    n, k = w_clipped.shape
    wg = np.asarray(w_clipped, np.float32).reshape(n, k // group_size, group_size)
    lo, hi = wg.min(axis=2), wg.max(axis=2)
    step = (np.maximum(hi - lo, np.float32(1e-5)) / np.float32(qmax)).astype(np.float16).astype(np.float32)
    zero = np.clip(-np.round(lo / step), 0, qmax)
    return step, zero


def int8_quantizer(w, group_size):
    """Symmetric int8 per (row, group): step = fp16(max(max|w|, 1e-5) / 127).     -> step [N, G]"""
    n, k = w.shape
    amax = np.abs(np.asarray(w, np.float32)).reshape(n, k // group_size, group_size).max(axis=2)
    return (np.maximum(amax, np.float32(1e-5)) / np.float32(127)).astype(np.float16).astype(np.float32)


def gptq(w, h, step, zero, group_size, qmin, qmax, damp=0.01):
    """GPTQ codes for fixed quantizers: w [N, K], h [K, K], step/zero [N, G] (zero None: symmetric).
    -> (codes [N, K], ŵ [N, K] dequantized)."""
    u, dead = inverse_hessian_factor(h, damp)
    W = np.array(w, np.float64)
    W[:, dead] = 0.0
    n, k = W.shape
    codes = np.zeros((n, k))
    w_hat = np.zeros((n, k))
    for j in range(k):
        s = step[:, j // group_size].astype(np.float64)
        z = 0.0 if zero is None else zero[:, j // group_size].astype(np.float64)
        codes[:, j] = np.clip(np.round(W[:, j] / s) + z, qmin, qmax)
        w_hat[:, j] = (codes[:, j] - z) * s
        e = (W[:, j] - w_hat[:, j]) / u[j, j]
        W[:, j:] -= np.outer(e, u[j, j:])
    return codes, w_hat
