"""Linear layers by weight format, dispatched by a table keyed by format name.

A linear maps x [T, K] -> y [T, N] = x @ W.T (+ bias). Each format knows how to recognise itself
among a checkpoint's tensor names, how to load and check itself, and how to multiply.
"""
from __future__ import annotations

import numpy as np

from ..errors import QuantFormatError


class Linear:
    """Interface: `__call__(x [T, K] float32) -> [T, N] float32`; `shape` is (N, K).

    A format implements `matvec(x [K]) -> [N]` (decode: the memory-bound hot spot, a Numba kernel)
    and `matmul(X [T, K]) -> [T, N]` (prefill: compute-bound, BLAS); the bias is added here.
    """
    kind = "?"
    bias = None
    shape = (0, 0)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = self.matvec(x[0])[None] if x.shape[0] == 1 else self.matmul(x)
        if self.bias is not None:
            y += self.bias
        return y

    def rows(self, X: np.ndarray) -> np.ndarray:
        """`__call__` for the rows of B decoded tokens (a batched decode step): each row meets the
        activations its own single-stream decode (`matvec`) gives it, so a batch decodes what each
        sequence would alone; prefill's format may differ (int8 from INT8_MIN_TOKENS tokens)."""
        return self(X)

    def matvec(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def matmul(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes of weights read per call (for bandwidth accounting)."""
        raise NotImplementedError

    @staticmethod
    def fuse(parts):
        """One linear computing all parts side by side, or None (the default: not fusable)."""
        return None


class DenseF32(Linear):
    """W float32 [N, K] (often a memory-mapped view): decode a Numba matvec, prefill BLAS gemm."""
    kind = "f32"

    def __init__(self, w: np.ndarray):
        self.w = w                 # [N, K] float32, C-contiguous (may be a read-only mmap view)
        self.shape = w.shape

    @classmethod
    def from_array(cls, w):
        return cls(np.ascontiguousarray(w, dtype=np.float32))


    @classmethod
    def load(cls, src, prefix, shape, cfg):
        return cls(np.ascontiguousarray(src.float32(prefix + ".weight", shape)))

    def matvec(self, x):
        if self.shape[1] % 16:                  # the Numba kernel reads whole 16-lane vectors
            return self.w @ x
        from ..kernels.dense_f32 import matvec_f32_f32
        return matvec_f32_f32(self.w, x)        # decode: a Numba matvec, not BLAS gemv

    def matmul(self, X):
        return X @ self.w.T        # [T, K] @ [K, N] -> [T, N]

    @property
    def nbytes(self):
        return self.w.nbytes
    # fuse: the default (no). Dense weights stay memory-mapped views; concatenating would copy them.


class DenseF16(Linear):
    """W float16 [N, K], kept fp16 in RAM (often a memory-mapped view): decode widens 16 weights at a
    time inside the matvec (kernels/dense_f32.py), prefill widens row tiles for BLAS."""
    kind = "f16"

    def __init__(self, w: np.ndarray):
        self.w = w                              # [N, K] float16, C-contiguous
        self.bits = w.view(np.uint16)           # the same bytes, as Numba can take them
        self.shape = w.shape


    @classmethod
    def load(cls, src, prefix, shape, cfg):
        from ..formats.tensors import check_shape
        w = src.raw(prefix + ".weight")[0]
        check_shape(prefix + ".weight", w.shape, shape)
        return cls(np.ascontiguousarray(w))

    def matvec(self, x):
        from ..kernels.dense_f32 import matvec_f16_f32
        return matvec_f16_f32(self.bits, x)

    def matmul(self, X):
        from ..kernels.dense_f32 import matmul_f16_f32
        return matmul_f16_f32(self.w, X)

    @property
    def nbytes(self):
        return self.w.nbytes


def anon_array(shape: tuple, dtype) -> np.ndarray:
    """An uninitialised array in its own anonymous memory map: freed, its pages go back to the OS at
    once (a heap block of the same size may stay in the RSS). q6 rows live in these: re-packed at load,
    then moved into the one-call step's stacks (runtime/decode.stack_q8), the first copy freed."""
    import mmap
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if nbytes == 0:
        return np.empty(shape, dtype)
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).reshape(shape)


def _optional(src, name):
    return src.raw(name)[0] if name in src else None


class Q4(Linear):
    """minilm-q4 v1 int4 weights (q4.py). With int8 activations (the default where the CPU has an int8
    dot, kernels/int8_dot.py: AVX512-VNNI, AVX-VNNI or AVX2): decode the int4 x int8 matvec
    (kernels/quant_i8_matvec.py), prefill the int4 x int8 matmul (kernels/quant_i8_matmul.py) where
    `use_int8_activations` says so. Otherwise float32: the fused int4 matvec (kernels/quant_f32.py), and
    dequantized tiles × BLAS for prefill.

    `int8_activations = False` forces the float32 prefill (the accuracy reference); see
    Model.set_int8_activations.
    """
    kind = "q4"

    def __init__(self, q4):
        from ..kernels.quant_f32 import prepare_q4
        self.q4 = q4                 # the on-disk form (None when built from a prepared view)
        self.p = prepare_q4(q4)      # the form the kernels read
        self.shape = q4.shape
        self.int8_activations = True

    @classmethod
    def from_prepared(cls, p):
        lin = cls.__new__(cls)
        lin.q4, lin.p, lin.shape, lin.int8_activations = None, p, p.shape, True
        return lin


    @classmethod
    def load(cls, src, prefix, shape, cfg):
        from ..formats.q4 import Q4Linear
        qweight = src.raw(prefix + ".qweight")[0]
        scales = src.raw(prefix + ".scales")[0]
        n, k = shape
        if qweight.shape != (n, k // 2) or scales.ndim != 2 or scales.shape[1] == 0:
            raise QuantFormatError(f"{prefix}.qweight has shape {list(qweight.shape)}, expected [{n}, {k // 2}]")
        try:
            q4 = Q4Linear(qweight, scales, src.raw(prefix + ".zeros")[0], k // scales.shape[1],
                          _optional(src, prefix + ".salient_idx"), _optional(src, prefix + ".salient_w"))
        except QuantFormatError as e:
            raise QuantFormatError(f"{prefix}: {e}") from None
        return cls(q4)

    def matvec(self, x):
        from ..kernels.int8_dot import INT8_DOT
        from ..kernels.quant_i8_matvec import matvec_q4_i8, supports_i8
        if self.int8_activations and INT8_DOT and supports_i8(self.p.group_size, self.shape[1]):
            return matvec_q4_i8(self.p, x)
        from ..kernels.quant_f32 import matvec_q4_f32
        return matvec_q4_f32(self.p, x)

    def rows(self, X):
        from ..kernels.int8_dot import INT8_DOT
        from ..kernels.quant_i8_matmul import matmul_q4_i8
        from ..kernels.quant_i8_matvec import supports_i8
        if not (self.int8_activations and INT8_DOT and supports_i8(self.p.group_size, self.shape[1])):
            return self(X)                         # float32, as matvec
        y = matmul_q4_i8(self.p, X)                # int8 activations at any B, as matvec_q4_i8
        if self.bias is not None:
            y += self.bias
        return y

    def matmul(self, X):
        from ..kernels.quant_i8_matmul import matmul_q4_i8, use_int8_activations
        if self.int8_activations and use_int8_activations(X.shape[0]):
            return matmul_q4_i8(self.p, X)
        from ..kernels.quant_f32 import matmul_q4_f32
        return matmul_q4_f32(self.p, X)

    @property
    def nbytes(self):
        return self.p.nbytes

    @staticmethod
    def fuse(parts):
        """One Q4 whose rows are the parts' rows stacked (q|k|v, gate|up): one call instead of
        several per token. Needs the same K, group size and salient channels."""
        from ..formats.q4 import Q4Linear
        first = parts[0].q4
        same_idx = lambda a, b: (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))
        if first is None or any(p.kind != "q4" or p.q4 is None or p.bias is not None or p.shape[1] != first.shape[1]
               or p.q4.group_size != first.group_size or not same_idx(p.q4.salient_idx, first.salient_idx)
               for p in parts):
            return None
        cat = lambda name: np.concatenate([getattr(p.q4, name) for p in parts])
        sal_w = cat("salient_w") if first.salient_idx is not None else None
        return Q4(Q4Linear(cat("qweight"), cat("scales"), cat("zeros"), first.group_size,
                           first.salient_idx, sal_w))


class Q8(Linear):
    """Symmetric int8 weights with per-(row, group) scales (q4.Q8Linear): the optional lm_head format.
    Prefill (and perplexity's head) multiply with int8 activations where `use_int8_activations` says
    so (kernels/quant_i8_matmul.py), else dequantized tiles × BLAS; `int8_activations` as in Q4."""
    kind = "q8"

    def __init__(self, q8):
        from ..kernels.quant_f32 import prepare_q8
        self.q8 = q8
        self.p = prepare_q8(q8)
        self.shape = q8.shape
        self.int8_activations = True


    @classmethod
    def load(cls, src, prefix, shape, cfg):
        from ..formats.q4 import Q8Linear
        qweight, scales = src.raw(prefix + ".qweight")[0], src.raw(prefix + ".scales")[0]
        if qweight.shape != tuple(shape) or scales.ndim != 2 or scales.shape[1] == 0:
            raise QuantFormatError(f"{prefix}.qweight has shape {list(qweight.shape)}, expected {list(shape)}")
        try:
            return cls(Q8Linear(qweight, scales, shape[1] // scales.shape[1]))
        except QuantFormatError as e:
            raise QuantFormatError(f"{prefix}: {e}") from None

    def matvec(self, x):
        from ..kernels.quant_f32 import matvec_q8_f32
        return matvec_q8_f32(self.p, x)

    def rows(self, X):
        """The single-stream head's sums for each row, the table read once for all rows
        (kernels/decode_step_batch.matvec_rows_q8_f32; BENCHMARKS.md, batched decoding)."""
        from ..kernels.decode_step_batch import matvec_rows_q8_f32
        from ..kernels.quant_f32 import _check_mat
        _check_mat(X, self.shape[1])
        X = np.ascontiguousarray(X)
        # One row: the tiled kernel would still do a whole tile's arithmetic (SmolLM2's head, quiet,
        # 2026-12-07: 2.5 ms against 1.2 ms as a matvec; at 2 rows both 2.2 ms, at 4 rows 2.2 against 3.9).
        if self.shape[1] % 16 or self.p.group_size % 16 or X.shape[0] == 1:
            return np.stack([self.matvec(x) for x in X])
        Y = np.empty((X.shape[0], self.p.shape[0]), np.float32)       # [B, N]
        matvec_rows_q8_f32(*self.p.kernel_args, X, Y)
        return Y

    def matmul(self, X):
        from ..kernels.quant_i8_matmul import matmul_q8_i8, use_int8_activations
        if self.int8_activations and use_int8_activations(X.shape[0]):
            return matmul_q8_i8(self.p, X)
        from ..kernels.quant_f32 import matmul_q8_f32
        return matmul_q8_f32(self.p, X)

    @property
    def nbytes(self):
        return self.p.nbytes


class Q6(Q8):
    """q6 weights (formats/q4.py: 6-bit codes, 3 bytes per 4), kept 6-bit in memory in the layout the
    q6 kernels read (`pack_q6_rows`, kernels/quant_q6.py): a view of the mapped file where the file
    holds that layout ("rows", what `quantize` writes), else re-packed at load from the older "packed"
    layout (`repacked`: load_weights says how to rewrite such a folder). The kernels compute bit for
    bit what a Q8 holding the same codes computes: decode (the head, the per-linear path, the one-call
    steps' rows: runtime/decode.stack_q8), batched head rows, prefill with int8 or float32
    activations. kind "q6". A packed file's K not a multiple of 32: unpacked to a plain Q8."""
    kind = "q6"
    # Decode (`matvec`, `rows`) with int8 activations where they are on and the CPU has an int8 dot: set for
    # the head (runtime/checkpoint.py), whose float32 q6 product costs ~6x the int8 table's time
    # (BENCHMARKS.md); block linears keep the float32 sums of their Q8 twin on the per-linear path.
    decode_i8 = False
    repacked = False                 # loaded from the "packed" layout (an anonymous copy, not the file)

    def __init__(self, p):
        self.q8 = None
        self.p = p                   # kernels/quant_q6.Q6Prepared
        self.shape = p.shape
        self.int8_activations = True

    @classmethod
    def load(cls, src, prefix, shape, cfg):
        from ..formats.q4 import _check, _check_group_size, q6_layout
        n, k = shape
        packed, scales = src.raw(prefix + ".qweight")[0], src.raw(prefix + ".scales")[0]
        if packed.ndim != 2 or packed.shape[0] != n or k % 4 or scales.ndim != 2 or scales.shape[1] == 0:
            raise QuantFormatError(f"{prefix}.qweight (q6) has shape {list(packed.shape)}, "
                                   f"expected [{n}, {3 * k // 4}]")
        g = k // scales.shape[1]
        try:
            layout = q6_layout(src.metadata_of(prefix + ".qweight"))
            if layout == "packed":
                return cls._load_packed(src, prefix, packed, scales, k, g)
            if k % 32:
                raise QuantFormatError(f"the q6 rows layout needs K % 32 == 0, got K = {k}")
            _check_group_size(g, k)
            _check("qweight", packed, np.uint8, (n, 3 * k // 4))
            _check("scales", scales, np.float16, (n, k // g))
            if not np.all(np.isfinite(scales)):
                raise QuantFormatError("scales: expected finite values, got inf or nan")
            from ..kernels.quant_q6 import prepare_q6
            return cls(prepare_q6(packed, scales, g))        # views of the mapped file: no copy
        except QuantFormatError as e:
            raise QuantFormatError(f"{prefix}: {e}") from None

    @classmethod
    def _load_packed(cls, src, prefix, packed, scales, k, g):
        """The older "packed" layout (formats/q4.py pack_q6): re-packed into anonymous memory, the
        file's pages released (a Q8 when K % 32 != 0)."""
        from ..formats.q4 import Q8Linear, _check, _check_group_size, q6_rows_from_file, unpack_q6
        from ..kernels.quant_q6 import prepare_q6
        n = packed.shape[0]
        if k % 32:
            return Q8(Q8Linear(unpack_q6(packed, k, prefix + ".qweight"), scales, g))
        _check_group_size(g, k)
        _check("scales", scales, np.float16, (n, k // g))
        if not np.all(np.isfinite(scales)):
            raise QuantFormatError("scales: expected finite values, got inf or nan")
        rows = q6_rows_from_file(packed, k, prefix + ".qweight", anon_array((n, 3 * k // 4), np.uint8))
        lin = cls(prepare_q6(rows, scales, g))
        lin.repacked = True
        src.release_pages()          # the file's copy is read: its pages need not count in the RSS
        return lin

    def _i8(self) -> bool:
        from ..kernels.quant_q6 import i8_ok
        return self.decode_i8 and self.int8_activations and i8_ok(self.p)

    def matvec(self, x):
        """Decode: with `decode_i8` int8 activations (kernels/quant_q6.matvec_q6_i8: what the one-call
        step's rows compute), else float32, bit for bit the Q8 kernel's sums."""
        from ..kernels import quant_q6
        if self._i8():
            return quant_q6.matvec_q6_i8(self.p, x)
        return quant_q6.matvec_q6_f32(self.p, x)

    def rows(self, X):
        """The single-stream `matvec` of each row of X, each weight row read once for all rows."""
        from ..kernels import quant_q6
        from ..kernels.quant_f32 import _check_mat
        _check_mat(X, self.shape[1])
        if X.shape[0] == 1:
            return self.matvec(np.ascontiguousarray(X[0]))[None]
        if self._i8():
            return quant_q6.matvec_rows_q6_i8(self.p, X)
        return quant_q6.matvec_rows_q6(self.p, np.ascontiguousarray(X))

    def matmul(self, X):
        from ..kernels.quant_i8_matmul import use_int8_activations
        if self.int8_activations and use_int8_activations(X.shape[0]):
            from ..kernels.quant_q6 import matmul_q6_i8
            return matmul_q6_i8(self.p, X)
        from ..kernels.quant_q6 import matmul_q6_f32
        return matmul_q6_f32(self.p, X)

    def codes(self, ids) -> np.ndarray:
        """int8 codes of rows `ids` (an embedding lookup)."""
        from ..formats.q4 import unpack_q6_rows
        return unpack_q6_rows(self.p.qweight[ids], self.shape[1])


class Q8Rows:
    """An int8 embedding table (a Q8 linear [V, D]) looked up by rows, so that a tied embedding is
    stored once: `table[ids]` dequantizes only the rows asked for (float32 [T, D]), and the same Q8
    serves as the head (`linear`). W[v, d] = qweight[v, d] · scales[v, d // g] (formats/q4.py)."""

    def __init__(self, linear: Q8):
        self.linear = linear
        self.shape = linear.shape
        self.dtype = np.dtype(np.float32)        # what a lookup returns

    def __getitem__(self, ids) -> np.ndarray:
        p = self.linear.p
        q = self.linear.codes(ids) if isinstance(self.linear, Q6) else p.qweight[ids]   # [..., D] int8
        s = p.scales[ids]                                          # [..., G] fp16 bits (or float32)
        s = (s.view(np.float16) if s.dtype == np.uint16 else s).astype(np.float32)
        g = p.group_size
        w = q.reshape(*q.shape[:-1], q.shape[-1] // g, g).astype(np.float32) * s[..., None]
        return w.reshape(q.shape)                                  # [..., D] float32

    @property
    def nbytes(self) -> int:
        return self.linear.nbytes


class AWQGemm(Q4):
    """AutoAWQ "GEMM" int4 tensors (formats/awq_gemm.py: qweight int32 [K, N/8], qzeros int32 [K/g, N/8],
    scales fp16 [K/g, N]), converted once at load into the native Q4Linear; from then on it is a Q4
    (same kernels, same fusion, kind "q4"). Conversion is exact: codes, zeros and scales are moved."""


    @classmethod
    def load(cls, src, prefix, shape, cfg):
        from ..formats.awq_gemm import awq_to_q4
        try:
            q4 = awq_to_q4(*(src.raw(prefix + s)[0] for s in (".qweight", ".qzeros", ".scales")))
        except QuantFormatError as e:
            raise QuantFormatError(f"{prefix}: {e}") from None
        if q4.shape != tuple(shape):
            raise QuantFormatError(f"{prefix}: AutoAWQ tensors hold a [{q4.shape[0]}, {q4.shape[1]}] weight "
                                   f"(qweight [K, N/8]), expected {list(shape)}")
        return cls(q4)


# stored format (formats/tensors.linear_format) -> class. bf16 is widened to float32 at load.
LINEAR_FORMATS = {"f16": DenseF16, "f32": DenseF32, "bf16": DenseF32, "q4": Q4, "q8": Q8, "q6": Q6,
                  "awq_gemm": AWQGemm}


def linear_class(fmt: str | None, k: int):
    """The class that loads a linear stored as `fmt` with K = k inputs, or None. fp16 stays fp16
    where the kernel reads whole 16-lane vectors (K % 16 == 0); otherwise it is widened."""
    if fmt == "f16" and k % 16:
        return DenseF32
    return LINEAR_FORMATS.get(fmt)


def fuse_rows(parts):
    """A single linear computing all parts' outputs side by side, or None if their format can't."""
    return type(parts[0]).fuse(parts) if len({type(p) for p in parts}) == 1 else None
