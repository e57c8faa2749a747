"""What is in a model folder: architecture, size, storage format and quantization provenance, and
per layer how each linear is stored. Reads only config.json, the safetensors headers (no weights
are read, except salient-channel counts, which are shapes) and, when present, `report.json` written
next to a quantized model by the quantizer.

`describe(model_dir, layers=False) -> dict` is JSON-able; `format_text(info) -> str` renders it.

Bits per weight (bpw) are measured from what is stored, not from the format's formula:
    bpw of a linear   = 8 · (bytes of all its tensors except the bias) / (N · K)
so a minilm-q4 linear at g = 64 shows 4.375 (codes + fp16 scale + uint8 zero per group), an fp16
one 16. `linear_bpw` is that ratio over every block linear together; `file_bpw` divides the whole
weight files (embedding, head, norms, headers included) by the parameter count (the tied embedding
counted once): the number to set beside llama.cpp's file size × 8 / parameters. `folder_bytes` is
every file of the folder (tokenizer and configs too), what a budget like --max-size counts.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import IntegrityError, QuantFormatError, UnsupportedModelError
from ..formats.manifest import manifest_digest, read_manifest
from ..formats.tensors import (
    EMBED_PREFIX,
    HEAD,
    TensorSource,
    block_linears,
    check_block_count,
    linear_format,
    parameter_count,
)
from ..quant.awq import SCALE_GROUPS
from ..runtime.config import load_config, read_json

DENSE_BITS = {"F32": 32, "F16": 16, "BF16": 16}
# quantization_config keys shown by name, in this order; any other key is shown as stored.
PROVENANCE_KEYS = ("quant_method", "format_version", "method", "bits", "group_size", "group_size_per_layer",
                   "zero_point", "version", "lm_head", "salient_fraction", "calibration", "source", "tool")


def _tensor_bytes(src: TensorSource, name: str) -> int:
    st = src.files[src.where[name]]
    _, _, begin, end = st.entries[name]
    return end - begin


def _linear_info(src: TensorSource, prefix: str, shape: tuple, bits: int | None) -> dict:
    n, k = shape
    fmt = linear_format(src, prefix) or "missing"
    stored = sum(_tensor_bytes(src, t) for t in src.where if t.startswith(prefix + ".") and t != prefix + ".bias")
    info = {"format": fmt, "shape": [n, k], "bpw": round(8 * stored / (n * k), 4), "bytes": stored}
    scales = src.raw(prefix + ".scales")[0] if prefix + ".scales" in src else None
    if fmt in ("q4", "awq_gemm", "q8", "q6") and (scales is None or scales.ndim != 2):
        raise QuantFormatError(f"{prefix}.scales: expected a 2-D array, got "
                               f"{'none' if scales is None else list(scales.shape)}")
    if fmt in ("q4", "awq_gemm"):
        groups = scales.shape[1] if fmt == "q4" else scales.shape[0]
        info.update(bits=bits or 4, group_size=k // groups if groups else None,
                    salient=int(src.raw(prefix + ".salient_idx")[0].shape[0]) if prefix + ".salient_idx" in src else 0)
    elif fmt in ("q8", "q6"):
        info.update(bits=8 if fmt == "q8" else 6, group_size=k // scales.shape[1] if scales.shape[1] else None,
                    salient=0)
    else:
        info.update(bits=DENSE_BITS.get(fmt.upper()), group_size=None, salient=0)
    return info


def _names(value) -> list | None:
    """config.json's `architectures` (class names, informative only) as a list of strings."""
    if value is None:
        return None
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def read_report(model_dir: Path) -> dict | None:
    """report.json next to the model, or None; a broken one is reported, not fatal."""
    path = Path(model_dir) / "report.json"
    if not path.is_file():
        return None
    try:
        return read_json(path, "report.json")
    except UnsupportedModelError as e:
        return {"error": str(e)}


def _report_blocks(report: dict | None) -> dict:
    """{block index: that block's entry of report["layers"]} for a list of {"layer": i, ...} or a
    dict keyed by block index; anything else is ignored."""
    layers = (report or {}).get("layers")
    if isinstance(layers, list):
        return {e.get("layer", i): e for i, e in enumerate(layers) if isinstance(e, dict)}
    if isinstance(layers, dict):
        return {int(k): v for k, v in layers.items() if str(k).isdigit() and isinstance(v, dict)}
    return {}


def _alphas(entry: dict) -> dict:
    """{scale group name: α} of one block's report entry ("groups": {name: {"alpha": a}}); an α
    that is not a number (a damaged or hand-edited file) is None, shown as "-"."""
    groups = entry.get("groups")
    if not isinstance(groups, dict):
        return {}
    number = lambda a: a if isinstance(a, (int, float)) and not isinstance(a, bool) else None
    return {name: number(g.get("alpha")) for name, g in groups.items() if isinstance(g, dict)}


