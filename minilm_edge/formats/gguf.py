"""Import a llama.cpp GGUF file (Llama or Gemma 3 architecture) as a Hugging Face style model folder.

`import_gguf(path, out_dir)` writes what the rest of minilm_edge reads:

    config.json              LlamaForCausalLM / Gemma3ForCausalLM hyper-parameters
    model.safetensors        HF tensor names, HF row order, float16 (or float32) weights
    tokenizer.json           byte-level BPE (Llama) or SentencePiece-style BPE with byte fallback
                             (Gemma), rebuilt from the GGUF vocabulary with `tokenizers`
    tokenizer_config.json    chat template and special token strings
    generation_config.json   bos/eos/pad ids (sampling defaults only if the GGUF carries them)

Quantized GGUF tensors (Q4_1, Q8_0, K-quants, ...) are dequantized with `gguf.quants.dequantize`;
the result is exactly the weights llama.cpp computes with, stored in a float format.

Three places where GGUF differs from HF and the import must undo it exactly:
- q/k row order: llama.cpp's converter reorders the rows of q_proj and k_proj for its RoPE layout
  (see `unpermute_rope_rows`); not for Gemma, whose RoPE llama.cpp runs in the rotate-half layout.
- Gemma's norm weights: HF scales by (1 + w); llama.cpp's converter stores w + 1, so the import
  subtracts 1 (in float32, as Hugging Face's own GGUF loader does).
- shapes: GGUF lists dimensions fastest-first (`tensor.shape` is [K, N] for an [N, K] matrix);
  `tensor.data` is already the row-major numpy view, [N, K].

The tokenizer pre-split must reproduce llama.cpp's regexes for `tokenizer.ggml.pre` (llama.cpp,
src/llama-vocab.cpp); names we have not checked raise rather than guess.

Shape vocabulary: V vocab, D hidden, F feed-forward, H heads, Hkv kv heads, Dh head dim, L layers.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, ModelNotFoundError, UnsupportedModelError, UsageError
from .folder import check_free_space, check_out_dir, output_tempdir
from .manifest import file_sha256, provenance, write_manifest

ARCHES = ("llama", "gemma3")     # general.architecture values that can be imported

# Output float formats; numpy has no bfloat16, and fp16 holds every weight of the models we import.
DTYPES = {"float16": np.float16, "float32": np.float32}

# ---------------------------------------------------------------------------------------------
# The name table: GGUF name -> (HF name, expected HF shape, RoPE row permutation to undo).
# `{i}` is the layer index. Shapes use the vocabulary above; QD = H*Dh, KD = Hkv*Dh.
# Permutation "q" undoes llama.cpp's q row order with n_head = H, "k" with n_head = Hkv.
# `output.weight` is optional: without it the model ties lm_head to the embedding.
# ---------------------------------------------------------------------------------------------
TENSOR_TABLE = {
    "token_embd.weight": ("model.embed_tokens.weight", ("V", "D"), None),
    "output_norm.weight": ("model.norm.weight", ("D",), None),
    "output.weight": ("lm_head.weight", ("V", "D"), None),
    "blk.{i}.attn_norm.weight": ("model.layers.{i}.input_layernorm.weight", ("D",), None),
    "blk.{i}.attn_q.weight": ("model.layers.{i}.self_attn.q_proj.weight", ("QD", "D"), "q"),
    "blk.{i}.attn_k.weight": ("model.layers.{i}.self_attn.k_proj.weight", ("KD", "D"), "k"),
    "blk.{i}.attn_v.weight": ("model.layers.{i}.self_attn.v_proj.weight", ("KD", "D"), None),
    "blk.{i}.attn_output.weight": ("model.layers.{i}.self_attn.o_proj.weight", ("D", "QD"), None),
    "blk.{i}.ffn_norm.weight": ("model.layers.{i}.post_attention_layernorm.weight", ("D",), None),
    "blk.{i}.ffn_gate.weight": ("model.layers.{i}.mlp.gate_proj.weight", ("F", "D"), None),
    "blk.{i}.ffn_up.weight": ("model.layers.{i}.mlp.up_proj.weight", ("F", "D"), None),
    "blk.{i}.ffn_down.weight": ("model.layers.{i}.mlp.down_proj.weight", ("D", "F"), None),
}
# Gemma 3: no q/k permutation (llama.cpp's Gemma RoPE is rotate-half, "NEOX"), q/k norms per head
# ([Dh]), four block norms, and every norm stored as w + 1 ("norm": subtract the 1 again).
# Note the names: llama.cpp's ffn_norm is Gemma's pre_feedforward_layernorm, and Gemma's
# post_attention_layernorm is the norm on the attention output (post_attention_norm).
GEMMA3_TENSOR_TABLE = {
    "token_embd.weight": ("model.embed_tokens.weight", ("V", "D"), None),
    "output_norm.weight": ("model.norm.weight", ("D",), "norm"),
    "output.weight": ("lm_head.weight", ("V", "D"), None),
    "blk.{i}.attn_norm.weight": ("model.layers.{i}.input_layernorm.weight", ("D",), "norm"),
    "blk.{i}.attn_q.weight": ("model.layers.{i}.self_attn.q_proj.weight", ("QD", "D"), None),
    "blk.{i}.attn_k.weight": ("model.layers.{i}.self_attn.k_proj.weight", ("KD", "D"), None),
    "blk.{i}.attn_v.weight": ("model.layers.{i}.self_attn.v_proj.weight", ("KD", "D"), None),
    "blk.{i}.attn_q_norm.weight": ("model.layers.{i}.self_attn.q_norm.weight", ("Dh",), "norm"),
    "blk.{i}.attn_k_norm.weight": ("model.layers.{i}.self_attn.k_norm.weight", ("Dh",), "norm"),
    "blk.{i}.attn_output.weight": ("model.layers.{i}.self_attn.o_proj.weight", ("D", "QD"), None),
    "blk.{i}.post_attention_norm.weight": ("model.layers.{i}.post_attention_layernorm.weight", ("D",), "norm"),
    "blk.{i}.ffn_norm.weight": ("model.layers.{i}.pre_feedforward_layernorm.weight", ("D",), "norm"),
    "blk.{i}.ffn_gate.weight": ("model.layers.{i}.mlp.gate_proj.weight", ("F", "D"), None),
    "blk.{i}.ffn_up.weight": ("model.layers.{i}.mlp.up_proj.weight", ("F", "D"), None),
    "blk.{i}.ffn_down.weight": ("model.layers.{i}.mlp.down_proj.weight", ("D", "F"), None),
    "blk.{i}.post_ffw_norm.weight": ("model.layers.{i}.post_feedforward_layernorm.weight", ("D",), "norm"),
}
TENSOR_TABLES = {"llama": TENSOR_TABLE, "gemma3": GEMMA3_TENSOR_TABLE}
OPTIONAL_TENSORS = {"output.weight"}
# Gemma 3 as llama.cpp runs it (src/llama-model.cpp): every 6th layer global, the others a sliding
# window with RoPE base 10000; scores scaled by Dh^-1/2 (all sizes but the 27B, which is refused).
GEMMA3_SLIDING_PATTERN = 6
GEMMA3_LOCAL_ROPE_BASE = 10000.0
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(.+)")


def import_gguf(gguf_path, out_dir, *, dtype: str = "float16", progress: bool = True) -> Path:
    """Convert a Llama GGUF file into an HF style folder at `out_dir` and return its path.

    Everything is written into a temporary folder next to `out_dir` and renamed at the end, so
    `out_dir` either appears complete or not at all (also on error or Ctrl-C).
    """
    if dtype not in DTYPES:
        raise UsageError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    reader = _open_gguf(Path(gguf_path))
    meta = _read_meta(reader)
    n_values = sum(int(np.prod([int(n) for n in t.shape], dtype=np.int64)) for t in reader.tensors)
    check_free_space(out_dir, n_values * np.dtype(DTYPES[dtype]).itemsize)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_tempdir(out_dir, "importing")
    try:
        _write_model_dir(reader, meta, tmp, dtype, progress)
        gguf = {"file": Path(gguf_path).name, "sha256": file_sha256(Path(gguf_path))}
        write_manifest(tmp, {"kind": "import-gguf", "gguf_sha256": gguf["sha256"], "dtype": dtype},
                       provenance(source=gguf, method=f"import-gguf --dtype {dtype}"))
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); a portable rename needs the name free
        try:
            os.rename(tmp, out_dir)
        except OSError as err:
            raise UsageError(f"{out_dir} was created by another process during the import; "
                             f"nothing was written there") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_model_dir(reader, meta: dict, folder: Path, dtype: str, progress: bool) -> None:
    from safetensors.numpy import save_file

    # The tokenizer first: it is quick, and an unsupported vocabulary should fail before the weights.
    # Compact JSON: Gemma's 262k-entry vocabulary and 513k merges take 14 MB so, 33 MB indented
    # (it counts against the folder's size, issue 17).
    _build_tokenizer(meta).save(str(folder / "tokenizer.json"), pretty=False)
    dims = _dims(meta, len(reader.tensors))
    tensors = _convert_tensors(reader, meta["general.architecture"], dims, DTYPES[dtype], progress)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(folder / "model.safetensors", 0o644)  # safetensors creates it owner-only
    tied = "lm_head.weight" not in tensors
    _write_json(folder / "config.json", _hf_config(meta, dims, tie_word_embeddings=tied, dtype=dtype))
    _write_json(folder / "tokenizer_config.json", _tokenizer_config(meta))
    _write_json(folder / "generation_config.json", _generation_config(meta))


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Reading the GGUF header
# ---------------------------------------------------------------------------------------------
def _open_gguf(path: Path):
    from gguf import GGUFReader

    if not path.exists():
        raise ModelNotFoundError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise UsageError(f"{path} is not a file; pass the path of a .gguf file")
    try:
        reader = GGUFReader(path)  # memory-maps the file; nothing is copied yet
    except (ValueError, IndexError, KeyError, OverflowError) as err:
        raise CheckpointError(f"{path} is not a readable GGUF file (truncated or not GGUF): {err}") from err
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise CheckpointError(f"{path} is truncated: tensor {t.name} ends at byte "
                                  f"{t.data_offset + t.n_bytes}, the file has {size}")
    return reader


def _read_meta(reader) -> dict:
    """All key/value fields as plain Python values, with the architecture checked."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as err:
            raise CheckpointError(f"GGUF field {key} cannot be read: {err}") from err
    arch = meta.get("general.architecture")
    if arch not in ARCHES:
        raise UnsupportedModelError(f"GGUF architecture is {arch!r}; only {' and '.join(map(repr, ARCHES))} "
                                    "models can be imported")
    refused = [(f"{arch}.expert_count", "mixture-of-experts")]
    if arch == "llama":
        refused.append(("llama.attention.sliding_window", "sliding-window attention"))
    else:
        refused += [(f"{arch}.final_logit_softcapping", "logit soft-capping"),
                    (f"{arch}.attn_logit_softcapping", "logit soft-capping")]
    for key, what in refused:
        if meta.get(key):
            raise UnsupportedModelError(f"this GGUF uses {what} ({key}), which minilm_edge does not run")
    return meta


