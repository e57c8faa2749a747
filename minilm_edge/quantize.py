"""Write a quantized model folder (minilm-q4 v1) from a full-precision one.

`quantize(src, out, method="rtn")` rounds every block linear to int4 per group (q4.py, DESIGN §4);
embeddings and norms are stored fp16, and lm_head fp16 unless `quantize_head` asks for int8/int4.
The output is a complete model folder (tokenizer and chat template files are copied), written to a
temporary folder next to `out` and renamed into place at the end: an interrupted run leaves nothing.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .checkpoint import BLOCK_LINEARS, BLOCK_NORMS, GLOBAL_TENSORS, HEAD, TensorSource
from .config import load_config
from .errors import UsageError

# Files copied verbatim so the output is a complete model folder.
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                "special_tokens_map.json")
HEAD_FORMATS = ("int8", "int4")


def _tool_version():
    from . import __version__
    return f"minilm_edge {__version__}"


def check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UsageError(f"{out_dir} exists and is not an empty folder; choose a new output folder")


def write_model_folder(src_dir: Path, out_dir: Path, tensors: dict, config: dict) -> Path:
    """Write tensors + config + copied tokenizer files into a temp folder, then rename it to out_dir."""
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for name in COPIED_FILES:
            if (src_dir / name).is_file():
                shutil.copy2(src_dir / name, tmp / name)
        if out_dir.exists():
            out_dir.rmdir()               # empty (checked above); rename needs it gone
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _progress(total, desc, enabled):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="layer", disable=not enabled, leave=False)


def quantize(src_dir, out_dir, *, method: str = "rtn", bits: int = 4, group_size: int = 128,
             quantize_head: str | None = None, progress: bool = True, linear_hook=None,
             extra_config: dict | None = None) -> Path:
    """Quantize every block linear of `src_dir` and write the model folder `out_dir`.

    `linear_hook(layer, name, w) -> (w, salient_idx)` lets a method (AWQ) transform a block's weight
    before rounding; RTN uses the weights as they are.
    """
    from .q4 import GROUP_SIZES, choose_group_size, quantize_q4, quantize_q8

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if bits not in (3, 4):
        raise UsageError(f"--bits must be 3 or 4 for the packed int4 format, got {bits}")
    if group_size not in GROUP_SIZES:
        raise UsageError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    if quantize_head not in (None, *HEAD_FORMATS):
        raise UsageError(f"--quantize-head must be one of {', '.join(HEAD_FORMATS)}, got {quantize_head}")
    check_out_dir(out_dir)
    cfg = load_config(src_dir)
    if cfg.quantization:
        raise UsageError(f"{src_dir} is already quantized; quantize a full-precision model")
    for key, (name, shape) in BLOCK_LINEARS.items():     # fail before any work if a layer can't be stored
        choose_group_size(shape(cfg)[1], group_size)
    src = TensorSource(src_dir)
    out: dict[str, np.ndarray] = {}
    per_layer_g = {}

    for key, (name, shape) in GLOBAL_TENSORS.items():
        out[name] = src.float32(name, shape(cfg)).astype(np.float16)
    bar = _progress(cfg.num_hidden_layers, f"quantize ({method}, W{bits})", progress)
    for i in range(cfg.num_hidden_layers):
        for key, (name, shape) in BLOCK_NORMS.items():
            out[name.format(i=i)] = src.float32(name.format(i=i), shape(cfg)).astype(np.float16)
        for key, (name, shape) in BLOCK_LINEARS.items():
            prefix = name.format(i=i)
            w = src.float32(prefix + ".weight", shape(cfg))
            salient = None
            if linear_hook is not None:
                w, salient = linear_hook(i, key, w)
            g = choose_group_size(w.shape[1], group_size)
            if g != group_size:
                per_layer_g[prefix] = g
            q = quantize_q4(w, g, salient_idx=salient, bits=bits)
            out[prefix + ".qweight"], out[prefix + ".scales"], out[prefix + ".zeros"] = q.qweight, q.scales, q.zeros
            if q.salient_idx is not None:
                out[prefix + ".salient_idx"], out[prefix + ".salient_w"] = q.salient_idx, q.salient_w
            if cfg.attention_bias and key in ("q", "k", "v"):
                out[prefix + ".bias"] = src.float32(prefix + ".bias", (shape(cfg)[0],))
        bar.update(1)
    bar.close()

    head_name, head_shape = HEAD
    head_src = "model.embed_tokens.weight" if cfg.tie_word_embeddings else head_name + ".weight"
    if quantize_head or not cfg.tie_word_embeddings:
        w = src.float32(head_src, head_shape(cfg))
        if quantize_head == "int8":
            q8 = quantize_q8(w, choose_group_size(w.shape[1], group_size))
            out[head_name + ".qweight"], out[head_name + ".scales"] = q8.qweight, q8.scales
        elif quantize_head == "int4":
            q = quantize_q4(w, choose_group_size(w.shape[1], group_size))
            out[head_name + ".qweight"], out[head_name + ".scales"], out[head_name + ".zeros"] = q.qweight, q.scales, q.zeros
        else:
            out[head_name + ".weight"] = w.astype(np.float16)

    config = json.loads((src_dir / "config.json").read_text(encoding="utf-8"))
    config["torch_dtype"] = "float16"
    config["quantization_config"] = {
        "quant_method": "minilm-q4", "format_version": 1, "method": method, "bits": bits,
        "group_size": group_size, "group_size_per_layer": per_layer_g, "zero_point": True,
        "lm_head": quantize_head or "float16", "tool": _tool_version(),
        "source": {"path": str(src_dir.resolve()), "weights_sha256": _weights_digest(src)},
        **(extra_config or {}),
    }
    return write_model_folder(src_dir, out_dir, out, config)


def _weights_digest(src: TensorSource) -> str:
    """sha256 over the source's safetensors files (names and bytes), in name order: provenance."""
    h = hashlib.sha256()
    for fname in sorted(src.files):
        h.update(fname.encode())
        with open(src.files[fname].path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()
