"""Checkpoint I/O: find a model folder's safetensors files, map Hugging Face names to our weights,
check every shape against the config, and build the runtime's `Weights`.

Hugging Face Llama checkpoints already store q/k rows in the rotate-half RoPE layout this runtime
uses, so no permutation happens here (GGUF files differ; formats/gguf.py undoes theirs).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..formats.safetensors import to_float32
from ..formats.tensors import (
    BIASED,
    EMBED_PREFIX,
    GLOBAL_TENSORS,
    HEAD,
    TensorSource,
    block_linears,
    block_norms,
    check_block_count,
    check_shape,
    linear_format,
)
from .config import LlamaConfig
from .linear import LINEAR_FORMATS, Q6, Linear, Q8Rows, linear_class


@dataclasses.dataclass
class BlockWeights:
    attn_norm: np.ndarray   # [D] float32
    q: Linear               # [H*Dh, D]
    k: Linear               # [Hkv*Dh, D]
    v: Linear               # [Hkv*Dh, D]
    o: Linear               # [D, H*Dh]
    mlp_norm: np.ndarray    # [D] float32
    gate: Linear            # [F, D]
    up: Linear              # [F, D]
    down: Linear            # [D, F]
    # Only in some architectures (runtime/architecture.py), else None:
    q_norm: np.ndarray | None = None         # [Dh] float32, per head of q (qk_norm)
    k_norm: np.ndarray | None = None         # [Dh] float32, per head of k (qk_norm)
    attn_post_norm: np.ndarray | None = None  # [D] float32, on the attention output (post_norms)
    mlp_post_norm: np.ndarray | None = None   # [D] float32, on the MLP output (post_norms)


@dataclasses.dataclass
class Weights:
    embed: np.ndarray       # [V, D] float32 or float16 as stored (rows widened per lookup), or an
                            # int8 table (linear.Q8Rows: rows dequantized per lookup)
    blocks: list            # L × BlockWeights
    norm: np.ndarray        # [D] float32
    lm_head: Linear         # [V, D]; the embedding itself when tied
    source: "TensorSource | None" = None   # the mapped files the arrays may view


def load_linear(src: TensorSource, prefix: str, shape: tuple, bias: bool, cfg: LlamaConfig) -> Linear:
    cls = linear_class(linear_format(src, prefix), shape[1])
    if cls is None:
        raise CheckpointError(f"tensor {prefix + '.weight'!r} is missing from the checkpoint")
    lin = cls.load(src, prefix, shape, cfg)
    if bias:
        lin.bias = src.float32(prefix + ".bias", (shape[0],))
    return lin


def load_embedding(src: TensorSource, cfg: LlamaConfig):
    """The embedding table as stored when NumPy can index it (f32/f16: rows are widened per lookup,
    the table is not copied); bf16 is widened once; int8 or q6 (EMBED_PREFIX.qweight) as a Q8Rows."""
    name, shape = GLOBAL_TENSORS["embed"]
    fmt = linear_format(src, EMBED_PREFIX) if name not in src else None
    if fmt in ("q8", "q6"):                 # q6: unpacked to the same int8 table (formats/q4.py pack_q6)
        return Q8Rows(LINEAR_FORMATS[fmt].load(src, EMBED_PREFIX, shape(cfg), cfg))
    arr, dt = src.raw(name)
    check_shape(name, arr.shape, shape(cfg))
    return arr if dt in ("F32", "F16") else to_float32(arr, dt)


def load_weights(model_dir: Path | None, cfg: LlamaConfig, src: TensorSource | None = None) -> Weights:
    """The weights of the folder `model_dir`, or of `src` when given (one already open)."""
    src = src if src is not None else TensorSource(model_dir)
    check_block_count(src, cfg)
    embed = load_embedding(src, cfg)
    norm_name, norm_shape = GLOBAL_TENSORS["norm"]
    linears = [{} for _ in range(cfg.num_hidden_layers)]
    for i, key, prefix, shape in block_linears(cfg):
        linears[i][key] = load_linear(src, prefix, shape, cfg.attention_bias and key in BIASED, cfg)
    blocks = [BlockWeights(**{k: norm_weight(src, name, shape, cfg) for k, name, shape in block_norms(cfg, i)},
                           **lins)
              for i, lins in enumerate(linears)]
    head_name, head_shape = HEAD
    if any(n.startswith(head_name + ".") for n in src.where):
        # A stored head wins, also when the embeddings are tied (a quantized copy of the embedding).
        lm_head = load_linear(src, head_name, head_shape(cfg), False, cfg)
    elif cfg.tie_word_embeddings and isinstance(embed, Q8Rows):
        lm_head = embed.linear                 # the int8 table, stored once, is the head too
    elif cfg.tie_word_embeddings:
        # The head is the embedding itself: fp16 stays fp16 (no float32 copy) where the kernel can.
        f16 = embed.dtype == np.float16 and embed.shape[1] % 16 == 0
        lm_head = LINEAR_FORMATS["f16"](embed) if f16 else LINEAR_FORMATS["f32"].from_array(embed)
    else:
        raise CheckpointError("lm_head.weight is missing and config.json does not tie the embeddings")
    if isinstance(lm_head, Q6):
        lm_head.decode_i8 = True               # the head decodes with int8 activations (linear.Q6)
    lins = [lm_head, getattr(embed, "linear", None)] + [lin for b in linears for lin in b.values()]
    if any(getattr(lin, "repacked", False) for lin in lins):
        where = f"{model_dir} " if model_dir is not None else ""
        print(f"note: {where}stores its q6 weights in the older packed layout: re-packed at every load "
              "(slower, more memory); quantize its source again with this version to have them mapped",
              file=sys.stderr)
    return Weights(embed=embed, blocks=blocks, norm=norm_weight(src, norm_name, norm_shape(cfg), cfg),
                   lm_head=lm_head, source=src)


def norm_weight(src: TensorSource, name: str, shape: tuple, cfg: LlamaConfig) -> np.ndarray:
    """An RMSNorm weight as the kernels multiply by it: Gemma stores w and scales by (1 + w)
    (Architecture.norm_offset), computed here once, in float32 as Hugging Face does."""
    w = src.float32(name, shape)
    offset = cfg.arch.norm_offset
    return (np.float32(offset) + w).astype(np.float32) if offset else w
