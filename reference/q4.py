"""Reference (plain NumPy) for the int4 format minilm-q4 v1 and the int8 head format.

The oracle for minilm_edge/formats/q4.py and the int4 kernels (minilm_edge/kernels/quant_*.py). It
takes raw arrays, never the library's dataclasses, and never imports minilm_edge. Written for
reading, not speed: one group at a time.

W [N, K] out x in; g group size; G = K // g; q the integer codes.

int4 (asymmetric, per row and group):
    W[n, k] = (q[n, k] - zeros[n, k // g]) * scales[n, k // g]
    byte j of qweight row n = q[n, 2j] | q[n, 2j+1] << 4
    salient columns: W[:, salient_idx[i]] = salient_w[:, i]
int8 (symmetric, per row and group):
    W[n, k] = q[n, k] * scales[n, k // g],  q in -127..127
q6 (symmetric, 6-bit codes): as int8 with q in -31..31, u = q + 32 stored in 6 bits, in one of two layouts
(minilm_edge/formats/q4.py): "packed" (older files, unpack_q6): bits 6i .. 6i+5 of the little-endian 24-bit
word of bytes 3j..3j+2 hold u[4j + i]; "rows" (the kernels' layout, unpack_q6_rows): see there.
int4 weights x int8 activations (the prefill kernel minilm_edge/kernels/quant_i8_matmul.py): X quantized per token
and block of B channels, integer dots, scales applied per block (see matmul_q4_i8).
"""
import numpy as np


