"""int4/int8 Numba kernels against the NumPy twins in reference/q4.py, over ragged shapes."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from kernel_cases import EPS32, int4_layer, ref_args

from minilm_edge.errors import UsageError
from minilm_edge.formats import q4
from minilm_edge.kernels import quant_f32 as kq, simd
from minilm_edge.kernels.policy import kernel, threads
from reference import q4 as ref

AWKWARD_N = [1, 2, 3, 5, 7, 15, 17, 31, 33, 64]
# A float32 dot product of length K in any summation order is within ~K*eps of sum |w_k x_k|; the
# kernels sum in 16 lanes then a tree, so the factor is far smaller in practice. 64 eps is roomy for
# K <= 512 lanes-per-lane depth and still catches any wrong index (errors of order |w x| itself).
DOT_RTOL = 64 * EPS32
SETTINGS = settings(max_examples=30, deadline=None)


def _dot_bound(lin, X):
    """Per output: DOT_RTOL * the magnitude the kernel's sums pass through.

    The kernel forms s * (sum q x - z * sum x) per group, so its rounding error scales with
    s * (q + z) |x|, not with |(q - z) s x|; salient columns contribute |w x|.
    """
    n, k = lin.shape
    g_of_k = np.arange(k) // lin.group_size
    q = q4.unpack_nibbles(lin.qweight).astype(np.float64)
    mag = (q + lin.zeros[:, g_of_k]) * lin.scales.astype(np.float64)[:, g_of_k]     # [N, K]
    if lin.n_salient:
        mag[:, lin.salient_idx] = np.abs(lin.salient_w.astype(np.float64))
    return DOT_RTOL * (np.abs(X).astype(np.float64) @ mag.T) + 1e-30


layers = st.tuples(st.integers(0, 2**32 - 1), st.sampled_from(AWKWARD_N), st.sampled_from(q4.GROUP_SIZES),
                   st.integers(1, 4), st.sampled_from([-1, 0, 1, 5, 17, 40]),
                   st.sampled_from(["normal", "mixed"]))


def _make(params):
    seed, n, g, groups, m, kind = params
    return int4_layer(seed, n, g, groups, min(m, g * groups), kind), np.random.default_rng(seed + 1)


@SETTINGS
@given(params=layers)
def test_matvec_q4_f32_matches_reference(params):
    lin, rng = _make(params)
    x = rng.standard_normal(lin.shape[1]).astype(np.float32)
    y = kq.matvec_q4_f32(kq.prepare_q4(lin), x)
    y_ref = ref.matvec_q4(*ref_args(lin), x)
    assert np.all(np.abs(y - y_ref) <= _dot_bound(lin, x))


@SETTINGS
@given(params=layers, t=st.sampled_from([1, 2, 3, 7, 17]))
def test_matmul_q4_f32_matches_reference(params, t):
    lin, rng = _make(params)
    X = rng.standard_normal((t, lin.shape[1])).astype(np.float32)
    Y = kq.matmul_q4_f32(kq.prepare_q4(lin), X)
    assert np.all(np.abs(Y - ref.matmul_q4(*ref_args(lin), X)) <= _dot_bound(lin, X))


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n=st.sampled_from(AWKWARD_N), g=st.sampled_from(q4.GROUP_SIZES),
       groups=st.integers(1, 4), t=st.sampled_from([1, 3, 17]))
def test_q8_kernels_match_reference(seed, n, g, groups, t):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, g * groups)).astype(np.float32)
    lin = q4.quantize_q8(w, g)
    p = kq.prepare_q8(lin)
    X = rng.standard_normal((t, g * groups)).astype(np.float32)
    bound = DOT_RTOL * (np.abs(X) @ np.abs(q4.dequantize_q8(lin)).T) + 1e-30
    y = kq.matvec_q8_f32(p, X[0])
    assert np.all(np.abs(y - ref.matvec_q8(lin.qweight, lin.scales, g, X[0])) <= bound[0])
    Y = kq.matmul_q8_f32(p, X)
    assert np.all(np.abs(Y - ref.matmul_q8(lin.qweight, lin.scales, g, X)) <= bound)


def test_matmul_spans_several_tiles_and_threads_agree():
    lin = int4_layer(7, kq.TILE_ROWS * 2 + 3, 64, 3, 9, "normal")
    p = kq.prepare_q4(lin)
    rng = np.random.default_rng(3)
    x = rng.standard_normal(lin.shape[1]).astype(np.float32)
    X = rng.standard_normal((4, lin.shape[1])).astype(np.float32)
    with threads(1):
        y1 = kq.matvec_q4_f32(p, x)
    with threads(2):
        y2 = kq.matvec_q4_f32(p, x)
    assert np.array_equal(y1, y2)                                  # rows are independent of threads
    assert np.all(np.abs(kq.matmul_q4_f32(p, X) - ref.matmul_q4(*ref_args(lin), X)) <= _dot_bound(lin, X))


def test_prepare_shares_weight_buffers_and_pads_salient():
    lin = int4_layer(1, 5, 32, 2, 3, "normal")
    p = kq.prepare_q4(lin)
    assert np.shares_memory(p.qweight, lin.qweight) and np.shares_memory(p.zeros, lin.zeros)
    assert np.shares_memory(p.scales, lin.scales) and p.scales.dtype == np.uint16     # fp16 bits, in place
    assert np.array_equal(p.scales.view(np.float16), lin.scales)
    assert p.sal_w.shape == (5, 16) and p.n_salient == 3
    assert not p.sal_w[:, 3:].any()


def test_nan_propagates():
    lin = int4_layer(2, 3, 32, 1, 0, "normal")
    x = np.ones(32, np.float32)
    x[5] = np.nan
    assert np.all(np.isnan(kq.matvec_q4_f32(kq.prepare_q4(lin), x)))


def test_wrappers_check_arguments():
    p = kq.prepare_q4(int4_layer(0, 4, 32, 2, 0, "normal"))
    with pytest.raises(UsageError, match="x: expected contiguous float32"):
        kq.matvec_q4_f32(p, np.zeros(64, np.float64))
    with pytest.raises(UsageError, match="x: expected contiguous float32"):
        kq.matvec_q4_f32(p, np.zeros(128, np.float32)[::2])
    with pytest.raises(UsageError, match="out: expected"):
        kq.matvec_q4_f32(p, np.zeros(64, np.float32), out=np.zeros(5, np.float32))
    with pytest.raises(UsageError, match=r"X: expected float32 \[T, 64\]"):
        kq.matmul_q4_f32(p, np.zeros((2, 32), np.float32))
    out = np.empty(4, np.float32)
    assert kq.matvec_q4_f32(p, np.zeros(64, np.float32), out=out) is out


@kernel()
def _exp16(x, out):
    for i in range(0, x.shape[0], simd.LANES):
        simd.v_store(out, i, simd.v_exp(simd.v_load(x, i)))


def test_vector_exp_matches_numpy():
    x = np.concatenate([np.linspace(-87.3, 88.3, 4000), np.random.default_rng(0).normal(0, 10, 4000).clip(-87, 88),
                        [0.0, -0.0, 1.0, -1.0, 1e-8, -1e-8] * 16]).astype(np.float32)
    x = x[: len(x) // 16 * 16]
    out = np.empty_like(x)
    _exp16(x, out)
    ref_ = np.exp(x.astype(np.float64))
    assert np.max(np.abs(out - ref_) / ref_) < 3e-7
    low = np.array([-88.0, -100.0, -1e30, -np.inf] * 4, np.float32)   # clamped: tiny, not 0 or NaN
    _exp16(low, out[:16])
    assert np.all((out[:16] > 0) & (out[:16] < 1.2e-38))
