"""The native int4 weight format "minilm-q4" v1, declared once (docs/DESIGN.md §3), and its RTN quantizer (§4).

Shape vocabulary: a linear layer maps x [K] -> y [N] with weight W [N, K]; g is the group size (a
group is g consecutive input channels of one output row), G = K // g, m = number of salient columns.

Tensors of one quantized linear (`Q4Linear`):
    qweight     uint8   [N, K/2]   two 4-bit codes per byte
    scales      float16 [N, G]
    zeros       uint8   [N, G]     zero points, 0..15
    salient_idx int32   [m]        optional: sorted, unique input channels kept in fp16
    salient_w   float16 [N, m]     optional: W[:, salient_idx]

Dequantization (q = 4-bit code):
    W[n, k] = (q[n, k] - zeros[n, k // g]) * scales[n, k // g]      for k not salient
    W[n, k] = salient_w[n, i]                                        for k = salient_idx[i]
The codes of salient columns equal the zero point, so the int4 part contributes exactly 0 there and a
kernel adds `salient_w @ x[salient_idx]` (fused mixed precision).

Nibble order (the on-disk order of docs/DESIGN.md §3, kept: the kernels read it as is, see below):

    byte j of row n:   bit 7 ... 4 | 3 ... 0
                       q[n, 2j+1]  | q[n, 2j]        (low nibble = even input channel)

    qweight[n] = [ q1 q0 | q3 q2 | q5 q4 | ... ]

Why not another order: the decode kernel splits a 16-byte load into its low nibbles (inputs 0,2,4,…)
and high nibbles (inputs 1,3,5,…) and multiplies them with x split once per call into its even and
odd entries (K floats, negligible next to N·K/2 weight bytes). That costs nothing per weight, so the
interleaved order runs as fast as a "first half / second half" order would, and no repack is needed.

Cost: bits per weight = 4 + (16 + 8)/g for fp16 scale + uint8 zero (4.375 at g = 64, 4.1875 at
g = 128); a packed 4-bit zero, as AutoAWQ's qzeros, would give 4 + 20/g (docs/DESIGN.md §3.1).
Salient columns add 16·m/K.

Group sizes: 32, 64 or 128 (`GROUP_SIZES`). Every group is a whole number of 16-byte vectors (32
codes), which the kernels rely on; `choose_group_size` picks the largest that divides K.

Quantizer (round to nearest, asymmetric min/max as AWQ), per group of g weights w:
    scale = max(max(w) - min(w), 1e-5) / (2^b - 1)      then rounded to fp16, as stored
    zero  = clamp(-round(min(w) / scale), 0, 2^b - 1)
    q     = clamp(round(w / scale) + zero, 0, 2^b - 1)   round half to even (np.round)
The scale is rounded to fp16 *before* zero and q are computed, so the codes are the best ones for the
scale actually stored and `pseudo_quantize(w) == dequantize(quantize_q4(w))` holds exactly; the error
per element is at most scale/2 except where q was clamped.

Also here: `Q8Linear`, a symmetric int8 per-(row, group) format for an optionally quantized lm_head:
    qweight int8 [N, K] in -127..127, scales float16 [N, G];  W[n, k] = qweight[n, k] * scales[n, k//g]
    scale = max(max|w|, 1e-5) / 127 (rounded to fp16);  q = clamp(round(w / scale), -127, 127)
Symmetric because lm_head rows are near zero-mean, a zero point buys little there, and the kernel
then needs no zero-point correction. Cost 8 + 16/g bits per weight (8.25 at g = 64).

And "q6", the same symmetric format with 6-bit codes (issue 17: where llama.cpp's Q4_K_M puts Q6_K):
    codes in -31..31, scale = max(max|w|, 1e-5) / 31;  in memory a Q8Linear holding those codes
    qweight uint8 [N, 3K/4] (no zeros tensor: that tells it from minilm-q4), scales float16 [N, G]
Two layouts of the same 6 bits a code, u = code + 32 (1..63, 0 never written); the safetensors
header says which one a file holds (`Q6_LAYOUT_KEY` in its __metadata__, `q6_layout`):
"rows" (`pack_q6_rows`, files written since 2026-12-08, K % 32 == 0): the layout kernels/quant_q6.py
reads, so loading maps the file's bytes in place (no copy, no re-pack). Per row, per chunk of 128
channels (the last may hold fewer: n = its channels / 2, a multiple of 16 when K % 32 == 0),
n + n/4 + n/4 bytes at byte 96c of the row:

    nib[j]             = (u[2j] & 15) | (u[2j+1] & 15) << 4            j < n (channel pairs of the chunk)
    hiE[4e + i] bits 2p..2p+1 = u[2j] >> 4,   hiO likewise u[2j+1] >> 4,   j = 16e + 4p + i

so 64 nibble bytes give the chunk's even and odd channels as the int4 kernels split them, and the
two-bit planes spread to 64 bytes each with one dword permute and one dword rotate (dword d of the
output takes source dword d // 4, bit pair d % 4). The kernels rebuild u + 96 = code + 128, the bytes
of the int8 rows (kernels/quant_i8_matvec.q8_rows), so q6 computes bit-identically to int8.
"packed" (`pack_q6`, no key: files written before 2026-12-08; any K % 4 == 0): 4 codes in 3 bytes,
    word = u0 | u1 << 6 | u2 << 12 | u3 << 18     (codes 4j .. 4j+3 of a row, 24 bits)
    bytes 3j, 3j+1, 3j+2 = word & 0xFF, (word >> 8) & 0xFF, word >> 16     (little-endian)
re-packed into "rows" at load (`q6_rows_from_file`: anonymous memory, seconds to minutes at 1B).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import QuantFormatError, UsageError

FORMAT_NAME = "minilm-q4"
FORMAT_VERSION = 1
BITS = 4
QMAX = (1 << BITS) - 1            # largest 4-bit code
GROUP_SIZES = (128, 64, 32)       # supported, in order of preference
DEFAULT_GROUP_SIZE = 128
SCALE_FLOOR = 1e-5                # max - min of a constant group is replaced by this
Q8_MAX = 127                      # int8 codes are symmetric: -127..127 (-128 unused)
Q6_MAX = 31                       # q6 codes: -31..31, stored as code + 32 in 6 bits
Q6_ROWS_PER_CHUNK = 4096
Q6_LAYOUT_KEY = "minilm_q6_layout"   # safetensors __metadata__ key: the layout of the file's q6 codes
Q6_LAYOUTS = ("rows", "packed")      # "rows": pack_q6_rows (what we write); "packed": pack_q6 (no key)
PSEUDO_BITS = (2, 3, 4, 5, 6, 7, 8)


def bits_per_weight(group_size: int, n_salient: int = 0, k: int | None = None) -> float:
    """Stored bits per weight of a Q4Linear: codes + fp16 scale and uint8 zero per group + salient."""
    bpw = BITS + (16 + 8) / group_size
    if n_salient:
        bpw += 16 * n_salient / k
    return bpw


# ----------------------------------------------------------------------------------------------
# Containers


def _check(name, arr, dtype, shape):
    """Raise QuantFormatError naming the tensor unless arr is an ndarray of dtype and shape."""
    if not isinstance(arr, np.ndarray):
        raise QuantFormatError(f"{name}: expected a numpy array, got {type(arr).__name__}")
    if arr.dtype != dtype:
        raise QuantFormatError(f"{name}: expected dtype {np.dtype(dtype).name}, got {arr.dtype.name}")
    if arr.shape != tuple(shape):
        raise QuantFormatError(f"{name}: expected shape {tuple(shape)}, got {arr.shape}")


def _check_group_size(group_size, k=None):
    if group_size not in GROUP_SIZES:
        raise QuantFormatError(f"group_size: expected one of {GROUP_SIZES}, got {group_size}")
    if k is not None and k % group_size:
        raise QuantFormatError(f"group_size {group_size} does not divide K = {k}")


@dataclass(frozen=True)
class Q4Linear:
    """One int4 linear layer in the minilm-q4 v1 format (see the module docstring)."""
    qweight: np.ndarray                   # uint8   [N, K/2]
    scales: np.ndarray                    # float16 [N, G]
    zeros: np.ndarray                     # uint8   [N, G]
    group_size: int
    salient_idx: np.ndarray | None = None  # int32  [m], sorted unique in [0, K)
    salient_w: np.ndarray | None = None    # float16 [N, m]

    def __post_init__(self):
        if not isinstance(self.qweight, np.ndarray) or self.qweight.ndim != 2:
            raise QuantFormatError("qweight: expected a 2-D uint8 array [N, K/2]")
        n, half = self.qweight.shape
        self.validate(n, 2 * half)

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of the dequantized weight."""
        return self.qweight.shape[0], 2 * self.qweight.shape[1]

    @property
    def n_salient(self) -> int:
        return 0 if self.salient_idx is None else len(self.salient_idx)

    def validate(self, n: int, k: int) -> None:
        """Check every tensor against W [n, k]; raise QuantFormatError naming tensor, expected, actual."""
        _check_group_size(self.group_size, k)
        g = k // self.group_size
        _check("qweight", self.qweight, np.uint8, (n, k // 2))
        _check("scales", self.scales, np.float16, (n, g))
        _check("zeros", self.zeros, np.uint8, (n, g))
        if self.zeros.size and int(self.zeros.max()) > QMAX:
            raise QuantFormatError(f"zeros: expected values in 0..{QMAX}, got {int(self.zeros.max())}")
        if not np.all(np.isfinite(self.scales)):
            raise QuantFormatError("scales: expected finite values, got inf or nan")
        if (self.salient_idx is None) != (self.salient_w is None):
            raise QuantFormatError("salient_idx and salient_w: give both or neither")
        if self.salient_idx is None:
            return
        idx = self.salient_idx
        if not isinstance(idx, np.ndarray) or idx.ndim != 1:
            raise QuantFormatError("salient_idx: expected a 1-D int32 array [m]")
        _check("salient_idx", idx, np.int32, (len(idx),))
        _check("salient_w", self.salient_w, np.float16, (n, len(idx)))
        if not np.all(np.isfinite(self.salient_w)):
            raise QuantFormatError("salient_w: expected finite values, got inf or nan")
        if len(idx) and (idx[0] < 0 or idx[-1] >= k or np.any(np.diff(idx) <= 0)):
            raise QuantFormatError(
                f"salient_idx: expected sorted unique channels in [0, {k}), got "
                f"min {int(idx.min())}, max {int(idx.max())}, sorted-unique {bool(np.all(np.diff(idx) > 0))}")


@dataclass(frozen=True)
class Q8Linear:
    """Symmetric int8 linear, per (row, group) fp16 scales: W[n, k] = qweight[n, k] * scales[n, k//g]."""
    qweight: np.ndarray    # int8    [N, K]
    scales: np.ndarray     # float16 [N, G]
    group_size: int

    def __post_init__(self):
        if not isinstance(self.qweight, np.ndarray) or self.qweight.ndim != 2:
            raise QuantFormatError("qweight: expected a 2-D int8 array [N, K]")
        self.validate(*self.qweight.shape)

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape

    def validate(self, n: int, k: int) -> None:
        _check_group_size(self.group_size, k)
        _check("qweight", self.qweight, np.int8, (n, k))
        _check("scales", self.scales, np.float16, (n, k // self.group_size))
        if not np.all(np.isfinite(self.scales)):
            raise QuantFormatError("scales: expected finite values, got inf or nan")


# ----------------------------------------------------------------------------------------------
# Packing


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 codes [N, K] (values 0..15, K even) -> uint8 [N, K/2]; even k low nibble, odd k high."""
    if q.dtype != np.uint8 or q.ndim != 2 or q.shape[1] % 2:
        raise UsageError(f"pack_nibbles: expected uint8 [N, even K], got {q.dtype.name} {q.shape}")
    if q.size and int(q.max()) > QMAX:
        raise UsageError(f"pack_nibbles: codes must be 0..{QMAX}, got {int(q.max())}")
    return q[:, 0::2] | (q[:, 1::2] << 4)                    # [N, K] -> [N, K/2]


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8 [N, K/2] -> uint8 codes [N, K] (inverse of pack_nibbles)."""
    n, half = packed.shape
    q = np.empty((n, 2 * half), np.uint8)
    q[:, 0::2] = packed & 0x0F
    q[:, 1::2] = packed >> 4
    return q


# ----------------------------------------------------------------------------------------------
# Quantizer (RTN)


def choose_group_size(k: int, preferred: int = DEFAULT_GROUP_SIZE) -> int:
    """Largest of (preferred, 64, 32) that divides K; QuantFormatError if none does."""
    if preferred not in GROUP_SIZES:
        raise UsageError(f"group size must be one of {GROUP_SIZES}, got {preferred}")
    for g in sorted({preferred, 64, 32}, reverse=True):
        if g <= preferred and k % g == 0:
            return g
    raise QuantFormatError(f"K = {k} is not divisible by any supported group size <= {preferred} "
                           f"({GROUP_SIZES}); this layer cannot be stored as minilm-q4")


def _as_weight(w, group_size):
    if not isinstance(w, np.ndarray) or w.ndim != 2:
        raise UsageError("weight: expected a 2-D float array [N, K]")
    w = np.asarray(w, np.float32)
    if w.shape[1] % group_size:
        raise UsageError(f"weight: K = {w.shape[1]} is not a multiple of group_size {group_size}")
    if not np.all(np.isfinite(w)):
        raise UsageError("weight: contains inf or nan; cannot quantize")
    return w


def fp16_scale(x, what):
    """Round scales to fp16 as stored; refuse values fp16 cannot hold."""
    with np.errstate(over="ignore"):
        s = x.astype(np.float16)
    if not np.all(np.isfinite(s)):
        raise QuantFormatError(f"{what}: a group's range exceeds what an fp16 scale can hold")
    return s


def rtn_codes(w: np.ndarray, bits: int, group_size: int):
    """RTN per group: w float32 [N, K] -> (q uint8 [N, K], scales float16 [N, G], zeros uint8 [N, G])."""
    n, k = w.shape
    qmax = (1 << bits) - 1
    wg = w.reshape(n, k // group_size, group_size)                          # [N, G, g]
    lo, hi = wg.min(axis=2), wg.max(axis=2)                                 # [N, G]
    scales = fp16_scale(np.maximum(hi - lo, np.float32(SCALE_FLOOR)) / np.float32(qmax), "scales")
    s = scales.astype(np.float32)
    zeros = np.clip(-np.round(lo / s), 0, qmax)                             # [N, G]
    q = np.clip(np.round(wg / s[..., None]) + zeros[..., None], 0, qmax)    # [N, G, g]
    return q.reshape(n, k).astype(np.uint8), scales, zeros.astype(np.uint8)


def pseudo_quantize(w: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    """Quantize then dequantize (RTN, any bits in 2..8): w float32 [N, K] -> w_hat float32 [N, K]."""
    if bits not in PSEUDO_BITS:
        raise UsageError(f"bits must be one of {PSEUDO_BITS}, got {bits}")
    if group_size <= 0:
        raise UsageError(f"group_size must be positive, got {group_size}")
    w = _as_weight(w, group_size)
    q, scales, zeros = rtn_codes(w, bits, group_size)
    n, k = w.shape
    qg = q.reshape(n, -1, group_size).astype(np.float32)
    w_hat = (qg - zeros[..., None].astype(np.float32)) * scales[..., None].astype(np.float32)
    return w_hat.reshape(n, k)


def quantize_q4(w: np.ndarray, group_size: int, salient_idx=None, bits: int = BITS) -> Q4Linear:
    """RTN int4: w float32 [N, K] -> Q4Linear; salient columns (if any) kept in fp16.

    bits=3 stores 3-bit codes (0..7) in the same 4-bit containers: the dequant formula is unchanged,
    so W3 quality can be run and measured with the int4 kernels (the file is not smaller).

    Salient columns are set to 0 before the group ranges are taken, so each of their groups' ranges
    contains 0 and their codes come out equal to the zero point (then set to it explicitly).
    """
    _check_group_size(group_size)
    w = _as_weight(w, group_size)
    n, k = w.shape
    sal_w = None
    if salient_idx is not None:
        salient_idx = np.asarray(salient_idx)
        if salient_idx.ndim != 1 or not np.issubdtype(salient_idx.dtype, np.integer):
            raise UsageError("salient_idx: expected a 1-D integer array")
        salient_idx = salient_idx.astype(np.int32)
        sal_w = np.ascontiguousarray(w[:, salient_idx], dtype=np.float16)     # [N, m] (w[:, idx] is F-ordered)
        w = w.copy()
        w[:, salient_idx] = 0.0
    if bits not in (3, BITS):
        raise UsageError(f"bits must be 3 or 4 for the packed format, got {bits}")
    q, scales, zeros = rtn_codes(w, bits, group_size)
    if salient_idx is not None and len(salient_idx):
        q[:, salient_idx] = zeros[:, salient_idx // group_size]
    return Q4Linear(pack_nibbles(q), scales, zeros, group_size, salient_idx, sal_w)


def dequantize(q4: Q4Linear) -> np.ndarray:
    """Q4Linear -> W float32 [N, K], salient columns included."""
    n, k = q4.shape
    g = q4.group_size
    q = unpack_nibbles(q4.qweight).reshape(n, k // g, g).astype(np.float32)         # [N, G, g]
    w = (q - q4.zeros[..., None].astype(np.float32)) * q4.scales[..., None].astype(np.float32)
    w = w.reshape(n, k)
    if q4.n_salient:
        w[:, q4.salient_idx] = q4.salient_w.astype(np.float32)
    return w


def quantize_q8(w: np.ndarray, group_size: int, qmax: int = Q8_MAX) -> Q8Linear:
    """Symmetric int8 per (row, group): w float32 [N, K] -> Q8Linear (codes in -qmax..qmax)."""
    _check_group_size(group_size)
    w = _as_weight(w, group_size)
    n, k = w.shape
    wg = w.reshape(n, k // group_size, group_size)                          # [N, G, g]
    amax = np.abs(wg).max(axis=2)                                           # [N, G]
    scales = fp16_scale(np.maximum(amax, np.float32(SCALE_FLOOR)) / np.float32(qmax), "scales")
    q = np.clip(np.round(wg / scales[..., None].astype(np.float32)), -qmax, qmax)
    return Q8Linear(q.reshape(n, k).astype(np.int8), scales, group_size)


def quantize_q6(w: np.ndarray, group_size: int) -> Q8Linear:
    """Symmetric 6-bit per (row, group): a Q8Linear whose codes are in -31..31 (store with pack_q6)."""
    return quantize_q8(w, group_size, Q6_MAX)


def q6_packed_width(k: int) -> int:
    """Bytes of one packed q6 row of K codes (K a multiple of 4)."""
    return 3 * k // 4


def pack_q6(q: np.ndarray) -> np.ndarray:
    """int8 codes [N, K] in -31..31 (K a multiple of 4) -> uint8 [N, 3K/4] (module docstring)."""
    if not isinstance(q, np.ndarray) or q.dtype != np.int8 or q.ndim != 2 or q.shape[1] % 4:
        raise UsageError(f"pack_q6: expected int8 [N, K] with K a multiple of 4, got "
                         f"{getattr(q, 'dtype', type(q).__name__)} {getattr(q, 'shape', '')}")
    if q.size and int(np.abs(q).max()) > Q6_MAX:
        raise UsageError(f"pack_q6: codes must be in -{Q6_MAX}..{Q6_MAX}, got {int(np.abs(q).max())}")
    n, k = q.shape
    u = (q.astype(np.int32) + (Q6_MAX + 1)).astype(np.uint32).reshape(n, k // 4, 4)
    word = u[..., 0] | (u[..., 1] << 6) | (u[..., 2] << 12) | (u[..., 3] << 18)      # [N, K/4]
    out = np.empty((n, k // 4, 3), np.uint8)
    out[..., 0], out[..., 1], out[..., 2] = word & 0xFF, (word >> 8) & 0xFF, word >> 16
    return out.reshape(n, 3 * k // 4)


def unpack_q6(packed: np.ndarray, k: int, name: str = "qweight") -> np.ndarray:
    """uint8 [N, 3K/4] -> int8 codes [N, K] in -31..31 (inverse of pack_q6). QuantFormatError (naming
    `name`) for a wrong dtype or width, or a byte pattern no q6 writer makes (the unused code -32)."""
    _check(name, packed, np.uint8, (packed.shape[0] if getattr(packed, "ndim", 0) == 2 else -1,
                                    q6_packed_width(k)))
    n = packed.shape[0]
    q = np.empty((n, k // 4, 4), np.int8)
    for r in range(0, n, Q6_ROWS_PER_CHUNK):         # row chunks: the uint32 temporaries stay a few MB
        b = packed[r:r + Q6_ROWS_PER_CHUNK].reshape(-1, k // 4, 3).astype(np.uint32)
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)              # [rows, K/4]
        for j in range(4):
            q[r:r + Q6_ROWS_PER_CHUNK, :, j] = ((word >> (6 * j)) & 0x3F).astype(np.int8) - np.int8(Q6_MAX + 1)
    q = q.reshape(n, k)
    if q.size and int(q.min()) < -Q6_MAX:
        raise QuantFormatError(f"{name}: holds the code -{Q6_MAX + 1}, which no q6 writer makes (corrupted?)")
    return q


Q6_CHUNK = 128          # channels per chunk of the in-memory layout (`pack_q6_rows`)


def pack_q6_rows(q: np.ndarray) -> np.ndarray:
    """int8 codes [N, K] in -31..31 (K % 32 == 0) -> uint8 [N, 3K/4] in the in-memory layout the q6
    kernels read (module docstring: per 128 channels a nibble plane, then the even and odd channels'
    two-bit planes)."""
    n_rows, k = q.shape
    if k % 32:
        raise UsageError(f"pack_q6_rows: K must be a multiple of 32, got {k}")
    u = (q.astype(np.int16) + (Q6_MAX + 1)).astype(np.uint8)
    out = np.empty((n_rows, 3 * k // 4), np.uint8)
    for c0 in range(0, k, Q6_CHUNK):
        part = u[:, c0:c0 + Q6_CHUNK]
        n = part.shape[1] // 2
        ev, od = part[:, 0::2], part[:, 1::2]                                      # [N, n]
        base = 3 * c0 // 4
        out[:, base:base + n] = (ev & 15) | ((od & 15) << 4)
        for par, src in ((0, ev), (1, od)):
            h = (src >> 4).reshape(n_rows, n // 16, 4, 4)                          # [N, e, p, i]
            b = h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)   # [N, e, i]
            o = base + n + par * (n // 4)
            out[:, o:o + n // 4] = b.reshape(n_rows, n // 4)
    return out


def unpack_q6_rows(rows: np.ndarray, k: int) -> np.ndarray:
    """uint8 [..., 3K/4] in the in-memory layout -> int8 codes [..., K] (inverse of `pack_q6_rows`)."""
    lead = rows.shape[:-1]
    r = rows.reshape(-1, rows.shape[-1])
    q = np.empty((r.shape[0], k), np.int16)
    for c0 in range(0, k, Q6_CHUNK):
        n = min(Q6_CHUNK, k - c0) // 2
        base = 3 * c0 // 4
        nib = r[:, base:base + n]
        for par, lo in ((0, nib & 15), (1, nib >> 4)):
            o = base + n + par * (n // 4)
            b = r[:, o:o + n // 4].reshape(-1, n // 16, 1, 4)                      # [N, e, 1, i]
            h = (b >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3   # [N, e, p, i]
            q[:, c0 + par:c0 + 2 * n:2] = lo.astype(np.int16) | (h.reshape(-1, n).astype(np.int16) << 4)
    return (q - (Q6_MAX + 1)).astype(np.int8).reshape(*lead, k)


def q6_rows_from_file(packed: np.ndarray, k: int, name: str = "qweight", out: np.ndarray | None = None) -> np.ndarray:
    """The file's q6 codes (`pack_q6`) re-packed into the in-memory layout (`pack_q6_rows`), a few
    thousand rows at a time (the int8 temporaries stay a few MB), into `out` (uint8 [N, 3K/4]) if
    given; the checks of `unpack_q6`."""
    _check(name, packed, np.uint8, (packed.shape[0] if getattr(packed, "ndim", 0) == 2 else -1,
                                    q6_packed_width(k)))
    out = np.empty((packed.shape[0], 3 * k // 4), np.uint8) if out is None else out
    for r in range(0, packed.shape[0], Q6_ROWS_PER_CHUNK):
        out[r:r + Q6_ROWS_PER_CHUNK] = pack_q6_rows(unpack_q6(packed[r:r + Q6_ROWS_PER_CHUNK], k, name))
    return out


def q6_layout(metadata: dict) -> str:
    """The layout of the q6 codes in a safetensors file with this __metadata__ (module docstring):
    "rows" or "packed"; QuantFormatError for a value this version does not know (a newer writer)."""
    layout = metadata.get(Q6_LAYOUT_KEY, "packed")
    if layout not in Q6_LAYOUTS:
        raise QuantFormatError(f"{Q6_LAYOUT_KEY} = {layout!r} is not a q6 layout this minilm_edge knows "
                               f"({', '.join(Q6_LAYOUTS)}); a newer version wrote it: upgrade minilm_edge")
    return layout


def dequantize_q8(q8: Q8Linear) -> np.ndarray:
    """Q8Linear -> W float32 [N, K]."""
    n, k = q8.shape
    g = q8.group_size
    w = q8.qweight.reshape(n, k // g, g).astype(np.float32) * q8.scales[..., None].astype(np.float32)
    return w.reshape(n, k)


# ----------------------------------------------------------------------------------------------
# Import-time check of the format's invariants


def _check_invariants():
    assert QMAX == 15 and BITS == 4
    assert all(g % 32 == 0 for g in GROUP_SIZES), "kernels read whole 16-byte vectors per group"
    assert bits_per_weight(64) == 4.375 and bits_per_weight(128) == 4.1875
    six = np.arange(-Q6_MAX, Q6_MAX + 1, dtype=np.int8)[:60].reshape(1, 60)
    assert np.array_equal(unpack_q6(pack_q6(six), 60), six), "q6 packing round-trips"
    rows = np.resize(np.arange(-Q6_MAX, Q6_MAX + 1, dtype=np.int8), (2, 160))
    assert np.array_equal(unpack_q6_rows(pack_q6_rows(rows), 160), rows), "the in-memory q6 layout round-trips"
    codes = np.arange(32, dtype=np.uint8).reshape(1, 32) % 16
    packed = pack_nibbles(codes)
    assert packed[0, 0] == (codes[0, 0] | codes[0, 1] << 4), "low nibble holds the even channel"
    assert np.array_equal(unpack_nibbles(packed), codes)


_check_invariants()
