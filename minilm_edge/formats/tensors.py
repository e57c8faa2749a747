"""A model folder's tensors: the one table of Hugging Face tensor names (with each shape as a
function of the config), and `TensorSource`, every tensor of a folder across one or several
safetensors files."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, ModelNotFoundError
from .safetensors import _TAGS, SafetensorsFile, to_float32

# Our name -> (Hugging Face name, expected shape as a function of the config).
# {i} is the block index. Shapes use the vocabulary of runtime/config.py: [N out, K in] for linears.
GLOBAL_TENSORS = {
    "embed": ("model.embed_tokens.weight", lambda c: (c.vocab_size, c.hidden_size)),
    "norm": ("model.norm.weight", lambda c: (c.hidden_size,)),
}
HEAD = ("lm_head", lambda c: (c.vocab_size, c.hidden_size))     # absent when embeddings are tied
# The embedding may also be stored as int8 or q6 (formats/q4.py Q8Linear: EMBED_PREFIX.qweight + .scales,
# no .weight; q6's qweight is uint8, packed); with tied embeddings that one table then serves the lookups and the head.
EMBED_PREFIX = "model.embed_tokens"
BLOCK_NORMS = {
    "attn_norm": ("model.layers.{i}.input_layernorm.weight", lambda c: (c.hidden_size,)),
    "mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", lambda c: (c.hidden_size,)),
}
# The block norms per `Architecture.norm_layout` (runtime/architecture.py). Gemma's names differ in
# meaning: its "post_attention_layernorm" normalizes the attention output (our attn_post_norm), and the
# norm before the MLP is "pre_feedforward_layernorm".
GEMMA_NORMS = {
    "attn_norm": BLOCK_NORMS["attn_norm"],
    "mlp_norm": ("model.layers.{i}.pre_feedforward_layernorm.weight", lambda c: (c.hidden_size,)),
    "attn_post_norm": ("model.layers.{i}.post_attention_layernorm.weight", lambda c: (c.hidden_size,)),
    "mlp_post_norm": ("model.layers.{i}.post_feedforward_layernorm.weight", lambda c: (c.hidden_size,)),
}
NORM_LAYOUTS = {"llama": BLOCK_NORMS, "gemma": GEMMA_NORMS}
QK_NORMS = {   # per head of q and k, when Architecture.qk_norm (Qwen3, Gemma 3)
    "q_norm": ("model.layers.{i}.self_attn.q_norm.weight", lambda c: (c.head_dim,)),
    "k_norm": ("model.layers.{i}.self_attn.k_norm.weight", lambda c: (c.head_dim,)),
}
# Linears are named without the ".weight" suffix: a linear may be dense (".weight") or quantized
# (".qweight", ".scales", ...); `linear_format` tells which from the names present.
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

# The int4 linears that runtime/decode.py stacks across blocks, each tuple fused by rows (q|k|v,
# gate|up). Files we write store the codes, zero points and scales of each stack back to back, block
# after block (`storage_rank`), so that the stack is a view of the mapped file, not a copy (the kernels
# read the fp16 scales as they are: kernels/simd.as_f32). Older files put the scales elsewhere: loading
# copies them (runtime/decode.stack_q4). The q6 block linears (formats/q4.py) likewise, apart from the
# int4 ones: each kind's q6 codes, then its q6 scales, block after block (runtime/decode.stack_q8).
STACKS = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))
STACKED_PARTS = ("qweight", "zeros", "scales")
_STACK_OF = {key: (s, j) for s, keys in enumerate(STACKS) for j, key in enumerate(keys)}
_PREFIX_KEY = {name.rsplit(".", 1)[1]: key for key, (name, _) in BLOCK_LINEARS.items()}   # "q_proj" -> "q"
_STACKED_NAME = re.compile(r"model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.(\w+)")


def storage_rank(name: str, q6: frozenset = frozenset()) -> tuple:
    """Sort key of a tensor in a file we write: the stacked int4 parts first, ordered (part, stack,
    block, position in the stack), then the q6 linears' (their prefixes `q6`, `q6_prefixes`) in the
    same order, then everything else as given. Only order within one item size matters
    (formats/safetensors.write_file keeps larger items first for alignment)."""
    m = _STACKED_NAME.fullmatch(name)
    if m and m.group(3) in STACKED_PARTS and m.group(2) in _PREFIX_KEY:
        stack, j = _STACK_OF[_PREFIX_KEY[m.group(2)]]
        fmt = int(name.rsplit(".", 1)[0] in q6)
        return (0, fmt, STACKED_PARTS.index(m.group(3)), stack, int(m.group(1)), j)
    return (1,)


def q6_prefixes(tensors: dict) -> frozenset:
    """The linears of {name: array} stored q6 (`linear_format`: a uint8 qweight without zeros)."""
    prefixes = (n[:-len(".qweight")] for n, a in tensors.items() if n.endswith(".qweight") and a.dtype == np.uint8)
    return frozenset(p for p in prefixes if p + ".zeros" not in tensors)


def block_linears(cfg, block: int | None = None):
    """Every block linear (of `block` only, when given): (block index, our name, tensor prefix,
    shape [N, K]), blocks in order."""
    for i in range(cfg.num_hidden_layers) if block is None else (block,):
        for key, (name, shape) in BLOCK_LINEARS.items():
            yield i, key, name.format(i=i), shape(cfg)


def norm_table(cfg) -> dict:
    """Our name -> (tensor name, shape) of every norm a block of this architecture has."""
    arch = getattr(cfg, "arch", None)
    if arch is None:
        return BLOCK_NORMS
    return {**NORM_LAYOUTS[arch.norm_layout], **(QK_NORMS if arch.qk_norm else {})}


def block_norms(cfg, i):
    """Block i's norms: (our name, tensor name, shape [D] or [Dh] for q/k norms)."""
    for key, (name, shape) in norm_table(cfg).items():
        yield key, name.format(i=i), shape(cfg)


