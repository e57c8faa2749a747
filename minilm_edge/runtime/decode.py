"""The one-call decode plan: every block's int4 weights stacked, and the buffers of one step.

int8 block linears (`quantize --int8`, any of q, k, v, o, gate, up, down in any block) keep their
int8 rows: a second, small stack of that kind (`stack_q8`: uint8 q + 128, per 128 channels even then
odd, quant_i8_matvec.q8_rows) that the step multiplies in one pass, int8 x int8 where the CPU has an
int8 dot (quant_i8_matvec.dot2_q8_i8), else with float32 activations (quant_f32.dot2_q8_f32). The int4 stack
keeps a zero placeholder in their place (never read: its memory, not its bandwidth, is the cost).
A block's int8 rows of one kind must be adjacent in whole row pairs: q|k|v's (q and v int8 take k
along, quant/sensitivity.choose_int8); gate|up's always are (gate, up or both), and such a block
computes gate and up in row pairs, then the SiLU product (kernels/decode_step._rows_gate_up_mixed),
while all-int4 blocks keep the fused gate-row-with-up-row kernel.

When every block linear is int4 (minilm-q4) and the stacks line up, the weights of all L blocks
are stacked once at load into [L, ...] arrays of one kind each (q|k|v fused by rows, o, gate|up
fused, down), and a decoded token goes through all of them in ONE compiled call
(kernels/decode_step.decode_blocks: the math, the threads, the barriers). This module builds
that call's records once: the stacked weights, the shared activations and the per-thread
scratch, so a step allocates nothing. The blocks' linears become views into the stacks
(`StackedQ4.layer`), so the prefill path reads the same bytes.
"""
from __future__ import annotations

import dataclasses
import mmap

import numba
import numpy as np

from ..kernels.decode_step import Blocks, KVCache, Q4Stack, Q8Stack, Scratch, Shared, decode_blocks
from ..kernels.int8_dot import INT8_DOT
from ..kernels.quant_f32 import Q4Prepared
from ..kernels.quant_i8_matmul import ACT_BLOCK
from ..kernels.quant_i8_matvec import CHUNK, group_index, padded, q8_rows, supports_i8
from ..kernels.simd import LANES
from ..kernels.sync import barrier_safe


@dataclasses.dataclass
class StackedQ4:
    """One kind of int4 linear across all L blocks, rows of fused parts stacked (see Q4Prepared)."""
    qweight: np.ndarray     # uint8   [L, N, K/2]
    scales: np.ndarray      # uint16  [L, N, G]  fp16 bits (quant_f32.fp16_bits)
    zeros: np.ndarray       # uint8   [L, N, G]
    group_size: int
    sal_idx: np.ndarray     # int64   [L, m16]   (padded with channel 0 / weight 0)
    sal_w: np.ndarray       # float32 [L, N, m16]
    n_salient: list         # L × m
    bias: np.ndarray        # float32 [L, N] (zeros when the layer has none)
    mapped: bool = False    # qweight, zeros and scales are views of the mapped file (see `stack_q4`)
    q8: "Q8Stack | None" = None     # the int8 linears' rows, R of them (`stack_q8`)
    q8_table: np.ndarray | None = None   # int64 [L, 4]: per block (first row in q8 or -1, pairs p0, p1, q6)

    @property
    def shape(self):
        return self.qweight.shape[1], 2 * self.qweight.shape[2]

    def record(self) -> Q4Stack:
        """The stack as `decode_blocks` reads it: (L, N) merged into rows (views), plus the int8
        matvec's tables (quant_i8_matvec.group_index) and the salient counts per block."""
        gpc, gidx, g0s = group_index(self.group_size, self.shape[1])
        rows = lambda a: a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])   # [L, N, ·] -> [L·N, ·]
        return Q4Stack(rows(self.qweight), rows(self.scales), rows(self.zeros), rows(self.sal_w),
                       rows(self.bias), self.group_size, self.sal_idx, np.array(self.n_salient, np.int64),
                       gpc, gidx, g0s)

    def layer(self, l: int, r0: int = 0, r1: int | None = None):
        """A Q4 linear over rows r0:r1 of block l: views into the stack, no copy."""
        from .linear import Q4
        r = slice(r0, r1)
        p = Q4Prepared(self.qweight[l, r], self.scales[l, r], self.zeros[l, r], self.group_size,
                       self.sal_idx[l], self.sal_w[l, r], self.n_salient[l])
        lin = Q4.from_prepared(p)
        if np.any(self.bias[l, r]):
            lin.bias = self.bias[l, r]
        return lin


