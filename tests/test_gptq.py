"""GPTQ after AWQ (minilm_edge/quant/gptq.py): the blocked code against its twin reference/gptq.py, the
error it is there to lower, and the folder storing exactly its codes."""
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

import minilm_edge
from minilm_edge.app.cli import main
from minilm_edge.formats.q4 import Q4Linear, unpack_nibbles
from minilm_edge.quant import gptq as G
from minilm_edge.quant.quantize import quantize
from reference import gptq as ref
from tinymodel import make_model_dir

QUANTIZABLE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)


def correlated(rng, tokens, k):
    """Inputs whose channels are correlated (a few shared factors) and unequal in size, as a linear's are."""
    f = rng.standard_normal((tokens, 8)) @ rng.standard_normal((8, k))
    return ((f + 0.5 * rng.standard_normal((tokens, k))) * rng.uniform(0.2, 3.0, k)).astype(np.float32)


def clipped(w, r=0.9):
    """Each (row, group of 32) clamped to r of its largest magnitude: a stand-in for the clip search."""
    n, k = w.shape
    wg = w.reshape(n, k // 32, 32)
    a = np.abs(wg).max(axis=2, keepdims=True) * r
    return np.clip(wg, -a, a).reshape(n, k)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k", [96, 320])              # one lazy block, and three with a ragged last one
def test_blocked_gptq_equals_reference(bits, k):
    rng = np.random.default_rng(k + bits)
    w = rng.standard_normal((24, k)).astype(np.float32)
    x = correlated(rng, 400, k)
    x[:, 5] = 0.0                                     # a dead channel
    h = x.T.astype(np.float64) @ x / len(x)
    wc = clipped(w)
    if bits == 8:
        packed, w_hat = G.gptq_linear(w, wc, h, 8, 32)
        codes = packed.qweight.astype(np.float64)
        want_codes, want_hat = ref.gptq(w, h, ref.int8_quantizer(wc, 32), None, 32, -127, 127)
    else:
        packed, w_hat = G.gptq_linear(w, wc, h, 4, 32)
        codes = unpack_nibbles(packed.qweight).astype(np.float64)
        step, zero = ref.int4_quantizer(wc, 4, 32)
        np.testing.assert_array_equal(packed.scales.astype(np.float32), step)
        np.testing.assert_array_equal(packed.zeros, zero)
        want_codes, want_hat = ref.gptq(w, h, step, zero, 32, 0, 15)
    np.testing.assert_array_equal(codes, want_codes)
    np.testing.assert_allclose(w_hat, want_hat, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_output_error_is_below_rtn_with_the_same_quantizers(bits):
    """||(Ŵ−W)X||² on the calibration inputs: GPTQ's codes beat rounding each weight to nearest on the
    same (row, group) steps and zeros."""
    rng = np.random.default_rng(bits)
    k = 256
    w = rng.standard_normal((48, k)).astype(np.float32)
    x = correlated(rng, 2000, k)
    h = x.T.astype(np.float64) @ x / len(x)
    wc = clipped(w) if bits == 4 else w
    _, w_hat = G.gptq_linear(w, wc, h, bits, 32)
    if bits == 4:
        step, zero = ref.int4_quantizer(wc, 4, 32)
        s, z = np.repeat(step, 32, 1), np.repeat(zero, 32, 1)
        rtn = (np.clip(np.round(w / s) + z, 0, 15) - z) * s
    else:
        s = np.repeat(ref.int8_quantizer(w, 32), 32, 1)
        rtn = np.clip(np.round(w / s), -127, 127) * s
    err = lambda wh: float(np.sum(np.square((wh - w) @ x.T.astype(np.float64))))
    assert err(w_hat) < 0.7 * err(rtn), (err(w_hat), err(rtn))


def test_the_folder_stores_exactly_gptqs_codes(tmp_path, monkeypatch):
    """Every int4 and int8 linear of the folder is one that gptq_linear returned, bit for bit (the
    writer must not re-round the dequantized weights: their min/max is not the clip's range)."""
    made = []
    real = G.gptq_linear

    def recording(*a, **kw):
        packed, w_hat = real(*a, **kw)
        made.append(packed)
        return packed, w_hat
    monkeypatch.setattr(G, "gptq_linear", recording)
    src, _, _ = make_model_dir(tmp_path / "src", num_hidden_layers=2, **QUANTIZABLE)
    out = quantize(src, tmp_path / "out", method="awq", seq_len=32, samples=4, group_size=32,
                   int8="v@all,down@1", gptq=True, progress=False,
                   awq_options={"gptq_linears": ("q", "k", "v", "o", "gate", "up", "down")})
    key = lambda *arrays: b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)
    made_keys = {key(p.qweight, p.scales, *((p.zeros,) if isinstance(p, Q4Linear) else ())) for p in made}
    t = load_file(str(out / "model.safetensors"))
    stored = [p[:-len(".qweight")] for p in t if p.startswith("model.layers.") and p.endswith(".qweight")]
    assert len(stored) == 14 and len(made) == 14
    for p in stored:
        extra = (t[p + ".zeros"],) if p + ".zeros" in t else ()
        assert key(t[p + ".qweight"], t[p + ".scales"], *extra) in made_keys, p
    assert t["model.layers.1.mlp.down_proj.qweight"].dtype == np.int8
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["awq"]["gptq"] is True and qc["awq"]["gptq_damp"] == 0.1


def test_quantize_gptq_cli_loads_and_runs(tmp_path, capsys):
    src, _, _ = make_model_dir(tmp_path / "src", num_hidden_layers=2, **QUANTIZABLE)
    out = tmp_path / "out"
    assert main(["quantize", str(src), str(out), "--samples", "16", "--seq-len", "32", "--group-size", "32",
                 "--gptq"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["awq"]["gptq"] is True
    m, f = minilm_edge.load(out), minilm_edge.load(src)
    ids = np.arange(3, 19)
    a, b = m.forward(ids), f.forward(ids)
    rms = lambda v: float(np.sqrt(np.mean(np.square(v))))
    assert np.all(np.isfinite(a)) and rms(a - b) < 0.5 * rms(b), (rms(a - b), rms(b))


@pytest.mark.parametrize("args, msg", [(["--gptq", "--keep-salient", "1"], "--gptq and --keep-salient"),
                                       (["--gptq", "--method", "rtn"], "apply to --method awq only"),
                                       (["--gptq-damp", "0.1"], "--gptq-damp and --gptq-linears apply to --gptq only"),
                                       (["--gptq-linears", "q"], "--gptq-damp and --gptq-linears apply to --gptq only"),
                                       (["--gptq", "--gptq-linears", "q,x"], "gptq linears must be some of"),
                                       (["--gptq", "--gptq-damp", "0"], "gptq_damp must be a positive number")])
def test_gptq_refuses_what_it_cannot_do(tmp_path, capsys, args, msg):
    src, _, _ = make_model_dir(tmp_path / "src", **QUANTIZABLE)
    assert main(["quantize", str(src), str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_gptq_linears_limits_which_linears_gptq_rounds(tmp_path, monkeypatch):
    shapes = []
    real = G.gptq_linear
    monkeypatch.setattr(G, "gptq_linear", lambda w, *a, **kw: shapes.append(w.shape) or real(w, *a, **kw))
    src, _, _ = make_model_dir(tmp_path / "src", num_hidden_layers=2, **QUANTIZABLE)
    quantize(src, tmp_path / "out", method="awq", seq_len=32, samples=4, group_size=32, gptq=True,
             awq_options={"gptq_linears": ("down",)}, progress=False)
    assert shapes == [(64, 96), (64, 96)]                   # down [D, F] in each block, nothing else
