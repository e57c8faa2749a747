"""AWQ (minilm_edge.quant: awq, clip, llama_block, calibration; quantize --method awq): properties
on tiny random models, the library functions against their readable twins in reference/awq.py
(the whole run against reference's awq_model: test_reference_awq.py), determinism, calibration
sources and their sampler, the report, and the CLI's handling of bad input."""
import doctest
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minilm_edge
from minilm_edge.app.cli import main
from minilm_edge.errors import UsageError
from minilm_edge.formats.tensors import TensorSource
from minilm_edge.quant import awq, clip, llama_block, parallel
from minilm_edge.quant.calibration import from_files, self_generated, split_documents
from minilm_edge.quant.quantize import quantize
from minilm_edge.runtime.config import LlamaConfig
from minilm_edge.runtime.generation import sample_rows
from minilm_edge.runtime.tokenizer import Tokenizer
from reference import awq as ref, llama as ref_llama
from tinymodel import make_model_dir, random_weights, tiny_config

QUANTIZABLE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
FOLD_RTOL = 2e-4          # float32 reassociation after multiplying and dividing by s (s within 1e±2)
FAST = dict(samples=4, seq_len=32, progress=False)
SWEEPS = awq.AWQSettings().clip_sweeps      # the joint clip's passes, as quantize runs it


def block_weights(cfg, seed, i=0):
    """Block i of random weights by awq's short names."""
    w = random_weights(cfg, seed)
    p = f"model.layers.{i}."
    names = {"attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight",
             "q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
             "o": "self_attn.o_proj.weight", "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight",
             "down": "mlp.down_proj.weight"}
    out = {k: w[p + n] for k, n in names.items()}
    for k in ("q", "k", "v"):
        if p + f"self_attn.{k}_proj.bias" in w:
            out[k + "_bias"] = w[p + f"self_attn.{k}_proj.bias"]
    return out, w


def tiny_cfg(**over):
    d = tiny_config(vocab_size=300, **over)
    return d, LlamaConfig.from_dict(d)


# ---- folding leaves the full-precision function unchanged (GQA and MHA, so v -> o is exercised)

@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), kv=st.sampled_from([1, 2, 4]), qwen=st.booleans(),
       log_span=st.floats(0.0, 2.0))
def test_folding_keeps_the_fp_function(seed, kv, qwen, log_span):
    d, cfg = tiny_cfg(num_key_value_heads=kv, model_type="qwen2" if qwen else "llama")
    w, full = block_weights(d, seed)
    bs = llama_block.BlockShape.of(cfg)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 7, cfg.hidden_size)).astype(np.float32)
    cos, sin = llama_block.rope_tables(cfg, 7)
    before = llama_block.block_forward(w, bs, x, cos, sin)["out"]
    folded = w
    for g in awq.LLAMA_GROUPS:
        if awq.can_fold(folded, g):
            k = folded[g.linears[0]].shape[1]
            s = np.exp(rng.uniform(-log_span, log_span, k)).astype(np.float32)
            folded = awq.fold_scales(folded, g, s)
    assert awq.can_fold(w, awq.LLAMA_GROUPS[1]) == (kv == cfg.num_attention_heads)   # v -> o only for MHA
    after = llama_block.block_forward(folded, bs, x, cos, sin)["out"]
    np.testing.assert_allclose(after, before, rtol=FOLD_RTOL, atol=FOLD_RTOL * np.abs(before).max())
    # and awq's NumPy block is the reference block
    expected = np.stack([ref_llama.block(xi, full, 0, d, np.arange(7), ref_llama.rope_settings(d)) for xi in x])
    np.testing.assert_allclose(before, expected, rtol=1e-4, atol=1e-4)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), kv=st.sampled_from([1, 2, 4]), qwen=st.booleans(), first=st.integers(1, 7))
def test_the_block_over_a_kv_cache_is_the_whole_sequence_block(seed, kv, qwen, first):
    # Self-generated calibration decodes through the block over a KV cache; AWQ runs whole
    # sequences. A prefill of `first` positions, then one position at a time, gives the same block.
    d, cfg = tiny_cfg(num_key_value_heads=kv, model_type="qwen2" if qwen else "llama")
    w, _ = block_weights(d, seed)
    bs = llama_block.BlockShape.of(cfg)
    x = np.random.default_rng(seed).standard_normal((2, 7, cfg.hidden_size)).astype(np.float32)
    cos, sin = llama_block.rope_tables(cfg, 9)
    whole = llama_block.block_forward(w, bs, x, cos[:7], sin[:7])["out"]
    cache = tuple(np.full((2, kv, 9, cfg.head_dim), np.nan, np.float32) for _ in range(2))   # unwritten: nan
    steps, p0 = [], 0
    for T in [first] + [1] * (7 - first):
        part = llama_block.block_forward(w, bs, x[:, p0:p0 + T], cos[p0:p0 + T], sin[p0:p0 + T], cache, p0)
        steps.append(part["out"])
        p0 += T
    np.testing.assert_allclose(np.concatenate(steps, axis=1), whole, rtol=1e-5, atol=1e-5)
    assert np.isnan(cache[0][:, :, 7:]).all() and not np.isnan(cache[0][:, :, :7]).any()


