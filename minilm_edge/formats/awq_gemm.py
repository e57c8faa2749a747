"""The AutoAWQ "GEMM" int4 layout (docs/DESIGN.md §3 interchange), declared once, and conversion to and from
the native minilm-q4 layout (q4.py), so AutoAWQ checkpoints run here and ours run in AutoAWQ,
transformers and vLLM.

Shape vocabulary: W [N out, K in], group size g, G = K // g (as in q4.py).

Tensors of one AutoAWQ GEMM linear (note: input-major, packed along the OUTPUT axis):
    qweight  int32   [K, N/8]   eight 4-bit codes per word
    qzeros   int32   [G, N/8]   eight 4-bit zero points per word, stored raw (no -1 offset, unlike GPTQ)
    scales   float16 [G, N]
Dequantization (identical to minilm-q4, transposed):
    W[n, k] = (q[k, n] - z[k // g, n]) * scales[k // g, n]

Nibble order: nibble i (bits 4i .. 4i+3) of word c holds output channel 8c + AWQ_ORDER[i]:

    bits       31..28  27..24  23..20  19..16  15..12  11..8   7..4    3..0
    channel    8c+7    8c+5    8c+3    8c+1    8c+6    8c+4    8c+2    8c+0

AutoAWQ chose this interleave for its CUDA dequantizer, which turns a word into eight fp16 values by
masking the two 16-bit halves at once; the values then come out in natural order. We only match it.

Conversion is exact in both directions: codes, zeros and fp16 scales are moved, never recomputed,
so native -> AutoAWQ -> native reproduces every byte.

Model-level limits of the AutoAWQ format (what `export_awq` refuses or converts, and why):
- ONE group size for the whole model (`quantization_config.group_size`). A native model with
  per-layer group sizes (SmolLM2 at --group-size 128: 576 is not divisible by 128, so q/k/v/o/
  gate/up use 64 and down 128) is re-grouped to the smallest group size. That is lossless: a group
  of 128 split into two groups of 64 that both carry its scale and zero point dequantizes to the
  same weights. It costs a little size (bits per weight of those layers go from 4.16 to 4.31 in
  this format's accounting). `regroup_layers=False` (CLI --no-regroup) refuses instead.
- No fp16 salient channels (no tensor for them): refused.
- lm_head stays fp16 in AutoAWQ: a model quantized with --quantize-head is refused.
- 4-bit containers only: a native W3 model (3-bit codes in 4-bit containers) is exported as bits=4,
  which is exact (the codes and zero points are valid 4-bit values).
"""
from __future__ import annotations

import numpy as np

from ..errors import QuantFormatError, UsageError
from .q4 import Q4Linear, pack_nibbles, unpack_nibbles

QUANT_METHOD = "awq"
VERSION = "gemm"
BITS = 4
PACK = 32 // BITS                              # codes per int32 word
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)           # nibble i holds channel 8c + AWQ_ORDER[i]


def awq_quantization_config(group_size: int) -> dict:
    """The config.json block AutoAWQ and transformers read for a GEMM checkpoint."""
    return {"quant_method": QUANT_METHOD, "bits": BITS, "group_size": group_size, "zero_point": True,
            "version": VERSION}


# ----------------------------------------------------------------------------------------------
# Packing along the output axis


