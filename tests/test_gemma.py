"""Gemma 3 and Qwen3 blocks (runtime/blocks.py) against the NumPy reference (reference/gemma.py), on
tiny random models: q/k norm, (1 + w) norms, post-norms, GELU-tanh, √D embedding scale, and
sliding-window layers with their own RoPE base, also for prompts longer than the window and over a
KV cache filled token by token."""
import json

import numpy as np
import pytest
from safetensors.numpy import save_file

import minilm_edge
from minilm_edge.errors import UnsupportedModelError
from minilm_edge.runtime.config import LlamaConfig
from reference import gemma as ref
from tinymodel import make_model_dir, random_weights, tiny_config

ATOL = 2e-4


def gemma_config(**overrides):
    cfg = tiny_config(
        architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", hidden_size=32, intermediate_size=48,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
        rope_theta=1_000_000.0, rope_local_base_freq=10000.0, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        query_pre_attn_scalar=16, hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=None,
        attn_logit_softcapping=None, max_position_embeddings=128)
    cfg.update(overrides)
    return cfg


def qwen3_config(**overrides):
    cfg = tiny_config(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=16,
                      rope_theta=1_000_000.0)
    cfg.update(overrides)
    return cfg


def make_variant_dir(path, cfg, seed=0):
    """A tiny model folder of `cfg` with every tensor its architecture needs; returns (path, weights)."""
    path, _, _ = make_model_dir(path, **{k: v for k, v in cfg.items() if k != "vocab_size"})
    cfg = json.loads((path / "config.json").read_text())
    w = random_weights(cfg, seed)
    rng = np.random.default_rng(seed + 1)
    Dh, D = cfg["head_dim"], cfg["hidden_size"]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_norm.weight"] = (1 + 0.3 * rng.standard_normal(Dh)).astype(np.float32)
        w[p + "self_attn.k_norm.weight"] = (1 + 0.3 * rng.standard_normal(Dh)).astype(np.float32)
        if cfg["model_type"] == "gemma3_text":
            for n in ("pre_feedforward_layernorm", "post_feedforward_layernorm"):
                w[p + n + ".weight"] = (0.3 * rng.standard_normal(D)).astype(np.float32)
    save_file(w, str(path / "model.safetensors"))
    return path, cfg, w


@pytest.mark.parametrize("overrides", [
    {},                                                          # window 4 < prompt, GQA 4/2
    {"sliding_window": 1, "num_key_value_heads": 1},            # a window of the token itself, MQA
    {"query_pre_attn_scalar": 7, "layer_types": None, "sliding_window_pattern": 2},  # another score scale
    {"tie_word_embeddings": False, "sliding_window": 64},       # window longer than the prompt
])
def test_tiny_gemma_matches_reference(tmp_path, overrides):
    cfg = gemma_config(**overrides)
    if cfg.get("layer_types") is None:
        cfg.pop("layer_types")
    path, cfg, w = make_variant_dir(tmp_path / "gemma", cfg)
    model = minilm_edge.load(path)
    assert not model.config.arch.plain and model.decode_plan is None
    ids = np.random.default_rng(1).integers(0, cfg["vocab_size"], 11)
    np.testing.assert_allclose(model.forward(ids), ref.forward(w, cfg, ids), atol=ATOL, rtol=0)


def test_gemma_sliding_window_over_the_cache(tmp_path):
    """A 40-token prompt (BLAS attention, window 5) then 20 tokens one at a time (window within the
    cache) give the logits of one full forward pass."""
    path, cfg, w = make_variant_dir(tmp_path / "gemma", gemma_config(sliding_window=5))
    model = minilm_edge.load(path)
    ids = np.random.default_rng(2).integers(0, cfg["vocab_size"], 60)
    expected = ref.forward(w, cfg, ids)
    cache = model.new_cache(64)
    got = [model.forward(ids[:40], cache)]
    got += [model.forward(ids[t:t + 1], cache) for t in range(40, 60)]
    np.testing.assert_allclose(np.concatenate(got), expected, atol=ATOL, rtol=0)


def test_window_changes_the_answer(tmp_path):
    """The window is honoured: the same weights with a window wider than the prompt differ."""
    path, cfg, w = make_variant_dir(tmp_path / "gemma", gemma_config(sliding_window=3))
    ids = np.arange(12) % cfg["vocab_size"]
    narrow = minilm_edge.load(path).forward(ids)
    wide = ref.forward(w, {**cfg, "sliding_window": 100}, ids)
    assert np.abs(narrow[-1] - wide[-1]).max() > 1e-2


@pytest.mark.parametrize("overrides", [{}, {"num_key_value_heads": 1}, {"num_hidden_layers": 3, "head_dim": 8}])
def test_tiny_qwen3_matches_reference(tmp_path, overrides):
    path, cfg, w = make_variant_dir(tmp_path / "qwen3", qwen3_config(**overrides))
    model = minilm_edge.load(path)
    assert model.config.arch.qk_norm and not model.config.arch.plain
    ids = np.random.default_rng(3).integers(0, cfg["vocab_size"], 9)
    np.testing.assert_allclose(model.forward(ids), ref.forward(w, cfg, ids), atol=ATOL, rtol=0)


def test_qwen3_without_qk_norm_weights_is_refused(tmp_path):
    path, _, _ = make_model_dir(tmp_path / "q", **{k: v for k, v in qwen3_config().items() if k != "vocab_size"})
    with pytest.raises(minilm_edge.CheckpointError, match="q_norm"):
        minilm_edge.load(path)