def rtn_quantize(w, bits, group_size):
    """Round-to-nearest quantization of each group of `group_size` consecutive weights in a row.

        scale = max(max - min, 1e-5) / (2^bits - 1), rounded to fp16 (as stored)
        zero  = clamp(-round(min / scale), 0, 2^bits - 1)
        q     = clamp(round(w / scale) + zero, 0, 2^bits - 1)     (round half to even)

    w float32 [N, K] -> q uint8 [N, K], scales float16 [N, G], zeros uint8 [N, G]
    """
    qmax = 2 ** bits - 1
    n, k = w.shape
    q = np.zeros((n, k), np.uint8)
    scales = np.zeros((n, k // group_size), np.float16)
    zeros = np.zeros((n, k // group_size), np.uint8)
    for gi in range(k // group_size):
        cols = slice(gi * group_size, (gi + 1) * group_size)
        wg = w[:, cols].astype(np.float32)                                  # [N, g]
        rng = wg.max(axis=1) - wg.min(axis=1)                               # [N]
        scale = (np.maximum(rng, np.float32(1e-5)) / np.float32(qmax)).astype(np.float16)
        s = scale.astype(np.float32)
        zero = np.clip(-np.round(wg.min(axis=1) / s), 0, qmax)              # [N]
        q[:, cols] = np.clip(np.round(wg / s[:, None]) + zero[:, None], 0, qmax)
        scales[:, gi] = scale
        zeros[:, gi] = zero
    return q, scales, zeros


def dequantize_codes(q, scales, zeros, group_size):
    """W[n, k] = (q[n, k] - zeros[n, k // g]) * scales[n, k // g]: [N, K] codes -> float32 [N, K]."""
    g_of_k = np.arange(q.shape[1]) // group_size                            # [K] group of each input
    s = scales.astype(np.float32)[:, g_of_k]                                # [N, K]
    z = zeros.astype(np.float32)[:, g_of_k]                                 # [N, K]
    return (q.astype(np.float32) - z) * s


def pseudo_quantize(w, bits, group_size):
    """Quantize then dequantize: float32 [N, K] -> float32 [N, K]."""
    q, scales, zeros = rtn_quantize(w, bits, group_size)
    return dequantize_codes(q, scales, zeros, group_size)


def pack_nibbles(q):
    """uint8 codes [N, K] -> uint8 [N, K/2]; byte j = q[:, 2j] (low nibble) | q[:, 2j+1] << 4."""
    n, k = q.shape
    packed = np.zeros((n, k // 2), np.uint8)
    for j in range(k // 2):
        packed[:, j] = q[:, 2 * j] + 16 * q[:, 2 * j + 1]
    return packed


def unpack_nibbles(packed):
    """uint8 [N, K/2] -> uint8 codes [N, K]."""
    n, half = packed.shape
    q = np.zeros((n, 2 * half), np.uint8)
    q[:, 0::2] = packed % 16
    q[:, 1::2] = packed // 16
    return q


def quantize_q4(w, group_size, salient_idx=None):
    """int4 with optional fp16 salient columns.

    Salient columns are zeroed before RTN (so their groups' ranges contain 0) and their codes set to
    the zero point, so that they contribute nothing in the int4 part.
    w float32 [N, K] -> (qweight uint8 [N, K/2], scales f16 [N, G], zeros u8 [N, G],
                         salient_idx int32 [m] or None, salient_w f16 [N, m] or None)
    """
    salient_w = None
    w = np.array(w, np.float32)
    if salient_idx is not None:
        salient_idx = np.asarray(salient_idx, np.int32)
        salient_w = w[:, salient_idx].astype(np.float16)                    # [N, m]
        w[:, salient_idx] = 0.0
    q, scales, zeros = rtn_quantize(w, 4, group_size)
    if salient_idx is not None:
        for i in salient_idx:
            q[:, i] = zeros[:, i // group_size]
    return pack_nibbles(q), scales, zeros, salient_idx, salient_w


def dequantize_q4(qweight, scales, zeros, group_size, salient_idx=None, salient_w=None):
    """Packed int4 (+ salient columns) -> W float32 [N, K]."""
    w = dequantize_codes(unpack_nibbles(qweight), scales, zeros, group_size)
    if salient_idx is not None:
        w[:, salient_idx] = salient_w.astype(np.float32)
    return w


def matvec_q4(qweight, scales, zeros, group_size, salient_idx, salient_w, x):
    """y [N] = W x, W dequantized first: x float32 [K] -> float32 [N]."""
    w = dequantize_q4(qweight, scales, zeros, group_size, salient_idx, salient_w)  # [N, K]
    return (w.astype(np.float64) @ x.astype(np.float64)).astype(np.float32)


def matmul_q4(qweight, scales, zeros, group_size, salient_idx, salient_w, X):
    """Y [T, N] = X W^T, W dequantized first: X float32 [T, K] -> float32 [T, N]."""
    w = dequantize_q4(qweight, scales, zeros, group_size, salient_idx, salient_w)  # [N, K]
    return (X.astype(np.float64) @ w.T.astype(np.float64)).astype(np.float32)


def quantize_activations_i8(X, block):
    """Symmetric int8 per token and block of `block` consecutive channels (llama.cpp's Q8_0):

        sx[t, b] = max_{k in b} |X[t, k]| / 127                 float32, in this order of operations
        qx[t, k] = round_half_even(X[t, k] * (1 / sx[t, b]))    0 where sx = 0;  |qx| <= 127

    X float32 [T, K] -> qx int8 [T, K], sx float32 [T, K/B]. Each entry's error |X - sx qx| is at most
    sx/2 (plus float rounding of the scale, ~1e-7 relative).
    """
    t, k = X.shape
    xb = np.asarray(X, np.float32).reshape(t, k // block, block)            # [T, nb, B]
    sx = (np.abs(xb).max(axis=2) / np.float32(127)).astype(np.float32)       # [T, nb]
    inv = np.zeros_like(sx)
    inv[sx > 0] = np.float32(1) / sx[sx > 0]
    qx = np.rint(xb * inv[:, :, None]).astype(np.int8).reshape(t, k)
    return qx, sx


def matmul_q4_i8(qweight, scales, zeros, group_size, salient_idx, salient_w, X, block):
    """Y [T, N] = X W^T with int4 W and X quantized to int8 (quantize_activations_i8):

        Y[t, n] = sum_b sw[n, g] sx[t, b] ( sum_{k in b} q[n, k] qx[t, k]  -  zw[n, g] sum_{k in b} qx[t, k] )
                + salient_w[n] . X[t, salient_idx]                   g = g(b) the group holding block b

    sw/zw = scales/zeros. Salient channels are set to 0 before X is quantized (their codes equal the
    zero point, so they add nothing to the integer part) and enter in float. The integer dots are
    exact (int64); the rest is float64, rounded to float32 at the end.
    X float32 [T, K] -> float32 [T, N]
    """
    X = np.array(X, np.float32)
    t, k = X.shape
    y = np.zeros((t, qweight.shape[0]), np.float64)                         # [T, N]
    if salient_idx is not None:
        y += X[:, salient_idx].astype(np.float64) @ salient_w.astype(np.float64).T
        X[:, salient_idx] = 0.0
    qx, sx = quantize_activations_i8(X, block)
    q = unpack_nibbles(qweight).astype(np.int64)                            # [N, K]
    for b in range(k // block):
        cols = slice(b * block, (b + 1) * block)
        gi = b * block // group_size
        qxb = qx[:, cols].astype(np.int64)                                  # [T, B]
        dot = qxb @ q[:, cols].T - np.outer(qxb.sum(axis=1), zeros[:, gi])  # [T, N] exact integers
        y += sx[:, b:b + 1].astype(np.float64) * scales[:, gi].astype(np.float64) * dot
    return y.astype(np.float32)


def matmul_q8_i8(q, scales, group_size, X, block):
    """Y [T, N] = X W^T with int8 W (quantize_q8) and X quantized to int8 (quantize_activations_i8):

        Y[t, n] = sum_b sw[n, g] sx[t, b] sum_{k in b} q[n, k] qx[t, k]      g = g(b), sw = scales

    Integer dots exact (int64), the rest float64, rounded to float32 at the end.  X float32 [T, K] -> [T, N]
    """
    t, k = X.shape
    qx, sx = quantize_activations_i8(X, block)
    y = np.zeros((t, q.shape[0]), np.float64)
    for b in range(k // block):
        cols = slice(b * block, (b + 1) * block)
        dot = qx[:, cols].astype(np.int64) @ q[:, cols].astype(np.int64).T     # [T, N] exact integers
        y += sx[:, b:b + 1].astype(np.float64) * scales[:, b * block // group_size].astype(np.float64) * dot
    return y.astype(np.float32)


def quantize_q8(w, group_size):
    """Symmetric int8 per (row, group): scale = max(max|w|, 1e-5)/127 (fp16), q = clamp(round(w/scale), ±127).

    w float32 [N, K] -> (q int8 [N, K], scales float16 [N, G])
    """
    n, k = w.shape
    q = np.zeros((n, k), np.int8)
    scales = np.zeros((n, k // group_size), np.float16)
    for gi in range(k // group_size):
        cols = slice(gi * group_size, (gi + 1) * group_size)
        wg = w[:, cols].astype(np.float32)
        scale = (np.maximum(np.abs(wg).max(axis=1), np.float32(1e-5)) / np.float32(127)).astype(np.float16)
        q[:, cols] = np.clip(np.round(wg / scale.astype(np.float32)[:, None]), -127, 127)
        scales[:, gi] = scale
    return q, scales


def dequantize_q8(q, scales, group_size):
    """W[n, k] = q[n, k] * scales[n, k // g] -> float32 [N, K]."""
    g_of_k = np.arange(q.shape[1]) // group_size
    return q.astype(np.float32) * scales.astype(np.float32)[:, g_of_k]


def matvec_q8(q, scales, group_size, x):
    """y [N] = W x for the int8 format."""
    w = dequantize_q8(q, scales, group_size)
    return (w.astype(np.float64) @ x.astype(np.float64)).astype(np.float32)


def matmul_q8(q, scales, group_size, X):
    """Y [T, N] = X W^T for the int8 format."""
    w = dequantize_q8(q, scales, group_size)
    return (X.astype(np.float64) @ w.T.astype(np.float64)).astype(np.float32)


def unpack_q6_rows(rows, k):
    """q6 codes from the kernels' layout (the file's "rows" layout): uint8 [N, 3K/4] -> int8 [N, K].
    Per chunk of 128 channels at byte 96c of a row (n = its channels / 2 pairs): byte j < n holds the
    low 4 bits of channel 2j (low nibble) and 2j+1 (high nibble); then n/4 bytes for the even channels'
    top 2 bits and n/4 for the odd ones': pair j = 16e + 4p + i at bits 2p..2p+1 of byte 4e + i."""
    n_rows = rows.shape[0]
    assert rows.dtype == np.uint8 and rows.shape == (n_rows, 3 * k // 4) and k % 32 == 0
    q = np.zeros((n_rows, k), np.int64)
    for c0 in range(0, k, 128):
        n = min(128, k - c0) // 2
        base = 3 * c0 // 4
        for j in range(n):
            e, p, i = j // 16, (j // 4) % 4, j % 4
            for par in (0, 1):                       # the even, then the odd channel of pair j
                lo = (rows[:, base + j].astype(np.int64) >> (4 * par)) & 15
                hi = (rows[:, base + n + par * (n // 4) + 4 * e + i].astype(np.int64) >> (2 * p)) & 3
                q[:, c0 + 2 * j + par] = lo | (hi << 4)
    return (q - 32).astype(np.int8)


def unpack_q6(packed, k):
    """q6 codes from the file: uint8 [N, 3K/4] -> int8 [N, K] in -31..31 (-32 would be a corrupt file).
    Bit by bit: code k of a row is the 6 bits starting at bit 6k of the row read as one little-endian
    bit string (byte b holds bits 8b .. 8b+7)."""
    n = packed.shape[0]
    assert packed.dtype == np.uint8 and packed.shape == (n, 3 * k // 4)
    bits = np.unpackbits(packed, axis=1, bitorder="little")          # [N, 6K] bit 8b+i = bit i of byte b
    q = np.zeros((n, k), np.int64)
    for i in range(6):
        q += bits[:, i::6].astype(np.int64) << i
    return (q - 32).astype(np.int8)
