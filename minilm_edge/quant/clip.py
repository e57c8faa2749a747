"""The clip search of AWQ (docs/DESIGN.md §5): after the scales are folded, each (row, group) of a linear's
weights is clamped to the range that least changes the group's partial dot products on the
calibration tokens, since a min/max quantizer spends its 2^bits levels on the group's extremes.

    e(lo, hi) = mean_t ( Σ_{k∈group} (Q(clamp(w, lo, hi))[n, k] − w[n, k]) · x[t, k] )²

    w        one row's weights of the group, already × s                        [g]
    x        the linear's input on calibration tokens, already ÷ s              [tokens, g]
    Q        the per-group min/max round-to-nearest quantizer of q4.py (docs/DESIGN.md §4)
    lo, hi   the symmetric clamps [−r·max|w|, r·max|w|], r in CLIP_SHRINKS, and with two_sided
             every [a·min w, b·max w], a, b in CLIP_SHRINKS (the quantizer is min/max, not
             symmetric, so each end can be cut on its own; the symmetric candidates stay, so the
             two-sided choice is never worse)

The mean over tokens is taken either on the tokens themselves or, at a cost that does not grow
with them, through the group's second moments C_g = mean_t x_g x_gᵀ: e = Δᵀ C_g Δ with Δ the
group's rounding error (`group_gram`; every calibration token). A linear's output error on a token
is the sum of its groups' partial errors, so the per-group objective drops the cross terms between
groups (a common offset or correlated channels make them add up or cancel); the joint pass
(`_joint_clip_choice`) revises a row's clamps together on Δ_rowᵀ C Δ_row, cross terms included.

Which tokens: with per-token errors, `clip_token_index` draws them and always adds each sample's
first token (the attention sink, see there). Readable twins: reference/awq.py `clip_search`,
`joint_clip_search`.

Shapes: N rows, K inputs, g group size, G = K/g groups, C candidate clamps.
"""
from __future__ import annotations

import numpy as np

CLIP_SHRINKS = tuple(1.0 - i / 20 for i in range(10))   # 1.00, 0.95, …, 0.55
CLIP_CHUNK_ELEMENTS = 1 << 23      # rounding errors held at once by the clip search (32 MiB)


