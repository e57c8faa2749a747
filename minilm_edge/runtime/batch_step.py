"""The buffers of the one-call batched decode step (kernels/decode_step_batch.py), which
`Model.decode_batch` runs for pooled caches when the model has a DecodePlan (every block linear
int4, or int8 where decode.stack_q8 takes it; runtime/batch.py says what batched decoding is).
A module of its own: model.py uses it, and batch.py uses model.py.
"""
from __future__ import annotations

import numba
import numpy as np

from ..kernels.decode_step_batch import WORK_PHASES, BatchScratch, BatchShared, decode_blocks_batch
from ..kernels.quant_i8_matmul import ACT_BLOCK
from ..kernels.quant_i8_matvec import CHUNK, padded
from ..kernels.simd import LANES
from ..kernels.sync import barrier_safe


class BatchStep:
    """The buffers of the one-call batched step (kernels/decode_step_batch.decode_blocks_batch) over a
    model's DecodePlan (its stacked int4 weights and int8 rows): allocated for up to `rows` rows and `S` cache
    positions, grown when a step needs more, so a step allocates nothing else."""

    def __init__(self, cfg, plan):
        self.cfg, self.plan = cfg, plan
        self.rows = self.positions = 0
        self._records = {}                  # B -> (BatchShared of B rows, BatchScratch)
        self._concurrent = None             # sync.barrier_safe(), once known
        self.variant = 1                    # the int8 row kernel: 1 four activation rows per pass, 2 one (an A/B)

    def _grow(self, B: int, S: int) -> None:
        c, P = self.cfg, numba.config.NUMBA_NUM_THREADS
        D, F, H, Hkv, Dh = c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        K = max(D, F, H * Dh)
        m16 = max(st.sal_idx.shape[1] for st in self.plan.stacks)
        self.rows, self.positions = max(B, self.rows), max(S, self.positions)
        B, S = self.rows, self.positions
        self._shared = BatchShared(
            qkv=np.empty((B, (H + 2 * Hkv) * Dh), np.float32), act=np.empty((B, F), np.float32),
            gu=np.empty((B, 2 * F), np.float32),
            bar=np.zeros(8, np.int64), work=np.zeros(c.num_hidden_layers * WORK_PHASES * 8, np.int64),
            xe=np.empty((B, K // 2), np.float32), xo=np.empty((B, K // 2), np.float32),
            xs=np.empty((B, K // 32), np.float32), xsal=np.zeros((B, m16), np.float32),
            xz=np.empty((B, K), np.float32),
            qe=np.zeros((B, padded(K // 2, CHUNK)), np.int8), qo=np.zeros((B, padded(K // 2, CHUNK)), np.int8),
            sxl=np.zeros((B, padded(K // 8, LANES)), np.float32),
            nzt=np.zeros((B, padded(K // ACT_BLOCK, LANES)), np.float32),
            nzl=np.zeros((B, padded(K // 8, LANES)), np.float32),
            pm=np.empty((B, P, H), np.float32), pl=np.empty((B, P, H), np.float32),
            po=np.empty((B, P, H, Dh), np.float32))
        self._scratch = BatchScratch(h=np.empty((P, D), np.float32), att=np.empty((P, H * Dh), np.float32),
                                     scores=np.empty((P, H, S), np.float32))
        self._records = {}

    def run(self, x, pos, slots, cos, sin, kp, vp) -> None:
        """x [B, D] float32 (in place) through every block; row b at position pos[b] of pool slot
        slots[b] (kp, vp [slots, L, Hkv, S, Dh]); cos, sin [B, Dh/2] at pos."""
        B, S = x.shape[0], kp.shape[3]
        if B > self.rows or S > self.positions:
            self._grow(B, S)
        if B not in self._records:
            sh = self._shared
            self._records[B] = sh._replace(**{f: getattr(sh, f)[:B] for f in sh._fields if f not in ("bar", "work")})
        if self._concurrent is None:
            self._concurrent = barrier_safe()
        T = numba.get_num_threads() if self._concurrent else 1   # None (layer not chosen yet): 1
        sh = self._records[B]
        sh.bar[0] = 0
        sh.work[:] = 0
        p = self.plan
        i8 = int(p.int8 and p.int8_ok) * self.variant       # 0: float32 activations
        decode_blocks_batch(T, i8, x, pos, slots, cos, sin, p.blocks, *p.stacks, *p.q8, p.q8_table, kp, vp, sh,
                            self._scratch)
