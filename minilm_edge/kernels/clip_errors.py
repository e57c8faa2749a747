"""Numba kernel for AWQ's clip search: every candidate clamp's rounding error in one pass.

The clip search tries C clamps [lo, hi] per (row, group) and needs, for each, the rounding error
Δ = Q(clamp(w, lo, hi)) − w of the group's weights. In NumPy that is about ten passes over [N, K]
per candidate (clip, divide, round, shift, clip, …), each writing a temporary; here it is one pass
that reads each weight once per candidate and writes Δ. The per-group step and zero point (a few
per group, with the fp16 rounding of the step that Numba cannot do) come from NumPy
(`awq._candidate_steps`). Every operation is the float32 one NumPy does, in the same order, so Δ
is bit for bit `awq.fake_quantize` of the clamped weights minus the weights (tested).

Serial on purpose: the scale search calls it from several Python threads at once (one per α
being tried, `awq.parallel_map`), and Numba's default thread pool must not be entered from two
threads at the same time.

Shapes: wg [N, G, g] the weights by (row, group); lo, hi, step, zero [C, N, G]; out [C, G, N, g]
(candidate-major, then group: the layout the Gram-matrix products of the search read).
"""
from __future__ import annotations

import numpy as np

from .policy import kernel


@kernel()
def clamped_rounding_errors(wg, lo, hi, step, zero, qmax, out):
    """out[c, gi, n, :] = (clip(round(clamp(w, lo, hi) / step) + zero, 0, qmax) − zero)·step − w
    for w = wg[n, gi, :] and candidate c's lo, hi, step, zero at (n, gi). qmax: float32 scalar."""
    n_cand, n_rows, n_groups = lo.shape
    g = wg.shape[2]
    fzero = np.float32(0.0)
    for n in range(n_rows):
        for c in range(n_cand):
            for gi in range(n_groups):
                a, b = lo[c, n, gi], hi[c, n, gi]
                s, z = step[c, n, gi], zero[c, n, gi]
                for j in range(g):
                    w = wg[n, gi, j]
                    q = min(max(w, a), b) / s            # np.clip(w, a, b) = min(max(w, a), b)
                    q = np.rint(q) + z
                    q = min(max(q, fzero), qmax)
                    out[c, gi, n, j] = (q - z) * s - w
