"""int4 x int8 and int8 x int8 prefill kernels (kernels/quant_i8_matmul) against their NumPy twins
(reference/q4.py), and the int4 twin against the exact float product, over ragged shapes."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from kernel_cases import EPILOGUE_RTOL, EPS32, activations, epilogue_bound, int4_layer, ref_args

from minilm_edge.errors import UsageError
from minilm_edge.formats import q4
from minilm_edge.kernels import quant_f32 as kq, quant_i8_matmul as kv
from minilm_edge.kernels.policy import threads
from minilm_edge.runtime.linear import Q4, Q8
from reference import q4 as ref

pytestmark = pytest.mark.skipif(not kv.INT8_DOT, reason="this target has no int8 dot (AVX2 or VNNI): "
                                                    "matmul_q4_i8 is never used here, the float32 path is")

SETTINGS = settings(max_examples=40, deadline=None)
# N: not a multiple of 16 or of the 32-row tile, one tile, several tiles; T: ragged to the 6-token tile
AWKWARD_N = [1, 3, 7, 16, 17, 31, 33, 64, 65, 100]
AWKWARD_T = [1, 2, 3, 5, 6, 7, 11, 13, 17]


def _natural_order(qx):
    """Undo the kernel's VNNI octet order (evens then odds per 8 channels): [T, K] -> [T, K]."""
    t, k = qx.shape
    return qx.reshape(t, k // 8, 2, 4).transpose(0, 1, 3, 2).reshape(t, k)


layers = st.tuples(st.integers(0, 2**32 - 1), st.sampled_from(AWKWARD_N), st.sampled_from(q4.GROUP_SIZES),
                   st.integers(1, 4), st.sampled_from([-1, 0, 1, 5, 17, 40]),
                   st.sampled_from(["normal", "mixed"]))


@SETTINGS
@given(params=layers, t=st.sampled_from(AWKWARD_T), xkind=st.sampled_from(["normal", "outliers", "blocks", "zero"]),
       block=st.sampled_from([32, 64, 128]))
def test_matmul_q4_i8_matches_reference(params, t, xkind, block):
    seed, n, g, groups, m, kind = params
    block = min(block, g)
    lin = int4_layer(seed, n, g, groups, min(m, g * groups), kind)
    X = activations(np.random.default_rng(seed + 1), t, lin.shape[1], xkind)
    Y = kv.matmul_q4_i8(kq.prepare_q4(lin), X, block=block)
    Y_ref = ref.matmul_q4_i8(*ref_args(lin), X, block)
    assert np.all(np.abs(Y.astype(np.float64) - Y_ref) <= epilogue_bound(lin, X, block))


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), t=st.sampled_from(AWKWARD_T), blocks=st.integers(1, 8),
       block=st.sampled_from([32, 64]), xkind=st.sampled_from(["normal", "outliers", "blocks", "zero"]))
