"""Inputs and error bounds shared by the int4/int8 kernel tests: awkward int4 layers, LLM-like
activations, the reference's argument order, and the bound of the int8 kernels' float epilogue."""
import numpy as np

from minilm_edge.formats import q4
from reference import q4 as ref

EPS32 = float(np.finfo(np.float32).eps)
# Kernel vs twin: the integer dots are exact, so only the float epilogue differs: per block one
# product sw*sx and one fma, then nb + G terms summed in float32. 64 eps of the magnitude those sums
# pass through is roomy for K <= 512 and still catches any wrong index, scale or block.
EPILOGUE_RTOL = 64 * EPS32


def int4_layer(seed, n, g, groups, m, kind):
    """A Q4Linear [n, g·groups] quantized from random weights; m salient channels (m < 0: none, not
    even an empty set). kind "mixed": groups from 1e-4 to 1e2, and a constant first group."""
    rng = np.random.default_rng(seed)
    k = g * groups
    w = rng.standard_normal((n, k)).astype(np.float32)
    if kind == "mixed":
        w *= (10.0 ** rng.integers(-4, 3, (n, groups))).repeat(g, axis=1).astype(np.float32)
        w[:, :g] = 0.25
    idx = np.sort(rng.choice(k, size=m, replace=False)).astype(np.int32) if m >= 0 else None
    return q4.quantize_q4(w, g, idx)


def activations(rng, t, k, kind):
    """X float32 [t, k]: "normal"; "outliers" (LLM-like: a few channels 100x the rest); "blocks"
    (block magnitudes 1e-6..1e3, a zero block, a zero token); "zero"."""
    X = rng.standard_normal((t, k)).astype(np.float32)
    if kind == "outliers":
        X[:, rng.choice(k, size=max(1, k // 50), replace=False)] *= 100.0
    elif kind == "blocks":
        X *= (10.0 ** rng.integers(-6, 4, (t, k // 32))).repeat(32, axis=1).astype(np.float32)
        X[:, 32:64] = 0.0
        X[t // 2] = 0.0
    elif kind == "zero":
        X[:] = 0.0
    return X


def ref_args(lin):
    """A Q4Linear's arrays in the order of reference/q4.py's functions."""
    return (lin.qweight, lin.scales, lin.zeros, lin.group_size, lin.salient_idx, lin.salient_w)


def epilogue_bound(lin, X, block):
    """EPILOGUE_RTOL * sum_b sw sx (sum_k q |qx| + zw sum_k |qx|) (+ |salient w x|): the magnitude the
    int8 kernels' float sums pass through, per output [T, N]."""
    Xz = np.array(X)
    if lin.n_salient:
        Xz[:, lin.salient_idx] = 0.0
    qx, sx = ref.quantize_activations_i8(Xz, block)
    q = q4.unpack_nibbles(lin.qweight).astype(np.float64)
    mag = np.zeros((X.shape[0], lin.shape[0]))
    for b in range(X.shape[1] // block):
        cols, gi = slice(b * block, (b + 1) * block), b * block // lin.group_size
        aq = np.abs(qx[:, cols]).astype(np.float64)
        part = aq @ q[:, cols].T + np.outer(aq.sum(axis=1), lin.zeros[:, gi])
        mag += sx[:, b:b + 1] * lin.scales[:, gi].astype(np.float64) * part
    if lin.n_salient:
        mag += np.abs(X[:, lin.salient_idx]).astype(np.float64) @ np.abs(lin.salient_w.astype(np.float64)).T
    return EPILOGUE_RTOL * mag + 1e-30
