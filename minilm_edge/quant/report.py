"""The AWQ report: report.json (everything measured) and report.html (the same, readable), written
into the quantized model folder. Self-contained: no scripts, no network, plots as inline SVG.

Per block: the chosen α of each scale group with the loss of the identity (plain RTN) and of the
chosen scales; the most active input channels and which were kept in fp16; the share of each
group's weight range that the clip kept; the relative output error of RTN vs AWQ on the clip
tokens. Overall: bits per weight and file size; with an evaluation text, the perplexity of the
source, RTN and AWQ models on it (runtime/evaluate.py).
"""
from __future__ import annotations

import html
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

PLOTTED_LAYERS = 3          # x_mean plots: first, middle, last block


def write_report(folder: Path, src_dir, src, cfg, res, calib, settings, qconfig, rtn_tensors, eval_text,
                 eval_ctx, eval_tokens, progress) -> dict:
    """Write report.json and report.html into `folder` (the complete quantized model); returns the dict.

    rtn_tensors(): the RTN model's tensors, built only when an evaluation asks for them.
    """
    folder = Path(folder)
    rep = {
        "method": "awq", "bits": settings.bits, "group_size": settings.group_size,
        "scale_form": "duo" if settings.duo else "x_mean^alpha", "keep_salient_percent": settings.keep_salient,
        "gptq": settings.gptq, **({"gptq_damp": settings.gptq_damp} if settings.gptq else {}),
        "calibration": calib.describe(), "notes": list(calib.notes) + list(res.notes),
        "size": _size_summary(folder, cfg, res, qconfig),
        "layers": [_layer_json(l) for l in res.layers],
        "activation_plots": _plots_data(res.layers),
        "eval": _evaluate(folder, src_dir, cfg, qconfig, rtn_tensors, eval_text, eval_ctx, eval_tokens, progress),
    }
    (folder / "report.json").write_text(json.dumps(rep, indent=1) + "\n", encoding="utf-8")
    (folder / "report.html").write_text(render_html(rep), encoding="utf-8")
    return rep


def _layer_json(layer):
    return {k: v for k, v in layer.items() if k not in ("x_mean", "notes")} | {"notes": layer["notes"]}


