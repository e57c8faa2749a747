"""Gemma 3 (text) and Qwen3 forward passes in plain NumPy, written to be read.

The oracle for runtime/blocks.py. Same interface as reference/llama.py: a Hugging Face config dict,
float32 weights keyed by Hugging Face tensor names, logits for every position, no cache.

Gemma 3 block (Gemma Team 2025, "Gemma 3 Technical Report"; as in Hugging Face transformers'
Gemma3DecoderLayer):

    x0 = embed[ids] · √D                                    (√D rounded to float32)
    h  = norm(x; w_in)               norm(x; w) = x / sqrt(mean(x²) + eps) · (1 + w)
    q, k, v = h·Wqᵀ, h·Wkᵀ, h·Wvᵀ, per head: q = norm(q; w_q), k = norm(k; w_k), then RoPE
    a  = softmax(q·kᵀ · s^-1/2 + mask)·v,  s = query_pre_attn_scalar
    x  = x + norm(a·Woᵀ; w_post_attn)
    m  = (gelu_tanh(h'·Wgᵀ) ⊙ h'·Wuᵀ)·Wdᵀ,  h' = norm(x; w_pre_ffw)
    x  = x + norm(m; w_post_ffw)
    logits = norm(x; w_final) · embedᵀ

Layer i is "sliding" (sees only the last `sliding_window` positions, RoPE base rope_local_base_freq)
unless it is a "full_attention" layer (RoPE base rope_theta): `layer_types`, or every
`sliding_window_pattern`-th layer.

Qwen3 (`model_type` "qwen3") is the Llama block of reference/llama.py with q/k RMSNorm per head
(plain weight w, no 1 +) before RoPE.
"""
import numpy as np

from . import llama

GELU_C = np.sqrt(2.0 / np.pi)


def gelu_tanh(x):
    """x/2 · (1 + tanh(√(2/π) · (x + 0.044715 x³)))  (PyTorch's approximate="tanh")."""
    return 0.5 * x * (1.0 + np.tanh(GELU_C * (x + 0.044715 * x ** 3)))


def rms_norm(x, w, eps, offset):
    """RMSNorm over the last axis, scaled by (offset + w): offset 1 for Gemma, 0 for Qwen3."""
    return llama.rms_norm(x, np.float32(offset) + w.astype(np.float32), eps)


def layer_is_sliding(cfg, i):
    if "layer_types" in cfg:
        return cfg["layer_types"][i] == "sliding_attention"
    if cfg["model_type"] != "gemma3_text":
        return False
    return (i + 1) % cfg.get("sliding_window_pattern", 6) != 0


def block(x, weights, i, cfg, positions):
    """One decoder block of Gemma 3 or Qwen3.                                 # [T, D] -> [T, D]"""
    p = f"model.layers.{i}."
    gemma = cfg["model_type"] == "gemma3_text"
    offset = 1.0 if gemma else 0.0
    T = x.shape[0]
    H, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    Dh = cfg.get("head_dim") or cfg["hidden_size"] // H
    eps = cfg.get("rms_norm_eps", 1e-6)
    sliding = layer_is_sliding(cfg, i)
    theta = cfg.get("rope_local_base_freq", 10000.0) if sliding else cfg.get("rope_theta", 10000.0)
    inv_freq = llama.rope_inv_freq(Dh, theta)
    window = cfg["sliding_window"] if sliding else 0
    norm = lambda v, name: rms_norm(v, weights[p + name], eps, offset)

    h = norm(x, "input_layernorm.weight")
    q = llama.linear(h, weights, p + "self_attn.q_proj").reshape(T, H, Dh)
    k = llama.linear(h, weights, p + "self_attn.k_proj").reshape(T, Hkv, Dh)
    v = llama.linear(h, weights, p + "self_attn.v_proj").reshape(T, Hkv, Dh)
    q, k = norm(q, "self_attn.q_norm.weight"), norm(k, "self_attn.k_norm.weight")
    q, k = llama.rope(q, positions, inv_freq), llama.rope(k, positions, inv_freq)
    # llama.attention scales scores by Dh^-1/2; Gemma asks for query_pre_attn_scalar^-1/2.
    q = q * np.float32(np.sqrt(Dh / cfg.get("query_pre_attn_scalar", Dh)))
    a = llama.linear(llama.attention(q, k, v, window).reshape(T, H * Dh), weights, p + "self_attn.o_proj")
    if gemma:
        x = x + norm(a, "post_attention_layernorm.weight")
        h = norm(x, "pre_feedforward_layernorm.weight")
        m = (gelu_tanh(h @ weights[p + "mlp.gate_proj.weight"].T) * (h @ weights[p + "mlp.up_proj.weight"].T)) \
            @ weights[p + "mlp.down_proj.weight"].T
        return x + norm(m, "post_feedforward_layernorm.weight")
    x = x + a
    h = norm(x, "post_attention_layernorm.weight")
    return x + llama.swiglu_mlp(h, weights[p + "mlp.gate_proj.weight"], weights[p + "mlp.up_proj.weight"],
                                weights[p + "mlp.down_proj.weight"])


def forward(weights, cfg, ids):
    """Logits for every position of the token sequence `ids`.        # [T] -> [T, V]"""
    ids = np.asarray(ids)
    positions = np.arange(len(ids))
    x = weights["model.embed_tokens.weight"][ids].astype(np.float32)       # [T, D]
    if cfg["model_type"] == "gemma3_text":
        x = x * np.float32(cfg["hidden_size"] ** 0.5)
    for i in range(cfg["num_hidden_layers"]):
        x = block(x, weights, i, cfg, positions)
    offset = 1.0 if cfg["model_type"] == "gemma3_text" else 0.0
    x = rms_norm(x, weights["model.norm.weight"], cfg.get("rms_norm_eps", 1e-6), offset)
    head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    return (x @ head.T).astype(np.float32)                                 # [T, V]
