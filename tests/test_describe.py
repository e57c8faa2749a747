"""app/describe.py and `inspect`: architecture, size, storage and quantization provenance of a model folder, per-layer
rows with --layers, JSON with --json; report.json read when present, tolerated when absent or broken."""
import json
import re
import shutil

import numpy as np
import pytest

from minilm_edge.app.cli import main
from minilm_edge.app.describe import describe, format_text
from minilm_edge.quant.export_awq import export_awq
from minilm_edge.quant.quantize import quantize
from tinymodel import make_model_dir

QUANTIZABLE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
LINEARS = ("q", "k", "v", "o", "gate", "up", "down")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("inspect")
    src, cfg, w = make_model_dir(base / "src", **QUANTIZABLE)
    q = quantize(src, base / "q", group_size=64, progress=False)
    return base, src, w, q


def test_fp_model(folders):
    _, src, w, _ = folders
    info = describe(src)
    assert info["parameters"] == sum(a.size for a in w.values())       # tied: no lm_head tensor
    assert info["quantization"] is None and info["linear_bpw"] == 32.0 and info["dtype"] == "float32"
    assert info["weights_bytes"] == (src / "model.safetensors").stat().st_size
    assert info["architecture"]["layers"] == 2 and info["lm_head"] == "tied to embeddings"
    assert "quantization   none" in format_text(info)


def test_quantized_model_layers_and_provenance(folders):
    _, src, _, q = folders
    info = describe(q, layers=True)
    qc = info["quantization"]
    assert qc["method"] == "rtn" and qc["bits"] == 4 and qc["group_size"] == 64
    assert len(qc["source"]["weights_sha256"]) == 64 and qc["tool"].startswith("minilm_edge")
    rows = info["layers"]
    assert [(r["layer"], r["name"]) for r in rows] == [(i, k) for i in range(2) for k in LINEARS]
    for r in rows:
        g = 32 if r["name"] == "down" else 64                               # K = 96 falls back to 32
        assert (r["format"], r["bits"], r["group_size"], r["salient"], r["alpha"]) == ("q4", 4, g, 0, None)
        assert r["bpw"] == 4 + 24 / g                                        # measured from the bytes stored
    text = format_text(info)
    assert "weights_sha256" in text and text.count("\n    1 ") == 7


