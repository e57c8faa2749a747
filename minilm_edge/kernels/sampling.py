"""Numba kernel of the batched nucleus (top-p) draw: per row, the id where the nucleus's cumulative
mass, in descending probability, first reaches u · (its total). Its readable twin is the full sort
of every row (`sample_rows_by_full_sort` in tests/test_batch.py, the oracle the kernel is tested
against); this one sorts only the ids that can be in the nucleus.

Why: self-generated calibration draws one token per row per step from SmolLM2's 49,152 ids, and the
NumPy draw (argpartition, lexsort, growing k) cost ~2 ms a row: about the int4 batched step's whole
time per row (BENCHMARKS.md "First run: int4-generated calibration").

How, exactly as the full sort (same order, same float64 running sums, so the same id): probabilities
fall into half-octave bins by their binary exponent (`_bin`: larger probabilities in lower bins; the
last bin holds everything below about 2^-63, zeros included). The first bins whose mass reaches
top_p give a threshold; every id in them is a candidate and every other id has a strictly smaller
probability, so the candidates sorted (descending, ties: lower id first) are the full sort's
prefix, and their running sums its running sums. When the nucleus does not end inside that prefix
(the bins' mass and the running sum round differently), one more bin is taken.
"""
import math

import numpy as np
from numba import prange

from .policy import kernel, parallel_kernel

N_BINS = 128          # half-octaves: probabilities down to about 2^-63 get bins of their own
HALF_OCTAVE = 0.7071067811865476     # 2^-0.5


@parallel_kernel()
def nucleus_draw(p, top_p, u, out):
    """out[b] = the id drawn for row b.        p: [B, V] float64 (rows sum to 1); u: [B] in [0, 1)"""
    B, V = p.shape
    for b in prange(B):
        row = p[b]
        bins = np.empty(V, np.int32)                  # [V] each id's bin
        mass = np.zeros(N_BINS, np.float64)           # [N_BINS] probability per bin
        for i in range(V):
            j = _bin(row[i])
            bins[i] = j
            mass[j] += row[i]
        last, acc = 0, 0.0                            # the first bins holding top_p of the mass
        while last < N_BINS - 1:
            acc += mass[last]
            if acc >= top_p:
                break
            last += 1
        while True:
            cand = np.empty(V, np.int64)              # ids of bins 0..last, in id order
            n = 0
            for i in range(V):
                if bins[i] <= last:
                    cand[n] = i
                    n += 1
            cand = cand[:n]
            order = np.argsort(-row[cand], kind="mergesort")   # stable: ties keep the lower id first
            cum = np.empty(n, np.float64)
            s = 0.0
            keep = 0                                  # ids with running sum < top_p
            for k in range(n):
                s += row[cand[order[k]]]
                cum[k] = s
                if s < top_p:
                    keep += 1
            if keep + 1 <= n or last == N_BINS - 1:   # the nucleus ends inside the prefix (or it is all)
                break
            last += 1
        n_keep = min(keep + 1, n)
        target = u[b] * cum[n_keep - 1]
        j = 0
        for k in range(n_keep):
            if cum[k] < target:
                j += 1
        out[b] = cand[order[j]]


@kernel(inline=True)
def _bin(x):
    """The bin of probability x: nonincreasing in x (see the module docstring)."""
    if x <= 0.0:
        return N_BINS - 1
    m, e = math.frexp(x)                              # x = m · 2^e, 0.5 ≤ m < 1, e ≤ 1
    j = 2 * (1 - e) + (1 if m < HALF_OCTAVE else 0) - 1
    return min(j, N_BINS - 1)
