"""The q6 storage format (formats/q4.py): 6-bit codes, 3 bytes per 4, in the file in the kernels'
layout (pack_q6_rows, kernels/quant_q6.py: mapped at load, not copied), in older files packed
4 in 3 bytes (pack_q6: re-packed at load, with a note). A folder with a q6 embedding and q6 linears
runs bit-identically to an int8 folder holding the same codes (the decode head with int8 activations:
the int8 product of its codes); its bytes are counted as stored; broken q6 tensors are refused."""
import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import minilm_edge
from minilm_edge.app.cli import main
from minilm_edge.formats.q4 import (
    Q6_LAYOUT_KEY,
    Q6_MAX,
    pack_q6,
    pack_q6_rows,
    quantize_q6,
    unpack_q6,
    unpack_q6_rows,
)
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
    if k % 32 == 0:                              # the kernels' layout round-trips, as the reference reads it
        rows = pack_q6_rows(q)
        assert np.array_equal(unpack_q6_rows(rows, k), q)
        assert np.array_equal(ref_q4.unpack_q6_rows(rows, k), q)
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


def _rewrite_q6(q6_dir, out_dir, convert, metadata=None):
    """The same folder (no manifest) with every q6 codes tensor `convert(codes [N, K])`-ed, written by
    safetensors itself with `metadata` (None: no q6 layout key, i.e. the older "packed" layout)."""
    import shutil
    shutil.copytree(q6_dir, out_dir)
    (out_dir / "manifest.json").unlink()
    raw = dict(load_file(str(q6_dir / "model.safetensors")))
    for name, arr in list(raw.items()):
        if name.endswith(".qweight") and arr.dtype == np.uint8 and name[:-8] + ".zeros" not in raw:
            raw[name] = convert(ref_q4.unpack_q6_rows(arr, 4 * arr.shape[1] // 3))
    save_file(raw, str(out_dir / "model.safetensors"), metadata=metadata)
    return out_dir


def _int8_twin(q6_dir, out_dir):
    """The same folder with every q6 tensor unpacked to int8 (the reference's unpacking)."""
    return _rewrite_q6(q6_dir, out_dir, lambda q: q)


def _packed_twin(q6_dir, out_dir):
    """The same folder as a version before 2026-12-08 wrote it: q6 codes packed 4 in 3 bytes, no key."""
    return _rewrite_q6(q6_dir, out_dir, pack_q6)


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


def _decode_run(m):
    """Logits of single-stream decode steps interleaved with batched steps (two pooled sequences)."""
    ids = np.arange(3, 40)
    cache, caches = m.new_cache(), [m.new_cache(), m.new_cache()]
    logits = [m.forward(ids[:8], cache, last_only=True)]
    for c, start in zip(caches, (5, 9)):
        m.forward(ids[start:start + 6], c)
    for t in range(10):
        nxt = int(np.argmax(logits[-1]))
        logits.append(m.decode_batch([int(ids[t]), int(ids[t + 1])], caches))
        logits.append(m.forward(np.array([nxt]), cache, last_only=True))
    return logits


@pytest.mark.parametrize("int8_act", [True, False])
def test_q6_runs_bit_identically_to_int8_with_the_same_codes(q6_folder, tmp_path, int8_act):
    """Prefill, the head, the one-call single-stream and batched steps: the q6 kernels (6-bit rows in
    memory, kernels/quant_q6.py) give the int8 kernels' bits. With int8 activations the decode head of a
    q6 table multiplies int8 activations (an int8 table's keeps float32), so there the blocks are
    compared under one head and the q6 head on its own (`test_q6_head_*`)."""
    from minilm_edge.runtime.linear import Q6, Q8, Q8Rows
    _, out = q6_folder
    twin = _int8_twin(out, tmp_path / "i8")
    a, b = minilm_edge.load(out, int8_activations=int8_act), minilm_edge.load(twin, int8_activations=int8_act)
    assert isinstance(a.weights.embed, Q8Rows) and isinstance(a.weights.blocks[0].v, Q6)
    assert isinstance(a.weights.lm_head, Q6) and type(b.weights.lm_head) is Q8 and a.weights.lm_head.decode_i8
    assert not a.weights.blocks[0].v.decode_i8
    ids = np.arange(3, 40)
    assert np.array_equal(a.forward(ids), b.forward(ids))                          # prefill and the head
    assert np.array_equal(a.weights.embed[ids], b.weights.embed[ids])              # lookups
    assert a.fused_decode and b.fused_decode and a.decode_plan.q8_table[..., 3].max() == 1
    if int8_act:
        a.weights.lm_head = b.weights.lm_head        # the blocks under one head
    for i, (x, y) in enumerate(zip(_decode_run(a), _decode_run(b))):
        assert np.array_equal(x, y), (i, float(np.abs(x - y).max()))


def test_q6_head_with_int8_activations_is_the_int8_product(q6_folder):
    """The q6 head in decode (int8 activations): the reference int8 x int8 product of its codes to
    float32 rounding; the batched head's rows are the single-stream head's bits."""
    from minilm_edge.kernels.quant_i8_matmul import ACT_BLOCK, INT8_DOT
    from minilm_edge.kernels.quant_q6 import i8_ok
    _, out = q6_folder
    m = minilm_edge.load(out)
    head = m.weights.lm_head
    X = np.random.default_rng(3).standard_normal((5, head.shape[1])).astype(np.float32)
    rows = head.rows(X)
    assert np.array_equal(rows, np.stack([head.matvec(x) for x in X]))
    assert i8_ok(head.p) == INT8_DOT
    q = ref_q4.unpack_q6_rows(load_file(str(out / "model.safetensors"))[EMBED + ".qweight"], head.shape[1])
    scales = load_file(str(out / "model.safetensors"))[EMBED + ".scales"]
    ref = (ref_q4.matmul_q8_i8(q, scales, head.p.group_size, X, ACT_BLOCK) if INT8_DOT
           else ref_q4.matmul_q8(q, scales, head.p.group_size, X))
    np.testing.assert_allclose(rows, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def test_q6_stays_6_bit_in_memory(q6_folder, tmp_path):
    """A q6 linear's arrays hold 6 bits a code (3/4 of its int8 twin's), and so do the one-call step's
    q6 rows: bytes read per token follow the file."""
    _, out = q6_folder
    a, b = minilm_edge.load(out), minilm_edge.load(_int8_twin(out, tmp_path / "i8"))
    for name in ("v", "down"):
        la, lb = getattr(a.weights.blocks[0], name), getattr(b.weights.blocks[0], name)
        assert la.p.qweight.nbytes * 4 == lb.p.qweight.nbytes * 3
        assert la.nbytes < lb.nbytes
    ha, hb = a.weights.lm_head, b.weights.lm_head
    assert ha.p.qweight.nbytes * 4 == hb.p.qweight.nbytes * 3
    q8a, q8b = a.decode_plan.q8, b.decode_plan.q8
    assert sum(s.q6w.nbytes + s.qweight.nbytes for s in q8a) < sum(s.q6w.nbytes + s.qweight.nbytes for s in q8b)
    assert a.decode_plan.nbytes < b.decode_plan.nbytes


@pytest.mark.parametrize("n, k, g", [(6, 576, 64), (4, 1536, 128), (2, 160, 32), (2, 96, 32)])
def test_q6_kernels_match_int8_kernels(n, k, g):
    """Every q6 product (float32 decode and batched rows, prefill with int8 and float32 activations) is
    bit for bit the int8 kernel's on the same codes, whole chunks of 128 channels or a short last one."""
    from minilm_edge.kernels.quant_q6 import prepare_q6_codes
    from minilm_edge.runtime.linear import Q6, Q8
    rng = np.random.default_rng(n * k)
    q8 = quantize_q6(rng.standard_normal((n, k)).astype(np.float32), g)
    a, b = Q8(q8), Q6(prepare_q6_codes(q8))
    X = rng.standard_normal((40, k)).astype(np.float32)
    assert np.array_equal(a.matmul(X), b.matmul(X))
    a.int8_activations = b.int8_activations = False
    assert np.array_equal(a.matmul(X), b.matmul(X))
    assert np.array_equal(a.matvec(X[0]), b.matvec(X[0]))
    assert np.array_equal(a.rows(X[:7]), b.rows(X[:7]))


ROWS = {Q6_LAYOUT_KEY: "rows"}


@pytest.mark.parametrize("tamper, layout, msg", [
    (lambda raw: raw.__setitem__(V_PROJ + ".qweight", raw[V_PROJ + ".qweight"][:, :-3].copy()), ROWS, "v_proj"),
    (lambda raw: raw.__setitem__(V_PROJ + ".qweight", raw[V_PROJ + ".qweight"][:, :-3].copy()), None, "v_proj"),
    (lambda raw: raw.__setitem__(EMBED + ".qweight", raw[EMBED + ".qweight"][:-1].copy()), ROWS, "embed_tokens"),
    # the older packed layout is decoded at load, which refuses a code no writer makes; the mapped
    # rows layout is not read at load (as int8 codes are not): `verify` checks those bytes
    (lambda raw: raw.__setitem__(EMBED + ".qweight", np.zeros_like(raw[EMBED + ".qweight"])), None, "-32"),
    (lambda raw: raw.__setitem__(V_PROJ + ".scales", np.tile(raw[V_PROJ + ".scales"], (1, 3))), ROWS, "v_proj"),
    (lambda raw: None, {Q6_LAYOUT_KEY: "planar"}, "upgrade minilm_edge"),       # a layout from the future
])
def test_broken_q6_tensors_are_refused_in_one_line(q6_folder, tmp_path, tamper, layout, msg, capsys):
    import shutil
    _, out = q6_folder
    base = _packed_twin(out, tmp_path / "old") if layout is None else out     # the older layout's bytes, or ours
    bad = tmp_path / "bad"
    shutil.copytree(base, bad)
    (bad / "manifest.json").unlink(missing_ok=True)   # as a plain folder: the format checks must refuse it
    raw = dict(load_file(str(bad / "model.safetensors")))
    tamper(raw)
    save_file(raw, str(bad / "model.safetensors"), metadata=layout)
    with pytest.raises((minilm_edge.QuantFormatError, minilm_edge.errors.CheckpointError), match=msg):
        minilm_edge.load(bad)
    assert main(["generate", str(bad), "--prompt", "hello", "--max-new-tokens", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and msg in err and "Traceback" not in err


def _owner(a):
    from minilm_edge.runtime.decode import _buffer_owner
    return _buffer_owner(a)


def test_q6_weights_are_views_of_the_mapped_file(q6_folder, capsys):
    """quantize writes the q6 codes in the kernels' layout and says so in the file: every q6 array
    the model reads (each linear's codes and scales, the embedding/head table, the one-call step's
    q6 rows) is a read-only view of the mapped file, not a copy; no note about the layout."""
    from minilm_edge.formats.tensors import TensorSource
    from minilm_edge.runtime.linear import Q6
    _, out = q6_folder
    assert TensorSource(out).metadata_of(V_PROJ + ".qweight")[Q6_LAYOUT_KEY] == "rows"
    m = minilm_edge.load(out)
    assert "note:" not in capsys.readouterr().err
    mm = m.weights.source.files["model.safetensors"]._mm
    q6 = [m.weights.lm_head, m.weights.blocks[0].v, m.weights.blocks[1].o, m.weights.blocks[0].down]
    assert all(isinstance(lin, Q6) and not lin.repacked for lin in q6)
    for lin in q6:
        for a in (lin.p.qweight, lin.p.scales):
            assert _owner(a) is mm and not a.flags.writeable and not a.flags.owndata
    stacks = [s for s in m.decode_plan.q8 if s.q6w.shape[0] > 2]        # the kinds holding q6 rows
    assert len(stacks) == 3                                              # q|k|v, o, down
    for s in stacks:
        assert _owner(s.q6w) is mm and _owner(s.q6s) is mm
    # the step reads the same bytes as the linears: block 0's v rows are in the q|k|v kind's q6 rows
    v = m.weights.blocks[0].v.p.qweight
    assert np.shares_memory(v, m.decode_plan.q8[0].q6w)


def test_older_packed_folder_loads_equal_with_a_note(q6_folder, tmp_path, capsys):
    """A folder written before 2026-12-08 (q6 codes packed 4 in 3 bytes, no layout key) still loads:
    re-packed into anonymous memory, with one note saying how to rewrite it, and computes the same
    bits as the mapped folder (prefill, lookups, single-stream and batched decode)."""
    from minilm_edge.runtime.linear import Q6
    _, out = q6_folder
    old = _packed_twin(out, tmp_path / "old")
    a = minilm_edge.load(out)
    capsys.readouterr()
    b = minilm_edge.load(old)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note: ") and "packed layout" in err[0] and "quantize" in err[0]
    lin = b.weights.blocks[0].v
    assert isinstance(lin, Q6) and lin.repacked
    assert _owner(lin.p.qweight) is not b.weights.source.files["model.safetensors"]._mm
    ids = np.arange(3, 40)
    assert np.array_equal(a.forward(ids), b.forward(ids))
    assert np.array_equal(a.weights.embed[ids], b.weights.embed[ids])
    for i, (x, y) in enumerate(zip(_decode_run(a), _decode_run(b))):
        assert np.array_equal(x, y), i


def test_int6_options_are_checked(tmp_path):
    src, _, _ = make_model_dir(tmp_path / "src", **QUANTIZABLE)
    with pytest.raises(minilm_edge.UsageError, match="--int6"):
        quantize(src, tmp_path / "a", method="rtn", int6="v@7", progress=False)
    with pytest.raises(minilm_edge.UsageError, match="--gptq"):
        quantize(src, tmp_path / "b", method="awq", int6="v@all", gptq=True, progress=False)
    with pytest.raises(minilm_edge.UsageError, match="--embed-group-size"):
        quantize(src, tmp_path / "c", method="rtn", embed="q6", embed_group_size=48, progress=False)
    assert not any((tmp_path / d).exists() for d in "abc")
