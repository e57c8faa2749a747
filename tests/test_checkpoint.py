"""Untrusted model folders: broken, truncated or crafted safetensors, wrong shapes, sharded files."""
import json
import struct

import numpy as np
import pytest

import minilm_edge
from minilm_edge.errors import CheckpointError, ModelNotFoundError, UnsupportedModelError
from minilm_edge.formats.safetensors import SafetensorsFile
from tinymodel import make_model_dir, write_safetensors


def raw_file(tmp_path, header: bytes, data: bytes = b"", n=None):
    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", len(header) if n is None else n) + header + data)
    return f


def hdr(obj):
    return json.dumps(obj).encode()


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}

BROKEN = {
    "empty file": (b"", b"", 0, "truncated"),
    "header length past the end": (hdr(GOOD), b"\0" * 8, 10_000, "header length"),
    "absurd header length": (hdr(GOOD), b"", 2**62, "header length"),
    "not json": (b"{not json", b"", None, "not valid JSON"),
    "json list": (b"[1, 2]", b"", None, "not a JSON object"),
    "duplicate names": (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                        b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', b"\0" * 8, None, "duplicate"),
    "unknown dtype": (hdr({"a": {"dtype": "F8X", "shape": [2], "data_offsets": [0, 8]}}), b"\0" * 8, None, "dtype"),
    "negative dim": (hdr({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}), b"\0" * 8, None, "malformed"),
    "size mismatch": (hdr({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}), b"\0" * 8, None, "needs 12"),
    "overflowing shape": (hdr({"a": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 8]}}),
                          b"\0" * 8, None, "needs"),
    "overlap": (hdr({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                     "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}), b"\0" * 12, None, "overlaps"),
    "hole": (hdr({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}), b"\0" * 8, None, "hole"),
    "truncated data": (hdr(GOOD), b"\0" * 5, None, "truncated"),
    "trailing bytes": (hdr(GOOD), b"\0" * 12, None, "unexplained"),
    "extra key": (hdr({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}}), b"\0" * 8, None,
                  "malformed"),
    "bad metadata": (hdr({"__metadata__": {"k": 1}, **GOOD}), b"\0" * 8, None, "__metadata__"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_safetensors_are_refused(tmp_path, case):
    header, data, n, msg = BROKEN[case]
    f = tmp_path / "x.safetensors"
    if case == "empty file":
        f.write_bytes(b"")
    else:
        f = raw_file(tmp_path, header, data, n)
    with pytest.raises(CheckpointError, match=msg):
        SafetensorsFile(f)


def test_good_file_reads_as_readonly_view(tmp_path):
    f = tmp_path / "ok.safetensors"
    write_safetensors(f, {"a": ("F32", np.arange(6, dtype=np.float32).reshape(2, 3)),
                          "b": ("U8", np.arange(3, dtype=np.uint8))})
    st = SafetensorsFile(f)
    a = st.tensor("a")
    assert a.shape == (2, 3) and a[1, 2] == 5 and not a.flags.writeable
    assert list(st.tensor("b")) == [0, 1, 2]


def test_written_file_reads_back_aligned_in_the_asked_order(tmp_path):
    """formats/safetensors.write_file: every dtype round-trips (a Fortran-ordered array in C order),
    larger items come first so each tensor is aligned, and within an item size `rank` orders them;
    the `safetensors` package reads the file too."""
    from safetensors.numpy import load_file

    from minilm_edge.formats.safetensors import write_file
    rng = np.random.default_rng(0)
    tensors = {"b_u8": rng.integers(0, 255, (3, 5), dtype=np.uint8), "a_f16": rng.standard_normal(7).astype(np.float16),
               "c_f32": np.asfortranarray(rng.standard_normal((4, 3)).astype(np.float32)),
               "d_u8": np.arange(9, dtype=np.uint8), "e_i64": np.arange(3, dtype=np.int64),
               "f_empty": np.zeros((0, 4), np.float32), "g_bool": np.array([True, False])}
    write_file(tmp_path / "t.safetensors", tensors, {"k": "v"}, rank=lambda n: 0 if n == "d_u8" else 1)
    st = SafetensorsFile(tmp_path / "t.safetensors")
    assert st.metadata == {"k": "v"}
    for name, a in tensors.items():
        assert np.array_equal(st.tensor(name), a), name
        assert st.tensor(name).__array_interface__["data"][0] % a.dtype.itemsize == 0, name
    begin = {n: st.entries[n][2] for n in tensors}
    assert begin["e_i64"] < begin["c_f32"] < begin["a_f16"] < begin["d_u8"] < begin["b_u8"]
    assert all(np.array_equal(v, tensors[k]) for k, v in load_file(str(tmp_path / "t.safetensors")).items())


def test_truncated_model_file(tmp_path):
    path, _, _ = make_model_dir(tmp_path / "m")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        minilm_edge.load(path)


def test_wrong_shape_names_tensor_and_shapes(tmp_path):
    path, cfg, w = make_model_dir(tmp_path / "m")
    w = dict(w)
    w["model.layers.1.mlp.up_proj.weight"] = w["model.layers.1.mlp.up_proj.weight"][:, :-1].copy()
    write_safetensors(path / "model.safetensors", {k: ("F32", v) for k, v in w.items()})
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.up_proj.weight.*\[48, 31\].*\[48, 32\]"):
        minilm_edge.load(path)


def test_missing_tensor(tmp_path):
    path, cfg, w = make_model_dir(tmp_path / "m")
    w = {k: v for k, v in w.items() if "layers.0.self_attn.k_proj" not in k}
    write_safetensors(path / "model.safetensors", {k: ("F32", v) for k, v in w.items()})
    with pytest.raises(CheckpointError, match="k_proj"):
        minilm_edge.load(path)


def test_untied_without_lm_head(tmp_path):
    path, cfg, w = make_model_dir(tmp_path / "m")
    cfg["tie_word_embeddings"] = False
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="lm_head"):
        minilm_edge.load(path)


def test_sharded_checkpoint_with_index(tmp_path):
    path, cfg, w = make_model_dir(tmp_path / "m", tie_word_embeddings=False)
    whole = minilm_edge.load(path).forward([3, 4, 5])
    (path / "model.safetensors").unlink()
    names = sorted(w)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, keys in shards.items():
        write_safetensors(path / fname, {k: ("F32", w[k]) for k in keys})
        weight_map.update({k: fname for k in keys})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    np.testing.assert_array_equal(minilm_edge.load(path).forward([3, 4, 5]), whole)


@pytest.mark.parametrize("weight_map", [["model.safetensors"], {"a": 3}, {"a": ["model.safetensors"]}])
def test_malformed_index_is_a_checkpoint_error(tmp_path, weight_map):
    path, _, _ = make_model_dir(tmp_path / "m")
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="weight_map"):
        minilm_edge.load(path)


def test_index_cannot_escape_the_folder(tmp_path):
    path, _, w = make_model_dir(tmp_path / "m")
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../evil.safetensors"}}))
    with pytest.raises(CheckpointError, match="outside the folder"):
        minilm_edge.load(path)


def test_pickle_weights_are_never_loaded(tmp_path):
    path, _, _ = make_model_dir(tmp_path / "m")
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"\x80\x04 pickle")
    with pytest.raises(ModelNotFoundError, match="pickle files are never loaded"):
        minilm_edge.load(path)


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="model folder not found"):
        minilm_edge.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json not found"):
        minilm_edge.load(tmp_path / "empty")