# ---- the search and the clip never make things worse than plain rounding

@pytest.mark.parametrize("clipped", [False, True])
@pytest.mark.parametrize("duo", [False, True])
@pytest.mark.parametrize("bits", [3, 4])
def test_chosen_scale_loss_is_never_above_identity(duo, bits, clipped):
    d, cfg = tiny_cfg(**QUANTIZABLE)
    w, _ = block_weights(d, 3)
    bs = llama_block.BlockShape.of(cfg)
    x = np.random.default_rng(1).standard_normal((2, 16, 64)).astype(np.float32)
    x[..., 5] *= 20                                               # one salient channel
    cos, sin = llama_block.rope_tables(cfg, 16)
    inter = llama_block.block_forward(w, bs, x, cos, sin)
    gs = {k: (64 if w[k].shape[1] % 64 == 0 else 32) for k in ("q", "k", "v", "o", "gate", "up", "down")}
    for g in awq.LLAMA_GROUPS:
        grams = None
        if clipped:                                   # each α sees the clipped linears clipped first
            xi = inter[g.inp]
            grams = {lin: clip.group_gram(xi, gs[lin]) / (xi.size // xi.shape[-1])
                     for lin in g.linears if lin not in awq.NO_CLIP}
        r = awq.search_scale(w, bs, g, inter[g.inp], awq.activation_mean(inter[g.inp]), cos, sin, bits, gs, duo=duo,
                             grams=grams)
        assert len(r.losses) == 20 and r.loss_best <= r.loss_identity


@pytest.mark.parametrize("n_grid", [1, 2, 7, 10, 20])
@pytest.mark.parametrize("coarse", [0, 2, 4, 8])
def test_coarse_to_fine_finds_the_argmin_of_a_unimodal_loss(n_grid, coarse):
    """search_coarse's α schedule: on any loss that falls then rises over the grid it ends at the
    full grid's argmin, measuring each α at most once and fewer than the grid where c > 2."""
    for m in range(n_grid):
        for loss in ([abs(i - m) for i in range(n_grid)], [(i - m) ** 2 + 0.5 * (i > m) for i in range(n_grid)]):
            measured = []

            def best(measured=measured, loss=loss):
                return min(measured, key=lambda j: (loss[j], j)) if measured else None
            for idx in awq.coarse_to_fine(n_grid, coarse, best):
                measured += idx
            assert best() == m and len(set(measured)) == len(measured) and set(measured) <= set(range(n_grid))
    if coarse == 4 and n_grid == 20:
        assert len(measured) <= 9


def test_coarse_search_measures_fewer_alphas_and_keeps_identity():
    d, cfg = tiny_cfg(**QUANTIZABLE)
    w, _ = block_weights(d, 3)
    bs = llama_block.BlockShape.of(cfg)
    x = np.random.default_rng(1).standard_normal((2, 16, 64)).astype(np.float32)
    x[..., 5] *= 20
    cos, sin = llama_block.rope_tables(cfg, 16)
    inter = llama_block.block_forward(w, bs, x, cos, sin)
    gs = {k: (64 if w[k].shape[1] % 64 == 0 else 32) for k in ("q", "k", "v", "o", "gate", "up", "down")}
    for g in awq.LLAMA_GROUPS:
        full = awq.search_scale(w, bs, g, inter[g.inp], awq.activation_mean(inter[g.inp]), cos, sin, 4, gs)
        fast = awq.search_scale(w, bs, g, inter[g.inp], awq.activation_mean(inter[g.inp]), cos, sin, 4, gs, coarse=4)
        got = [i for i, l in enumerate(fast.losses) if np.isfinite(l)]
        assert 0 in got and len(got) <= 9 and fast.loss_best <= fast.loss_identity
        assert all(fast.losses[i] == full.losses[i] for i in got)        # the same trials, only fewer
        assert fast.alpha == got[int(np.argmin([fast.losses[i] for i in got]))] / 20


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.sampled_from([3, 4]), salient=st.booleans())
def test_the_scale_search_rounds_the_weights_it_would_store(seed, bits, salient):
    # With a Gram matrix, scaled_fake_quantize is what the AWQ pipeline stores for that s: the
    # scaled weight clipped by the (symmetric) clip search on x ÷ s, then rounded, then ÷ s.
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((6, 64)).astype(np.float32)
    w[rng.integers(0, 6), rng.integers(0, 64)] *= 8
    x = rng.standard_normal((40, 64)).astype(np.float32)
    x[:, 3] *= 10
    s = np.exp(rng.uniform(-1, 1, 64)).astype(np.float32)
    sal = np.array([3, 40], np.int32) if salient else None
    got = awq.scaled_fake_quantize(w, s, bits, 32, sal, clip.group_gram(x, 32) / len(x))
    clipped, _ = clip.clip_search(w * s[None, :], x / s[None, :], bits, 32, sal)
    want = awq.fake_quantize(clipped, bits, 32, sal)
    if salient:
        want[:, sal] = (w * s[None, :])[:, sal].astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(got, want / s[None, :], rtol=1e-6, atol=1e-6)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.sampled_from([3, 4]))