def _require(meta: dict, key: str):
    if key not in meta:
        raise CheckpointError(f"GGUF metadata lacks {key!r}")
    return meta[key]


def _count(meta: dict, key: str, default=None) -> int:
    """A positive whole number from the metadata (a count or a size), or a CheckpointError naming it."""
    v = _require(meta, key) if default is None else meta.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise CheckpointError(f"GGUF metadata {key} must be a positive whole number, got {v!r}")
    return int(v)


def _dims(meta: dict, n_tensors: int) -> dict:
    """The shape vocabulary's values for this model; counts checked before anything is sized by
    them (a 370 KB file claiming a billion blocks must not cost a billion of anything)."""
    a = meta["general.architecture"]
    d, h = _count(meta, f"{a}.embedding_length"), _count(meta, f"{a}.attention.head_count")
    hkv = _count(meta, f"{a}.attention.head_count_kv", h)
    dh = _count(meta, f"{a}.attention.key_length", max(d // h, 1))
    if _count(meta, f"{a}.attention.value_length", dh) != dh:
        raise UnsupportedModelError("key and value head sizes differ; Llama models use one head_dim")
    if _count(meta, f"{a}.rope.dimension_count", dh) != dh:
        raise UnsupportedModelError("RoPE covers only part of each head (partial rotary); not a Llama model")
    if h % hkv:
        raise CheckpointError(f"head_count {h} is not a multiple of head_count_kv {hkv}")
    n_blocks = _count(meta, f"{a}.block_count")
    per_block = sum(1 for name in TENSOR_TABLES[a] if "{i}" in name)
    if n_blocks * per_block > n_tensors:
        raise CheckpointError(f"GGUF metadata {a}.block_count is {n_blocks}, but the file holds only "
                              f"{n_tensors} tensors ({per_block} per block)")
    vocab = _count(meta, f"{a}.vocab_size", len(meta.get("tokenizer.ggml.tokens", ())) or None)
    return {"V": vocab, "D": d, "F": _count(meta, f"{a}.feed_forward_length"),
            "H": h, "Hkv": hkv, "Dh": dh, "QD": h * dh, "KD": hkv * dh, "L": n_blocks}


def _hf_config(meta: dict, dims: dict, *, tie_word_embeddings: bool, dtype: str) -> dict:
    if meta["general.architecture"] == "gemma3":
        return _gemma3_config(meta, dims, tie_word_embeddings=tie_word_embeddings, dtype=dtype)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dims["D"],
        "intermediate_size": dims["F"],
        "num_hidden_layers": dims["L"],
        "num_attention_heads": dims["H"],
        "num_key_value_heads": dims["Hkv"],
        "head_dim": dims["Dh"],
        "hidden_act": "silu",
        "rms_norm_eps": float(_require(meta, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),  # llama.cpp's default
        "max_position_embeddings": int(_require(meta, "llama.context_length")),
        "vocab_size": dims["V"],
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": dtype,
    }
    if "tokenizer.ggml.padding_token_id" in meta:
        config["pad_token_id"] = meta["tokenizer.ggml.padding_token_id"]
    rope_scaling = _rope_scaling(meta)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _gemma3_config(meta: dict, dims: dict, *, tie_word_embeddings: bool, dtype: str) -> dict:
    """Gemma3ForCausalLM's config.json; what GGUF does not store is llama.cpp's fixed Gemma 3 layout."""
    if dims["D"] == 5376:       # the 27B: llama.cpp scales its scores by (D/H)^-1/2, not Dh^-1/2
        raise UnsupportedModelError("Gemma 3 27B's attention scale is not implemented here")
    layer_types = ["full_attention" if (i + 1) % GEMMA3_SLIDING_PATTERN == 0 else "sliding_attention"
                   for i in range(dims["L"])]
    config = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": dims["D"],
        "intermediate_size": dims["F"],
        "num_hidden_layers": dims["L"],
        "num_attention_heads": dims["H"],
        "num_key_value_heads": dims["Hkv"],
        "head_dim": dims["Dh"],
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": float(_require(meta, "gemma3.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get("gemma3.rope.freq_base", 1_000_000.0)),
        "rope_local_base_freq": GEMMA3_LOCAL_ROPE_BASE,
        "sliding_window": _count(meta, "gemma3.attention.sliding_window"),
        "layer_types": layer_types,
        "query_pre_attn_scalar": dims["Dh"],
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "max_position_embeddings": int(_require(meta, "gemma3.context_length")),
        "vocab_size": dims["V"],
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": dtype,
    }
    if meta.get("gemma3.rope.scaling.type") not in (None, "none"):
        raise UnsupportedModelError("this Gemma 3 GGUF uses RoPE scaling, which is not implemented here")
    return config