def test_activation_quantization_is_the_reference_bit_for_bit(seed, t, blocks, block, xkind):
    X = activations(np.random.default_rng(seed), t, 64 * blocks, xkind)
    qx, sx, zt = kv.quantize_activations(X, group_size=64, block=block)
    qx_ref, sx_ref = ref.quantize_activations_i8(X, block)
    assert qx.shape[0] % kv.TILE_TOKENS == 0 and not qx[t:].any() and not sx[t:].any()
    assert np.array_equal(_natural_order(qx[:t]), qx_ref) and np.array_equal(sx[:t], sx_ref)
    per_block = sx_ref.astype(np.float64) * qx_ref.reshape(t, -1, block).sum(axis=2)     # [T, nb]
    zt_ref = per_block.reshape(t, -1, 64 // block).sum(axis=2)                          # [T, G]
    zt_mag = (sx_ref.astype(np.float64) * np.abs(qx_ref).reshape(t, -1, block).sum(axis=2)).reshape(
        t, -1, 64 // block).sum(axis=2)
    assert np.all(np.abs(zt[:t] - zt_ref) <= 4 * EPS32 * zt_mag)


@SETTINGS
@given(params=layers, t=st.sampled_from([1, 3, 17]), xkind=st.sampled_from(["normal", "outliers", "blocks"]),
       block=st.sampled_from([32, 64, 128]))
def test_reference_i8_is_within_int8_rounding_of_the_float_product(params, t, xkind, block):
    """|Y_i8 - Y_exact| <= sum_k |W[n, k]| (sx[t, b(k)]/2 + 4 eps |X[t, k]|), the int8 rounding bound
    (|X - sx qx| <= sx/2 up to the rounding of 1/sx), plus the float32 rounding of both results."""
    seed, n, g, groups, m, kind = params
    block = min(block, g)
    lin = int4_layer(seed, n, g, groups, min(m, g * groups), kind)
    X = activations(np.random.default_rng(seed + 1), t, lin.shape[1], xkind)
    Y_i8 = ref.matmul_q4_i8(*ref_args(lin), X, block).astype(np.float64)
    Y = ref.matmul_q4(*ref_args(lin), X).astype(np.float64)
    Xz = np.array(X)
    if lin.n_salient:
        Xz[:, lin.salient_idx] = 0.0                      # salient channels are exact (float) in both
    _, sx = ref.quantize_activations_i8(Xz, block)
    err_x = np.repeat(sx, block, axis=1).astype(np.float64) / 2 + 4 * EPS32 * np.abs(Xz)    # [T, K]
    W = np.abs(ref.dequantize_q4(*ref_args(lin))).astype(np.float64)
    if lin.n_salient:
        W[:, lin.salient_idx] = 0.0
    bound = err_x @ W.T + EPS32 * (np.abs(Y) + np.abs(Y_i8)) + 1e-30
    assert np.all(np.abs(Y_i8 - Y) <= bound)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n=st.sampled_from(AWKWARD_N), g=st.sampled_from(q4.GROUP_SIZES),
       groups=st.integers(1, 4), t=st.sampled_from(AWKWARD_T), xkind=st.sampled_from(["normal", "outliers", "blocks"]))
def test_matmul_q8_i8_matches_reference(seed, n, g, groups, t, xkind):
    """Codes -127..127 become q + 128 in the kernel; the bound's magnitude counts that offset."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, g * groups)).astype(np.float32)
    w[:, :g] *= 1e-3                                                       # a group of tiny weights
    lin = q4.quantize_q8(w, g)
    X = activations(rng, t, g * groups, xkind)
    Y = kv.matmul_q8_i8(kq.prepare_q8(lin), X)
    Y_ref = ref.matmul_q8_i8(lin.qweight, lin.scales, g, X, kv.ACT_BLOCK)
    qx, sx = ref.quantize_activations_i8(X, kv.ACT_BLOCK)
    mag = np.zeros((t, n))
    for b in range(X.shape[1] // kv.ACT_BLOCK):
        cols = slice(b * kv.ACT_BLOCK, (b + 1) * kv.ACT_BLOCK)
        u = np.abs(lin.qweight[:, cols].astype(np.float64)) + 128
        mag += sx[:, b:b + 1] * lin.scales[:, b * kv.ACT_BLOCK // g].astype(np.float64) * (np.abs(qx[:, cols]) @ u.T)
    assert np.all(np.abs(Y.astype(np.float64) - Y_ref) <= EPILOGUE_RTOL * mag + 1e-30)


def test_int8_error_is_small_on_typical_activations():
    """Not just within the worst case: on Gaussian activations the rounding errors (uniform in
    +-sx/2, sx ~ 2.2 sigma / 127 for 32 channels) average out to ~0.5% of the product (measured 0.53%)."""
    lin = int4_layer(5, 256, 64, 9, 0, "normal")
    X = activations(np.random.default_rng(6), 32, lin.shape[1], "normal")
    Y = kv.matmul_q4_i8(kq.prepare_q4(lin), X)
    Y_ref = ref.matmul_q4(*ref_args(lin), X)
    assert np.linalg.norm(Y - Y_ref) / np.linalg.norm(Y_ref) < 0.01


def test_nan_or_inf_in_a_token_makes_that_token_nan_only():
    lin = int4_layer(2, 40, 32, 2, 0, "normal")
    p = kq.prepare_q4(lin)
    X = activations(np.random.default_rng(0), 8, 64, "normal")
    clean = kv.matmul_q4_i8(p, X)
    X[2, 5], X[6, 40] = np.nan, np.inf
    Y = kv.matmul_q4_i8(p, X)
    assert np.all(np.isnan(Y[[2, 6]]))
    others = [0, 1, 3, 4, 5, 7]
    assert np.array_equal(Y[others], clean[others])


def test_threads_agree_and_rows_span_tiles():
    lin = int4_layer(7, 3 * kv.TILE_ROWS + 5, 64, 3, 9, "normal")
    p = kq.prepare_q4(lin)
    X = activations(np.random.default_rng(3), 4 * kv.TILE_TOKENS + 1, lin.shape[1], "outliers")
    with threads(1):
        y1 = kv.matmul_q4_i8(p, X)
    with threads(2):
        y2 = kv.matmul_q4_i8(p, X)
    assert np.array_equal(y1, y2)                                  # rows are independent of threads
    y_ref = ref.matmul_q4_i8(*ref_args(lin), X, kv.ACT_BLOCK)
    assert np.all(np.abs(y1 - y_ref) <= epilogue_bound(lin, X, kv.ACT_BLOCK))


def test_wrapper_checks_arguments_and_writes_into_out():
    p = kq.prepare_q4(int4_layer(0, 4, 32, 2, 0, "normal"))
    with pytest.raises(UsageError, match=r"X: expected float32 \[T, 64\]"):
        kv.matmul_q4_i8(p, np.zeros((2, 32), np.float32))
    with pytest.raises(UsageError, match="activation block 64 must"):
        kv.matmul_q4_i8(p, np.zeros((2, 64), np.float32), block=64)
    with pytest.raises(UsageError, match="activation block 8 must be a multiple of 16"):
        kv.matmul_q4_i8(p, np.zeros((2, 64), np.float32), block=8)
    with pytest.raises(UsageError, match="out: expected"):
        kv.matmul_q4_i8(p, np.zeros((2, 64), np.float32), out=np.zeros((2, 5), np.float32))
    out = np.empty((3, 4), np.float32)
    X = np.asfortranarray(np.ones((3, 64), np.float32))          # any layout: the wrapper copies
    assert kv.matmul_q4_i8(p, X, out=out) is out
    assert np.array_equal(out, kv.matmul_q4_i8(p, np.ascontiguousarray(X)))


def test_q8_linear_dispatches_by_token_count_and_switch():
    lin = q4.quantize_q8(np.random.default_rng(0).standard_normal((40, 128)).astype(np.float32), 64)
    layer = Q8(lin)
    X = activations(np.random.default_rng(1), kv.INT8_MIN_TOKENS, 128, "normal")
    assert np.array_equal(layer.matmul(X), kv.matmul_q8_i8(layer.p, X))
    layer.int8_activations = False
    assert np.array_equal(layer.matmul(X), kq.matmul_q8_f32(layer.p, X))


def test_q4_linear_dispatches_by_token_count_switch_and_cpu(monkeypatch):
    lin = int4_layer(4, 48, 64, 3, 5, "normal")
    layer = Q4(lin)
    X = activations(np.random.default_rng(1), kv.INT8_MIN_TOKENS, lin.shape[1], "normal")
    assert np.array_equal(layer.matmul(X), kv.matmul_q4_i8(layer.p, X))
    few = X[: kv.INT8_MIN_TOKENS - 1]
    assert np.array_equal(layer.matmul(few), kq.matmul_q4_f32(layer.p, few))
    with monkeypatch.context() as m:
        m.setattr(kv, "INT8_DOT", False)                        # a CPU without an int8 dot
        assert np.array_equal(layer.matmul(X), kq.matmul_q4_f32(layer.p, X))
    layer.int8_activations = False
    assert np.array_equal(layer.matmul(X), kq.matmul_q4_f32(layer.p, X))