def group_gram(x: np.ndarray, group_size: int) -> np.ndarray:
    """Σ_t x_g(t) x_g(t)ᵀ for every group g of x's channels, in float64: the per-group second
    moments that `clip_search` needs (sum them over chunks, divide by the token count).
                                                                    x [..., K] -> [G, g, g]"""
    xg = x.reshape(-1, x.shape[-1] // group_size, group_size).transpose(1, 0, 2)     # [G, t, g]
    return np.matmul(xg.transpose(0, 2, 1), xg).astype(np.float64)


def second_moments(x: np.ndarray) -> np.ndarray:
    """Σ_t x(t) x(t)ᵀ in float64 (summed over chunks, then divided).           x [t, K] -> [K, K]"""
    return (x.T @ x).astype(np.float64)


def scaled_gram(gram: np.ndarray, s: np.ndarray, group_size: int) -> np.ndarray:
    """The per-group second moments of x ÷ s from those of x: C_g / (s_g s_gᵀ).
                                                          gram [G, g, g], s [G·g] -> [G, g, g]"""
    sg = s.astype(np.float64).reshape(-1, group_size)
    return gram / (sg[:, :, None] * sg[:, None, :])


def clip_search(w: np.ndarray, x: np.ndarray | None, bits: int, group_size: int, salient_idx=None,
                gram: np.ndarray | None = None, two_sided: bool = False, full_gram: np.ndarray | None = None,
                sweeps: int = 0):
    """Per (row, group) clamp of the weights minimising the error of the group's partial dot
    products  e = mean_t ( Σ_{k∈group} (Q(clamp(w, lo, hi))[n, k] − w[n, k]) · x[t, k] )².

    The candidates (docs/DESIGN.md §5): the symmetric clamps lo = −r·max|w|, hi = r·max|w| for the shrink
    factors r in CLIP_SHRINKS. With two_sided, also every pair lo = a·min w, hi = b·max w (a, b in
    CLIP_SHRINKS): the quantizer is asymmetric (min/max), so each end of the range can be cut on its
    own; the symmetric candidates stay, so the choice is never worse than the symmetric search's.

    w [N, K] (already scaled), x [n_tok, K] (already ÷ s) -> (clipped w [N, K], kept [N, G]), kept
    the fraction of each group's range max w − min w that the chosen clamp keeps (1: unclipped).
    Or, instead of x, gram [G, g, g] = mean_t x_g x_gᵀ (already ÷ s s ᵀ): then e = Δᵀ C_g Δ per
    (row, group), Δ the group's rounding error — the same mean over tokens, on as many tokens as
    the Gram matrix saw, at a cost that does not grow with them.
    With gram and also full_gram [K, K] = mean_t x xᵀ (÷ s sᵀ; its diagonal blocks are taken from
    gram), the choice then minimises the whole row's error Δ_rowᵀ C Δ_row, cross terms between
    groups included, by `sweeps` passes of coordinate descent over the groups
    (`_joint_clip_choice`; reference: `joint_clip_search`; 0 passes: the per-group choice).
    Salient columns are left out (they are stored exactly) and left unchanged.
    """
    n, k = w.shape
    G = k // group_size
    wz = np.array(w, np.float32)
    if salient_idx is not None:
        wz[:, salient_idx] = 0.0
    if gram is None:
        xg = np.ascontiguousarray(x.reshape(-1, G, group_size).transpose(1, 2, 0))   # [G, g, n_tok]
    else:
        gram32 = gram.astype(np.float32)
    wg = wz.reshape(n, G, group_size)                                            # [N, G, g]
    lo0 = wg.min(axis=2, keepdims=True)                                          # [N, G, 1]
    hi0 = wg.max(axis=2, keepdims=True)
    amax = np.maximum(-lo0, hi0)
    cands = [(-amax * np.float32(r), amax * np.float32(r)) for r in CLIP_SHRINKS]
    if two_sided:
        cands += [(lo0 * np.float32(a), hi0 * np.float32(b)) for a in CLIP_SHRINKS for b in CLIP_SHRINKS]
    cand_lo = np.stack([np.broadcast_to(lo[..., 0], (n, G)) for lo, _ in cands])   # [C, N, G]
    cand_hi = np.stack([np.broadcast_to(hi[..., 0], (n, G)) for _, hi in cands])
    n_cand = len(cands)
    all_err = np.empty((n_cand, n, G), np.float32)
    chunk = max(1, min(n_cand, CLIP_CHUNK_ELEMENTS // (n * k)))          # candidates per pass
    buf = np.empty((chunk, G, n, group_size), np.float32)                # reused: no fresh pages
    for c0 in range(0, n_cand, chunk):
        c1 = min(n_cand, c0 + chunk)
        dq = candidate_rounding_errors(wg, lo0, hi0, cand_lo[c0:c1], cand_hi[c0:c1], bits, buf[:c1 - c0])
        for c in range(c0, c1):
            dqt = dq[c - c0]                                                     # [G, N, g]
            if gram is None:
                err = np.matmul(dqt, xg)                                         # [G, N, n_tok]
                all_err[c] = np.mean(err * err, axis=2).T                        # [N, G]
            else:
                all_err[c] = np.einsum("gnk,gnk->ng", np.matmul(dqt, gram32), dqt)
    del buf
    choice = np.argmin(np.nan_to_num(all_err, nan=np.inf), axis=0)   # [N, G]; ties: the earlier one
    if full_gram is not None and gram is not None and G > 1 and sweeps:
        choice = _joint_clip_choice(wg, lo0, hi0, cand_lo, cand_hi, bits, all_err, choice, full_gram, gram32,
                                    sweeps)
    best_lo = np.take_along_axis(cand_lo, choice[None], 0)[0]
    best_hi = np.take_along_axis(cand_hi, choice[None], 0)[0]
    out = np.clip(np.asarray(w, np.float32).reshape(n, G, group_size), best_lo[..., None], best_hi[..., None])
    out = out.reshape(n, k)
    if salient_idx is not None:
        out[:, salient_idx] = w[:, salient_idx]
    kept_lo, kept_hi = np.maximum(best_lo, lo0[..., 0]), np.minimum(best_hi, hi0[..., 0])
    span = hi0[..., 0] - lo0[..., 0]
    kept = np.where(span > 0, (kept_hi - kept_lo) / np.where(span > 0, span, 1), 1).astype(np.float32)
    return out, kept


def _joint_clip_choice(wg, lo0, hi0, cand_lo, cand_hi, bits, all_err, choice, full_gram, gram32, sweeps):
    """Coordinate descent over a row's groups on the whole row's output error Δᵀ C Δ.

    The per-group search scores each group's partial dot product alone; the linear's output error
    also has the cross terms Δ_iᵀ C_ij Δ_j between groups. Starting from the per-group choice, each
    group in turn takes the candidate minimising the row's total error given the others' current
    choice (quadratic term all_err, from `gram32`; cross terms from `full_gram`), `sweeps` times;
    the total never increases. Each group's candidates' Δ are recomputed when it is visited (one
    Numba pass) rather than all kept.
        wg [N, G, g]; lo0, hi0 [N, G, 1]; cand_lo, cand_hi [C, N, G]; all_err [C, N, G];
        choice [N, G] -> choice [N, G]"""
    nc, n, G = cand_lo.shape
    g = wg.shape[2]
    cfull = np.array(full_gram, np.float32)
    for i in range(G):                                  # its own blocks: the per-group (all-token) ones
        cfull[i * g:(i + 1) * g, i * g:(i + 1) * g] = gram32[i]
    rows = np.arange(n)
    pick = lambda a: np.take_along_axis(a, choice[None], 0)                # [1, N, G]
    d = candidate_rounding_errors(wg, lo0, hi0, pick(cand_lo), pick(cand_hi), bits)[0]   # [G, N, g]
    r = d.transpose(1, 0, 2).reshape(n, G * g) @ cfull                  # [N, K]: C Δ per row
    buf = np.empty((nc, 1, n, g), np.float32)
    for _ in range(sweeps):
        for i in range(G):
            sl = slice(i * g, (i + 1) * g)
            dq = candidate_rounding_errors(wg[:, i:i + 1], lo0[:, i:i + 1], hi0[:, i:i + 1],
                                           cand_lo[:, :, i:i + 1], cand_hi[:, :, i:i + 1], bits, buf)[:, 0]
            others = r[:, sl] - d[i] @ gram32[i]                          # [N, g]
            e = all_err[:, :, i] + 2.0 * np.einsum("cnk,nk->cn", dq, others)
            new = np.argmin(np.nan_to_num(e, nan=np.inf), axis=0)
            dn = dq[new, rows]
            r += (dn - d[i]) @ cfull[sl, :]
            d[i] = dn
            choice[:, i] = new
    return choice


def _candidate_steps(lo0, hi0, cand_lo, cand_hi, bits):
    """Each candidate's quantizer step (fp16-rounded, as stored) and zero point per (row, group),
    without reducing the clamped group again: a group whose range was [lo0, hi0] has, clamped to
    [lo, hi], the range [min(max(lo0, lo), hi), min(max(hi0, lo), hi)].
                                      lo0, hi0 [N, G, 1]; cand_lo, cand_hi [C, N, G] -> 2 × [C, N, G]"""
    from ..formats.q4 import SCALE_FLOOR as RANGE_FLOOR, fp16_scale
    qmax = np.float32((1 << bits) - 1)
    lo_c = np.minimum(np.maximum(lo0[..., 0], cand_lo), cand_hi)
    hi_c = np.minimum(np.maximum(hi0[..., 0], cand_lo), cand_hi)
    step = fp16_scale(np.maximum(hi_c - lo_c, np.float32(RANGE_FLOOR)) / qmax, "scales").astype(np.float32)
    zero = np.clip(-np.round(lo_c / step), 0, qmax)
    return step, zero


def candidate_rounding_errors(wg, lo0, hi0, cand_lo, cand_hi, bits, out=None):
    """Δ = fake_quantize(clamp(w, lo, hi)) − w of every group for every candidate clamp, bit for
    bit, in one Numba pass; into `out` when given (a reused buffer saves the first-touch cost of
    fresh pages).
                    wg [N, G, g]; lo0, hi0 [N, G, 1]; cand_lo, cand_hi [C, N, G] -> [C, G, N, g]"""
    from ..kernels.clip_errors import clamped_rounding_errors
    step, zero = _candidate_steps(lo0, hi0, cand_lo, cand_hi, bits)
    c, n, G = cand_lo.shape
    if out is None:
        out = np.empty((c, G, n, wg.shape[2]), np.float32)
    clamped_rounding_errors(np.ascontiguousarray(wg, np.float32), np.ascontiguousarray(cand_lo, np.float32),
                            np.ascontiguousarray(cand_hi, np.float32), step, zero.astype(np.float32),
                            np.float32((1 << bits) - 1), out)
    return out


def clip_token_index(n: int, T: int, clip_tokens: int, seed: int) -> np.ndarray:
    """Flat indices (sample·T + position) of the tokens the clip search measures on: `clip_tokens`
    drawn at random, plus the first token of every sample, sorted and unique.

    Why the first tokens: a sequence's first position is the attention sink of Llama-family models;
    its activations are tens to hundreds of times the others in a few channels (down_proj inputs of
    early and late blocks), and every later token attends to it. A random draw of 512 of n·T tokens
    holds about one of them, so the clip search, blind to them, clamps exactly the large weights that
    meet those channels (on SmolLM2-135M W4 the clip search alone then scored worse than RTN:
    BENCHMARKS.md).
    """
    rng = np.random.default_rng(seed)
    n_clip = min(clip_tokens, n * T)
    drawn = rng.choice(n * T, size=n_clip, replace=False)
    return np.union1d(drawn, np.arange(n, dtype=drawn.dtype) * T)
