"""AutoAWQ GEMM interchange (formats/awq_gemm.py, quant/export_awq.py, loading in runtime/linear.py):
packing matches an independent plain-loop decoder of the layout, native -> AutoAWQ -> native is
bit-exact, an exported folder loads with the native model's logits, and what AutoAWQ cannot hold is
refused with a typed, one-line error."""
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from safetensors.numpy import load_file, save_file

import minilm_edge
from minilm_edge.app.cli import main
from minilm_edge.formats.awq_gemm import awq_to_q4, pack_awq, q4_to_awq, unpack_awq
from minilm_edge.formats.q4 import Q4Linear, dequantize, quantize_q4
from minilm_edge.quant.export_awq import export_awq
from minilm_edge.quant.quantize import quantize
from tinymodel import make_model_dir

QUANTIZABLE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]      # docs/DESIGN.md §3: nibble i of word c holds output channel 8c + ORDER[i]


def oracle_dequantize_awq(qweight, qzeros, scales):
    """W [N, K] from AutoAWQ GEMM tensors, one element at a time, straight from docs/DESIGN.md §3."""
    k, n = qweight.shape[0], qweight.shape[1] * 8
    g = k // scales.shape[0]
    nib = lambda word, i: (int(word) >> (4 * i)) & 0xF
    w = np.zeros((n, k), np.float32)
    for kk in range(k):
        for c in range(n // 8):
            for i in range(8):
                ch = 8 * c + ORDER[i]
                z = nib(qzeros[kk // g, c], i)
                w[ch, kk] = (nib(qweight[kk, c], i) - z) * np.float32(scales[kk // g, ch])
    return w


@st.composite
def codes(draw):
    rows, words = draw(st.integers(1, 9)), draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).integers(0, 16, (rows, 8 * words), dtype=np.uint8)


@given(codes())
@settings(max_examples=60, deadline=None)
def test_pack_unpack_round_trip_and_layout(c):
    words = pack_awq(c)
    assert words.dtype == np.int32 and words.shape == (c.shape[0], c.shape[1] // 8)
    assert np.array_equal(unpack_awq(words), c)
    for r in range(c.shape[0]):                       # every word against the layout drawn in docs/DESIGN.md §3
        for w in range(words.shape[1]):
            expect = sum(int(c[r, 8 * w + ORDER[i]]) << (4 * i) for i in range(8))
            assert int(words[r, w]) & 0xFFFFFFFF == expect


@st.composite
def q4_layers(draw):
    g = draw(st.sampled_from([32, 64, 128]))
    n, k = 8 * draw(st.integers(1, 6)), g * draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    w = (rng.standard_normal((n, k)) * draw(st.sampled_from([1e-3, 0.05, 3.0]))).astype(np.float32)
    return quantize_q4(w, g, bits=draw(st.sampled_from([3, 4])))


@given(q4_layers())
@settings(max_examples=40, deadline=None)
def test_native_to_awq_to_native_is_bit_exact(q4):
    qweight, qzeros, scales = q4_to_awq(q4)
    n, k = q4.shape
    groups = k // q4.group_size
    assert (qweight.shape, qzeros.shape, scales.shape) == ((k, n // 8), (groups, n // 8), (groups, n))
    back = awq_to_q4(qweight, qzeros, scales)
    assert back.group_size == q4.group_size
    for name in ("qweight", "scales", "zeros"):
        a, b = getattr(back, name), getattr(q4, name)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name
    np.testing.assert_array_equal(oracle_dequantize_awq(qweight, qzeros, scales), dequantize(q4))


@pytest.mark.parametrize("bad, msg", [
    (lambda t: {**t, "qweight": t["qweight"].view(np.uint32)}, "qweight: expected a 2-D int32"),
    (lambda t: {**t, "qzeros": t["qzeros"][:, :-1]}, "qzeros: expected shape"),
    (lambda t: {**t, "scales": t["scales"].astype(np.float32)}, "scales: expected a 2-D float16"),
    (lambda t: {**t, "scales": t["scales"][:, :-8]}, "scales: expected shape"),
    (lambda t: {**t, "scales": np.zeros((3, t["scales"].shape[1]), np.float16)}, "scales: expected shape"),
    (lambda t: {**t, "qweight": t["qweight"][0]}, "qweight: expected a 2-D"),
])
def test_bad_awq_tensors_are_typed_errors(bad, msg):
    q4 = quantize_q4(np.random.default_rng(0).standard_normal((16, 128)).astype(np.float32), 64)
    t = dict(zip(("qweight", "qzeros", "scales"), q4_to_awq(q4)))
    with pytest.raises(minilm_edge.QuantFormatError, match=msg):
        awq_to_q4(**bad(t))


# ---- model folders


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("awq")
    src, _, _ = make_model_dir(base / "src", **QUANTIZABLE)
    g32 = quantize(src, base / "g32", group_size=32, progress=False)        # one group size everywhere
    g64 = quantize(src, base / "g64", group_size=64, progress=False)        # down_proj (K = 96) uses 32
    return base, src, g32, g64


def test_exported_folder_gives_the_native_logits(folders):
    base, _, g32, _ = folders
    out, regrouped = export_awq(g32, base / "awq32")
    assert regrouped == {}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": 32,
                                          "zero_point": True, "version": "gemm"}
    assert cfg["torch_dtype"] == "float16" and cfg["minilm_edge"]["exported_from"]["method"] == "rtn"
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).is_file()
    raw, native = load_file(str(out / "model.safetensors")), load_file(str(g32 / "model.safetensors"))
    p = "model.layers.1.mlp.down_proj"
    assert raw[p + ".qweight"].dtype == np.int32 and raw[p + ".qweight"].shape == (96, 8)
    assert not any(k.endswith((".zeros", ".weight")) and "layers" in k and "proj" in k for k in raw)
    assert all(v.dtype == np.float16 for k, v in raw.items() if not k.endswith((".qweight", ".qzeros")))
    prefixes = {k.rsplit(".", 1)[0] for k in raw if k.endswith(".qzeros")}
    assert len(prefixes) == 14                                                       # 2 blocks × 7 linears
    for prefix in prefixes:                                                          # tensor-level round trip
        back = awq_to_q4(raw[prefix + ".qweight"], raw[prefix + ".qzeros"], raw[prefix + ".scales"])
        for name in ("qweight", "scales", "zeros"):
            assert getattr(back, name).tobytes() == native[prefix + "." + name].tobytes()
    ids = np.random.default_rng(1).integers(0, 250, 23)
    a, n = minilm_edge.load(out), minilm_edge.load(g32)
    np.testing.assert_array_equal(a.forward(ids), n.forward(ids))                   # prefill
    ca, cn = a.new_cache(8), n.new_cache(8)
    for t in ids[:5]:                                                                # decode
        np.testing.assert_array_equal(a.forward([t], ca), n.forward([t], cn))


def test_per_layer_group_sizes_are_regrouped_exactly_or_refused(folders):
    base, _, _, g64 = folders
    with pytest.raises(minilm_edge.UsageError, match="quantize with --group-size 32"):
        export_awq(g64, base / "refused", regroup_layers=False)
    assert not (base / "refused").exists()
    out, regrouped = export_awq(g64, base / "awq64")
    assert len(regrouped) == 12 and set(regrouped.values()) == {64}                  # 2 blocks × 6 linears
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 32
    raw, native = load_file(str(out / "model.safetensors")), load_file(str(g64 / "model.safetensors"))
    p = "model.layers.0.self_attn.q_proj"
    w_awq = dequantize(awq_to_q4(raw[p + ".qweight"], raw[p + ".qzeros"], raw[p + ".scales"]))
    w_nat = dequantize(Q4Linear(native[p + ".qweight"], native[p + ".scales"], native[p + ".zeros"], 64))
    np.testing.assert_array_equal(w_awq, w_nat)                                      # same weights
    ids = np.arange(3, 30)
    np.testing.assert_allclose(minilm_edge.load(out).forward(ids), minilm_edge.load(g64).forward(ids), atol=1e-5)


def test_what_autoawq_cannot_hold_is_refused(folders):
    base, src, _, _ = folders
    salient = quantize(src, base / "sal", group_size=32, progress=False,
                       linear_hook=lambda i, key, w: (w, np.array([1, 5], np.int32)))
    with pytest.raises(minilm_edge.UsageError, match="salient"):
        export_awq(salient, base / "x1")
    head = quantize(src, base / "head", group_size=32, quantize_head="int8", progress=False)
    with pytest.raises(minilm_edge.UsageError, match="lm_head is quantized"):
        export_awq(head, base / "x2")
    with pytest.raises(minilm_edge.UsageError, match="not a minilm-q4 model"):
        export_awq(src, base / "x3")
    assert not any((base / x).exists() for x in ("x1", "x2", "x3"))


@pytest.mark.parametrize("tamper, msg", [
    (lambda r, p: r.__setitem__(p + ".qweight", r[p + ".qweight"].astype(np.int64)), "qweight: expected a 2-D int32"),
    (lambda r, p: r.__setitem__(p + ".qzeros", r[p + ".qzeros"][:1].copy()), "qzeros: expected shape"),
    (lambda r, p: r.__setitem__(p + ".scales", r[p + ".scales"].astype(np.float32)), "scales"),
    (lambda r, p: r.__setitem__(p + ".qweight", np.concatenate([r[p + ".qweight"]] * 2)),
     "scales: expected shape|expected \\["),
    (lambda r, p: r.__setitem__(p + ".qweight", r[p + ".qweight"][:, :4].copy()), "scales: expected shape"),
])
def test_bad_awq_checkpoints_fail_to_load_with_the_layer_named(folders, tmp_path, tamper, msg):
    base, _, g32, _ = folders
    out, _ = export_awq(g32, tmp_path / "awq")
    raw = dict(load_file(str(out / "model.safetensors")))
    tamper(raw, "model.layers.1.mlp.up_proj")
    save_file(raw, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(minilm_edge.QuantFormatError, match="model.layers.1.mlp.up_proj") as e:
        minilm_edge.load(out)
    assert e.match(msg)


def test_cli_export_awq(folders, capsys):
    base, src, _, g64 = folders
    assert main(["export-awq", str(g64), str(base / "cli-out")]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(base / "cli-out") and "re-grouped 12 layers" in err
    for argv, code, msg in [
        (["export-awq", str(g64), str(base / "cli-2"), "--no-regroup"], 2, "--group-size 32"),
        (["export-awq", str(src), str(base / "cli-3")], 2, "not a minilm-q4 model"),
        (["export-awq", str(g64), str(base / "cli-out")], 2, "not an empty folder"),
    ]:
        assert main(argv) == code
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("minilm-edge: error:") and msg in err[0], err
    with pytest.raises(SystemExit):
        main(["export-awq", "--help"])
    assert "examples:" in capsys.readouterr().out
