"""Each Numba leaf kernel against its NumPy twin in reference/llama.py, on ragged shapes."""
import numpy as np
from hypothesis import given, settings, strategies as st

from minilm_edge.kernels import ops_f32 as kernels
from reference import llama as ref

TOL = dict(rtol=1e-5, atol=1e-5)   # float32 kernels vs float64-ish reference, O(1) values
dims = st.integers(1, 9)


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(T=dims, D=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_rms_norm(T, D, seed):
    rng = np.random.default_rng(seed)
    x, w = rand(rng, T, D) * 3, rand(rng, D)
    out = np.empty_like(x)
    kernels.rms_norm(x, w, 1e-5, out)
    np.testing.assert_allclose(out, ref.rms_norm(x, w, 1e-5), **TOL)


@settings(max_examples=40, deadline=None)
@given(T=dims, nh=st.integers(1, 5), half=st.integers(1, 12), p0=st.integers(0, 5000), seed=st.integers(0, 2**16))
def test_rope(T, nh, half, p0, seed):
    rng = np.random.default_rng(seed)
    Dh = 2 * half
    x = rand(rng, T, nh, Dh)
    pos = np.arange(p0, p0 + T)
    inv = ref.rope_inv_freq(Dh, 10000.0)
    ang = pos[:, None] * inv[None]
    got = x.copy()
    kernels.rope_inplace(got, np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32))
    np.testing.assert_allclose(got, ref.rope(x, pos, inv), rtol=1e-4, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 7), past=st.integers(0, 9), Hkv=st.integers(1, 3), rep=st.integers(1, 3),
       Dh=st.integers(1, 17), window=st.sampled_from([0, 1, 2, 3, 5, 40]), seed=st.integers(0, 2**16))
def test_attention_over_cache(T, past, Hkv, rep, Dh, window, seed):
    """New queries at positions past..past+T-1 attend causally over a cache of past+T keys (only the
    last `window` of them when window > 0: sliding-window layers)."""
    rng = np.random.default_rng(seed)
    H, S = Hkv * rep, past + T
    q, k, v = rand(rng, T, H, Dh), rand(rng, S, Hkv, Dh), rand(rng, S, Hkv, Dh)
    cap = S + 3                                          # cache larger than used: tail must be ignored
    kc = np.full((Hkv, cap, Dh), np.nan, np.float32)
    vc = np.full((Hkv, cap, Dh), np.nan, np.float32)
    kc[:, :S], vc[:, :S] = k.transpose(1, 0, 2), v.transpose(1, 0, 2)
    expected = ref.attention(q, k, v, window)
    blas = lambda q, kc, vc, past, scratch, out, w: kernels.attention_blas(q, kc, vc, past, out, block=3, window=w)
    for build in (kernels.attention_serial, kernels.attention_parallel, blas):
        out = np.empty((T, H, Dh), np.float32)
        build(q, kc, vc, past, np.zeros((H, cap), np.float32), out, window)
        np.testing.assert_allclose(out, expected, **TOL)


@settings(max_examples=30, deadline=None)
@given(T=dims, F=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_silu_mul(T, F, seed):
    rng = np.random.default_rng(seed)
    g, u = rand(rng, T, F) * 4, rand(rng, T, F)
    out = np.empty_like(g)
    kernels.silu_mul(g, u, out)
    np.testing.assert_allclose(out, ref.silu(g) * u, **TOL)


def test_silu_extremes_stay_finite():
    g = np.array([[-100.0, -30.0, 0.0, 30.0, 100.0]], np.float32)
    out = np.empty_like(g)
    kernels.silu_mul(g, np.ones_like(g), out)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, ref.silu(g.astype(np.float64)), atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(N=st.integers(1, 40), K16=st.integers(1, 6), T=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_f16_matvec_and_matmul(N, K16, T, seed):
    """fp16 weights × float32 activations vs the float32 product of the widened weights."""
    from minilm_edge.kernels.dense_f32 import matmul_f16_f32, matvec_f16_f32, matvec_f32_f32
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((N, 16 * K16)) * 3).astype(np.float16)
    X = rand(rng, T, 16 * K16)
    expected = X.astype(np.float64) @ w.astype(np.float64).T
    np.testing.assert_allclose(matmul_f16_f32(w, X), expected, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(matvec_f16_f32(w.view(np.uint16), X[0]), expected[0], rtol=1e-4, atol=1e-3)
    w32 = w.astype(np.float32)
    np.testing.assert_allclose(matvec_f32_f32(w32, X[0]), expected[0], rtol=1e-4, atol=1e-3)


def test_f16_special_values_propagate():
    from minilm_edge.kernels.dense_f32 import matvec_f16_f32
    w = np.ones((3, 16), np.float16)
    w[1, 3], w[2, 5] = np.inf, np.nan
    y = matvec_f16_f32(w.view(np.uint16), np.ones(16, np.float32))
    assert y[0] == 16 and np.isinf(y[1]) and np.isnan(y[2])
