"""Reference (plain NumPy, written to be read) for the AWQ formulas of minilm_edge/quant/awq.py.

Never imports minilm_edge. W [N, K] out x in, X [T, K] activations, g group size, s [K] scales.

Why scaling helps — the paper's argument (Lin et al. 2024, §3.2), on numbers. Take 2,000 groups of
128 random weights and look at one input channel j. Round-to-nearest int4 with a per-group min/max
step Δ = (max − min)/15 leaves each weight off by at most Δ/2:

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> W = rng.standard_normal((2000, 128)).astype(np.float32)     # 2,000 groups, one row each
>>> j = 0
>>> err_1 = np.abs(pseudo_quantize(W, 4, 128)[:, j] - W[:, j]).mean()
>>> round(float(err_1), 4)
0.0863

Scale channel j by s = 2 before rounding and divide its activation by 2 (so the product w·x is
unchanged in full precision). The channel's weight is now on a finer grid relative to itself:

>>> s = 2.0
>>> Ws = W.copy(); Ws[:, j] *= s
>>> err_2 = np.abs(pseudo_quantize(Ws, 4, 128)[:, j] / s - W[:, j]).mean()
>>> round(float(err_2 / err_1), 2)                              # about 1/s
0.53

while the step of the group, set by the group's extremes, barely moves (it grows only in the few
groups where s·w_j becomes the new max or min):

>>> step = lambda m: (m.max(axis=1) - m.min(axis=1)) / 15
>>> round(float(np.mean(step(Ws) / step(W))), 3)
1.036

So the error of w_j·x_j shrinks by ~1/s while the other channels of the group are hurt by only
~4% on average. For channels with large |x_j| (salient), that trade is worth it. With a larger s the scaled
weight sets the group's range more often and the other channels pay more:

>>> Ws4 = W.copy(); Ws4[:, j] *= 4.0
>>> round(float(np.mean(step(Ws4) / step(W))), 3)
1.234

which is why s is searched (s = x_mean^α for α on a grid) rather than made large.
"""
import numpy as np

from . import llama


def pseudo_quantize(w, bits, group_size):
    """Round-to-nearest per (row, group), asymmetric min/max, then dequantize (docs/DESIGN.md §4).

        scale = max(max − min, 1e-5) / (2^bits − 1)   (rounded to fp16, as stored)
        zero  = clamp(−round(min / scale), 0, 2^bits − 1)
        w_hat = (clamp(round(w / scale) + zero, 0, 2^bits − 1) − zero) · scale

    w [N, K] -> [N, K] float32
    """
    qmax = 2 ** bits - 1
    w = np.asarray(w, np.float32)
    out = np.zeros_like(w)
    for c in range(0, w.shape[1], group_size):
        wg = w[:, c:c + group_size]
        lo, hi = wg.min(axis=1, keepdims=True), wg.max(axis=1, keepdims=True)
        scale = (np.maximum(hi - lo, np.float32(1e-5)) / np.float32(qmax)).astype(np.float16).astype(np.float32)
        zero = np.clip(-np.round(lo / scale), 0, qmax)
        q = np.clip(np.round(wg / scale) + zero, 0, qmax)
        out[:, c:c + group_size] = (q - zero) * scale
    return out


def activation_mean(x):
    """x_mean[j] = mean over tokens t of |X[t, j]|.           X [T, K] -> [K]"""
    return np.mean(np.abs(np.asarray(x, np.float64)), axis=0)


def weight_mean(w, group_size):
    """w_mean[j] = mean over rows n of |W[n, j]| / max_{k in j's group} |W[n, k]|   (duo form)."""
    a = np.abs(np.asarray(w, np.float64))
    rel = np.zeros_like(a)
    for c in range(0, a.shape[1], group_size):
        rel[:, c:c + group_size] = a[:, c:c + group_size] / (a[:, c:c + group_size].max(axis=1, keepdims=True) + 1e-6)
    return rel.mean(axis=0)


def awq_scales(x_mean, alpha, w_mean=None):
    """s = x_mean^α  (duo: x_mean^α / (w_mean^(1−α) + 1e-4));  s = max(s, 1e-4);  s /= sqrt(max(s)·min(s)).

    The last step centres s geometrically (max·min = 1), so s does not drift the weights' overall size.
    """
    s = np.asarray(x_mean, np.float64) ** alpha
    if w_mean is not None:
        s = s / (np.asarray(w_mean, np.float64) ** (1 - alpha) + 1e-4)
    s = np.maximum(s, 1e-4)
    return s / np.sqrt(s.max() * s.min())


