"""formats/gguf.py: import_gguf on a tiny GGUF written here with gguf.GGUFWriter, the way llama.cpp's converter does.

The weights are random HF-order arrays; q/k are stored in llama.cpp's RoPE row order and some
tensors as Q8_0, so the import must undo the permutation, reverse the GGUF shapes and dequantize.
"""
import json

import gguf  # a dependency of minilm_edge (pyproject), so never skipped
import numpy as np
import pytest
import safetensors.numpy
from gguf import GGMLQuantizationType, TokenType
from gguf.quants import dequantize, quantize
from hypothesis import given, settings, strategies as st
from safetensors.numpy import load_file
from tokenizers import Tokenizer
from tokenizers.pre_tokenizers import ByteLevel

from minilm_edge.errors import CheckpointError, ModelNotFoundError, UnsupportedModelError, UsageError
from minilm_edge.formats import gguf as gguf_import
from minilm_edge.formats.gguf import import_gguf

# Tiny model: D hidden, F feed-forward, H heads, Hkv kv heads, Dh head dim, L layers.
D, F, H, HKV, DH, L = 32, 64, 4, 2, 8, 2
CONTEXT = 128
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = ["<tool>"]
BYTES = sorted(ByteLevel.alphabet())  # the 256 byte-level characters: any text can be encoded
MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w"), ("o", "r"),
          ("Ġw", "or"), ("l", "d"), ("Ġwor", "ld"), ("Ġ", "t"), ("Ġt", "he")]
TOKENS = CONTROL + USER_DEFINED + BYTES + ["".join(m) for m in MERGES]
TYPES = [TokenType.CONTROL] * len(CONTROL) + [TokenType.USER_DEFINED] * len(USER_DEFINED) + \
        [TokenType.NORMAL] * (len(TOKENS) - len(CONTROL) - len(USER_DEFINED))
