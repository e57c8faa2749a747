"""Checkpoint I/O: find a model folder's safetensors files, map Hugging Face names to our weights,
check every shape against the config, and build the runtime's `Weights`.

Hugging Face Llama checkpoints already store q/k rows in the rotate-half RoPE layout this runtime
uses, so no permutation happens here (GGUF files differ; `gguf_import` undoes theirs).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from .config import LlamaConfig
from .errors import CheckpointError, ModelNotFoundError
from .linear import LINEAR_FORMATS, Linear
from .safetensors_io import SafetensorsFile, to_float32

# Our name -> (Hugging Face name, expected shape as a function of the config).
# {i} is the block index. Shapes use the vocabulary of config.py: [N out, K in] for linears.
GLOBAL_TENSORS = {
    "embed": ("model.embed_tokens.weight", lambda c: (c.vocab_size, c.hidden_size)),
    "norm": ("model.norm.weight", lambda c: (c.hidden_size,)),
}
HEAD = ("lm_head", lambda c: (c.vocab_size, c.hidden_size))     # absent when embeddings are tied
BLOCK_NORMS = {
    "attn_norm": ("model.layers.{i}.input_layernorm.weight", lambda c: (c.hidden_size,)),
    "mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", lambda c: (c.hidden_size,)),
}
# Linears are named without the ".weight" suffix: a linear may be dense (".weight") or quantized
# (".qweight", ".scales", ...); `linear.LINEAR_FORMATS` decides from the names present.
BLOCK_LINEARS = {
    "q": ("model.layers.{i}.self_attn.q_proj", lambda c: (c.num_attention_heads * c.head_dim, c.hidden_size)),
    "k": ("model.layers.{i}.self_attn.k_proj", lambda c: (c.num_key_value_heads * c.head_dim, c.hidden_size)),
    "v": ("model.layers.{i}.self_attn.v_proj", lambda c: (c.num_key_value_heads * c.head_dim, c.hidden_size)),
    "o": ("model.layers.{i}.self_attn.o_proj", lambda c: (c.hidden_size, c.num_attention_heads * c.head_dim)),
    "gate": ("model.layers.{i}.mlp.gate_proj", lambda c: (c.intermediate_size, c.hidden_size)),
    "up": ("model.layers.{i}.mlp.up_proj", lambda c: (c.intermediate_size, c.hidden_size)),
    "down": ("model.layers.{i}.mlp.down_proj", lambda c: (c.hidden_size, c.intermediate_size)),
}
BIASED = ("q", "k", "v")   # carry a bias when config.attention_bias (qwen2)


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


@dataclasses.dataclass
class Weights:
    embed: np.ndarray       # [V, D] float32 or float16 as stored (rows widened per lookup)
    blocks: list            # L × BlockWeights
    norm: np.ndarray        # [D] float32
    lm_head: Linear         # [V, D]; the embedding itself when tied
    source: "TensorSource | None" = None   # the mapped files the arrays may view


class TensorSource:
    """All tensors of a model folder, across one or several safetensors files."""

    def __init__(self, model_dir: Path):
        model_dir = Path(model_dir)
        self.files = {}          # file name -> SafetensorsFile
        self.where = {}          # tensor name -> file name
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError):
                raise CheckpointError(f"{index} is not a valid safetensors index") from None
            names = sorted(set(weight_map.values()))
        else:
            names = sorted(p.name for p in model_dir.glob("*.safetensors"))
        if not names:
            pickles = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt")]
            hint = (f" (found {', '.join(pickles)}: pickle files are never loaded, convert them to "
                    "safetensors first)") if pickles else ""
            raise ModelNotFoundError(f"no .safetensors weights in {model_dir}{hint}")
        for fname in names:
            if Path(fname).name != fname:
                raise CheckpointError(f"safetensors index names a file outside the folder: {fname!r}")
            st = SafetensorsFile(model_dir / fname)
            self.files[fname] = st
            for t in st.keys():
                if t in self.where:
                    raise CheckpointError(f"tensor {t!r} appears in both {self.where[t]} and {fname}")
                self.where[t] = fname
        self.metadata = {k: v for st in self.files.values() for k, v in st.metadata.items()}

    def __contains__(self, name):
        return name in self.where

    def release_pages(self) -> None:
        for st in self.files.values():
            st.release_pages()

    def raw(self, name: str):
        """(array view, safetensors dtype) of a tensor; a clear error if it is missing."""
        if name not in self.where:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint")
        st = self.files[self.where[name]]
        return st.tensor(name), st.dtype(name)

    def float32(self, name: str, shape: tuple) -> np.ndarray:
        arr, dt = self.raw(name)
        check_shape(name, arr.shape, shape)
        return to_float32(arr, dt)


def check_shape(name, actual, expected):
    if tuple(actual) != tuple(expected):
        raise CheckpointError(f"tensor {name!r} has shape {list(actual)}, expected {list(expected)}")


def load_linear(src: TensorSource, prefix: str, shape: tuple, bias: bool, cfg: LlamaConfig) -> Linear:
    for fmt in LINEAR_FORMATS.values():
        if fmt.present(src, prefix):
            lin = fmt.load(src, prefix, shape, cfg)
            break
    else:
        raise CheckpointError(f"tensor {prefix + '.weight'!r} is missing from the checkpoint")
    if bias:
        lin.bias = src.float32(prefix + ".bias", (shape[0],))
    return lin


def load_embedding(src: TensorSource, cfg: LlamaConfig) -> np.ndarray:
    """The embedding table as stored when NumPy can index it (f32/f16: rows are widened per lookup,
    the table is not copied); bf16 is widened once."""
    name, shape = GLOBAL_TENSORS["embed"]
    arr, dt = src.raw(name)
    check_shape(name, arr.shape, shape(cfg))
    return arr if dt in ("F32", "F16") else to_float32(arr, dt)


def load_weights(model_dir: Path, cfg: LlamaConfig) -> Weights:
    src = TensorSource(model_dir)
    embed = load_embedding(src, cfg)
    norm_name, norm_shape = GLOBAL_TENSORS["norm"]
    blocks = []
    for i in range(cfg.num_hidden_layers):
        norms = {k: src.float32(name.format(i=i), shape(cfg)) for k, (name, shape) in BLOCK_NORMS.items()}
        lins = {k: load_linear(src, name.format(i=i), shape(cfg), cfg.attention_bias and k in BIASED, cfg)
                for k, (name, shape) in BLOCK_LINEARS.items()}
        blocks.append(BlockWeights(**norms, **lins))
    head_name, head_shape = HEAD
    if any(n.startswith(head_name + ".") for n in src.where):
        # A stored head wins, also when the embeddings are tied (a quantized copy of the embedding).
        lm_head = load_linear(src, head_name, head_shape(cfg), False, cfg)
    elif cfg.tie_word_embeddings:
        # The head is the embedding itself: fp16 stays fp16 (no float32 copy) where the kernel can.
        f16 = embed.dtype == np.float16 and embed.shape[1] % 16 == 0
        lm_head = LINEAR_FORMATS["f16"](embed) if f16 else LINEAR_FORMATS["f32"].from_array(embed)
    else:
        raise CheckpointError("lm_head.weight is missing and config.json does not tie the embeddings")
    return Weights(embed=embed, blocks=blocks, norm=src.float32(norm_name, norm_shape(cfg)), lm_head=lm_head,
                   source=src)
