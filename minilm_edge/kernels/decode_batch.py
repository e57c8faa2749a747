"""Numba leaves of the batched decode step (runtime/model.Model.decode_batch): B sequences, one new
token each, each at its own position in its own slot of one KV pool.

KV pool: kp, vp [P, L, Hkv, S, Dh] float32 (P slots; runtime/batch.BatchDecoder owns it). Sequence b
lives in slot slots[b] and its new token sits at position pos[b]. The linears of the step are the
prefill matmul kernels over the B rows (every weight read once for all B tokens); only these two
per-sequence pieces need their own kernels. (All-int4 blocks over one pool take the one-call step
of decode_step_batch.py instead; this is the path of every other model.) The readable twins:
reference/llama.py `attention` (one query, causal over positions 0..pos) and the cache write of its
forward.
"""
import math

import numpy as np
from numba import prange

from .policy import FASTMATH_REDUCE, kernel, parallel_kernel


@kernel()
def store_kv(k, v, kp, vp, layer, slots, pos):
    """kp[slots[b], layer, :, pos[b]] = k[b] (and v likewise).   k, v: [B, Hkv, Dh]"""
    B, Hkv, Dh = k.shape
    for b in range(B):
        s, p = slots[b], pos[b]
        for h in range(Hkv):
            for d in range(Dh):
                kp[s, layer, h, p, d] = k[b, h, d]
                vp[s, layer, h, p, d] = v[b, h, d]


# fastmath on the q·k and p·v reductions (vectorisation); exp and max stay exact (as ops_f32._attention).
@parallel_kernel(fastmath=FASTMATH_REDUCE)
def attention_slots(q, kp, vp, layer, slots, pos, scores, out):
    """out[b, h] = softmax_j(q[b, h] · K[j] / sqrt(Dh)) · V over positions j = 0 .. pos[b] of slot
    slots[b] (K, V: its kv head h // (H / Hkv)).

    q, out: [B, H, Dh]; kp, vp: [P, L, Hkv, S, Dh]; slots, pos: [B] int64; scores: [B, H, ≥ max pos + 1].
    (sequence, head) pairs are independent: split across threads, each owning scores[b, h].
    """
    B, H, Dh = q.shape
    rep = H // kp.shape[2]
    scale = np.float32(1.0 / math.sqrt(Dh))
    for bh in prange(B * H):
        b, h = bh // H, bh % H
        kc, vc = kp[slots[b], layer, h // rep], vp[slots[b], layer, h // rep]      # [S, Dh]
        s = scores[b, h]
        n = pos[b] + 1
        m = np.float32(-np.inf)
        for j in range(n):
            acc = np.float32(0.0)
            for d in range(Dh):
                acc += q[b, h, d] * kc[j, d]
            acc *= scale
            s[j] = acc
            m = max(m, acc)
        total = np.float32(0.0)
        for j in range(n):
            e = np.exp(s[j] - m)
            s[j] = e
            total += e
        inv = np.float32(1.0) / total
        for d in range(Dh):
            out[b, h, d] = 0.0
        for j in range(n):
            p = s[j] * inv
            for d in range(Dh):
                out[b, h, d] += p * vc[j, d]