def parameter_count(cfg) -> int:
    """Logical parameters (weights as if dense, the tied embedding once), from the config's shapes:
    the denominator of whole-file bits per weight."""
    prod = lambda s: s[0] * (s[1] if len(s) > 1 else 1)
    total = sum(prod(shape(cfg)) for _, shape in GLOBAL_TENSORS.values())
    per_block = sum(prod(shape(cfg)) for _, shape in {**norm_table(cfg), **BLOCK_LINEARS}.values())
    if cfg.attention_bias:
        per_block += sum(BLOCK_LINEARS[k][1](cfg)[0] for k in BIASED)
    total += cfg.num_hidden_layers * per_block
    if not cfg.tie_word_embeddings:
        total += prod(HEAD[1](cfg))
    return total


def check_block_count(src, cfg) -> None:
    """config.json's num_hidden_layers against the blocks the weights hold, before anything is
    built per block: a config claiming a million layers must not cost a million of anything."""
    name = BLOCK_NORMS["attn_norm"][0]
    if name.format(i=cfg.num_hidden_layers - 1) not in src:
        held = sum(1 for i in range(len(src.where)) if name.format(i=i) in src)
        raise CheckpointError(f"config.json says num_hidden_layers = {cfg.num_hidden_layers}, but the "
                              f"weights hold {held} blocks (no {name.format(i=cfg.num_hidden_layers - 1)!r})")


def linear_format(src, prefix: str) -> str | None:
    """How the linear `prefix` is stored, told from the tensor names present (one place decides;
    runtime/linear.py maps each to a class, app/describe.py reports it):
        "f32" / "f16" / "bf16" (any dense dtype, lower-cased)   prefix.weight
        "q4"        minilm-q4 (formats/q4.py)                  prefix.qweight + prefix.zeros
        "awq_gemm"  AutoAWQ GEMM (formats/awq_gemm.py)        prefix.qweight + prefix.qzeros
        "q8"        int8 (formats/q4.py Q8Linear)             prefix.qweight (int8) alone
                    (an lm_head, or the embedding: EMBED_PREFIX)
        "q6"        6-bit codes, 3 bytes per 4                prefix.qweight (uint8) alone
                    (formats/q4.py: layout per file, q6_layout; the kernels' layout mapped)
    None when nothing of it is stored (or a qweight matches no format)."""
    if prefix + ".weight" in src:
        return src.raw(prefix + ".weight")[1].lower()
    if prefix + ".qweight" not in src:
        return None
    if prefix + ".zeros" in src:
        return "q4"
    if prefix + ".qzeros" in src:
        return "awq_gemm"
    return {"I8": "q8", "U8": "q6"}.get(src.raw(prefix + ".qweight")[1])


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
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
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

    def metadata_of(self, name: str) -> dict:
        """The __metadata__ of the file holding tensor `name` (e.g. its q6 layout, formats/q4.py)."""
        return self.files[self.where[name]].metadata

    def check_finite(self, rows_per_chunk: int = 4096) -> None:
        """Every floating-point tensor holds only finite numbers, or a CheckpointError names the
        first that does not: a NaN or infinite weight turns every logit NaN downstream. Chunked,
        so the temporary is a few MB whatever the tensor's size. Run where weights come in to be
        quantized (quantize; import-gguf checks its own); loading does not pay the pass (about
        60 ms on SmolLM2, BENCHMARKS.md) and generation checks its logits instead."""
        for name, fname in self.where.items():
            st = self.files[fname]
            dt = st.dtype(name)
            if dt not in ("F32", "F16", "BF16"):
                continue
            arr = st.tensor(name)
            flat = arr.reshape(arr.shape[0], -1) if arr.ndim > 1 else arr.reshape(1, -1)
            for r in range(0, flat.shape[0], rows_per_chunk):
                if not np.isfinite(to_float32(flat[r:r + rows_per_chunk], dt)).all():
                    raise CheckpointError(f"tensor {name!r} holds NaN or infinite numbers")
            st.release_pages()      # read once: the pages need not stay mapped (RSS of a 3B model)

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


class ArraySource(TensorSource):
    """A TensorSource over arrays in memory ({name: array}, as a folder's safetensors would hold them):
    a model built without writing a folder (the int4 generator of self-generated calibration,
    quant/calibration.py)."""

    def __init__(self, tensors: dict):
        self.files, self.metadata = {}, {}
        self._tensors = tensors
        self.where = {name: "<memory>" for name in tensors}

    def release_pages(self) -> None:
        pass

    def metadata_of(self, name: str) -> dict:
        return self.metadata

    def raw(self, name: str):
        if name not in self._tensors:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint")
        a = self._tensors[name]
        return a, _TAGS[a.dtype.newbyteorder("<")]


def check_shape(name, actual, expected):
    if tuple(actual) != tuple(expected):
        raise CheckpointError(f"tensor {name!r} has shape {list(actual)}, expected {list(expected)}")