def test_clipping_never_increases_the_group_loss(seed, bits):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((6, 64)).astype(np.float32)
    w[rng.integers(0, 6), rng.integers(0, 64)] *= 8                # an outlier worth clipping
    x = rng.standard_normal((40, 64)).astype(np.float32)
    clipped, r = clip.clip_search(w, x, bits, 32)
    clipped_two, r_two = clip.clip_search(w, x, bits, 32, two_sided=True)

    def group_err(wc):
        d = awq.fake_quantize(wc, bits, 32) - w                      # [N, K]
        return np.stack([np.mean((x[:, c:c + 32] @ d[:, c:c + 32].T) ** 2, axis=0) for c in (0, 32)], 1)
    assert np.all(group_err(clipped) <= group_err(w) * (1 + 1e-6) + 1e-12)
    # the two-sided search holds the symmetric candidates: never worse than the symmetric choice
    assert np.all(group_err(clipped_two) <= group_err(clipped) * (1 + 1e-5) + 1e-12)
    for kept in (r, r_two):                                      # the fraction of the range kept
        assert np.all((kept >= 0.55 * 0.55 - 1e-6) & (kept <= 1.0 + 1e-6))


def test_clip_tokens_hold_every_samples_first_token():
    # The first position is the attention sink: massive activations that a random draw of ~512 of
    # n·T tokens almost always misses, so the clip search clamped the weights meeting them
    # (SmolLM2-135M W4: clip alone raised WikiText-2 perplexity above RTN's).
    n, T = 16, 512
    idx = clip.clip_token_index(n, T, 512, seed=0)
    assert set((np.arange(n) * T).tolist()) <= set(idx.tolist())
    assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < n * T
    assert 512 <= len(idx) <= 512 + n
    assert np.array_equal(idx, clip.clip_token_index(n, T, 512, seed=0))
    assert len(clip.clip_token_index(2, 8, 512, seed=0)) == 16           # fewer tokens than asked


def test_clip_search_keeps_the_weights_that_meet_a_sink_token():
    # One channel carries a massive value on one token (the sink) and little elsewhere; its weights
    # are the groups' largest. Measured with the sink token, clipping must not clamp them away.
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    w[:, 5] = 4.0 * np.sign(w[:, 5]) + w[:, 5]
    x = rng.standard_normal((64, 64)).astype(np.float32)
    x[:, 5] *= 0.01
    sink = np.zeros((1, 64), np.float32)
    sink[0, 5] = 300.0
    without, _ = clip.clip_search(w, x, 4, 64)
    with_sink, _ = clip.clip_search(w, np.concatenate([sink, x]), 4, 64)
    err = lambda wc: float(np.abs((awq.fake_quantize(wc, 4, 64) - w) @ sink[0]).max())
    assert err(with_sink) < err(without)
    assert err(with_sink) <= err(w) * (1 + 1e-6)



def _row_errors(w, wc, x, bits, g, idx=None):
    """mean_t (x_t · (Q(wc) − w)_n)² per row n: the linear's output error (salient columns exact)."""
    dq = awq.fake_quantize(wc, bits, g, idx) - w
    if idx is not None:
        dq[:, idx] = 0.0
    return np.mean((x.astype(np.float64) @ dq.T.astype(np.float64)) ** 2, axis=0)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.sampled_from([3, 4]), sal=st.sampled_from([0, 3]))