def _config_blocks(qc: dict) -> dict:
    """The same shape as `_report_blocks`, from quantization_config["awq"]["alpha"] (one {group: α}
    per block, what the quantizer records even without --report)."""
    alpha = (qc.get("awq") or {}).get("alpha") if isinstance(qc.get("awq"), dict) else None
    if not isinstance(alpha, list):
        return {}
    return {i: {"groups": {k: {"alpha": v} for k, v in a.items()}} for i, a in enumerate(alpha) if isinstance(a, dict)}


def _group_of(model_type: str) -> dict:
    """linear short name -> AWQ scale group name, from the AWQ module's table."""
    return {lin: g.name for g in SCALE_GROUPS.get(model_type, ()) for lin in g.linears}


def describe(model_dir, layers: bool = False) -> dict:
    model_dir = Path(model_dir)
    cfg = load_config(model_dir)
    raw_cfg = read_json(model_dir / "config.json", "config.json")
    src = TensorSource(model_dir)
    check_block_count(src, cfg)
    qc = dict(cfg.quantization or {})
    weight_bytes = sum(Path(st.path).stat().st_size for st in src.files.values())
    dtypes: dict[str, int] = {}
    for name in src.where:
        dt = src.raw(name)[1]
        dtypes[dt] = dtypes.get(dt, 0) + 1
    n_params = parameter_count(cfg)
    bits = qc.get("bits") if isinstance(qc.get("bits"), int) else None
    lin_info = {(i, key): _linear_info(src, prefix, shape, bits) | {"tensor": prefix}
                for i, key, prefix, shape in block_linears(cfg)}
    lin_bytes = sum(v["bytes"] for v in lin_info.values())
    lin_weights = sum(v["shape"][0] * v["shape"][1] for v in lin_info.values())
    head_name = HEAD[0]
    head = (_linear_info(src, head_name, HEAD[1](cfg), None)["format"]
            if any(t.startswith(head_name + ".") for t in src.where) else "tied to embeddings")
    info = {
        "path": str(model_dir.resolve()),
        "architecture": {
            "model_type": cfg.model_type, "architectures": _names(raw_cfg.get("architectures")),
            "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "heads": cfg.num_attention_heads,
            "kv_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
            "max_context": cfg.max_position_embeddings, "tied_embeddings": cfg.tie_word_embeddings,
        },
        "parameters": n_params,
        "weights_bytes": weight_bytes,
        "folder_bytes": sum(p.stat().st_size for p in model_dir.iterdir() if p.is_file()),
        "files": sorted(src.files),
        "dtype": raw_cfg.get("torch_dtype"),
        "tensor_dtypes": dict(sorted(dtypes.items())),
        "lm_head": head,
        "embedding": linear_format(src, EMBED_PREFIX) or "missing",
        "linear_bpw": round(8 * lin_bytes / lin_weights, 4),
        "file_bpw": round(8 * weight_bytes / n_params, 4),
        "quantization": ({k: qc[k] for k in PROVENANCE_KEYS if k in qc}
                         | {k: v for k, v in qc.items() if k not in PROVENANCE_KEYS}) if qc else None,
    }
    info["manifest"] = _manifest_info(model_dir)
    if isinstance(raw_cfg.get("minilm_edge"), dict):            # written by export-awq
        info["export"] = raw_cfg["minilm_edge"]
    report = read_report(model_dir)
    info["report"] = None if report is None else sorted(report)
    if layers:
        reported = _report_blocks(report)
        blocks = reported or _config_blocks(qc)            # α per block: the report's, else the config's
        group_of = _group_of(cfg.model_type)
        rows = []
        for (i, key), li in lin_info.items():
            alphas = _alphas(blocks.get(i, {}))
            row = {"layer": i, "name": key, **li}
            row["alpha"] = alphas.get(group_of.get(key)) if alphas else None
            rows.append(row)
        info["layers"] = rows
        info["report_layers"] = {i: {"alpha": _alphas(e), "notes": e.get("notes", [])}
                                 for i, e in sorted(reported.items())} if reported else None
    return info


def _manifest_info(model_dir: Path) -> dict | None:
    """The folder's manifest (formats/manifest.py) in brief, None for a plain Hugging Face folder.
    Not checked here (that reads every byte): `models verify`, or loading, does."""
    try:
        m = read_manifest(model_dir)
    except IntegrityError as e:
        return {"error": str(e)}
    if m is None:
        return None
    return {"digest": manifest_digest(model_dir), "files": len(m["files"]), "recipe": m.get("recipe"),
            "provenance": m.get("provenance")}


def _manifest_text(man: dict | None) -> str:
    if man is None:
        return "manifest       no manifest (plain Hugging Face folder): nothing to check files against"
    if "error" in man:
        return f"manifest       unreadable: {man['error']}"
    prov = man.get("provenance") or {}
    made = ", ".join(str(prov[k]) for k in ("tool", "date", "user", "host") if prov.get(k))
    return f"manifest       sha256:{man['digest'][:12]}, {man['files']} files; made by {made or '-'}"


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _group_sizes_text(per_layer: dict) -> str:
    """{tensor: g} (the linears whose group size differs from group_size) in one line:
    "64 for 180 linears (q_proj, k_proj, ...)"."""
    by_size: dict = {}
    for name, g in per_layer.items():
        by_size.setdefault(g, []).append(str(name).rsplit(".", 1)[-1])
    return "; ".join(f"{g} for {len(kinds)} linears ({', '.join(dict.fromkeys(kinds))})"
                     for g, kinds in by_size.items())