@pytest.mark.parametrize("change, msg", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"model_type": "mistral", "sliding_window": 16}, "sliding_window"),
    ({"num_key_value_heads": 3}, "not a multiple"),
    ({"hidden_size": "wide"}, "wrong type"),
    ({"hidden_size": float("inf")}, "wrong type"),        # json writes Infinity, Python's json reads it
    ({"max_position_embeddings": float("-inf")}, "wrong type"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    # malformed values that used to surface as untyped internal errors
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"num_key_value_heads": 0}, "num_key_value_heads"),
    ({"rope_scaling": "llama3"}, "rope_scaling"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 0, "low_freq_factor": 1, "high_freq_factor": 4,
                       "original_max_position_embeddings": 8192}}, "rope_scaling"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 4,
                       "original_max_position_embeddings": 8192}}, "rope_scaling"),
    ({"model_type": ["llama"]}, "model_type"),
    ({"model_type": "mistral", "sliding_window": "wide"}, "sliding_window"),
    ({"rms_norm_eps": 0}, "rms_norm_eps"),
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
    ({"rope_theta": float("inf")}, "rope_theta"),
    ({"eos_token_id": "end"}, "eos_token_id"),
    ({"quantization_config": "awq"}, "quantization_config"),
])
def test_unsupported_configs(tmp_path, change, msg):
    path, cfg, _ = make_model_dir(tmp_path / "m")
    cfg.update(change)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=msg):
        minilm_edge.load(path)


def test_config_missing_field(tmp_path):
    path, cfg, _ = make_model_dir(tmp_path / "m")
    del cfg["hidden_size"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="hidden_size"):
        minilm_edge.load(path)


def test_a_config_claiming_more_blocks_than_the_weights_hold_is_refused_at_once(tmp_path):
    # inspect spent 66 s and 2.7 GB on num_hidden_layers = 1e6 before this check
    from minilm_edge.app.describe import describe
    path, cfg, _ = make_model_dir(tmp_path / "m")
    cfg["num_hidden_layers"] = 10**6
    (path / "config.json").write_text(json.dumps(cfg))
    for open_it in (minilm_edge.load, describe):
        with pytest.raises(CheckpointError, match=r"num_hidden_layers = 1000000, but the weights hold 2 blocks"):
            open_it(path)


def test_the_default_context_is_bounded_and_a_cache_too_large_is_a_usage_error(tmp_path):
    # max_position_embeddings 1e12 (a hostile or merely huge config): the default context stays
    # within DEFAULT_CONTEXT, and asking for all of it is a typed error, not ENOMEM.
    from minilm_edge.runtime.model import DEFAULT_CONTEXT
    path, cfg, _ = make_model_dir(tmp_path / "m")
    cfg["max_position_embeddings"] = 10**12
    (path / "config.json").write_text(json.dumps(cfg))
    model = minilm_edge.load(path)
    assert model.new_cache().max_len == DEFAULT_CONTEXT
    with pytest.raises(minilm_edge.UsageError, match="cannot be allocated"):
        model.new_cache(10**12)