def test_joint_clip_never_raises_the_row_error(seed, bits, sal):
    """Coordinate descent over a row's groups on Δᵀ C Δ starts from the per-group choice and only
    takes steps that lower it: never worse per row than the per-group search."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((16, 128)).astype(np.float32)
    w[rng.integers(0, 16, 4), rng.integers(0, 128, 4)] *= 6
    # correlated channels with a common offset: what makes the groups' errors add up
    x = (rng.standard_normal((400, 128)) + rng.standard_normal((400, 1)) + 0.5).astype(np.float32)
    x *= np.exp(rng.uniform(-1, 1, 128)).astype(np.float32)
    idx = np.sort(rng.choice(128, sal, replace=False)) if sal else None
    gram, full = clip.group_gram(x, 32) / len(x), (x.T.astype(np.float64) @ x) / len(x)
    per_group, _ = clip.clip_search(w, None, bits, 32, idx, gram=gram, two_sided=True)
    joint, kept = clip.clip_search(w, None, bits, 32, idx, gram=gram, two_sided=True, full_gram=full, sweeps=SWEEPS)
    e_pg, e_joint = _row_errors(w, per_group, x, bits, 32, idx), _row_errors(w, joint, x, bits, 32, idx)
    assert np.all(e_joint <= e_pg * (1 + 1e-4) + 1e-12)
    assert e_joint.sum() < e_pg.sum()                   # and with these correlations it helps
    assert np.all((kept >= 0.55 * 0.55 - 1e-6) & (kept <= 1.0 + 1e-6))
    cols = [] if idx is None else idx                   # salient columns come back unchanged
    np.testing.assert_array_equal(joint[:, cols], w[:, cols])


# ---- library functions vs reference/awq.py

def test_formulas_match_reference():
    rng = np.random.default_rng(7)
    x = np.abs(rng.standard_normal((50, 64))).astype(np.float32) ** 3
    w = rng.standard_normal((10, 64)).astype(np.float32)
    xm = awq.activation_mean(x)
    np.testing.assert_allclose(xm, ref.activation_mean(x), rtol=1e-6)
    wm = awq.weight_mean([w[:4], w[4:]], 32)
    np.testing.assert_allclose(wm, ref.weight_mean(w, 32), rtol=1e-5)
    np.testing.assert_array_equal(awq.awq_scales(xm, 0.0), np.ones(64, np.float32))   # α = 0: plain RTN
    for alpha in (0.0, 0.35, 0.95):
        np.testing.assert_allclose(awq.awq_scales(xm, alpha), ref.awq_scales(xm, alpha), rtol=1e-5)
        np.testing.assert_allclose(awq.awq_scales(xm, alpha, wm), ref.awq_scales(xm, alpha, wm), rtol=1e-5)
    s = awq.awq_scales(xm, 0.5)
    for bits in (3, 4):
        np.testing.assert_array_equal(awq.fake_quantize(w, bits, 32), ref.pseudo_quantize(w, bits, 32))
        np.testing.assert_allclose(awq.scaled_fake_quantize(w, s, bits, 32),
                                   ref.scaled_pseudo_quantize(w, s, bits, 32), rtol=1e-6, atol=1e-7)
        got = awq.MODULES["linear"]({"o": awq.scaled_fake_quantize(w, s, bits, 32)}, None, x, None, None, ("o",))
        loss = float(np.mean((got - x @ w.T) ** 2, dtype=np.float64))
        assert loss == pytest.approx(ref.linear_loss(w, x, s.astype(np.float64), bits, 32), rel=1e-3)
        for two in (False, True):
            c1, r1 = clip.clip_search(w, x[:20], bits, 32, two_sided=two)
            c2, r2 = ref.clip_search(w, x[:20], bits, 32, two_sided=two)
            np.testing.assert_allclose(r1, r2, rtol=1e-6)
            np.testing.assert_array_equal(c1, c2)
    # the joint clip (whole-row error): the library on Gram matrices, the reference on tokens
    xt = x[:40] + np.float32(0.3)
    gram, full = clip.group_gram(xt, 16) / len(xt), (xt.T.astype(np.float64) @ xt) / len(xt)
    for bits in (3, 4):
        c1, r1 = clip.clip_search(w, None, bits, 16, gram=gram, two_sided=True, full_gram=full, sweeps=SWEEPS)
        c2, r2 = ref.joint_clip_search(w, xt, bits, 16, two_sided=True)
        assert np.mean(r1 == r2) > 0.9
        np.testing.assert_allclose(_row_errors(w, c1, xt, bits, 16), _row_errors(w, c2, xt, bits, 16), rtol=1e-3)
    d, cfg = tiny_cfg()
    bw, _ = block_weights(d, 0)
    s = np.exp(rng.uniform(-1, 1, 32)).astype(np.float32)
    folded = awq.fold_scales(bw, awq.LLAMA_GROUPS[0], s)
    norm, (q, k, v) = ref.fold_into_norm(bw["attn_norm"], [bw["q"], bw["k"], bw["v"]], s)
    for a, b in ((folded["attn_norm"], norm), (folded["q"], q), (folded["k"], k), (folded["v"], v)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    f = np.exp(rng.uniform(-1, 1, 48)).astype(np.float32)
    folded = awq.fold_scales(bw, awq.LLAMA_GROUPS[3], f)
    up, _, down = ref.fold_into_linear(bw["up"], None, bw["down"], f)
    np.testing.assert_allclose(folded["up"], up, rtol=1e-6)
    np.testing.assert_allclose(folded["down"], down, rtol=1e-6)


def test_salient_channels_are_kept_and_excluded_from_ranges():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    xm = np.ones(64, np.float32)
    xm[[3, 40]] = 50
    idx = awq.salient_channels(xm, 100 * 2 / 64)
    assert idx.tolist() == [3, 40]
    s = np.ones(64, np.float32)
    w_hat = awq.scaled_fake_quantize(w, s, 4, 32, idx)
    np.testing.assert_array_equal(w_hat[:, idx], w[:, idx].astype(np.float16).astype(np.float32))
    assert awq.salient_channels(xm, 0.0) is None


def test_reference_doctests_pass():
    import reference.awq
    res = doctest.testmod(reference.awq)
    assert res.attempted > 5 and res.failed == 0


# ---- end to end on tiny models

def test_awq_model_runs_and_records_its_calibration(tmp_path):
    src, cfg, _ = make_model_dir(tmp_path / "src", **QUANTIZABLE)
    text = "\n\n".join(f"Document {i}: the capital of France is Paris, and hello again." * 3 for i in range(10))
    (tmp_path / "c.txt").write_text(text)
    out = quantize(src, tmp_path / "q", method="awq", calib=tmp_path / "c.txt", keep_salient=5, report=True,
                   **FAST)
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["method"] == "awq" and q["awq"]["calibration"]["source"] == ["c.txt"]
    assert len(q["awq"]["calibration"]["tokens_sha256"]) == 64 and len(q["awq"]["alpha"]) == 2
    assert q["awq"]["alpha"][0]["o"] is None                        # GQA 4/2: v -> o not scaled
    from safetensors.numpy import load_file
    raw = load_file(str(out / "model.safetensors"))
    assert raw["model.layers.0.self_attn.q_proj.salient_idx"].shape == (3,)     # round(5% of 64)
    model = minilm_edge.load(out)
    ids = np.arange(3, 20)
    assert np.all(np.isfinite(model.forward(ids)))
    # The stored fp16 columns are those of the scaled weight, in the folded basis: times the folded
    # norm they equal the source's columns times its norm (they once came out transposed: a
    # Fortran-ordered array written as is).
    fp = load_file(str(src / "model.safetensors"))
    p, norm = "model.layers.0.self_attn.q_proj", "model.layers.0.input_layernorm.weight"
    sal = raw[p + ".salient_idx"]
    got = raw[p + ".salient_w"].astype(np.float32) * raw[norm].astype(np.float32)[sal]
    want = fp[p + ".weight"].astype(np.float32)[:, sal] * fp[norm].astype(np.float32)[sal]
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-3 * np.abs(want).max())
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["layers"]) == 2 and "<svg" in (out / "report.html").read_text()
    assert "http" not in (out / "report.html").read_text().replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_awq_is_deterministic_for_a_seed(tmp_path):
    src, _, _ = make_model_dir(tmp_path / "src", **{**QUANTIZABLE, "num_key_value_heads": 4})   # MHA: v -> o too
    a = quantize(src, tmp_path / "a", method="awq", seed=3, **FAST)
    b = quantize(src, tmp_path / "b", method="awq", seed=3, **FAST)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    qa = json.loads((a / "config.json").read_text())["quantization_config"]
    assert qa["awq"]["calibration"]["source"] == ["self-generated"]
    assert qa["awq"]["alpha"][0]["o"] is not None                   # MHA: o was searched


def test_parallel_map_is_the_serial_map_in_order():
    import threading
    import time

    import numba
    seen = set()

    def slow_square(i):
        seen.add(threading.get_ident())
        time.sleep(0.002 * (7 - i % 7))                 # later items finish first
        return i * i
    n0 = numba.get_num_threads()
    try:
        for k in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(k)
            assert list(parallel.parallel_map(slow_square, range(23))) == [i * i for i in range(23)]
            assert list(parallel.parallel_map(slow_square, [])) == []

        def boom(i):
            if i == 5:
                raise ValueError("five")
            return i
        with pytest.raises(ValueError, match="five"):
            list(parallel.parallel_map(boom, range(9)))
    finally:
        numba.set_num_threads(n0)


def test_awq_gives_the_same_model_on_one_thread_and_on_several(tmp_path):
    """The α trials, calibration chunks and final clips run on threads; in order, so the model is
    the one a serial run makes (these tiny products do not depend on BLAS's thread count)."""
    import numba
    src, _, _ = make_model_dir(tmp_path / "src", **QUANTIZABLE)
    n0 = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        # 24 samples: three chunks of the calibration pass (8 samples each)
        a = quantize(src, tmp_path / "a", method="awq", seed=1, samples=24, seq_len=16, progress=False)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        b = quantize(src, tmp_path / "b", method="awq", seed=1, samples=24, seq_len=16, progress=False)
    finally:
        numba.set_num_threads(n0)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_calibration_from_a_file_with_fewer_docs_than_samples(tmp_path):
    src, _, _ = make_model_dir(tmp_path / "src", **QUANTIZABLE)
    (tmp_path / "few.txt").write_text("hello the capital\n\n  \n\nand Paris France and hello\n")
    assert split_documents((tmp_path / "few.txt").read_text()) == ["hello the capital", "and Paris France and hello"]
    tok = Tokenizer(src)
    cal = from_files([tmp_path / "few.txt"], tok, n_samples=8, seq_len=4, seed=0)
    assert cal.ids.shape[1] == 4 and 1 <= cal.ids.shape[0] < 8 and cal.notes
    cal = from_files([tmp_path / "few.txt"], tok, n_samples=8, seq_len=512, seed=0)
    assert cal.ids.shape[0] == 1 and cal.ids.shape[1] < 512 and "only" in cal.notes[0]
    out = quantize(src, tmp_path / "q", method="awq", calib=tmp_path / "few.txt", samples=8, seq_len=64,
                   progress=False)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["awq"]["notes"]


def test_self_generated_calibration_is_reproducible(tmp_path):
    src, d, _ = make_model_dir(tmp_path / "src", **QUANTIZABLE)
    cfg, tok, ts = LlamaConfig.from_dict(d), Tokenizer(src), TensorSource(src)
    a = self_generated(ts, cfg, tok, n_samples=3, seq_len=24, seed=5, batch=2, progress=False)
    b = self_generated(ts, cfg, tok, n_samples=3, seq_len=24, seed=5, batch=2, progress=False)
    c = self_generated(ts, cfg, tok, n_samples=3, seq_len=24, seed=6, batch=2, progress=False)
    assert a.ids.shape == (3, 24) and a.ids.max() < cfg.vocab_size
    assert a.sha256 == b.sha256 and a.sha256 != c.sha256 and a.source == ["self-generated"]


def test_the_int4_generator_holds_what_rtn_writes_at_its_group_size(tmp_path):
    """The int4 generator (built in memory) is the folder `quantize(method="rtn", embed="int8")`
    writes at GENERATOR_GROUP_SIZE: the same bytes, so it writes the same text such a folder would."""
    from minilm_edge.formats.safetensors import SafetensorsFile
    from minilm_edge.quant.calibration import GENERATOR_GROUP_SIZE, _rtn_int4
    src, d, _ = make_model_dir(tmp_path / "src", **QUANTIZABLE)
    cfg = LlamaConfig.from_dict(d)
    gen = _rtn_int4(TensorSource(src), cfg)
    out = quantize(src, tmp_path / "q", method="rtn", group_size=GENERATOR_GROUP_SIZE, embed="int8", progress=False)
    stored = SafetensorsFile(out / "model.safetensors")
    assert sorted(gen) == sorted(stored.keys())
    for name, a in gen.items():
        b = stored.tensor(name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name


def test_self_generated_text_is_written_by_the_int4_model_unless_asked(tmp_path):
    src, d, _ = make_model_dir(tmp_path / "src", **QUANTIZABLE)
    cfg, tok, ts = LlamaConfig.from_dict(d), Tokenizer(src), TensorSource(src)
    i4 = self_generated(ts, cfg, tok, n_samples=4, seq_len=24, seed=5, batch=4, progress=False)
    fp = self_generated(ts, cfg, tok, n_samples=4, seq_len=24, seed=5, batch=4, progress=False, generator="float")
    assert i4.generator == "int4" and i4.describe()["generator"] == "int4" and fp.generator == "float"
    assert i4.sha256 != fp.sha256              # another model wrote it (random tiny weights: int4 differs)
    with pytest.raises(UsageError, match="generator"):
        self_generated(ts, cfg, tok, n_samples=1, seq_len=4, progress=False, generator="int8")
    with pytest.raises(UsageError, match="generator"):
        quantize(src, tmp_path / "q", method="awq", calib=[src / "config.json"], generator="float", progress=False)
    assert not (tmp_path / "q").exists()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), top_p=st.sampled_from([1e-9, 0.3, 0.9, 1.0]),
       temperature=st.sampled_from([0.5, 1.0, 2.0]))