def _awq_text(awq: dict) -> list:
    """The awq record of quantization_config as a few lines: settings, calibration, the range of
    α per scale group (each block's α: --layers), notes."""
    lines = ["  awq"]
    settings = {k: v for k, v in awq.items() if k not in ("calibration", "alpha", "notes")}
    lines.append("    settings             " + ", ".join(f"{k} {json.dumps(v)}" for k, v in settings.items()))
    cal = awq.get("calibration")
    if isinstance(cal, dict):
        lines.append("    calibration          " + ", ".join(f"{k} {json.dumps(v)}" for k, v in cal.items()))
    alpha = awq.get("alpha")
    if isinstance(alpha, list) and alpha:
        ranges = {}
        for a in alpha:
            for k, v in (a.items() if isinstance(a, dict) else ()):
                if isinstance(v, (int, float)):
                    lo, hi = ranges.get(k, (v, v))
                    ranges[k] = (min(lo, v), max(hi, v))
        text = ", ".join(f"{k} {lo:.2f}–{hi:.2f}" for k, (lo, hi) in ranges.items())
        lines.append(f"    alpha                {text or '-'} over {len(alpha)} blocks (each block's: --layers)")
    notes = awq.get("notes")
    for note in notes if isinstance(notes, list) else [notes] if notes else []:
        lines.append(f"    note                 {note}")
    return lines


def format_text(info: dict) -> str:
    a = info["architecture"]
    lines = [
        f"model          {info['path']}",
        f"architecture   {a['model_type']} ({', '.join(a['architectures'] or []) or '-'}): {a['layers']} layers, "
        f"D {a['hidden_size']}, F {a['intermediate_size']}, heads {a['heads']}/{a['kv_heads']} (Dh {a['head_dim']}), "
        f"V {a['vocab_size']}, context {a['max_context']}, embeddings {'tied' if a['tied_embeddings'] else 'untied'}",
        f"parameters     {info['parameters']:,} ({info['parameters'] / 1e6:.1f} M)",
        f"weights        {_human_bytes(info['weights_bytes'])} in {', '.join(info['files'])}; "
        f"{info['file_bpw']:.2f} bits/weight over the whole folder's weights, {info['linear_bpw']:.3f} in block "
        f"linears; folder {info['folder_bytes']:,} bytes",
        f"dtype          {info['dtype'] or '-'}; tensors: "
        + ", ".join(f"{k} ×{v}" for k, v in info["tensor_dtypes"].items())
        + f"; embedding {info['embedding']}, lm_head {info['lm_head']}",
    ]
    q = info["quantization"]
    if not q:
        lines.append("quantization   none")
    else:
        lines.append("quantization")
        for k, v in q.items():
            if k == "group_size_per_layer" and isinstance(v, dict) and v and all(type(g) is int for g in v.values()):
                lines.append(f"  {k:22s} {_group_sizes_text(v)}")
            elif k == "awq" and isinstance(v, dict):
                lines += _awq_text(v)
            else:
                if isinstance(v, (dict, list)) and not v:
                    v = "-"
                lines.append(f"  {k:22s} {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    if info.get("export"):
        src_q = info["export"].get("exported_from") or {}
        lines.append(f"exported from  minilm-q4 (method {src_q.get('method', '?')}, tool {src_q.get('tool', '?')}); "
                     f"re-grouped layers: {len(info['export'].get('regrouped_layers') or {})}")
    lines.append(f"report.json    {', '.join(info['report']) if info['report'] else 'none'}")
    lines.append(_manifest_text(info.get("manifest")))
    if "layers" in info:
        lines.append("")
        lines.append(f"{'layer':>5} {'linear':6} {'format':8} {'shape':>12} {'bits':>4} {'g':>4} "
                     f"{'salient':>7} {'bpw':>7} {'alpha':>6}")
        for r in info["layers"]:
            shape = f"{r['shape'][0]}x{r['shape'][1]}"
            alpha = "-" if r["alpha"] is None else f"{r['alpha']:.2f}"
            lines.append(f"{r['layer']:>5} {r['name']:6} {r['format']:8} {shape:>12} {r['bits'] or '-':>4} "
                         f"{r['group_size'] or '-':>4} {r['salient']:>7} {r['bpw']:>7.3f} {alpha:>6}")
        for i, e in (info.get("report_layers") or {}).items():
            if e["alpha"] or e["notes"]:
                groups = " ".join(f"{k}={'-' if v is None else f'{v:.2f}'}" for k, v in e["alpha"].items())
                lines.append(f"report block {i}: {groups}" + (f"; {'; '.join(e['notes'])}" if e["notes"] else ""))
    return "\n".join(lines)