def _rope_scaling(meta: dict) -> dict | None:
    kind = meta.get("llama.rope.scaling.type")
    factor = meta.get("llama.rope.scaling.factor", meta.get("llama.rope.scale_linear"))
    if kind is None and factor is not None:
        kind = "linear"  # older converters wrote only llama.rope.scale_linear
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "type": "linear", "factor": float(factor)}
    if kind == "yarn":
        return {"rope_type": "yarn", "type": "yarn", "factor": float(factor),
                "original_max_position_embeddings": int(_require(meta, "llama.rope.scaling.original_context_length"))}
    raise UnsupportedModelError(f"RoPE scaling type {kind!r} in this GGUF is not supported (linear and yarn are)")


# ---------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------
def unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order so that RoPE is HF's rotate-half.

    HF's rotate-half pairs dimension j of a head with j + Dh/2; llama.cpp's RoPE pairs adjacent
    rows 2j and 2j+1. So convert_hf_to_gguf.py interleaves the two halves of every head:
    HF rows [a0 .. a(Dh/2-1), b0 .. b(Dh/2-1)] become GGUF rows [a0, b0, a1, b1, ...], i.e.

        gguf = hf.reshape(n_head, 2, Dh/2, K).swapaxes(1, 2).reshape(N, K)

    with n_head = H for q and Hkv for k. The inverse reads each head's rows as (Dh/2, 2) pairs:

        hf = gguf.reshape(n_head, Dh/2, 2, K).swapaxes(1, 2).reshape(N, K)
    """
    n, k = w.shape
    assert n % (2 * n_head) == 0, (w.shape, n_head)
    return w.reshape(n_head, n // n_head // 2, 2, k).swapaxes(1, 2).reshape(n, k)


def _hf_name(table: dict, gguf_name: str, n_layers: int) -> tuple[str, tuple, str | None]:
    """Look a GGUF tensor name up in the architecture's table: (HF name, shape symbols, fix-up)."""
    key, layer = gguf_name, None
    m = _LAYER_NAME.fullmatch(gguf_name)
    if m:
        layer, key = int(m.group(1)), "blk.{i}." + m.group(2)
    if key not in table:
        hint = " (llama3-style RoPE frequency factors)" if gguf_name == "rope_freqs.weight" else ""
        raise UnsupportedModelError(f"GGUF tensor {gguf_name}{hint} has no counterpart in a Llama model here")
    if layer is not None and layer >= n_layers:
        raise CheckpointError(f"GGUF tensor {gguf_name} names layer {layer}, but block_count is {n_layers}")
    hf, shape, perm = table[key]
    return hf.format(i=layer), shape, perm