def _plots_data(layers):
    picks = sorted({0, len(layers) // 2, len(layers) - 1})[:PLOTTED_LAYERS]
    out = []
    for i in picks:
        l = layers[i]
        for inp, xm in l["x_mean"].items():
            if inp not in ("attn_in", "mlp_in"):
                continue
            lin = "q" if inp == "attn_in" else "gate"
            out.append({"layer": l["layer"], "input": inp, "x_mean": [round(float(v), 5) for v in xm],
                        "salient": l["salient"].get(lin) or []})
    return out


def _size_summary(folder, cfg, res, qconfig):
    from ..formats.q4 import bits_per_weight
    from ..formats.tensors import block_linears
    total_w = total_bits = 0.0
    per_g = qconfig.get("group_size_per_layer", {})
    for _, _, prefix, (n, k) in block_linears(cfg):
        sal = res.salient.get(prefix)
        m = 0 if sal is None else len(sal)
        total_bits += n * k * bits_per_weight(per_g.get(prefix, qconfig["group_size"]), m, k)
        total_w += n * k
    from ..formats.tensors import parameter_count
    f = folder / "model.safetensors"
    file_bytes = f.stat().st_size if f.is_file() else None
    return {"block_linear_bits_per_weight": total_bits / total_w, "block_linear_params": int(total_w),
            "file_bytes": file_bytes,
            # embedding, head, norms and header included, over every parameter (tied embedding once)
            "file_bits_per_weight": None if file_bytes is None else 8 * file_bytes / parameter_count(cfg),
            "folder_bytes": sum(p.stat().st_size for p in folder.iterdir() if p.is_file()),
            "note": "3-bit codes are stored in 4-bit containers" if qconfig["bits"] == 3 else ""}


def _evaluate(folder, src_dir, cfg, qconfig, rtn_tensors, text, ctx, max_tokens, progress):
    if text is None:
        return None
    from ..formats.folder import write_model_folder
    from ..runtime.evaluate import perplexity
    from ..runtime.model import load
    kw = dict(ctx=ctx, max_tokens=max_tokens, progress=progress)
    out = {"ctx": ctx, "max_tokens": max_tokens}
    out["source"] = perplexity(load(src_dir), text, **kw)
    tmp = Path(tempfile.mkdtemp(prefix=".rtn-eval-", dir=Path(folder).parent))
    try:
        rtn_cfg = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        rtn_cfg["quantization_config"] = {k: v for k, v in qconfig.items() if k != "awq"} | {"method": "rtn"}
        write_model_folder(Path(src_dir), tmp / "rtn", rtn_tensors(), rtn_cfg)
        out["rtn"] = perplexity(load(tmp / "rtn"), text, **kw)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["awq"] = perplexity(load(folder), text, **kw)
    gap = out["rtn"]["ppl"] - out["source"]["ppl"]
    out["gap_closed"] = (out["rtn"]["ppl"] - out["awq"]["ppl"]) / gap if gap > 0 else None
    return out


# ---- HTML

CSS = """body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#f3f3f3}
td.l{text-align:left}.note{color:#a50}svg{background:#fafafa;border:1px solid #ddd;margin:4px 0}"""


def _f(v, fmt="{:.3g}"):
    return "—" if v is None else fmt.format(v)


def _svg_bars(xm, salient, width=720, height=140):
    """Activation magnitude per input channel as bars; fp16-kept channels in red."""
    xm = np.asarray(xm, float)
    top = float(xm.max()) or 1.0
    bw = width / len(xm)
    sal = set(salient)
    bars = []
    for j, v in enumerate(xm):
        h = (height - 12) * v / top
        color = "#d33" if j in sal else "#48c"
        bars.append(f'<rect x="{j * bw:.2f}" y="{height - h:.2f}" width="{max(bw, 0.6):.2f}" '
                    f'height="{h:.2f}" fill="{color}"/>')
    label = f'<text x="4" y="11" font-size="10">max {top:.3g}</text>'
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}">{label}{"".join(bars)}</svg>')


def render_html(rep: dict) -> str:
    e = html.escape
    cal = rep["calibration"]
    size = rep["size"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>AWQ report</title>"
             f"<style>{CSS}</style></head><body><h1>AWQ report</h1>",
             f"<p>W{rep['bits']}, group size {rep['group_size']} (per-layer fallbacks in config.json), scale "
             f"form {e(rep['scale_form'])}, fp16 salient channels {rep['keep_salient_percent']}%.<br>"
             f"Calibration: {e(', '.join(cal['source']))}, {cal['samples']} × {cal['seq_len']} tokens, "
             f"sha256 {cal['tokens_sha256'][:16]}…<br>"
             f"Block linears: {size['block_linear_bits_per_weight']:.3f} bits per weight over "
             f"{size['block_linear_params']:,} weights; model.safetensors {_f(size['file_bytes'], '{:,}')} bytes, "
             f"{_f(size.get('file_bits_per_weight'), '{:.3f}')} bits per weight over every parameter (embedding, "
             f"head, norms included); the whole folder {_f(size.get('folder_bytes'), '{:,}')} bytes. "
             f"{e(size['note'])}</p>"]
    for n in rep["notes"]:
        parts.append(f"<p class='note'>note: {e(n)}</p>")
    ev = rep.get("eval")
    if ev:
        if "error" in ev:
            parts.append(f"<p class='note'>{e(ev['error'])}</p>")
        else:
            parts.append(f"<h2>Perplexity</h2><p>ctx {ev['ctx']}, first {ev['max_tokens']} tokens</p><table>"
                         "<tr><th>model</th><th>perplexity</th><th>tokens scored</th></tr>")
            for k in ("source", "rtn", "awq"):
                parts.append(f"<tr><td class=l>{k}</td><td>{ev[k]['ppl']:.3f}</td>"
                             f"<td>{ev[k]['tokens_scored']}</td></tr>")
            parts.append(f"</table><p>AWQ closes {_f(ev['gap_closed'], '{:.0%}')} of the RTN → source gap.</p>")
    parts.append("<h2>Activation magnitude per input channel</h2><p>mean |x| per channel; red: kept in fp16.</p>")
    for p in rep["activation_plots"]:
        parts.append(f"<div>block {p['layer']}, input of {'q/k/v' if p['input'] == 'attn_in' else 'gate/up'}"
                     f"<br>{_svg_bars(p['x_mean'], p['salient'])}</div>")
    groups = list(rep["layers"][0]["groups"]) if rep["layers"] else []
    parts.append("<h2>Per block</h2><table><tr><th>block</th>" +
                 "".join(f"<th>{g} α</th><th>{g} loss RTN → AWQ</th>" for g in groups) +
                 "<th>clip: mean range kept (groups clipped)</th><th>output error RTN / AWQ</th>"
                 "<th>top q/k/v input channels</th><th>fp16 kept</th></tr>")
    for l in rep["layers"]:
        cells = [f"<td>{l['layer']}</td>"]
        for g in groups:
            r = l["groups"][g]
            cells.append(f"<td>{_f(r['alpha'], '{:.2f}')}</td><td>{_f(r['loss_identity'])} → {_f(r['loss_best'])}</td>")
        clip = "; ".join(f"{k} {v['mean']:.2f} ({v['frac_clipped']:.0%})" for k, v in l["clip"].items())
        err = "; ".join(f"{k} {v['rtn']:.3f}/{v['awq']:.3f}" for k, v in l["output_error"].items())
        top = ", ".join(str(c) for c, _ in l["top_channels"]["attn_in"])
        kept = l["salient"].get("q")
        cells.append(f"<td class=l>{e(clip)}</td><td class=l>{e(err)}</td><td class=l>{top}</td>"
                     f"<td class=l>{'—' if not kept else len(kept)}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table></body></html>\n")
    return "".join(parts)
