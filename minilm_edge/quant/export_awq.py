"""Export a native minilm-q4 model folder as an AutoAWQ "GEMM" folder (the layout and its limits:
formats/awq_gemm.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import QuantFormatError, UsageError
from ..formats.awq_gemm import QUANT_METHOD, awq_quantization_config, q4_to_awq, regroup


def export_awq(model_dir, out_dir, *, regroup_layers: bool = True) -> tuple[Path, dict]:
    """Write the native minilm-q4 model `model_dir` as an AutoAWQ GEMM folder `out_dir` (fp16
    non-quantized tensors, tokenizer files copied, written to a temp folder and renamed into place).

    Returns (out_dir, {layer prefix: original group size} of the layers that were re-grouped).
    """
    from ..formats.folder import check_free_space, check_out_dir, write_model_folder
    from ..formats.q4 import Q4Linear
    from ..formats.safetensors import to_float32
    from ..formats.tensors import TensorSource, block_linears, check_block_count
    from ..runtime.config import load_config

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_out_dir(out_dir)
    cfg = load_config(model_dir)
    qc = cfg.quantization or {}
    if qc.get("quant_method") != "minilm-q4":
        what = "an AutoAWQ model already" if qc.get("quant_method") == QUANT_METHOD else "not a minilm-q4 model"
        raise UsageError(f"{model_dir} is {what}; export-awq takes a folder written by `quantize`")
    src = TensorSource(model_dir)
    check_block_count(src, cfg)
    # AutoAWQ keeps what is not quantized in fp16: at most twice the bytes of the native folder.
    check_free_space(out_dir, 2 * sum(Path(st.path).stat().st_size for st in src.files.values()))
    if "lm_head.qweight" in src:
        raise UsageError("lm_head is quantized, but AutoAWQ keeps lm_head in fp16; "
                         "quantize without --quantize-head to export")
    if "model.embed_tokens.qweight" in src:
        raise UsageError("the embedding is quantized (int8 or q6), but AutoAWQ keeps it in fp16; quantize with "
                         "--embed fp16 to export")

    layers = {}                                                              # prefix -> Q4Linear
    for _, _, prefix, _ in block_linears(cfg):
        qweight, scales = src.raw(prefix + ".qweight")[0], src.raw(prefix + ".scales")[0]
        sal_idx, sal_w = (src.raw(prefix + s)[0] if prefix + s in src else None for s in (".salient_idx", ".salient_w"))
        try:
            q4 = Q4Linear(qweight, scales, src.raw(prefix + ".zeros")[0], 2 * qweight.shape[1] // scales.shape[1],
                          sal_idx, sal_w)
        except QuantFormatError as e:
            raise QuantFormatError(f"{prefix}: {e}") from None
        if q4.n_salient:
            raise UsageError(f"{prefix} keeps {q4.n_salient} fp16 salient channels, which AutoAWQ cannot "
                             "store; quantize without salient channels to export")
        layers[prefix] = q4

    g = min(q.group_size for q in layers.values())
    regrouped = {p: q.group_size for p, q in layers.items() if q.group_size != g}
    if regrouped and not regroup_layers:
        sizes = sorted({q.group_size for q in layers.values()})
        raise UsageError(f"the model uses group sizes {sizes} in different layers, but AutoAWQ uses one for "
                         f"the whole model; quantize with --group-size {g} (or export with re-grouping)")

    tensors = {}
    for prefix, q4 in layers.items():
        qweight, qzeros, scales = q4_to_awq(regroup(q4, g) if q4.group_size != g else q4)
        tensors[prefix + ".qweight"], tensors[prefix + ".qzeros"], tensors[prefix + ".scales"] = qweight, qzeros, scales
    quant_suffixes = (".qweight", ".scales", ".zeros", ".salient_idx", ".salient_w")
    for name in src.where:                                                   # everything else: fp16
        if name.endswith(quant_suffixes) and name.rsplit(".", 1)[0] in layers:
            continue
        arr, dt = src.raw(name)
        tensors[name] = arr if dt == "F16" else to_float32(arr, dt).astype(np.float16)

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    config["torch_dtype"] = "float16"
    config["quantization_config"] = awq_quantization_config(g)
    # Provenance survives the export in a key AutoAWQ and transformers ignore.
    config["minilm_edge"] = {"exported_from": qc, "regrouped_layers": regrouped}
    return write_model_folder(model_dir, out_dir, tensors, config), regrouped
