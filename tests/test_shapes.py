"""tools/make_shape_model.py: random-weight folders with a real model's shapes (issue 14).

On a tiny shape: the folder loads and runs, its config carries the shape, the weights look like
the intended distribution, and the GGUF written beside it, read back by import-gguf (which undoes
llama.cpp's q/k row order), holds exactly the same tensors.
"""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import minilm_edge
from minilm_edge.errors import UsageError
from minilm_edge.formats.gguf import unpermute_rope_rows
from minilm_edge.formats.tensors import TensorSource
from tinymodel import CHATML, build_tokenizer

TOOL = Path(__file__).resolve().parent.parent / "tools" / "make_shape_model.py"


def _tool():
    spec = importlib.util.spec_from_file_location("make_shape_model", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tool():
    return _tool()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_tokenizer().save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    return d


def tiny(tool, base="llama-3.2-1b", **kw):
    """The base shape's config with tiny sizes (rope scaling and the rest kept)."""
    cfg = dict(tool.SHAPES[base], hidden_size=64, intermediate_size=96, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=400)
    cfg.pop("head_dim", None)
    cfg.update(kw)
    return cfg


def test_folder_loads_runs_and_is_sharded(tool, tok_dir, tmp_path):
    out = tool.make_shape_model(tiny(tool), tmp_path / "m", tokenizer_dir=tok_dir, shard_bytes=30_000)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (64, 3, 400)
    assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["eos_token_id"] == 2
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    assert (out / "model.safetensors.index.json").is_file()
    model = minilm_edge.load(out)
    assert model.config.rope_scaling is not None
    logits = model.forward([1, 5, 9, 300])
    assert logits.shape == (4, 400) and np.isfinite(logits).all()
    src = TensorSource(out)
    w = src.float32("model.layers.1.mlp.up_proj.weight", (96, 64))
    assert abs(w.std() - tool.STD) < 0.002 and abs(w.mean()) < 0.002
    assert abs(src.float32("model.norm.weight", (64,)).mean() - 1) < 0.01


def test_same_tensors_whatever_the_sharding(tool, tok_dir, tmp_path):
    a = TensorSource(tool.make_shape_model(tiny(tool), tmp_path / "a", tokenizer_dir=tok_dir, shard_bytes=30_000))
    b = TensorSource(tool.make_shape_model(tiny(tool), tmp_path / "b", tokenizer_dir=tok_dir))
    c = TensorSource(tool.make_shape_model(tiny(tool), tmp_path / "c", tokenizer_dir=tok_dir, seed=1))
    name = "model.layers.2.self_attn.k_proj.weight"
    assert set(a.where) == set(b.where)
    assert np.array_equal(a.raw(name)[0], b.raw(name)[0])
    assert not np.array_equal(a.raw(name)[0], c.raw(name)[0])


def test_qwen2_shape_has_qkv_biases(tool, tok_dir, tmp_path):
    out = tool.make_shape_model(tiny(tool, "qwen2.5-1.5b"), tmp_path / "q", tokenizer_dir=tok_dir, dtype="bfloat16")
    src = TensorSource(out)
    assert src.raw("model.layers.0.self_attn.k_proj.bias")[1] == "BF16"
    assert "model.layers.0.self_attn.o_proj.bias" not in src
    model = minilm_edge.load(out)
    assert model.config.attention_bias and model.weights.blocks[0].q.bias is not None
    assert np.isfinite(model.forward([3, 4])).all()


def test_gguf_reads_back_as_the_same_tensors(tool, tok_dir, tmp_path):
    pytest.importorskip("gguf", reason="the gguf package (extra 'tools') writes GGUF")
    from minilm_edge.formats.gguf import import_gguf
    # rope_scaling None: import-gguf does not read llama.cpp's rope_freqs tensor (module docstring)
    out = tool.make_shape_model(tiny(tool, rope_scaling=None), tmp_path / "m", tokenizer_dir=tok_dir,
                                gguf_path=tmp_path / "m.gguf")
    back = import_gguf(tmp_path / "m.gguf", tmp_path / "back", progress=False)
    a, b = TensorSource(out), TensorSource(back)
    assert set(a.where) == set(b.where)
    for name in a.where:
        assert np.array_equal(a.raw(name)[0].astype(np.float32), b.raw(name)[0].astype(np.float32)), name
    ids = [1, 7, 100, 250]
    np.testing.assert_allclose(minilm_edge.load(out).forward(ids), minilm_edge.load(back).forward(ids), atol=1e-5)
    cfg = json.loads((back / "config.json").read_text())
    assert cfg["vocab_size"] == 400     # the token list was padded to the embedding's rows


def test_permute_is_the_inverse_of_gguf_unpermute(tool):
    w = np.arange(2 * 3 * 8 * 5, dtype=np.float32).reshape(3 * 8 * 2 // 2, 10)
    p = tool.permute_rope_rows(w, 3)
    assert not np.array_equal(p, w)
    assert np.array_equal(unpermute_rope_rows(p, 3), w)


def test_refuses_an_existing_folder_and_a_too_large_tokenizer(tool, tok_dir, tmp_path):
    (tmp_path / "there").mkdir()
    with pytest.raises(UsageError, match="already exists"):
        tool.make_shape_model(tiny(tool), tmp_path / "there", tokenizer_dir=tok_dir)
    with pytest.raises(UsageError, match="more than"):
        tool.make_shape_model(tiny(tool, vocab_size=100), tmp_path / "small", tokenizer_dir=tok_dir)
    assert not (tmp_path / "small").exists() and list(tmp_path.iterdir()) == [tmp_path / "there"]