def pack_awq(codes: np.ndarray) -> np.ndarray:
    """uint8 codes [R, N] (0..15, N % 8 == 0) -> int32 words [R, N/8] in AWQ_ORDER."""
    if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] % PACK:
        raise UsageError(f"pack_awq: expected uint8 [R, N] with N a multiple of {PACK}, got "
                         f"{codes.dtype.name} {codes.shape}")
    if codes.size and int(codes.max()) > 15:
        raise UsageError(f"pack_awq: codes must be 0..15, got {int(codes.max())}")
    r, n = codes.shape
    c = codes.reshape(r, n // PACK, PACK).astype(np.uint32)                  # [R, N/8, 8]
    words = np.zeros((r, n // PACK), np.uint32)
    for i, ch in enumerate(AWQ_ORDER):
        words |= c[:, :, ch] << np.uint32(BITS * i)
    return words.view(np.int32)                                              # bit pattern kept


def unpack_awq(words: np.ndarray) -> np.ndarray:
    """int32 words [R, N/8] -> uint8 codes [R, N] (inverse of pack_awq)."""
    r, w = words.shape
    u = words.view(np.uint32)
    codes = np.empty((r, w, PACK), np.uint8)
    for i, ch in enumerate(AWQ_ORDER):
        codes[:, :, ch] = (u >> np.uint32(BITS * i)) & np.uint32(0xF)
    return codes.reshape(r, w * PACK)


# ----------------------------------------------------------------------------------------------
# One linear: native Q4Linear <-> AutoAWQ tensors


def q4_to_awq(q4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4Linear -> (qweight int32 [K, N/8], qzeros int32 [G, N/8], scales float16 [G, N])."""
    n, k = q4.shape
    if q4.n_salient:
        raise UsageError(f"the layer keeps {q4.n_salient} fp16 salient input channels, which the AutoAWQ "
                         "format cannot store; quantize without salient channels to export")
    if n % PACK:
        raise UsageError(f"output size {n} is not a multiple of {PACK}; AutoAWQ GEMM cannot store it")
    codes = unpack_nibbles(q4.qweight)                                       # [N, K]
    qweight = pack_awq(np.ascontiguousarray(codes.T))                        # [K, N] -> [K, N/8]
    qzeros = pack_awq(np.ascontiguousarray(q4.zeros.T))                      # [G, N] -> [G, N/8]
    return qweight, qzeros, np.ascontiguousarray(q4.scales.T)                # [G, N]


def awq_to_q4(qweight, qzeros, scales):
    """AutoAWQ GEMM tensors -> Q4Linear; QuantFormatError naming the tensor on bad dtypes/shapes."""
    for name, arr, dtype in (("qweight", qweight, np.int32), ("qzeros", qzeros, np.int32),
                             ("scales", scales, np.float16)):
        if not isinstance(arr, np.ndarray) or arr.ndim != 2 or arr.dtype != dtype:
            got = f"{arr.dtype.name} {list(arr.shape)}" if isinstance(arr, np.ndarray) else type(arr).__name__
            raise QuantFormatError(f"{name}: expected a 2-D {np.dtype(dtype).name} array, got {got}")
    k, n = qweight.shape[0], qweight.shape[1] * PACK
    n_groups = scales.shape[0]
    if scales.shape[1] != n or n_groups == 0 or k % n_groups:
        raise QuantFormatError(f"scales: expected shape [K/g, {n}] with K = {k}, got {list(scales.shape)}")
    if qzeros.shape != (n_groups, n // PACK):
        raise QuantFormatError(f"qzeros: expected shape {[n_groups, n // PACK]}, got {list(qzeros.shape)}")
    codes = unpack_awq(qweight)                                              # [K, N]
    zeros = unpack_awq(qzeros)                                               # [G, N]
    return Q4Linear(pack_nibbles(np.ascontiguousarray(codes.T)),             # [N, K/2]
                    np.ascontiguousarray(scales.T), np.ascontiguousarray(zeros.T), k // n_groups)


def regroup(q4, group_size: int):
    """The same weights with smaller groups: each group of q4.group_size is split into groups of
    `group_size` that carry its scale and zero point (exact: dequantize() is unchanged)."""
    if q4.group_size % group_size:
        raise UsageError(f"cannot re-group g = {q4.group_size} into g = {group_size} exactly")
    r = q4.group_size // group_size
    return Q4Linear(q4.qweight, np.repeat(q4.scales, r, axis=1), np.repeat(q4.zeros, r, axis=1),
                    group_size, q4.salient_idx, q4.salient_w)


# ----------------------------------------------------------------------------------------------
# A whole model folder


# ----------------------------------------------------------------------------------------------
# Import-time check of the layout


def _check_invariants():
    assert sorted(AWQ_ORDER) == list(range(PACK)) and PACK == 8
    codes = np.arange(16, dtype=np.uint8).reshape(2, 8)                      # channel j holds code j (+8)
    words = pack_awq(codes).view(np.uint32)
    assert words[0, 0] == 0x75316420, hex(words[0, 0])                       # the drawing above, row 0
    assert np.array_equal(unpack_awq(pack_awq(codes)), codes)


_check_invariants()
