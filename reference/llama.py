"""A whole-sequence Llama-family forward pass in plain NumPy, written to be read.

This is the oracle for minilm_edge's runtime. It takes a plain `config` dict (the keys of a Hugging
Face config.json) and a dict of float32 weights keyed by Hugging Face tensor names, and returns
logits for every position. It recomputes everything from the first token: no cache, no fusion.

Shapes: T tokens, D hidden, H heads, Hkv key/value heads, Dh head dim, F MLP width, V vocabulary.

References: Touvron et al. 2023 (Llama); Su et al. 2021 (RoPE, rotate-half form as in Hugging Face
transformers); Ainslie et al. 2023 (grouped-query attention); Shazeer 2020 (SwiGLU).
"""
import numpy as np


def rms_norm(x, w, eps):
    """y = x / sqrt(mean(x²) + eps) * w, per row.          # [T, D] -> [T, D]"""
    x = x.astype(np.float64)
    return (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w).astype(np.float32)


def rope_inv_freq(head_dim, theta, scaling=None):
    """inv_freq[i] = theta^(-2i/Dh), i < Dh/2; with Llama-3 scaling of the low frequencies.

    llama3 scaling (Meta's `apply_scaling`): wavelengths longer than original_ctx/low_freq_factor are
    divided by `factor`; shorter than original_ctx/high_freq_factor are kept; in between, a smooth
    blend of the two.
    """
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)   # [Dh/2]
    if scaling is None:
        return inv
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * np.pi / inv
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * inv / factor + smooth * inv
    out = np.where(wavelen > old_ctx / lo, inv / factor, inv)
    mid = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
    return np.where(mid, blended, out)


def rope(x, positions, inv_freq):
    """Rotate each head's pairs (i, i + Dh/2) by angle pos·inv_freq[i] (rotate-half layout).

    x: [T, nh, Dh], positions: [T] -> [T, nh, Dh]
    x1' = x1·cos − x2·sin,  x2' = x2·cos + x1·sin
    """
    half = x.shape[-1] // 2
    angle = positions[:, None].astype(np.float64) * inv_freq[None, :]   # [T, Dh/2]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]      # [T, 1, Dh/2]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(np.float32)


def softmax(x, axis=-1):
    x = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=axis, keepdims=True)


def attention(q, k, v, window=0):
    """Causal grouped-query attention.

    q: [T, H, Dh], k, v: [S, Hkv, Dh] where the last T of the S positions are the queries' own
    (S ≥ T: earlier positions come from a cache). Query head h reads key/value head h // (H/Hkv).
    Returns [T, H, Dh] = softmax(q·kᵀ/sqrt(Dh) + mask) · v, with query t seeing keys j ≤ S − T + t,
    and with window > 0 (sliding window) only keys j > S − T + t − window.
    """
    T, H, Dh = q.shape
    S, Hkv, _ = k.shape
    rep = H // Hkv
    k = np.repeat(k, rep, axis=1)                                  # [S, H, Dh]
    v = np.repeat(v, rep, axis=1)                                  # [S, H, Dh]
    scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(Dh)        # [H, T, S]
    pos = S - T + np.arange(T)                                     # [T] each query's position
    mask = np.arange(S)[None, :] > pos[:, None]                    # [T, S] True where future
    if window > 0:
        mask |= np.arange(S)[None, :] <= (pos - window)[:, None]   # ... or out of the window
    scores = np.where(mask[None], -np.inf, scores)
    return np.einsum("hts,shd->thd", softmax(scores), v).astype(np.float32)


def silu(x):
    return x / (1.0 + np.exp(-x))


def swiglu_mlp(x, w_gate, w_up, w_down):
    """down( silu(x·gateᵀ) ⊙ (x·upᵀ) ).             # [T, D] -> [T, F] -> [T, D]"""
    return (silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


def linear(x, weights, name, bias=False):
    y = x @ weights[name + ".weight"].T
    if bias:
        y = y + weights[name + ".bias"]
    return y


def block(x, weights, i, cfg, positions, inv_freq):
    """One pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(x)).     # [T, D] -> [T, D]"""
    p = f"model.layers.{i}."
    T = x.shape[0]
    H, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    Dh = cfg.get("head_dim") or cfg["hidden_size"] // H
    eps = cfg.get("rms_norm_eps", 1e-6)
    bias = cfg["model_type"] == "qwen2" or cfg.get("attention_bias", False)

    h = rms_norm(x, weights[p + "input_layernorm.weight"], eps)
    q = linear(h, weights, p + "self_attn.q_proj", bias).reshape(T, H, Dh)
    k = linear(h, weights, p + "self_attn.k_proj", bias).reshape(T, Hkv, Dh)
    v = linear(h, weights, p + "self_attn.v_proj", bias).reshape(T, Hkv, Dh)
    q, k = rope(q, positions, inv_freq), rope(k, positions, inv_freq)
    a = attention(q, k, v).reshape(T, H * Dh)
    x = x + linear(a, weights, p + "self_attn.o_proj")

    h = rms_norm(x, weights[p + "post_attention_layernorm.weight"], eps)
    return x + swiglu_mlp(h, weights[p + "mlp.gate_proj.weight"], weights[p + "mlp.up_proj.weight"],
                          weights[p + "mlp.down_proj.weight"])


def rope_settings(cfg):
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or None
    if scaling and scaling.get("rope_type", scaling.get("type")) != "llama3":
        scaling = None
    H = cfg["num_attention_heads"]
    Dh = cfg.get("head_dim") or cfg["hidden_size"] // H
    return rope_inv_freq(Dh, theta, scaling)


def forward(weights, cfg, ids):
    """Logits for every position of the token sequence `ids`.        # [T] -> [T, V]"""
    ids = np.asarray(ids)
    positions = np.arange(len(ids))
    inv_freq = rope_settings(cfg)
    x = weights["model.embed_tokens.weight"][ids].astype(np.float32)  # [T, D]
    for i in range(cfg["num_hidden_layers"]):
        x = block(x, weights, i, cfg, positions, inv_freq)
    x = rms_norm(x, weights["model.norm.weight"], cfg.get("rms_norm_eps", 1e-6))
    head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    return (x @ head.T).astype(np.float32)                             # [T, V]