V = len(TOKENS)
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def llamacpp_permute(w, n_head):
    """HF -> GGUF q/k row order, as written by llama.cpp's convert_hf_to_gguf.py."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def hf_weights(tied, seed=0):
    rng = np.random.default_rng(seed)
    def rand(*shape):
        return rng.standard_normal(shape).astype(np.float32)
    w = {"model.embed_tokens.weight": rand(V, D), "model.norm.weight": rand(D)}
    if not tied:
        w["lm_head.weight"] = rand(V, D)
    for i in range(L):
        p = f"model.layers.{i}."
        w |= {p + "input_layernorm.weight": rand(D), p + "post_attention_layernorm.weight": rand(D),
              p + "self_attn.q_proj.weight": rand(H * DH, D), p + "self_attn.k_proj.weight": rand(HKV * DH, D),
              p + "self_attn.v_proj.weight": rand(HKV * DH, D), p + "self_attn.o_proj.weight": rand(D, H * DH),
              p + "mlp.gate_proj.weight": rand(F, D), p + "mlp.up_proj.weight": rand(F, D),
              p + "mlp.down_proj.weight": rand(D, F)}
    return w


# HF name -> GGUF name (llama.cpp's convention), written out independently of the importer's table.
GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
GGUF_LAYER = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
              "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
              "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
              "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
              "mlp.down_proj.weight": "ffn_down.weight"}


def gguf_name(hf):
    if hf in GGUF_GLOBAL:
        return GGUF_GLOBAL[hf]
    _, _, i, rest = hf.split(".", 3)  # model.layers.{i}.{rest}
    return f"blk.{i}.{GGUF_LAYER[rest]}"


# Stored as Q8_0 (block of 32 along a row): exercises dequantization and the permutation after it.
Q8_TENSORS = {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
              "model.layers.1.self_attn.k_proj.weight"}


def write_tiny_gguf(path, *, tied=True, arch="llama", pre="smollm", add_bos=False, skip=(), extra=None,
                    counts=None):
    """Write the tiny model as llama.cpp would; return the HF-order weights the import must give back.

    `skip`: GGUF tensor names left out; `extra(writer)`: adds keys or tensors of a test's own;
    `counts`: {key after "llama.": value} written instead of the model's own (an int as uint64,
    anything else as a string), for hostile metadata.
    """
    weights = hf_weights(tied)
    w = gguf.GGUFWriter(str(path), arch)
    own = {"block_count": L, "embedding_length": D, "feed_forward_length": F,
           "attention.head_count": H, "attention.head_count_kv": HKV} | (counts or {})
    for key, value in own.items():
        if isinstance(value, int):
            w.add_uint64(f"llama.{key}", value)
        else:
            w.add_string(f"llama.{key}", str(value))
    w.add_context_length(CONTEXT)
    w.add_rope_dimension_count(DH)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(TOKENS)
    w.add_token_types([int(t) for t in TYPES])
    w.add_token_merges([" ".join(m) for m in MERGES])
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(TEMPLATE)
    if extra is not None:
        extra(w)
    expected = {}
    for hf, arr in weights.items():
        if gguf_name(hf) in skip:
            continue
        stored = arr
        if hf.endswith("q_proj.weight"):
            stored = llamacpp_permute(arr, H)
        elif hf.endswith("k_proj.weight"):
            stored = llamacpp_permute(arr, HKV)
        if hf in Q8_TENSORS:
            q = quantize(stored, GGMLQuantizationType.Q8_0)
            w.add_tensor(gguf_name(hf), q, raw_dtype=GGMLQuantizationType.Q8_0)
            # Q8_0 blocks lie within a row, so quantization commutes with the row permutation.
            expected[hf] = dequantize(quantize(arr, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gguf_name(hf), stored)
            expected[hf] = arr
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.gguf"
    return path, write_tiny_gguf(path)


def test_config_matches_the_gguf(tiny_model_dir):
    out = tiny_model_dir
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (D, F, L)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (H, HKV, DH)
    assert config["rope_theta"] == 50000.0 and config["rms_norm_eps"] == pytest.approx(1e-5)
    assert config["max_position_embeddings"] == CONTEXT and config["vocab_size"] == V
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert config["tie_word_embeddings"] is True and config["torch_dtype"] == "float16"
    assert "rope_scaling" not in config
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def test_weights_come_back_in_hf_order_exactly(tiny, tmp_path):
    out = import_gguf(tiny[0], tmp_path / "model", dtype="float32", progress=False)
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(tiny[1]) and "lm_head.weight" not in got
    for name, want in tiny[1].items():
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], want, err_msg=name)


def test_float16_is_the_default_dtype(tiny, tmp_path):
    got = load_file(str(import_gguf(tiny[0], tmp_path / "model", progress=False) / "model.safetensors"))
    assert set(got) == set(tiny[1])
    for name, want in tiny[1].items():
        np.testing.assert_array_equal(got[name], want.astype(np.float16), err_msg=name)


def test_output_weight_gives_an_untied_lm_head(tmp_path):
    want = write_tiny_gguf(tmp_path / "untied.gguf", tied=False)
    out = import_gguf(tmp_path / "untied.gguf", tmp_path / "model", dtype="float32", progress=False)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    np.testing.assert_array_equal(load_file(str(out / "model.safetensors"))["lm_head.weight"], want["lm_head.weight"])


@settings(max_examples=50, deadline=None)
@given(n_head=st.integers(1, 6), half=st.integers(1, 8), cols=st.integers(1, 5))
def test_unpermute_inverts_llamacpp_permute(n_head, half, cols):
    # The inverse over many head counts; import_gguf covers it for this file's H and Hkv only.
    w = np.arange(n_head * 2 * half * cols, dtype=np.float32).reshape(n_head * 2 * half, cols)
    np.testing.assert_array_equal(gguf_import.unpermute_rope_rows(llamacpp_permute(w, n_head), n_head), w)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    write_tiny_gguf(folder / "tiny.gguf")
    return import_gguf(folder / "tiny.gguf", folder / "model", progress=False)


@pytest.fixture
def tokenizer(tiny_model_dir):
    return Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))


def test_tokenizer_uses_the_gguf_ids_and_merges(tokenizer):
    assert tokenizer.get_vocab_size() == V
    ids = tokenizer.encode("hello world the 42", add_special_tokens=False).ids
    assert [TOKENS[i] for i in ids] == ["hello", "Ġworld", "Ġthe", "Ġ", "4", "2"]  # digits split one by one


def test_control_tokens_are_parsed_only_when_asked(tokenizer):
    text = "<|im_start|>user<|im_end|>"
    assert tokenizer.encode(text, add_special_tokens=False).ids[0] == 1
    tokenizer.encode_special_tokens = True  # llama.cpp's parse_special=false
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert 1 not in ids and 2 not in ids and tokenizer.decode(ids) == text
    # user-defined tokens are split out even then, as llama.cpp does
    assert TOKENS.index("<tool>") in tokenizer.encode("a<tool>b", add_special_tokens=False).ids


def test_no_bos_is_added_unless_the_gguf_says_so(tokenizer, tmp_path):
    assert tokenizer.encode("hello").ids == [TOKENS.index("hello")]
    write_tiny_gguf(tmp_path / "bos.gguf", add_bos=True)
    with_bos = Tokenizer.from_file(str(import_gguf(tmp_path / "bos.gguf", tmp_path / "bos", progress=False)
                                       / "tokenizer.json"))
    assert with_bos.encode("hello").ids == [1, TOKENS.index("hello")]
    assert json.loads((tmp_path / "bos" / "tokenizer_config.json").read_text())["add_bos_token"] is True


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_tokenizer_round_trips_any_text(tiny_model_dir, text):
    tokenizer = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_tokenizer_config_has_template_and_special_strings(tiny_model_dir):
    config = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == TEMPLATE
    assert (config["bos_token"], config["eos_token"], config["pad_token"], config["unk_token"]) == \
        ("<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert config["add_bos_token"] is False and config["model_max_length"] == CONTEXT


def test_failure_midway_leaves_nothing(tiny, tmp_path, monkeypatch):
    real_save_file = safetensors.numpy.save_file

    def save_then_interrupt(*args, **kwargs):  # Ctrl-C once the tokenizer and the weights are written
        real_save_file(*args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(safetensors.numpy, "save_file", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        import_gguf(tiny[0], tmp_path / "out" / "model", progress=False)
    assert list((tmp_path / "out").iterdir()) == []  # neither the model nor a temporary folder


def test_existing_non_empty_out_dir_is_refused(tiny, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not an empty folder"):
        import_gguf(tiny[0], out, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_existing_empty_out_dir_is_filled(tiny, tmp_path):
    (tmp_path / "model").mkdir()
    assert (import_gguf(tiny[0], tmp_path / "model", progress=False) / "model.safetensors").is_file()


def test_missing_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        import_gguf(tmp_path / "nope.gguf", tmp_path / "model", progress=False)


def test_not_a_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"this is not a gguf file at all")
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        import_gguf(tmp_path / "x.gguf", tmp_path / "model", progress=False)
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("keep", [0.3, 0.9, 0.999])
def test_truncated_gguf(tiny, tmp_path, keep):
    data = tiny[0].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError):
        import_gguf(cut, tmp_path / "model", progress=False)
    assert not (tmp_path / "model").exists()


def test_other_architecture_is_unsupported(tmp_path):
    write_tiny_gguf(tmp_path / "q.gguf", arch="qwen2")
    with pytest.raises(UnsupportedModelError, match="architecture is 'qwen2'"):
        import_gguf(tmp_path / "q.gguf", tmp_path / "model", progress=False)


def test_unknown_pre_tokenizer_is_unsupported(tmp_path):
    write_tiny_gguf(tmp_path / "p.gguf", pre="llama-bpe")
    with pytest.raises(UnsupportedModelError, match="pre-split 'llama-bpe'"):
        import_gguf(tmp_path / "p.gguf", tmp_path / "model", progress=False)
    assert not (tmp_path / "model").exists()


def test_missing_tensor_is_named(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", skip={"blk.1.ffn_up.weight"})
    with pytest.raises(CheckpointError, match="blk.1.ffn_up.weight"):
        import_gguf(tmp_path / "m.gguf", tmp_path / "model", progress=False)


def test_unknown_tensor_is_unsupported(tmp_path):
    def llama3_rope(w):
        w.add_tensor("rope_freqs.weight", np.ones(DH // 2, np.float32))
    write_tiny_gguf(tmp_path / "r.gguf", extra=llama3_rope)
    with pytest.raises(UnsupportedModelError, match="rope_freqs.weight"):
        import_gguf(tmp_path / "r.gguf", tmp_path / "model", progress=False)


def test_linear_rope_scaling_reaches_the_config(tmp_path):
    def scaling(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)
    write_tiny_gguf(tmp_path / "s.gguf", extra=scaling)
    out = import_gguf(tmp_path / "s.gguf", tmp_path / "model", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "linear" and config["rope_scaling"]["factor"] == 4.0


def test_bad_dtype(tiny, tmp_path):
    with pytest.raises(UsageError, match="dtype"):
        import_gguf(tiny[0], tmp_path / "model", dtype="int8", progress=False)


@pytest.mark.parametrize("counts, key", [
    ({"block_count": 10**9}, "block_count"),              # used to cost 28 s and 2.1 GB before failing
    ({"attention.head_count": 0}, "head_count"),
    ({"attention.head_count_kv": 0}, "head_count_kv"),
    ({"embedding_length": "abc"}, "embedding_length"),
])
def test_hostile_counts_are_refused_before_anything_is_sized_by_them(tmp_path, counts, key):
    write_tiny_gguf(tmp_path / "h.gguf", counts=counts)
    with pytest.raises(CheckpointError, match=key):
        import_gguf(tmp_path / "h.gguf", tmp_path / "model", progress=False)
    assert not (tmp_path / "model").exists()


def test_a_tensor_that_is_not_finite_is_refused(tmp_path, monkeypatch):
    import sys
    here = sys.modules[__name__]
    original = here.hf_weights

    def with_nan(tied):
        w = original(tied)
        w["model.layers.0.mlp.up_proj.weight"][0, 0] = np.nan
        return w
    monkeypatch.setattr(here, "hf_weights", with_nan)
    write_tiny_gguf(tmp_path / "n.gguf")
    with pytest.raises(CheckpointError, match="blk.0.ffn_up.weight holds NaN"):
        import_gguf(tmp_path / "n.gguf", tmp_path / "model", progress=False)
    assert not (tmp_path / "model").exists()


def test_too_little_free_space_is_refused_before_importing(tmp_path, monkeypatch):
    import collections
    import shutil as shutil_module
    write_tiny_gguf(tmp_path / "t.gguf")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(UsageError, match="needs about"):
        import_gguf(tmp_path / "t.gguf", tmp_path / "model", progress=False)
    assert not (tmp_path / "model").exists()
