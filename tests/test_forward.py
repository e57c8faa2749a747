"""The runtime forward pass against the reference, on tiny random models the tests build."""
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minilm_edge
from reference import llama as ref
from tinymodel import make_model_dir

# Logits of the float32 runtime vs the reference (which normalises in float64): values are O(1..10)
LOGIT_ATOL = 1e-4

VARIANTS = {
    "gqa-tied": {},
    "mha": dict(num_key_value_heads=4),
    "mqa-untied": dict(num_key_value_heads=1, tie_word_embeddings=False),
    "qwen2-bias": dict(model_type="qwen2", tie_word_embeddings=False),
    "head_dim-given": dict(head_dim=16, num_attention_heads=3, num_key_value_heads=1),
    "llama3-rope": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "mistral": dict(model_type="mistral", sliding_window=None),
}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_reference(tmp_path, variant, dtype):
    path, cfg, w = make_model_dir(tmp_path / "m", dtype=dtype, **VARIANTS[variant])
    model = minilm_edge.load(path)
    ids = np.random.default_rng(1).integers(0, cfg["vocab_size"], 23)
    got = model.forward(ids)
    assert got.dtype == np.float32 and got.shape == (23, cfg["vocab_size"])
    np.testing.assert_allclose(got, ref.forward(w, cfg, ids), atol=LOGIT_ATOL, rtol=0)


def test_rope_theta_in_rope_parameters(tmp_path):
    """Newer transformers nest rope_theta in rope_parameters: it must be read from there."""
    path, cfg, w = make_model_dir(tmp_path / "m", rope_theta=None,
                                  rope_parameters={"rope_theta": 500.0, "rope_type": "default"})
    model = minilm_edge.load(path)
    assert model.config.rope_theta == 500.0
    ids = np.arange(20)
    np.testing.assert_allclose(model.forward(ids), ref.forward(w, cfg, ids), atol=LOGIT_ATOL)
    cfg_default = dict(cfg, rope_parameters=None, rope_theta=10000.0)
    assert np.abs(ref.forward(w, cfg_default, ids) - model.forward(ids)).max() > 1e-3  # it matters


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path, cfg, w = make_model_dir(tmp_path_factory.mktemp("m") / "m")
    return minilm_edge.load(path), cfg, w


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_cached_decode_matches_recompute(tiny, data):
    """Feeding a sequence in arbitrary chunks through the cache gives the one-shot logits."""
    model, cfg, _ = tiny
    n = data.draw(st.integers(1, 40))
    ids = np.array(data.draw(st.lists(st.integers(0, cfg["vocab_size"] - 1), min_size=n, max_size=n)))
    cuts = sorted(set(data.draw(st.lists(st.integers(1, n - 1), max_size=6)) if n > 1 else []))
    cache = model.new_cache(64)
    parts = [model.forward(chunk, cache) for chunk in np.split(ids, cuts)]
    np.testing.assert_allclose(np.concatenate(parts), model.forward(ids), atol=1e-5)
    assert cache.length == n


def test_last_only_and_truncate(tiny):
    model, cfg, _ = tiny
    ids = np.arange(10) + 3
    full = model.forward(ids)
    cache = model.new_cache(32)
    np.testing.assert_allclose(model.forward(ids, cache, last_only=True)[0], full[-1], atol=1e-5)
    cache.truncate(4)           # rewind: positions 4.. are recomputed with other tokens
    other = np.array([7, 8, 9])
    got = model.forward(other, cache)
    np.testing.assert_allclose(got, model.forward(np.concatenate([ids[:4], other]))[4:], atol=1e-5)


def test_cache_overflow_is_a_clear_error(tiny):
    model, _, _ = tiny
    cache = model.new_cache(8)
    model.forward(np.arange(6), cache)
    with pytest.raises(minilm_edge.ContextOverflowError, match="6 tokens in context"):
        model.forward(np.arange(3), cache)


def test_bad_token_ids(tiny):
    model, cfg, _ = tiny
    with pytest.raises(minilm_edge.UsageError):
        model.forward([cfg["vocab_size"]])
    with pytest.raises(minilm_edge.UsageError):
        model.forward([])


def test_fp32_weights_are_memory_mapped(tmp_path):
    """fp32 checkpoints are used in place (a view of the mapped file), not copied."""
    path, _, _ = make_model_dir(tmp_path / "m", tie_word_embeddings=False)
    model = minilm_edge.load(path)
    w = model.weights.blocks[0].gate.w
    assert not w.flags.owndata and not w.flags.writeable
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "float32"


def test_fp16_weights_stay_fp16(tmp_path):
    """fp16 checkpoints are not widened to a float32 copy: the kernels read the mapped fp16 bytes."""
    path, _, _ = make_model_dir(tmp_path / "m", dtype="float16")
    model = minilm_edge.load(path)
    lin = model.weights.blocks[0].gate
    assert lin.kind == "f16" and lin.w.dtype == np.float16 and not lin.w.flags.owndata
    assert model.weights.lm_head.kind == "f16"          # the tied head reads the fp16 embedding
