"""Linear layers by weight format, dispatched by a table keyed by format name.

A linear maps x [T, K] -> y [T, N] = x @ W.T (+ bias). Each format knows how to recognise itself
among a checkpoint's tensor names, how to load and check itself, and how to multiply.
"""
from __future__ import annotations

import numpy as np


class Linear:
    """Interface: `__call__(x [T, K] float32) -> [T, N] float32`; `shape` is (N, K)."""
    kind = "?"
    bias = None
    shape = (0, 0)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes of weights read per call (for bandwidth accounting)."""
        raise NotImplementedError


class DenseF32(Linear):
    """W float32 [N, K]; BLAS does the work (prefill: gemm, decode: gemv)."""
    kind = "f32"

    def __init__(self, w: np.ndarray):
        self.w = w                 # [N, K] float32, C-contiguous (may be a read-only mmap view)
        self.shape = w.shape

    @classmethod
    def from_array(cls, w):
        return cls(np.ascontiguousarray(w, dtype=np.float32))

    @staticmethod
    def present(src, prefix):
        return prefix + ".weight" in src

    @classmethod
    def load(cls, src, prefix, shape, cfg):
        return cls(np.ascontiguousarray(src.float32(prefix + ".weight", shape)))

    def __call__(self, x):
        y = x @ self.w.T           # [T, K] @ [K, N] -> [T, N]
        if self.bias is not None:
            y += self.bias
        return y

    @property
    def nbytes(self):
        return self.w.nbytes


# format name -> class. Quantized formats register here.
LINEAR_FORMATS = {"f32": DenseF32}