def test_calibration_draws_only_from_the_nucleus(seed, top_p, temperature):
    """sample_rows (the calibration sampler) keeps, per row, the smallest set of most likely ids
    whose probability reaches top_p, and nothing else; top-p → 0 is greedy."""
    rng = np.random.default_rng(seed)
    logits = (rng.permutation(40)[None, :] * 0.2 + rng.standard_normal((3, 1))).astype(np.float32)  # distinct
    p = np.exp(logits / temperature - (logits / temperature).max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    allowed = []
    for row in p:
        order = np.argsort(-row)
        n_keep = 1 + int(np.sum(np.cumsum(row[order]) < top_p))
        allowed.append(set(order[:n_keep].tolist()))
    draws = np.stack([sample_rows(logits, temperature, top_p, rng) for _ in range(50)])    # [50, 3]
    for r in range(3):
        assert set(draws[:, r].tolist()) <= allowed[r]
    assert np.array_equal(sample_rows(logits, temperature, 1e-9, rng), np.argmax(logits, axis=1))


# ---- the CLI: bad input gives one line and leaves nothing behind

def test_cli_bad_awq_input_is_one_line_and_leaves_nothing(tmp_path, capsys):
    src, _, _ = make_model_dir(tmp_path / "src", **QUANTIZABLE)
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    base = ["quantize", str(src), "--seq-len", "32"]
    cases = [
        (base + [str(tmp_path / "o1"), "--calib", str(tmp_path / "empty.txt")], 2, "holds no text"),
        (base + [str(tmp_path / "o2"), "--calib", str(tmp_path / "missing.txt")], 2, "not found"),
        (base + [str(tmp_path / "o3"), "--group-size", "48"], 2, "--group-size"),
        (base + [str(tmp_path / "o4"), "--bits", "8"], 2, "--bits"),
        (base + [str(tmp_path / "o5"), "--keep-salient", "100"], 2, "keep-salient"),
        (base + [str(tmp_path / "o6"), "--keep-salient", "-1"], 2, "keep-salient"),
        (base + [str(tmp_path / "o7"), "--method", "rtn", "--calib", str(tmp_path / "empty.txt")], 2, "awq only"),
        (base + [str(tmp_path / "o8"), "--samples", "0"], 2, "--samples"),
    ]
    for argv, code, msg in cases:
        assert main(argv) == code, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert msg in err[-1], (argv, err)
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == ["empty.txt", "src"]


def test_cli_quantize_awq_default(tmp_path, capsys):
    src, _, _ = make_model_dir(tmp_path / "src", **QUANTIZABLE)
    assert main(["quantize", str(src), str(tmp_path / "q"), "--samples", "2", "--seq-len", "16"]) == 0
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["method"] == "awq"
    # the CLI's default recipe (quant/recipe.py): g = 32; k, v, gate, up, down 6-bit everywhere and o in the
    # first and last eighth; the embedding q6 with a scale per 64; no int8
    from minilm_edge.quant.quantize import end_layers
    n = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    every = list(range(n))
    assert qc["group_size"] == 32 and qc["embed"] == "q6" and qc["embed_group_size"] == 64
    assert qc["int6_layers"] == {"v": every, "k": every, "o": end_layers(n), "gate": every, "up": every,
                                 "down": every}
    assert "int8_layers" not in qc
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    assert "--calib" in capsys.readouterr().out


@pytest.mark.parametrize("extra, group, int8, int6, embed", [
    (["--int6", "none"], 32, None, None, ("q6", 64)),               # every block linear int4
    (["--group-size", "128", "--int6", "none", "--embed", "int8"], 128, None, None, ("int8", None)),  # the smallest
    (["--method", "awq", "--samples", "2", "--seq-len", "16", "--max-size", "10000000"], None, None, None,
     ("int8", None)),                                               # a budget chooses the group sizes itself
    (["--int8", "down@0"], 32, {"down": [0]}, None, ("q6", 64)),    # a hand-given list replaces both defaults
    (["--int6", "up@1"], 32, None, {"up": [1]}, ("q6", 64)),
    (["--embed", "q6"], 32, None, "recipe", ("q6", None)),          # an explicit embedding keeps --group-size
])
def test_cli_quantize_defaults_give_way(tmp_path, extra, group, int8, int6, embed):
    from minilm_edge.quant.quantize import _layers_of, int8_linears
    from minilm_edge.quant.recipe import RECIPE_INT6
    src, _, _ = make_model_dir(tmp_path / "src", **QUANTIZABLE)
    assert main(["quantize", str(src), str(tmp_path / "q"), "--method", "rtn", *extra]) == 0   # a later --method wins
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    n = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    if int6 == "recipe":
        int6 = _layers_of(int8_linears(RECIPE_INT6, n))
    assert qc.get("int8_layers") == int8
    assert qc.get("int6_layers") == int6
    assert (qc["embed"], qc.get("embed_group_size")) == embed
    if group is not None:
        assert qc["group_size"] == group


def test_end_layers_are_the_first_and_last_eighth():
    from minilm_edge.quant.quantize import end_layers, int8_linears
    assert end_layers(30) == [0, 1, 2, 3, 26, 27, 28, 29]          # SmolLM2: the measured o@0-3+26-29
    assert end_layers(16) == [0, 1, 14, 15] and end_layers(2) == [0, 1] and end_layers(9) == [0, 1, 7, 8]
    assert int8_linears("o@ends", 30, "--int6") == int8_linears("o@0-3+26-29", 30, "--int6")


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.sampled_from([3, 4]), shift=st.sampled_from([0.0, 3.0, -3.0]),
       a=st.floats(0.3, 1.2), b=st.floats(0.3, 1.2))