def _expected_names(table: dict, n_layers: int) -> set[str]:
    names = set()
    for key in table:
        if key in OPTIONAL_TENSORS:
            continue
        names.update({key.format(i=i) for i in range(n_layers)} if "{i}" in key else {key})
    return names


def _convert_tensors(reader, arch: str, dims: dict, dtype, progress: bool) -> dict[str, np.ndarray]:
    """Dequantize, check, un-permute and cast every tensor; returns {HF name: array}."""
    from gguf.quants import dequantize
    from tqdm import tqdm

    table = TENSOR_TABLES[arch]
    missing = _expected_names(table, dims["L"]) - {t.name for t in reader.tensors}
    if missing:
        raise CheckpointError(f"GGUF lacks tensors: {', '.join(sorted(missing)[:5])}")
    out = {}
    for t in tqdm(reader.tensors, desc="import tensors", unit="tensor", file=sys.stderr, disable=not progress):
        hf, symbols, fix = _hf_name(table, t.name, dims["L"])
        expected = tuple(dims[s] for s in symbols)
        # GGUF lists dimensions fastest-first: shape [K, N] is the numpy array [N, K].
        if tuple(int(n) for n in reversed(t.shape)) != expected:
            raise CheckpointError(f"GGUF tensor {t.name}: expected shape {expected} (HF order), "
                                  f"got {tuple(int(n) for n in reversed(t.shape))}")
        try:
            w = dequantize(t.data, t.tensor_type).reshape(expected)  # float32
        except NotImplementedError as err:
            raise UnsupportedModelError(f"GGUF tensor {t.name} has type {t.tensor_type.name}, "
                                        f"which the gguf package cannot dequantize") from err
        if not np.isfinite(w).all():
            raise CheckpointError(f"GGUF tensor {t.name} holds NaN or infinite numbers")
        if fix in ("q", "k"):
            w = unpermute_rope_rows(w, dims["H"] if fix == "q" else dims["Hkv"])
        elif fix == "norm":
            w = w - np.float32(1.0)             # llama.cpp stored Gemma's w + 1
        out[hf] = _cast(w, dtype, t.name)
    return out