def stack_q8(parts: list, q6_lins: list = (), K: int | None = None) -> Q8Stack | None:
    """The int8 linears' rows (Q8Prepared, one K and one group size g8) as the step reads them
    (quant_i8_matvec.q8_rows), and the q6 linears' (linear.Q6, one group size g6: their 6-bit rows,
    kernels/quant_q6.py): views of the mapped file when it stores them back to back in stack order
    (formats/tensors.storage_rank, files written since 2026-12-08), else moved into the stack (each
    linear then reads its rows there, its own copy is freed); None where the kernels do not take
    them (`supports_i8`, `supports_q6`)."""
    from ..kernels.quant_q6 import supports_q6
    from .linear import anon_array
    q6_parts = [lin.p for lin in q6_lins]
    K = K if K is not None else (parts or q6_parts)[0].shape[1]
    if parts:
        g8 = parts[0].group_size
        if any(p.shape[1] != K or p.group_size != g8 for p in parts) or not supports_i8(g8, K):
            return None
        qweight = np.concatenate([q8_rows(p.qweight) for p in parts])                # uint8 [R, K]
        scales = np.concatenate([p.scales for p in parts])                           # fp16 bits [R, K/g8]
    else:
        g8, qweight, scales = K, np.zeros((2, K), np.uint8), np.zeros((2, 1), np.uint16)
    if q6_parts:
        g6 = q6_parts[0].group_size
        if any(p.shape[1] != K or p.group_size != g6 for p in q6_parts) or not supports_i8(g6, K) \
                or not supports_q6(g6, K):
            return None
        R6 = sum(p.shape[0] for p in q6_parts)
        q6w = _view_in_place([p.qweight for p in q6_parts], (R6, 3 * K // 4))          # uint8 [R6, 3K/4]
        q6s = _view_in_place([p.scales for p in q6_parts], (R6, K // g6))             # fp16 bits [R6, K/g6]
        q6s = q6s if q6s is not None else np.concatenate([p.scales for p in q6_parts])
        del q6_parts
        if q6w is None:
            q6w = anon_array((R6, 3 * K // 4), np.uint8)
            r = 0
            for lin in q6_lins:    # one linear at a time, so the RSS holds one copy and the part moving
                n = lin.p.shape[0]
                q6w[r:r + n] = lin.p.qweight
                lin.p = dataclasses.replace(lin.p, qweight=q6w[r:r + n], scales=q6s[r:r + n])
                r += n
    else:
        g6, q6w, q6s = K, np.zeros((2, 3 * K // 4), np.uint8), np.zeros((2, 1), np.uint16)
    return Q8Stack(qweight, scales, g8, *group_index(g8, K), q6w, q6s, g6, *group_index(g6, K))


def stack_q4(layers: list) -> StackedQ4 | None:
    """layers: L lists of Q4 (or Q8: `stack_q8`, where the int8 parts of a block are adjacent and in
    whole row pairs) linears to fuse by rows; None if they cannot share one stack."""
    kinds = {lin.kind for parts in layers for lin in parts}
    if not kinds <= {"q4", "q8", "q6"}:
        return None
    first = next((lin.p for parts in layers for lin in parts if lin.kind == "q4"), layers[0][0].p)
    K = first.shape[1]
    g = first.group_size if first is not None and hasattr(first, "zeros") else _first_int4_group(K)
    if kinds & {"q8", "q6"}:
        return _stack_mixed(layers, K, g)
    for parts in layers:
        for lin in parts:
            if lin.kind != "q4" or lin.p.shape[1] != K or lin.p.group_size != g:
                return None
            if not np.array_equal(lin.p.sal_idx, parts[0].p.sal_idx) or lin.p.n_salient != parts[0].p.n_salient:
                return None
    L, N = len(layers), sum(lin.p.shape[0] for lin in layers[0])
    if any(sum(lin.p.shape[0] for lin in parts) != N for parts in layers):
        return None
    m16 = max(parts[0].p.sal_idx.shape[0] for parts in layers)
    # Codes, zero points and scales: views of the file when it stores them back to back in stack order
    # (formats/tensors.storage_rank: codes and zero points in every file `quantize` writes, scales
    # since 2026-12-07), else copies (the scales' fp16 bits: half the bytes of the float32 they were).
    qweight = _view_in_place([lin.p.qweight for parts in layers for lin in parts], (L, N, K // 2))
    zeros = _view_in_place([lin.p.zeros for parts in layers for lin in parts], (L, N, K // g))
    scales = _view_in_place([lin.p.scales for parts in layers for lin in parts], (L, N, K // g))
    mapped = qweight is not None and zeros is not None
    # Copies in their own anonymous maps (linear.anon_array), not NumPy's heap: NumPy asks for huge
    # pages on large arrays, and a kind whose int8/q6 rows leave placeholders in this stack (the
    # default recipe's q|k|v and o) would then hold every placeholder row too: the 1B shape's q|k|v
    # stack, 32 MiB of int4 rows, held 48 MiB (BENCHMARKS.md, issue 14 item 3).
    from .linear import anon_array
    st = StackedQ4(qweight if mapped else anon_array((L, N, K // 2), np.uint8),
                   scales if scales is not None else anon_array((L, N, K // g), np.uint16),
                   zeros if mapped else anon_array((L, N, K // g), np.uint8), g, np.zeros((L, m16), np.int64),
                   np.zeros((L, N, m16), np.float32), [parts[0].p.n_salient for parts in layers],
                   np.zeros((L, N), np.float32), mapped)
    for l, parts in enumerate(layers):
        r = 0
        for lin in parts:
            p, n = lin.p, lin.p.shape[0]
            if lin.bias is not None:
                st.bias[l, r:r + n] = lin.bias
            if getattr(lin, "placeholder", False):
                r += n           # never read (an int8/q6 linear's rows): its pages of np.empty stay untouched
                continue
            if scales is None:
                st.scales[l, r:r + n] = p.scales
            if not mapped:
                st.qweight[l, r:r + n], st.zeros[l, r:r + n] = p.qweight, p.zeros
            st.sal_w[l, r:r + n, :p.sal_w.shape[1]] = p.sal_w
            r += n
        st.sal_idx[l, :parts[0].p.sal_idx.shape[0]] = parts[0].p.sal_idx
    return st


class _Part:
    """A stand-in linear for `stack_q4`: a prepared int4 part (an int8 linear's placeholder)."""
    kind = "q4"
    placeholder = True

    def __init__(self, p, bias=None):
        self.p, self.bias = p, bias


def _placeholder(n: int, K: int, g: int) -> Q4Prepared:
    """n zero int4 rows: where an int8 linear sits in the int4 stack (the step never reads them)."""
    none_i, none_w = np.zeros(0, np.int64), np.zeros((n, 0), np.float32)
    return Q4Prepared(np.zeros((n, K // 2), np.uint8), np.zeros((n, K // g), np.uint16),
                      np.zeros((n, K // g), np.uint8), g, none_i, none_w, 0)


def _first_int4_group(K: int) -> int:
    """The placeholders' group size in a kind with no int4 linear at all."""
    return 128 if K % 128 == 0 else 64 if K % 64 == 0 else 32


def _stack_mixed(layers, K, g):
    """`stack_q4` for kinds with int8 (or q6) parts: placeholders in the int4 stack, the int8 rows
    (one block's int8 rows r0:r1, adjacent) in `q8` (`stack_q8`), where the step computes them
    (q8_table); a block's rows of one kind are all int8 or all q6 (q8_table[l, 3] = 1: q6)."""
    L = len(layers)
    main, q8_parts, q6_lins, table = [], [], [], np.full((L, 4), -1, np.int64)
    R = R6 = 0
    for l, parts in enumerate(layers):
        row, span, ps, fmt = 0, None, [], None
        for lin in parts:
            n = lin.p.shape[0]
            if lin.kind in ("q8", "q6"):
                if lin.p.shape[1] != K or (span is not None and span[1] != row) or fmt not in (None, lin.kind):
                    return None
                fmt = lin.kind
                span = (span[0] if span else row, row + n)
                ps.append(_Part(_placeholder(n, K, g), lin.bias))
                (q6_lins if fmt == "q6" else q8_parts).append(lin if fmt == "q6" else lin.p)
            else:
                if lin.p.n_salient:     # the int8 rows meet activations quantized with no salient channel
                    return None
                ps.append(lin)
            row += n
        main.append(ps)
        if span is not None:
            if span[0] % 2 or span[1] % 2:
                return None
            first = R6 if fmt == "q6" else R
            table[l] = (first, span[0] // 2, span[1] // 2, int(fmt == "q6"))
            if fmt == "q6":
                R6 += span[1] - span[0]
            else:
                R += span[1] - span[0]
    st = stack_q4(main)
    q8 = stack_q8(q8_parts, q6_lins, K) if st is not None else None
    if st is None or q8 is None:
        return None
    st.q8, st.q8_table = q8, table
    return st


def _dummy_q8(K: int) -> Q8Stack:
    """An empty int8 stack (two zero rows) for a kind without int8 linears: the step's records
    keep one type."""
    return stack_q8([], [], K)


def _buffer_owner(a: np.ndarray):
    """The object that owns an array's memory (an mmap for a view of a mapped file)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a if a.base is None else getattr(a.base, "obj", a.base)   # memoryview -> what it views


def _view_in_place(arrays: list, shape: tuple) -> np.ndarray | None:
    """The arrays as one C-contiguous array of `shape`, without copying, when they lie back to back,
    in order, in one buffer that is not an ndarray (a mapped file); else None."""
    owner, dt = _buffer_owner(arrays[0]), arrays[0].dtype
    if isinstance(owner, np.ndarray) or not isinstance(owner, mmap.mmap):
        return None
    start = arrays[0].__array_interface__["data"][0]
    end = start
    for a in arrays:
        if a.dtype != dt or not a.flags.c_contiguous or _buffer_owner(a) is not owner \
                or a.__array_interface__["data"][0] != end:
            return None
        end += a.nbytes
    whole = np.frombuffer(owner, np.uint8)                  # the mapping, as bytes (a view)
    offset = start - whole.__array_interface__["data"][0]
    if end - start != int(np.prod(shape)) * dt.itemsize:
        return None
    return whole[offset:offset + end - start].view(dt).reshape(shape)


class DecodePlan:
    """Stacked int4 weights of every block plus the buffers of one decode step. Build with `build_plan`.

    `int8_ok`: the stacks can take int8 activations (INT8_DOT, `supports_i8`); `int8`: whether a step
    uses them where it can (Model.set_int8_activations sets it).
    """

    def __init__(self, cfg, blocks, qkv: StackedQ4, o: StackedQ4, gate_up: StackedQ4, down: StackedQ4):
        self.qkv, self.o, self.gate_up, self.down = qkv, o, gate_up, down
        self.attn_norm = np.stack([b.attn_norm for b in blocks]).astype(np.float32)   # [L, D]
        self.mlp_norm = np.stack([b.mlp_norm for b in blocks]).astype(np.float32)     # [L, D]
        D, F = cfg.hidden_size, cfg.intermediate_size
        H, Hkv, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        P = numba.config.NUMBA_NUM_THREADS                        # most threads a call can use
        K = max(D, F, H * Dh)
        m16 = max(st.sal_idx.shape[1] for st in (qkv, o, gate_up, down))
        self.blocks = Blocks(self.attn_norm, self.mlp_norm, np.float32(cfg.rms_norm_eps), H, Hkv, Dh)
        self.stacks = (qkv.record(), o.record(), gate_up.record(), down.record())   # kernels' Q4Stack
        # the int8 linears' rows (q|k|v, o, gate|up, down) and where they go (kernels' _rows_mixed)
        kinds = (qkv, o, gate_up, down)
        self.q8 = tuple(st.q8 or _dummy_q8(st.shape[1]) for st in kinds)
        L = self.attn_norm.shape[0]
        self.q8_table = np.stack([st.q8_table if st.q8_table is not None else np.full((L, 4), -1, np.int64)
                                  for st in kinds])                              # int64 [4, L, 4]
        self.shared = Shared(qkv=np.empty((H + 2 * Hkv) * Dh, np.float32),   # [(H + 2 Hkv) Dh]
                             act=np.empty(F, np.float32),                     # [F]
                             gu=np.empty(2 * F, np.float32),                  # [2F]
                             bar=np.zeros(8, np.int64))                       # barrier counter
        self.scratch = Scratch(                                              # per thread (kernels/decode_step)
            h=np.empty((P, D), np.float32), att=np.empty((P, H * Dh), np.float32),
            pm=np.empty((P, H), np.float32), pl=np.empty((P, H), np.float32), po=np.empty((P, H, Dh), np.float32),
            xe=np.empty((P, K // 2), np.float32), xo=np.empty((P, K // 2), np.float32),
            xs=np.empty((P, K // 32), np.float32), xsal=np.empty((P, m16), np.float32),
            xz=np.empty((P, K), np.float32),
            qe=np.zeros((P, padded(K // 2, CHUNK)), np.int8), qo=np.zeros((P, padded(K // 2, CHUNK)), np.int8),
            sxl=np.zeros((P, padded(K // 8, LANES)), np.float32),
            nzt=np.zeros((P, padded(K // ACT_BLOCK, LANES)), np.float32),
            nzl=np.zeros((P, padded(K // 8, LANES)), np.float32))
        # int8 activations in the block matvecs (INT8_DOT; Model.set_int8_activations turns them off)
        self.int8_ok = INT8_DOT and all(supports_i8(st.group_size, st.shape[1]) for st in (qkv, o, gate_up, down))
        self.int8 = self.int8_ok
        self._concurrent = None                                   # sync.barrier_safe(), once known

    @property
    def has_int8(self) -> bool:
        """Whether some block linear is int8 (its rows in a `q8` stack)."""
        return bool((self.q8_table[..., 0] >= 0).any())

    @property
    def mapped(self) -> bool:
        """Whether the stacked codes and zero points are views of the mapped file (no copy)."""
        return all(st.mapped for st in (self.qkv, self.o, self.gate_up, self.down))

    @property
    def nbytes(self) -> int:
        stacks = [self.qkv, self.o, self.gate_up, self.down]
        return sum(s.qweight.nbytes + s.scales.nbytes + s.zeros.nbytes + s.sal_w.nbytes for s in stacks) \
            + sum(st.q8.qweight.nbytes + st.q8.scales.nbytes + st.q8.q6w.nbytes + st.q8.q6s.nbytes
                  for st in stacks if st.q8 is not None)

    def run(self, x, cache, pos, cos, sin):
        """x [D] float32 (modified in place) through every block; writes the cache at `pos`."""
        if self._concurrent is None:
            self._concurrent = barrier_safe()
        T = numba.get_num_threads() if self._concurrent else 1   # None (layer not chosen yet): 1
        self.shared.bar[0] = 0
        decode_blocks(T, self.int8 and self.int8_ok, x, pos, cos, sin, self.blocks, *self.stacks, *self.q8,
                      self.q8_table, KVCache(cache.k, cache.v, cache.scratch), self.shared, self.scratch)


def build_plan(cfg, blocks):
    """A DecodePlan when every block linear is int4 (or int8: `stack_q8`) and the stacks line up, else
    None."""
    if not all(getattr(b, n).kind in ("q4", "q8", "q6") for b in blocks
               for n in ("q", "k", "v", "o", "gate", "up", "down")):
        return None
    if cfg.head_dim % LANES or cfg.hidden_size % 2:   # whole 16-lane vectors; output rows in pairs
        return None
    if any(getattr(b, n).bias is not None for b in blocks for n in ("o", "gate", "up", "down")):
        return None
    stacks = [stack_q4([[b.q, b.k, b.v] for b in blocks]), stack_q4([[b.o] for b in blocks]),
              stack_q4([[b.gate, b.up] for b in blocks]), stack_q4([[b.down] for b in blocks])]
    if any(s is None for s in stacks):
        return None
    return DecodePlan(cfg, blocks, *stacks)
