"""The architectures minilm_edge runs, as data: one table entry per Hugging Face `model_type`, naming
the variant of the decoder block it selects (docs/DESIGN.md §2.1).

Every supported model is a stack of the same block with a few switches:

    h = norm_attn(x)                          RMSNorm, weight w or (1 + w) (`norm_offset`)
    q, k, v = q(h), k(h), v(h)                (+ bias: `attention_bias`)
    q, k = rms_norm(q), rms_norm(k) per head  (`qk_norm`: Qwen3, Gemma 3)
    a = o(attention(rope(q), rope(k), v))     window and RoPE base per layer (`sliding_window`)
    x = x + post_attn(a)                      (`post_norms`: Gemma 2/3; identity otherwise)
    h = norm_mlp(x)
    m = down(act(gate(h)) ⊙ up(h))            act = silu (SwiGLU) or gelu_tanh (GeGLU)
    x = x + post_mlp(m)                       (`post_norms`)

and embeddings scaled by √D before the first block (`embed_scale`: Gemma). The per-model numbers
(window size, which layers slide, the local RoPE base) are fields of runtime/config.LlamaConfig;
the switches are here. `plain` architectures (no switch on) take the Llama fast paths (fused
decode, runtime/decode.py); the others run through runtime/blocks.py.
"""
from __future__ import annotations

import dataclasses

ACTIVATIONS = ("silu", "gelu_tanh")


@dataclasses.dataclass(frozen=True)
class Architecture:
    attention_bias: bool = False      # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool = False             # RMSNorm over each head of q and k before RoPE (Qwen3, Gemma 3)
    norm_offset: float = 0.0          # norms scale by (offset + w): 1 for Gemma (its weights are stored as w − 1)
    post_norms: bool = False          # an RMSNorm on the attention and MLP outputs before each residual add
    embed_scale: bool = False         # embeddings multiplied by √D (in float32)
    activation: str = "silu"          # of the gated MLP: silu (SwiGLU) or gelu_tanh (GeGLU)
    norm_layout: str = "llama"        # which tensor names hold the block norms (formats/tensors.NORM_LAYOUTS)
    sliding_window: bool = False      # some layers attend to a window only, with their own RoPE base

    def __post_init__(self):
        assert self.activation in ACTIVATIONS, self.activation

    @property
    def plain(self) -> bool:
        """Exactly the Llama block (biases allowed): the fused decode and model.py's loop apply."""
        return self == dataclasses.replace(LLAMA, attention_bias=self.attention_bias)


LLAMA = Architecture()

# model_type -> block variant. One table, no class-name matching.
ARCHITECTURES = {
    "llama": LLAMA,
    "mistral": LLAMA,                 # only without a sliding window (config.py checks)
    "qwen2": Architecture(attention_bias=True),
    "qwen3": Architecture(qk_norm=True),
    "gemma3_text": Architecture(qk_norm=True, norm_offset=1.0, post_norms=True, embed_scale=True,
                                activation="gelu_tanh", norm_layout="gemma", sliding_window=True),
}