def _cast(w: np.ndarray, dtype, name: str) -> np.ndarray:
    cast = np.ascontiguousarray(w, dtype=dtype)
    if dtype is np.float16 and np.isinf(cast).any() and not np.isinf(w).any():
        raise CheckpointError(f"GGUF tensor {name} has values beyond the float16 range "
                              f"(max |w| = {np.abs(w).max():.3g}); import with dtype='float32'")
    return cast


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
def _pre_tokenizer(pre: str):
    """HF pre-tokenizer equal to llama.cpp's regex split for `tokenizer.ggml.pre`.

    llama.cpp (src/llama-vocab.cpp) splits with a list of regexes applied one after the other,
    keeping matches and the text between them as pieces, then maps bytes to the GPT-2 alphabet:
      "smollm": `\\p{N}`, then the GPT-2 pattern
      "gpt-2":  the GPT-2 pattern
    GPT-2 pattern: 's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)
    In HF terms, `\\p{N}` is Digits(individual_digits=True), and ByteLevel(use_regex=True) is the
    GPT-2 pattern (HF adds a trailing `|\\s+`, which only names the leftover that llama.cpp keeps
    anyway) followed by the byte mapping.
    """
    from tokenizers import pre_tokenizers as pt

    def gpt2():
        return pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)

    table = {
        "smollm": lambda: pt.Sequence([pt.Digits(individual_digits=True), gpt2()]),
        "gpt-2": gpt2,
    }
    if pre not in table:
        raise UnsupportedModelError(
            f"GGUF tokenizer pre-split {pre!r} is not supported (known: {', '.join(sorted(table))}); "
            f"its regexes would have to be checked against llama.cpp before use")
    return table[pre]()