def test_whole_folder_bits_per_weight_with_an_int8_embedding(folders, tmp_path):
    """file_bpw counts every byte of the weight file over every parameter (the tied embedding once);
    folder_bytes every file. An int8 tied embedding stored once makes the file smaller than an fp16
    one, and its bytes are what the bpw says."""
    _, src, w, q = folders
    q8 = quantize(src, tmp_path / "e8", group_size=64, embed="int8", progress=False)
    fp16, int8 = describe(q), describe(q8)
    n_params = sum(a.size for a in w.values())
    for info, folder in ((fp16, q), (int8, q8)):
        size = (folder / "model.safetensors").stat().st_size
        assert info["file_bpw"] == round(8 * size / n_params, 4)
        assert info["folder_bytes"] == sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    assert (fp16["embedding"], int8["embedding"]) == ("f16", "q8") and int8["lm_head"] == "tied to embeddings"
    V, D = w["model.embed_tokens.weight"].shape
    saved = fp16["weights_bytes"] - int8["weights_bytes"]
    assert abs(saved - (2 * V * D - (V * D + 2 * V * D // 64))) < 512       # fp16 table vs int8 + scales (± header)
    assert "embedding q8" in format_text(int8)


def test_report_json_alpha_and_salient(folders, tmp_path):
    _, src, _, _ = folders
    q = quantize(src, tmp_path / "sal", group_size=64, progress=False,
                 linear_hook=lambda i, key, w: (w, np.array([3, 7, 9], np.int32) if key == "up" else None))
    (q / "report.json").write_text(json.dumps({"method": "awq", "layers": [
        {"layer": 0, "groups": {"qkv": {"alpha": 0.35}, "o": {"alpha": None}, "gate_up": {"alpha": 0.5},
                                "down": {"alpha": 0.2}}, "notes": ["o: not scaled"]},
        {"layer": 1, "groups": {"qkv": {"alpha": 0.1}}}]}))
    info = describe(q, layers=True)
    assert info["report"] == ["layers", "method"]
    assert info["report_layers"][0]["alpha"] == {"qkv": 0.35, "o": None, "gate_up": 0.5, "down": 0.2}
    up = [r for r in info["layers"] if r["name"] == "up"]
    assert [r["salient"] for r in up] == [3, 3] and up[0]["bpw"] > 4.375
    alpha = {(r["layer"], r["name"]): r["alpha"] for r in info["layers"]}   # linears -> groups: quant.awq's table
    assert alpha[(0, "q")] == 0.35 and alpha[(0, "up")] == 0.5 and alpha[(1, "q")] == 0.1
    assert "report block 0: qkv=0.35 o=- gate_up=0.50 down=0.20; o: not scaled" in format_text(info)
    (q / "report.json").write_text("{not json")
    assert "error" in describe(q, layers=True)["report"]                    # broken: shown, not fatal


def test_autoawq_folder(folders, tmp_path):
    _, _, _, q = folders
    out, _ = export_awq(q, tmp_path / "awq")
    info = describe(out, layers=True)
    assert info["quantization"]["quant_method"] == "awq" and info["quantization"]["version"] == "gemm"
    assert {r["format"] for r in info["layers"]} == {"awq_gemm"} and {r["group_size"] for r in info["layers"]} == {32}
    assert info["export"]["exported_from"]["method"] == "rtn"


def test_awq_config_without_a_report(folders, tmp_path):
    # quantize records α per block in quantization_config even without --report: --layers shows
    # it, and the text condenses the per-layer group sizes and the α list into a line each
    _, _, _, q = folders
    m = tmp_path / "awq"
    shutil.copytree(q, m)
    cfg = json.loads((m / "config.json").read_text())
    cfg["quantization_config"] |= {
        "method": "awq",
        "group_size_per_layer": {f"model.layers.{i}.mlp.down_proj": 32 for i in range(2)},
        "awq": {"clip": True, "seed": 0, "calibration": {"source": "self-generated", "samples": 4},
                "alpha": [{"qkv": 0.35, "o": None, "gate_up": 0.5, "down": 0.2},
                          {"qkv": 0.1, "o": None, "gate_up": 0.0, "down": 0.45}], "notes": []}}
    (m / "config.json").write_text(json.dumps(cfg))
    info = describe(m, layers=True)
    alpha = {(r["layer"], r["name"]): r["alpha"] for r in info["layers"]}
    assert alpha[(0, "q")] == 0.35 and alpha[(1, "down")] == 0.45 and alpha[(0, "o")] is None
    assert info["report_layers"] is None                  # no report.json: no "report block" lines
    text = format_text(info)
    assert "32 for 2 linears (down_proj)" in text
    assert "qkv 0.10–0.35, gate_up 0.00–0.50, down 0.20–0.45 over 2 blocks" in text
    assert 'source "self-generated"' in text and "report block" not in text
    # a hand-edited or damaged record is shown as stored, not a crash
    cfg["quantization_config"]["group_size_per_layer"] = {"model.layers.0.mlp.down_proj": [32]}
    cfg["quantization_config"]["awq"] |= {"alpha": "x", "notes": "one note", "calibration": 5}
    (m / "config.json").write_text(json.dumps(cfg))
    text = format_text(describe(m, layers=True))
    assert '{"model.layers.0.mlp.down_proj": [32]}' in text
    assert text.count("    note ") == 1 and "alpha  " not in text
    cfg["quantization_config"]["awq"]["alpha"] = [{"qkv": "bad", "gate_up": 0.5}]
    (m / "config.json").write_text(json.dumps(cfg))
    info = describe(m, layers=True)
    alpha = {(r["layer"], r["name"]): r["alpha"] for r in info["layers"]}
    assert alpha[(0, "q")] is None and alpha[(0, "up")] == 0.5
    assert re.search(r"\n    alpha +gate_up 0\.50–0\.50 over 1 blocks", format_text(info))   # "bad" left out
    (m / "report.json").write_text(json.dumps({"layers": [{"layer": 0, "groups": {"qkv": {"alpha": "bad"}}}]}))
    assert "report block 0: qkv=-" in format_text(describe(m, layers=True))


def test_cli_inspect(folders, capsys):
    _, src, _, q = folders
    assert main(["inspect", str(q)]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "minilm-q4" in out
    assert main(["inspect", str(q), "--layers", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info["layers"]) == 14 and info == describe(q, layers=True)
    assert main(["inspect", str(src / "missing")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minilm-edge: error:")
    with pytest.raises(SystemExit):
        main(["inspect", "--help"])
    assert "examples:" in capsys.readouterr().out
