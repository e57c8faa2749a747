"""GPTQ error feedback after AWQ (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR), with "static groups", as docs/DESIGN.md §5.1 specifies it.

AWQ (awq.py) has folded its scales (W ← W·diag(s), x ← x ÷ s) and the clip search (clip.py) has fixed
each (row, group)'s quantizer: the step and zero point that will be stored. Round-to-nearest would then
round every weight on its own. GPTQ keeps those quantizers and chooses only the codes, one input
column j after the other, pushing each column's rounding error into the columns not yet rounded so
that the linear's output error on the calibration inputs stays small:

    minimise  || (Ŵ − W) X ||²        X = the linear's input after AWQ (x ÷ s) on every calibration token
    H        = mean_t x xᵀ + λ I      [K, K];  λ = damp · mean(diag H)  (damp 0.01: the paper's)
    U        = upper Cholesky factor of H⁻¹  (H⁻¹ = Uᵀ U)
    for j = 0 … K−1:
        q_j  = Q_j(W[:, j])                        the stored quantizer of column j's (row, group)
        e    = (W[:, j] − q_j) / U[j, j]           [N]
        W[:, j:] −= e ⊗ U[j, j:]                    the later columns absorb the error

    Q_j      int4: q = clamp(round(w / step) + zero, 0, 15),  ŵ = (q − zero) · step  (q4.py, asymmetric)
             int8: q = clamp(round(w / step), −127, 127),      ŵ = q · step           (Q8Linear)
    W        starts as the AWQ-scaled weights *before* the clip: the clamp to [0, 15] does the clipping,
             so the clip's error is fed forward too.

The update of all later columns is done lazily in blocks of 128 columns (the paper's §"Lazy batch
updates"): inside a block column by column, then the block's errors hit the rest in one matmul.
Readable twin (no blocks): reference/gptq.py.

Shapes: N rows, K inputs, g group size, G = K / g.
"""
from __future__ import annotations

import numpy as np

from ..errors import UsageError

BLOCK = 128                  # columns per lazy batch update (the paper's B)
DEFAULT_DAMP = 0.01          # λ = damp · mean(diag H)
Q8_MAX = 127


def inverse_hessian_factor(h: np.ndarray, damp: float = DEFAULT_DAMP) -> tuple[np.ndarray, np.ndarray]:
    """Upper Cholesky factor U of (H + λI)⁻¹ (H⁻¹ = Uᵀ U), λ = damp · mean(diag H), and the mask of
    dead input channels (diag H = 0: never active on calibration; their H diagonal is set to 1).
                                                                         h [K, K] -> (U [K, K], dead [K])"""
    h = np.array(h, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    lam = damp * float(np.mean(np.diag(h)))
    h[np.diag_indices_from(h)] += lam
    try:
        hinv = np.linalg.inv(h)
        return np.linalg.cholesky(hinv).T, dead                    # cholesky gives L (H⁻¹ = L Lᵀ): U = Lᵀ
    except np.linalg.LinAlgError:
        raise UsageError("GPTQ: the calibration Hessian is not positive definite even after dampening; "
                         "try a larger damp or more calibration samples") from None


def int4_quantizer(w_clipped: np.ndarray, bits: int, group_size: int):
    """The stored int4 quantizer of every (row, group): what q4.quantize_q4 would derive from the
    clipped weights.               w_clipped [N, K] -> (steps float16 [N, G], zeros uint8 [N, G])"""
    from ..formats.q4 import rtn_codes
    _, steps, zeros = rtn_codes(np.asarray(w_clipped, np.float32), bits, group_size)
    return steps, zeros


def int8_quantizer(w: np.ndarray, group_size: int) -> np.ndarray:
    """The stored int8 step of every (row, group), as q4.quantize_q8 derives it.  [N, K] -> float16 [N, G]"""
    from ..formats.q4 import quantize_q8
    return quantize_q8(np.asarray(w, np.float32), group_size).scales


def gptq_codes(w: np.ndarray, u: np.ndarray, steps: np.ndarray, zeros: np.ndarray | None, group_size: int,
               qmin: int, qmax: int, block: int = BLOCK):
    """The codes GPTQ chooses for the fixed quantizers (steps, zeros; zeros None: symmetric int8).

    w [N, K] float (AWQ-scaled), u [K, K] from `inverse_hessian_factor`, steps [N, G], zeros [N, G]
    -> (codes int64 [N, K] in qmin..qmax, ŵ float64 [N, K] their dequantized values).
    """
    n, k = w.shape
    W = np.array(w, np.float64)
    step = np.repeat(steps.astype(np.float64), group_size, axis=1)                 # [N, K]
    zero = np.zeros_like(step) if zeros is None else np.repeat(zeros.astype(np.float64), group_size, axis=1)
    codes = np.empty((n, k), np.int64)
    for i1 in range(0, k, block):
        i2 = min(k, i1 + block)
        W1 = W[:, i1:i2]                                         # a view: updated in place
        E1 = np.empty((n, i2 - i1))                              # the block's scaled errors
        U1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            q = np.clip(np.round(W1[:, i] / step[:, j]) + zero[:, j], qmin, qmax)
            codes[:, j] = q
            e = (W1[:, i] - (q - zero[:, j]) * step[:, j]) / U1[i, i]
            W1[:, i:] -= np.outer(e, U1[i, i:])
            E1[:, i] = e
        W[:, i2:] -= E1 @ u[i1:i2, i2:]                          # lazy batch update of the rest
    w_hat = (codes - zero) * step
    return codes, w_hat


def gptq_linear(w: np.ndarray, w_clipped: np.ndarray, h: np.ndarray, bits: int, group_size: int,
                damp: float = DEFAULT_DAMP):
    """GPTQ on one AWQ-scaled linear: w [N, K] before the clip, w_clipped [N, K] after it (it defines
    the int4 quantizers; for bits = 8 the int8 steps come from w), h [K, K] = mean x xᵀ of x ÷ s.

    -> (Q4Linear or Q8Linear holding GPTQ's codes with the stored quantizers, ŵ float32 [N, K])."""
    from ..formats.q4 import Q4Linear, Q8Linear, pack_nibbles
    u, dead = inverse_hessian_factor(h, damp)
    w = np.array(w, np.float64)
    w[:, dead] = 0.0                     # never active: any code is as good; 0 keeps the rest unchanged
    if bits == 8:
        steps = int8_quantizer(w_clipped, group_size)
        codes, w_hat = gptq_codes(w, u, steps, None, group_size, -Q8_MAX, Q8_MAX)
        return Q8Linear(codes.astype(np.int8), steps, group_size), w_hat.astype(np.float32)
    steps, zeros = int4_quantizer(w_clipped, bits, group_size)
    codes, w_hat = gptq_codes(w, u, steps, zeros, group_size, 0, (1 << bits) - 1)
    return Q4Linear(pack_nibbles(codes.astype(np.uint8)), steps, zeros, group_size), w_hat.astype(np.float32)