def _build_tokenizer(meta: dict):
    """Byte-level BPE tokenizer from tokenizer.ggml.{tokens, merges, token_type, pre}.

    Token ids are the GGUF list positions. Control tokens (type 3) become special added tokens:
    parsed from text only when special tokens are parsed, skipped when decoding with
    skip_special_tokens. User-defined tokens (type 4) become added tokens that are not special,
    because llama.cpp splits them out of text even when it does not parse control tokens.
    """
    from gguf import TokenType
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    model = meta.get("tokenizer.ggml.model")
    if model == "llama":
        return _build_spm_tokenizer(meta)
    if model != "gpt2":
        raise UnsupportedModelError(f"GGUF tokenizer model {model!r} is not supported; only byte-level BPE "
                                    "('gpt2') and SentencePiece BPE ('llama')")
    tokens = list(_require(meta, "tokenizer.ggml.tokens"))
    types = list(meta.get("tokenizer.ggml.token_type", [TokenType.NORMAL] * len(tokens)))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise CheckpointError("GGUF vocabulary has duplicate token strings; ids would be ambiguous")
    merges = [tuple(m.split(" ")) for m in _require(meta, "tokenizer.ggml.merges")]
    bad = next((m for m in merges if len(m) != 2 or m[0] not in vocab or m[1] not in vocab
                or m[0] + m[1] not in vocab), None)
    if bad is not None:
        raise CheckpointError(f"GGUF merge {' '.join(bad)!r} is not a pair of vocabulary tokens whose join is one")
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, fuse_unk=False,
                                   byte_fallback=False, ignore_merges=False))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:      # tokenizers reports some bad vocabularies as a Rust panic (a BaseException)
        raise CheckpointError(f"GGUF vocabulary and merges do not make a BPE tokenizer: {e}") from None
    tok.normalizer = None
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == TokenType.CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == TokenType.USER_DEFINED])
    tok.post_processor = _post_processor(meta, tokens, processors, processors.ByteLevel(trim_offsets=False))
    return tok


SPM_SPACE = "\u2581"     # "▁": SentencePiece's visible space


