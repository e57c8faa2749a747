"""The q6 storage format (formats/q4.py pack_q6): 6-bit codes packed 4 in 3 bytes in the file, int8
in memory. A folder with a q6 embedding and q6 linears runs bit-identically to an int8 folder
holding the same codes; its bytes are counted as stored; broken packed tensors are refused."""
import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import minilm_edge
from minilm_edge.app.cli import main
from minilm_edge.formats.q4 import Q6_MAX, pack_q6, quantize_q6, unpack_q6
from minilm_edge.quant.quantize import quantize
from reference import q4 as ref_q4
from tinymodel import make_model_dir

QUANTIZABLE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
V_PROJ = "model.layers.0.self_attn.v_proj"
EMBED = "model.embed_tokens"


@pytest.mark.parametrize("n, k", [(1, 4), (3, 32), (17, 96), (5, 576)])
def test_unpack_matches_the_reference_and_round_trips(n, k):
    rng = np.random.default_rng(n * k)
    q = rng.integers(-Q6_MAX, Q6_MAX + 1, (n, k)).astype(np.int8)
    q[0, :2] = (-Q6_MAX, Q6_MAX)                          # both ends of the range
    packed = pack_q6(q)
    assert packed.dtype == np.uint8 and packed.shape == (n, 3 * k // 4)
    assert np.array_equal(unpack_q6(packed, k), q)
    assert np.array_equal(ref_q4.unpack_q6(packed, k), q)
    # any byte pattern a writer makes decodes the same both ways
    noise = rng.integers(0, 256, (n, 3 * k // 4)).astype(np.uint8)
    ref = ref_q4.unpack_q6(noise, k)
    if ref.min() >= -Q6_MAX:
        assert np.array_equal(unpack_q6(noise, k), ref)
    else:
        with pytest.raises(minilm_edge.QuantFormatError, match="-32"):
            unpack_q6(noise, k)


def test_q6_quantizer_codes_and_error():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 128)).astype(np.float32)
    q8 = quantize_q6(w, 32)
    assert np.abs(q8.qweight).max() == Q6_MAX                     # every group reaches its end code
    w_hat = ref_q4.dequantize_q8(q8.qweight, q8.scales, 32)
    step = np.repeat(q8.scales.astype(np.float32), 32, axis=1)
    assert np.all(np.abs(w_hat - w) <= 0.5 * step + 1e-6)


def test_pack_refuses_codes_out_of_range():
    with pytest.raises(minilm_edge.UsageError, match="-31..31"):
        pack_q6(np.full((1, 4), 32, np.int8))


def _int8_twin(q6_dir, out_dir):
    """The same folder with every q6 tensor unpacked to int8 (the reference's unpacking)."""
    import shutil
    shutil.copytree(q6_dir, out_dir)
    (out_dir / "manifest.json").unlink()
    raw = dict(load_file(str(q6_dir / "model.safetensors")))
    for name, arr in list(raw.items()):
        if name.endswith(".qweight") and arr.dtype == np.uint8 and name[:-8] + ".zeros" not in raw:
            raw[name] = ref_q4.unpack_q6(arr, 4 * arr.shape[1] // 3)
    save_file(raw, str(out_dir / "model.safetensors"))
    return out_dir


@pytest.fixture(scope="module")
def q6_folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("q6")
    src, _, _ = make_model_dir(tmp / "src", num_hidden_layers=2, **QUANTIZABLE)
    out = quantize(src, tmp / "q6", method="awq", seq_len=32, samples=2, group_size=32, embed="q6",
                   embed_group_size=64, int8="v@all,down@all", int6="v@0,o@1,down@0", progress=False,
                   generator="float")
    return src, out


def test_q6_folder_is_stored_packed_and_recorded(q6_folder):
    src, out = q6_folder
    t = load_file(str(out / "model.safetensors"))
    assert "model.embed_tokens.weight" not in t and "lm_head.weight" not in t     # tied: stored once
    assert t[EMBED + ".qweight"].dtype == np.uint8 and t[EMBED + ".qweight"].shape[1] == 3 * 64 // 4
    assert t[EMBED + ".scales"].shape[1] == 64 // 64                                # --embed-group-size 64
    for name in (V_PROJ, "model.layers.1.self_attn.o_proj", "model.layers.0.mlp.down_proj"):
        assert t[name + ".qweight"].dtype == np.uint8 and name + ".zeros" not in t
    for name in ("model.layers.1.self_attn.v_proj", "model.layers.1.mlp.down_proj"):    # --int8 less --int6
        assert t[name + ".qweight"].dtype == np.int8
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["embed"] == "q6" and qc["embed_group_size"] == 64
    assert qc["int6_layers"] == {"down": [0], "o": [1], "v": [0]}
    assert qc["int8_layers"] == {"down": [1], "v": [1]}
    from minilm_edge.app.describe import describe
    info = describe(out, layers=True)
    assert info["embedding"] == "q6"
    row = next(r for r in info["layers"] if r["layer"] == 0 and r["name"] == "v")
    n, k = row["shape"]
    assert row["format"] == "q6" and row["bits"] == 6
    assert row["bytes"] == n * k * 3 // 4 + 2 * n * (k // row["group_size"])
    assert row["bpw"] == round(8 * row["bytes"] / (n * k), 4)


def test_q6_runs_bit_identically_to_int8_with_the_same_codes(q6_folder, tmp_path):
    from minilm_edge.runtime.linear import Q8, Q8Rows
    _, out = q6_folder
    twin = _int8_twin(out, tmp_path / "i8")
    a, b = minilm_edge.load(out), minilm_edge.load(twin)
    assert isinstance(a.weights.embed, Q8Rows) and isinstance(a.weights.blocks[0].v, Q8)
    ids = np.arange(3, 40)
    assert np.array_equal(a.forward(ids), b.forward(ids))                          # prefill and the head
    assert a.fused_decode and b.fused_decode
    outs = []
    for m in (a, b):                                 # single-stream decode steps, then the batched step
        cache, caches = m.new_cache(), [m.new_cache(), m.new_cache()]
        logits = [m.forward(ids[:8], cache, last_only=True)]
        for c, start in zip(caches, (5, 9)):
            m.forward(ids[start:start + 6], c)
        for t in range(10):
            nxt = int(np.argmax(logits[-1]))
            logits.append(m.decode_batch([int(ids[t]), int(ids[t + 1])], caches))
            logits.append(m.forward(np.array([nxt]), cache, last_only=True))
        outs.append(logits)
    for i, (x, y) in enumerate(zip(*outs)):
        assert np.array_equal(x, y), (i, float(np.abs(x - y).max()))


@pytest.mark.parametrize("tamper, msg", [
    (lambda raw: raw.__setitem__(V_PROJ + ".qweight", raw[V_PROJ + ".qweight"][:, :-3].copy()), "v_proj"),
    (lambda raw: raw.__setitem__(EMBED + ".qweight", raw[EMBED + ".qweight"][:-1].copy()), "embed_tokens"),
    (lambda raw: raw.__setitem__(EMBED + ".qweight", np.zeros_like(raw[EMBED + ".qweight"])), "-32"),
    (lambda raw: raw.__setitem__(V_PROJ + ".scales", np.tile(raw[V_PROJ + ".scales"], (1, 3))), "v_proj"),
])
def test_broken_q6_tensors_are_refused_in_one_line(q6_folder, tmp_path, tamper, msg, capsys):
    import shutil
    _, out = q6_folder
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    (bad / "manifest.json").unlink()             # as a plain folder: the format checks must refuse it
    raw = dict(load_file(str(bad / "model.safetensors")))
    tamper(raw)
    save_file(raw, str(bad / "model.safetensors"))
    with pytest.raises((minilm_edge.QuantFormatError, minilm_edge.errors.CheckpointError), match=msg):
        minilm_edge.load(bad)
    assert main(["generate", str(bad), "--prompt", "hello", "--max-new-tokens", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and msg in err and "Traceback" not in err


def test_int6_options_are_checked(tmp_path):
    src, _, _ = make_model_dir(tmp_path / "src", **QUANTIZABLE)
    with pytest.raises(minilm_edge.UsageError, match="--int6"):
        quantize(src, tmp_path / "a", method="rtn", int6="v@7", progress=False)
    with pytest.raises(minilm_edge.UsageError, match="--gptq"):
        quantize(src, tmp_path / "b", method="awq", int6="v@all", gptq=True, progress=False)
    with pytest.raises(minilm_edge.UsageError, match="--embed-group-size"):
        quantize(src, tmp_path / "c", method="rtn", embed="q6", embed_group_size=48, progress=False)
    assert not any((tmp_path / d).exists() for d in "abc")