def scaled_pseudo_quantize(w, s, bits, group_size):
    """Q(W·diag(s))·diag(s)⁻¹: the effective weight after scaling, rounding and unscaling."""
    return pseudo_quantize(np.asarray(w, np.float32) * s[None, :], bits, group_size) / s[None, :]


def linear_loss(w, x, s, bits, group_size):
    """L(s) = mean over tokens and outputs of ( Q(W·diag(s)) (diag(s)⁻¹ x) − W x )²  for one linear.

    w [N, K], x [T, K] (tokens as rows), s [K].
    """
    x = np.asarray(x, np.float64)
    y_fp = x @ np.asarray(w, np.float64).T
    w_q = pseudo_quantize(np.asarray(w, np.float32) * s[None, :], bits, group_size).astype(np.float64)
    y_q = (x / s[None, :]) @ w_q.T
    return float(np.mean((y_q - y_fp) ** 2))


def fold_into_norm(norm_w, linears, s):
    """RMSNorm weight ÷ s, each following linear's columns × s: (new norm [K], [new W [N_i, K]])."""
    return norm_w / s, [w * s[None, :] for w in linears]


def fold_into_linear(prev_w, prev_b, w, s):
    """Previous linear's output rows (and bias) ÷ s, the next linear's columns × s."""
    return prev_w / s[:, None], (None if prev_b is None else prev_b / s), w * s[None, :]