def spm_merges(tokens: list, scores: list, types: list) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece BPE's (and llama.cpp's "llama" tokenizer's) rule:
    repeatedly join the adjacent pair whose join is the vocabulary piece with the highest score.

    Every split of a normal piece into two vocabulary pieces is a merge, ranked by the score of
    the joined piece (higher first; ties by the ids of the left and right piece), as the
    `tokenizers` library's own conversion of SentencePiece models does."""
    from gguf import TokenType

    vocab = {t: i for i, t in enumerate(tokens) if types[i] == TokenType.NORMAL}
    ranked = []
    for piece, i in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _build_spm_tokenizer(meta: dict):
    """SentencePiece-style BPE (tokenizer.ggml.model "llama": Gemma) from tokens, scores and types.

    Spaces become "▁" (no prefix space is added unless tokenizer.ggml.add_space_prefix says so);
    pieces merge by score (`spm_merges`); a character outside the vocabulary falls back to its UTF-8
    bytes, the <0xNN> tokens (type 6). Control and user-defined tokens are handled as in
    `_build_tokenizer`. Decoding maps "▁" back to spaces and byte tokens back to bytes.
    """
    from gguf import TokenType
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    tokens = list(_require(meta, "tokenizer.ggml.tokens"))
    scores = list(_require(meta, "tokenizer.ggml.scores"))
    types = list(meta.get("tokenizer.ggml.token_type", [TokenType.NORMAL] * len(tokens)))
    if not len(scores) == len(types) == len(tokens):
        raise CheckpointError("GGUF tokens, scores and token types differ in length")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise CheckpointError("GGUF vocabulary has duplicate token strings; ids would be ambiguous")
    unk = _token(meta, tokens, "unk")
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=spm_merges(tokens, scores, types), dropout=None,
                                   unk_token=unk, fuse_unk=True, byte_fallback=True, ignore_merges=False))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:      # a Rust panic is a BaseException
        raise CheckpointError(f"GGUF vocabulary does not make a BPE tokenizer: {e}") from None
    steps = [normalizers.Replace(" ", SPM_SPACE)]
    if meta.get("tokenizer.ggml.add_space_prefix", False):
        steps.insert(0, normalizers.Prepend(SPM_SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = None
    dec = [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if meta.get("tokenizer.ggml.add_space_prefix", False):
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == TokenType.CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == TokenType.USER_DEFINED])
    tok.post_processor = _post_processor(meta, tokens, processors, None)
    return tok


def _post_processor(meta: dict, tokens: list, processors, byte_level):
    """`byte_level` (offsets only; None for SentencePiece), plus BOS/EOS templates when the GGUF asks
    to add them."""
    added = {}  # "bos"/"eos" -> token string, for those the GGUF adds to every sequence
    for which in ("bos", "eos"):
        if meta.get(f"tokenizer.ggml.add_{which}_token", False):
            added[which] = _token(meta, tokens, which)
            if added[which] is None:
                raise CheckpointError(f"GGUF asks to add a {which} token but has no {which} token id")
    if not added:
        return byte_level
    pre = [added["bos"]] if "bos" in added else []
    post = [added["eos"]] if "eos" in added else []
    single = " ".join([*pre, "$A", *post])
    pair = " ".join([*pre, "$A", *post, *pre, "$B:1", *post])
    specials = [(t, tokens.index(t)) for t in added.values()]
    template = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    return template if byte_level is None else processors.Sequence([byte_level, template])


def _token(meta: dict, tokens: list, which: str) -> str | None:
    """The string of tokenizer.ggml.{which}_token_id, or None when the GGUF has no such id."""
    key = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
           "pad": "tokenizer.ggml.padding_token_id", "unk": "tokenizer.ggml.unknown_token_id"}[which]
    if key not in meta:
        return None
    try:
        i = int(meta[key])
    except (TypeError, ValueError, OverflowError):
        raise CheckpointError(f"{key} = {meta[key]!r} is not a token id") from None
    if not 0 <= i < len(tokens):
        raise CheckpointError(f"{key} = {i} is outside the vocabulary (size {len(tokens)})")
    return tokens[i]


def _tokenizer_config(meta: dict) -> dict:
    tokens = meta["tokenizer.ggml.tokens"]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _token(meta, tokens, "bos"),
        "eos_token": _token(meta, tokens, "eos"),
        "pad_token": _token(meta, tokens, "pad"),
        "unk_token": _token(meta, tokens, "unk"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_require(meta, f"{meta['general.architecture']}.context_length")),
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config


# GGUF general.sampling.* -> HF generation_config field
_SAMPLING_FIELDS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_k": "top_k",
    "general.sampling.top_p": "top_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}


def _generation_config(meta: dict) -> dict:
    config = {"bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
              "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
              "pad_token_id": meta.get("tokenizer.ggml.padding_token_id")}
    sampling = {hf: meta[key] for key, hf in _SAMPLING_FIELDS.items() if key in meta}
    if sampling:
        config.update(do_sample=True, **sampling)
    return config