def test_gemma_greedy_generation_follows_the_reference(tmp_path):
    """Greedy decoding (prefill, then one token at a time past the window) picks the reference's argmax."""
    from minilm_edge.runtime.generation import Generation, SamplingSettings
    path, cfg, w = make_variant_dir(tmp_path / "gemma", gemma_config(sliding_window=3))
    model = minilm_edge.load(path)
    prompt = [5, 17, 42, 99, 7]
    gen = Generation(model, model.new_cache(32), prompt, SamplingSettings(max_new_tokens=8))
    "".join(gen)
    ids = list(prompt)
    for _ in range(len(gen.token_ids)):
        ids.append(int(np.argmax(ref.forward(w, cfg, ids)[-1])))
    assert gen.token_ids == ids[len(prompt):] and len(gen.token_ids) >= 1


@pytest.mark.parametrize("change, message", [
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"sliding_window": 0}, "sliding_window"),
    ({"layer_types": ["sliding_attention"]}, "layer_types"),
    ({"layer_types": ["local"] * 4}, "layer_types"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 8.0}}, "(?i)rope.scaling"),
    ({"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0}}}, "RoPE scaling"),
    ({"hidden_activation": "relu"}, "GELU"),
    ({"query_pre_attn_scalar": -1}, "query_pre_attn_scalar"),
])
def test_gemma_config_refusals(change, message):
    cfg = gemma_config(vocab_size=300, **change)
    with pytest.raises(UnsupportedModelError, match=message):
        LlamaConfig.from_dict(cfg)


def test_gemma_config_layouts():
    """`sliding_window_pattern` (older configs) and nested `rope_parameters` (newer) both read."""
    old = LlamaConfig.from_dict(gemma_config(vocab_size=300, layer_types=None, sliding_window_pattern=2))
    assert old.sliding_layers == (True, False, True, False)
    cfg = gemma_config(vocab_size=300, rope_parameters={"full_attention": {"rope_theta": 5e5},
                                                        "sliding_attention": {"rope_theta": 2e4}})
    del cfg["rope_theta"], cfg["rope_local_base_freq"]
    new = LlamaConfig.from_dict(cfg)
    assert (new.rope_theta, new.rope_local_theta) == (5e5, 2e4)


# ---- the quantizer on Gemma 3 and Qwen3 (quant/llama_block.py's block variants, AWQ's folding)
@pytest.mark.parametrize("make", [gemma_config, qwen3_config])
def test_quantizer_block_matches_reference(tmp_path, make):
    """The quantizer's NumPy block, block after block with per-layer windows and RoPE bases, gives
    the reference's logits (final norm and tied head applied as the reference does)."""
    from minilm_edge.formats.tensors import TensorSource
    from minilm_edge.quant.llama_block import BlockShape, block_forward, embed_rows, load_block, rope_tables
    path, cfg, w = make_variant_dir(tmp_path / "m", make(sliding_window=3) if make is gemma_config else make())
    c, src = minilm_edge.load(path).config, TensorSource(path)
    ids = np.random.default_rng(4).integers(0, cfg["vocab_size"], 10)
    x = embed_rows(c, w["model.embed_tokens.weight"], ids[None])                  # [1, T, D]
    for i in range(c.num_hidden_layers):
        x = block_forward(load_block(src, c, i), BlockShape.of(c, i), x, *rope_tables(c, len(ids), i))["out"]
    logits = ref.rms_norm(x[0], w["model.norm.weight"], c.rms_norm_eps, c.arch.norm_offset) \
        @ w["model.embed_tokens.weight"].T
    np.testing.assert_allclose(logits, ref.forward(w, cfg, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("make", [gemma_config, qwen3_config])
def test_awq_folding_keeps_the_function(tmp_path, make):
    """AWQ's scaled full-precision weights (no clipping, before rounding) compute the same logits:
    the scales went into (1 + w) norms and previous linears exactly, and were stored back as w."""
    from minilm_edge.formats.tensors import TensorSource
    from minilm_edge.quant.awq import AWQSettings, run_awq
    path, cfg, w = make_variant_dir(tmp_path / "m", make(hidden_size=64, intermediate_size=128))
    c = minilm_edge.load(path).config
    calib = np.random.default_rng(5).integers(0, cfg["vocab_size"], (3, 16))
    res = run_awq(TensorSource(path), c, calib, AWQSettings(clip=False, search_tokens=0), progress=False)
    scaled = {**w, **res.tensors}
    assert any(not np.allclose(scaled[k], w[k]) for k in res.tensors)            # something was scaled
    ids = np.arange(3, 30)
    np.testing.assert_allclose(ref.forward(scaled, cfg, ids), ref.forward(w, cfg, ids), atol=5e-4, rtol=0)


@pytest.mark.parametrize("calib", [True, False])
def test_awq_quantizes_a_tiny_gemma(tmp_path, calib):
    """AWQ W4 with an int8 head (on a text file, or on text the model generates) writes a Gemma folder
    that loads and stays close to full precision."""
    from minilm_edge.quant.quantize import quantize
    path, cfg, w = make_variant_dir(tmp_path / "gemma", gemma_config(hidden_size=64, intermediate_size=128))
    text = tmp_path / "calib.txt"
    text.write_text("the capital of France is Paris and the capital hello world " * 40)
    out = quantize(path, tmp_path / "awq", method="awq", calib=text if calib else None, samples=4, seq_len=24,
                   progress=False, quantize_head="int8")
    fp, q = minilm_edge.load(path), minilm_edge.load(out)
    assert q.weights.lm_head.kind == "q8" and q.weights.blocks[0].q.kind == "q4"
    ids = np.arange(3, 40)
    a, b = fp.forward(ids), q.forward(ids)
    assert np.isfinite(b).all() and np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.7   # random weights: int4 costs much