def test_candidate_rounding_errors_are_fake_quantize_of_the_clamps(seed, bits, shift, a, b):
    """The clip search's shortcut (each group's clamped range from its old one, every candidate in
    one Numba pass) rounds bit for bit like fake_quantize on the clamped weights: symmetric and
    two-sided clamps (also past the group's ends), all-positive / all-negative and constant groups,
    rows of very different sizes."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((7, 96)) * np.exp(rng.uniform(-3, 3, (7, 1))) + shift).astype(np.float32)
    w[0, :32] = 0.5                                                 # a constant group
    wg = w.reshape(7, 3, 32)
    lo0, hi0 = wg.min(axis=2, keepdims=True), wg.max(axis=2, keepdims=True)
    amax = np.maximum(-lo0, hi0)
    cands = [(-amax * np.float32(r), amax * np.float32(r)) for r in clip.CLIP_SHRINKS + (a,)]
    cands += [(lo0 * np.float32(x), hi0 * np.float32(y)) for x in clip.CLIP_SHRINKS[::3] + (a,)
              for y in clip.CLIP_SHRINKS[::4] + (b,)]
    got = clip.candidate_rounding_errors(wg, lo0, hi0, np.stack([lo[..., 0] for lo, _ in cands]),
                                        np.stack([hi[..., 0] for _, hi in cands]), bits)
    for c, (lo, hi) in enumerate(cands):
        want = awq.fake_quantize(np.clip(wg, lo, hi).reshape(7, 96), bits, 32).reshape(7, 3, 32) - wg
        np.testing.assert_array_equal(got[c], want.transpose(1, 0, 2))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.sampled_from([3, 4]), g=st.sampled_from([32, 64]),
       sal=st.sampled_from([0, 3]))
def test_clip_search_on_gram_matrices_is_the_clip_search_on_tokens(seed, bits, g, sal):
    """e(r) = mean_t (Δ·x_t)² = Δᵀ (mean_t x_t x_tᵀ) Δ: the same shrink factors either way, up to
    float ties (the chosen errors agree to float rounding)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((24, 2 * g)).astype(np.float32)
    x = (rng.standard_normal((300, 2 * g)) * np.exp(rng.uniform(-2, 2, 2 * g))).astype(np.float32)
    idx = np.sort(rng.choice(2 * g, sal, replace=False)) if sal else None
    two = bool(seed % 2)
    c1, r1 = clip.clip_search(w, x, bits, g, idx, two_sided=two)
    c2, r2 = clip.clip_search(w, None, bits, g, idx, gram=clip.group_gram(x, g) / len(x), two_sided=two)
    def err(c):                                      # the per-(row, group) error of a clipped weight
        dq = (awq.fake_quantize(c, bits, g, idx) - np.where(np.isin(np.arange(2 * g), idx if sal else []), 0, w))
        return np.mean((x.reshape(-1, 2, g)[:, None] * dq.reshape(24, 2, g)[None]).sum(-1) ** 2, axis=0)
    assert np.mean(r1 == r2) > 0.95
    np.testing.assert_allclose(err(c2), err(c1), rtol=1e-3, atol=1e-12)