def clip_search(w, x, bits, group_size, shrinks=tuple(1.0 - i / 20 for i in range(10)), two_sided=False):
    """Per (row n, group c): the clamp [lo, hi] of the weights that, after rounding, least changes the
    group's partial dot products with the tokens:

        err(lo, hi) = mean_t ( Σ_{k in c} (Q(clamp(w, lo, hi))[n, k] − w[n, k]) · x[t, k] )²

    over the symmetric clamps lo = −r·m, hi = r·m (m = max_{k in c} |w[n, k]|, r in shrinks) and,
    with two_sided, every pair lo = a·min w, hi = b·max w (a, b in shrinks); ties keep the earlier one.

    One (row, group) at a time. w [N, K], x [T, K] -> (clipped w [N, K], kept [N, K/g]): kept is the
    fraction of the group's range max w − min w that the chosen clamp keeps.
    """
    w = np.asarray(w, np.float32)
    n_rows, k = w.shape
    out = w.copy()
    kept = np.ones((n_rows, k // group_size), np.float32)
    for n in range(n_rows):
        for gi, c in enumerate(range(0, k, group_size)):
            wg = w[n:n + 1, c:c + group_size]
            xg = np.asarray(x, np.float64)[:, c:c + group_size]
            lo0, hi0 = wg.min(), wg.max()
            m = max(-lo0, hi0)
            cands = [(-m * np.float32(r), m * np.float32(r)) for r in shrinks]
            if two_sided:
                cands += [(lo0 * np.float32(a), hi0 * np.float32(b)) for a in shrinks for b in shrinks]
            best, best_c = np.inf, (lo0, hi0)
            for lo, hi in cands:
                d = pseudo_quantize(np.clip(wg, lo, hi), bits, group_size) - wg
                err = np.mean((xg @ d[0].astype(np.float64)) ** 2)
                if err < best:
                    best, best_c = err, (lo, hi)
            out[n, c:c + group_size] = np.clip(wg[0], *best_c)
            if hi0 > lo0:
                kept[n, gi] = (min(best_c[1], hi0) - max(best_c[0], lo0)) / (hi0 - lo0)
    return out, kept


def joint_clip_search(w, x, bits, group_size, shrinks=tuple(1.0 - i / 20 for i in range(10)), two_sided=False,
                      sweeps=2):
    """The clip search on a whole row's output error instead of each group's alone.

    A row's output error on token t is the sum of its groups' partial errors, so

        err_row = mean_t ( Σ_k (Q(w')[n, k] − w[n, k]) · x[t, k] )²

    holds, besides each group's own err of `clip_search`, the cross terms between groups: one
    group's clamp can cancel part of another's rounding error. Per row: start from clip_search's
    choice; then, `sweeps` times, for each group in turn, try every candidate clamp of that group
    with the other groups kept, and take the one of least err_row (ties: the earlier candidate).
    Each step keeps or lowers err_row. Same candidates and outputs as clip_search.
    """
    w = np.asarray(w, np.float32)
    x = np.asarray(x, np.float64)
    n_rows, k = w.shape
    first, kept = clip_search(w, x, bits, group_size, shrinks, two_sided)
    out = first.copy()
    for n in range(n_rows):
        err = pseudo_quantize(first[n:n + 1], bits, group_size)[0].astype(np.float64) - w[n]   # [K]
        for _ in range(sweeps):
            for gi, c in enumerate(range(0, k, group_size)):
                wg = w[n:n + 1, c:c + group_size]
                lo0, hi0 = wg.min(), wg.max()
                m = max(-lo0, hi0)
                cands = [(-m * np.float32(r), m * np.float32(r)) for r in shrinks]
                if two_sided:
                    cands += [(lo0 * np.float32(a), hi0 * np.float32(b)) for a in shrinks for b in shrinks]
                best = np.inf
                for lo, hi in cands:
                    trial = err.copy()
                    trial[c:c + group_size] = pseudo_quantize(np.clip(wg, lo, hi), bits, group_size)[0] - wg[0]
                    e = np.mean((x @ trial) ** 2)
                    if e < best:
                        best, best_c, best_trial = e, (lo, hi), trial
                err = best_trial
                out[n, c:c + group_size] = np.clip(wg[0], *best_c)
                if hi0 > lo0:
                    kept[n, gi] = (min(best_c[1], hi0) - max(best_c[0], lo0)) / (hi0 - lo0)
    return out, kept



# ----------------------------------------------------------------------------------------------
# The α search on one block, and the loop over the blocks (minilm_edge.quant.awq.run_awq).
#
# Plain and slow: one sequence at a time, every loss on every calibration token, no clipping
# inside the search, then the symmetric per-group clip search. The package's further switches
# (AWQSettings search_clip, clip_two_sided, clip_joint_tokens, clip_all_tokens, search_tokens,
# search_samples) change which tokens and clamp candidates it uses, not this method.

ALPHAS = [i / 20 for i in range(20)]           # α = 0, 0.05, …, 0.95

# One row per scale group: the op whose output is divided by s, the linears whose columns are
# multiplied by s, the module whose output the loss compares, and which activation is their input.
GROUPS = [
    ("qkv", "input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "attention",
     "attn_in"),
    ("o", "self_attn.v_proj", ["self_attn.o_proj"], "linear", "o_in"),
    ("gate_up", "post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"], "mlp", "mlp_in"),
    ("down", "mlp.up_proj", ["mlp.down_proj"], "linear", "down_in"),
]
NOT_CLIPPED = ["self_attn.q_proj", "self_attn.k_proj"]   # their error passes through the softmax


def attention_core(h, weights, p, cfg):
    """q, k, v of h, RoPE, causal grouped-query attention over positions 0..T-1; o not applied.
                                                                        h [T, D] -> [T, H·Dh]"""
    T = h.shape[0]
    H, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    Dh = cfg.get("head_dim") or cfg["hidden_size"] // H
    bias = cfg["model_type"] == "qwen2" or cfg.get("attention_bias", False)
    q = llama.linear(h, weights, p + "self_attn.q_proj", bias).reshape(T, H, Dh)
    k = llama.linear(h, weights, p + "self_attn.k_proj", bias).reshape(T, Hkv, Dh)
    v = llama.linear(h, weights, p + "self_attn.v_proj", bias).reshape(T, Hkv, Dh)
    inv_freq = llama.rope_settings(cfg)
    q, k = llama.rope(q, np.arange(T), inv_freq), llama.rope(k, np.arange(T), inv_freq)
    return llama.attention(q, k, v).reshape(T, H * Dh)


def block_parts(x, weights, i, cfg):
    """Block i on one sequence, keeping every scale group's input.             x [T, D] -> dict

    attn_in [T, D], o_in [T, H·Dh], mlp_in [T, D], down_in [T, F], out [T, D] (next block's input).
    """
    p = f"model.layers.{i}."
    eps = cfg.get("rms_norm_eps", 1e-6)
    h = llama.rms_norm(x, weights[p + "input_layernorm.weight"], eps)
    a = attention_core(h, weights, p, cfg)
    x2 = x + a @ weights[p + "self_attn.o_proj.weight"].T
    h2 = llama.rms_norm(x2, weights[p + "post_attention_layernorm.weight"], eps)
    act = llama.silu(h2 @ weights[p + "mlp.gate_proj.weight"].T) * (h2 @ weights[p + "mlp.up_proj.weight"].T)
    out = x2 + act @ weights[p + "mlp.down_proj.weight"].T
    return {"attn_in": h, "o_in": a, "mlp_in": h2, "down_in": act, "out": out}


def module_output(kind, x, weights, p, linears, cfg):
    """What a group's loss compares: the attention through o, the MLP through down, or the linear."""
    if kind == "attention":
        return attention_core(x, weights, p, cfg) @ weights[p + "self_attn.o_proj.weight"].T
    if kind == "mlp":
        return llama.swiglu_mlp(x, weights[p + "mlp.gate_proj.weight"], weights[p + "mlp.up_proj.weight"],
                                weights[p + "mlp.down_proj.weight"])
    return x @ weights[p + linears[0] + ".weight"].T


def search_alpha(weights, p, linears, kind, xs, bits, group_size, cfg):
    """The α of least loss for one scale group of one block, and the scales it gives.

        L(α) = mean over tokens and outputs of ( M_q(X) − M(X) )²

    M the module, X its input, M_q the same module with each linear W of the group replaced by
    Q(W·diag(s))·diag(s)⁻¹ where s = awq_scales(mean_t |X|, α), kept in float32 as the package
    keeps it. xs: the group's input on every calibration sequence, [T, K] each. Ties keep the
    smaller α. Returns (α, s [K], the loss of every α on the grid).
    """
    x_mean = activation_mean(np.concatenate(xs))
    y_fp = np.concatenate([module_output(kind, x, weights, p, linears, cfg) for x in xs])
    losses = []
    for alpha in ALPHAS:
        s = awq_scales(x_mean, alpha).astype(np.float32)
        trial = dict(weights)
        for lin in linears:
            trial[p + lin + ".weight"] = scaled_pseudo_quantize(weights[p + lin + ".weight"], s, bits, group_size)
        y_q = np.concatenate([module_output(kind, x, trial, p, linears, cfg) for x in xs])
        losses.append(float(np.mean((y_q.astype(np.float64) - y_fp) ** 2)))
    best = int(np.argmin(losses))
    return ALPHAS[best], awq_scales(x_mean, ALPHAS[best]).astype(np.float32), losses


def awq_model(weights, cfg, ids, bits, group_size, clip=True):
    """AWQ over every block. weights by Hugging Face name, calibration ids [n, T] ->
    (new weights, per block {group: (α, the loss of every α)}; α None where nothing was folded).

    Block by block: run block l with its full-precision weights on its full-precision inputs;
    search each scale group's α on those inputs; fold every group's s (the op before ÷ s, the
    group's columns × s), except where the op before's output is not the group's input (v -> o
    under grouped-query attention); clip each linear but q and k by `clip_search` on its input
    ÷ s; the next block's input is this block's full-precision output.
    """
    w = {name: np.asarray(t, np.float32) for name, t in weights.items()}
    xs = [weights["model.embed_tokens.weight"][row].astype(np.float32) for row in np.asarray(ids)]
    chosen = []
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        parts = [block_parts(x, weights, i, cfg) for x in xs]
        found, scales = {}, {}
        for name, prev, linears, kind, inp in GROUPS:
            k_in = weights[p + linears[0] + ".weight"].shape[1]
            scales[name] = np.ones(k_in, np.float32)
            if weights[p + prev + ".weight"].shape[0] != k_in:
                found[name] = (None, [])
                continue
            alpha, scales[name], losses = search_alpha(weights, p, linears, kind, [pt[inp] for pt in parts],
                                                       bits, group_size, cfg)
            found[name] = (alpha, losses)
            fold(w, p + prev, [p + lin for lin in linears], scales[name])
        if clip:
            for name, _, linears, _, inp in GROUPS:
                x = np.concatenate([pt[inp] for pt in parts]) / scales[name][None, :]
                for lin in linears:
                    if lin not in NOT_CLIPPED:
                        w[p + lin + ".weight"], _ = clip_search(w[p + lin + ".weight"], x, bits, group_size)
        chosen.append(found)
        xs = [pt["out"] for pt in parts]
    return w, chosen


def fold(w, prev, linears, s):
    """In place: the op before ÷ s (a norm, or a linear's rows and bias), the linears' columns × s."""
    if w[prev + ".weight"].ndim == 1:
        w[prev + ".weight"], new = fold_into_norm(w[prev + ".weight"], [w[n + ".weight"] for n in linears], s)
    else:
        w[prev + ".weight"], bias, new_w = fold_into_linear(w[prev + ".weight"], w.get(prev + ".bias"),
                                                            w[linears[0] + ".weight"], s)
        new = [new_w]
        if bias is not None:
            w[prev + ".bias"] = bias
    for n, new_w in zip(linears, new):
        w[n + ".weight"] = new_w
