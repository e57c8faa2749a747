"""The one-call decode step's int8 weight rows (quant_i8_matvec.q8_rows: u = q + 128, per 128 channels
the even ones first) and their row kernels against reference/q4.py: float32 activations
(quant_f32.dot2_q8_f32, every target) and int8 activations (quant_i8_matvec.dot2_q8_i8, AVX2 or VNNI), over K
with every chunk tail (K % 128 in 0, 32, 64, 96), int8 group sizes 32 .. 128, odd row counts; and the
step's split of a phase's row pairs by cost (decode_step._share_mixed)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from kernel_cases import EPILOGUE_RTOL, activations

from minilm_edge.formats import q4
from minilm_edge.kernels import quant_i8_matvec as km
from minilm_edge.kernels.decode_step import Q4_COST, Q6_COST, Q8_COST, _share_mixed
from minilm_edge.kernels.policy import FASTMATH_REDUCE, kernel
from minilm_edge.kernels.quant_f32 import dot2_q8_f32, split_x
from minilm_edge.kernels.quant_i8_matmul import ACT_BLOCK, INT8_DOT
from reference import q4 as ref

SETTINGS = settings(max_examples=60, deadline=None)
AWKWARD_N = [1, 2, 3, 7, 16, 17, 33]
EPS32 = float(np.finfo(np.float32).eps)

# (seed, rows, int8 group size, groups): K = g · groups from 32 to 1024 (q4.GROUP_SIZES)
layers = st.tuples(st.integers(0, 2**32 - 1), st.sampled_from(AWKWARD_N), st.sampled_from(q4.GROUP_SIZES),
                   st.integers(1, 12)).filter(lambda p: p[2] * p[3] <= 1024)


def _int8_layer(seed, n, g, groups):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, g * groups)).astype(np.float32)
    w[:, :g] *= 1e-3                                                         # a group of tiny weights
    return q4.quantize_q8(w, g)


@kernel(fastmath=FASTMATH_REDUCE)
def _rows_f32(qw, sc, g, xe, xo, out):
    n = qw.shape[0]
    for i in range((n + 1) // 2):
        a, b = 2 * i, min(2 * i + 1, n - 1)                  # odd N: the last row pairs with itself
        ya, yb = dot2_q8_f32(qw, sc, a, b, g, xe, xo)
        out[a] = ya
        out[b] = yb


if INT8_DOT:
    @kernel(fastmath=FASTMATH_REDUCE)
    def _rows_i8(qw, sc, gpc, gidx, g0s, qe, qo, sxl, nzl, out):
        km.q8_lane_zero(qe, qo, sxl, nzl)
        n = qw.shape[0]
        for i in range((n + 1) // 2):
            a, b = 2 * i, min(2 * i + 1, n - 1)
            ya, yb = km.dot2_q8_i8(qw, sc, a, b, gpc, gidx, g0s, qe, qo, sxl, nzl)
            out[a] = ya
            out[b] = yb


@SETTINGS
@given(params=layers)
def test_q8_rows_puts_each_chunks_even_channels_first(params):
    lin = _int8_layer(*params)
    rows = km.q8_rows(lin.qweight)
    k = lin.shape[1]
    u = lin.qweight.astype(np.int16) + 128
    for c in range(0, k, 128):
        h = min(64, (k - c) // 2)
        np.testing.assert_array_equal(rows[:, c:c + h], u[:, c:c + 2 * h:2])
        np.testing.assert_array_equal(rows[:, c + h:c + 2 * h], u[:, c + 1:c + 2 * h:2])


@SETTINGS
@given(params=layers, xkind=st.sampled_from(["normal", "outliers", "blocks", "zero"]))
def test_int8_rows_with_float_activations_match_reference(params, xkind):
    seed, n, g, groups = params
    lin = _int8_layer(*params)
    k = lin.shape[1]
    x = activations(np.random.default_rng(seed + 1), 2, k, xkind)[0]
    xe, xo = np.full(k // 2 + 64, np.nan, np.float32), np.full(k // 2 + 64, np.nan, np.float32)   # as in decode:
    xs, xsal = np.empty(k // 32, np.float32), np.empty(0, np.float32)                           # bigger buffers
    split_x(x, 32, np.zeros(0, np.int64), xe, xo, xs, xsal)
    y = np.empty(n, np.float32)
    _rows_f32(km.q8_rows(lin.qweight), lin.scales.astype(np.float32), g, xe, xo, y)
    y_ref = ref.matvec_q8(lin.qweight, lin.scales, g, x)
    # the kernel sums u·x − 128·Σx (u = q + 128) in float32: its rounding scales with (|q| + 128)|x|
    mag = (np.abs(lin.qweight.astype(np.float64)) + 128) * np.repeat(lin.scales.astype(np.float64), g, axis=1)
    bound = 8 * np.sqrt(k) * EPS32 * (mag @ np.abs(x.astype(np.float64))) + 1e-30
    assert np.all(np.abs(y.astype(np.float64) - y_ref) <= bound)


@pytest.mark.skipif(not INT8_DOT, reason="this target has no int8 dot (AVX2 or VNNI): "
                                     "the int8 x int8 rows are never used here, the float32 ones are")
@SETTINGS
@given(params=layers, xkind=st.sampled_from(["normal", "outliers", "blocks", "zero"]))
def test_int8_rows_with_int8_activations_match_reference(params, xkind):
    """The decode prologue's activations (quantize_vec, as a prefill quantizes them) times the rows:
    reference/q4.matmul_q8_i8 for one token, up to the float epilogue."""
    seed, n, g, groups = params
    lin = _int8_layer(*params)
    k = lin.shape[1]
    x = activations(np.random.default_rng(seed + 1), 2, k, xkind)[0]
    s = km.VecScratch(k + 256)                                     # a bigger buffer, as in decode
    nzl = np.full(s.sxl.shape, np.nan, np.float32)                 # stale values must not survive
    km.quantize_vec(x, np.zeros(0, np.int64), 0, 32, s.xz, s.qe, s.qo, s.sxl, s.nzt)
    y = np.empty(n, np.float32)
    _rows_i8(km.q8_rows(lin.qweight), lin.scales.astype(np.float32), *km.group_index(g, k),
             s.qe, s.qo, s.sxl, nzl, y)
    y_ref = ref.matmul_q8_i8(lin.qweight, lin.scales, g, x[None], ACT_BLOCK)[0]
    qx, sx = ref.quantize_activations_i8(x[None], ACT_BLOCK)
    mag = np.zeros(n)
    for b in range(k // ACT_BLOCK):
        cols = slice(b * ACT_BLOCK, (b + 1) * ACT_BLOCK)
        u = np.abs(lin.qweight[:, cols].astype(np.float64)) + 128
        mag += sx[0, b] * lin.scales[:, b * ACT_BLOCK // g].astype(np.float64) * (u @ np.abs(qx[0, cols]))
    assert np.all(np.abs(y.astype(np.float64) - y_ref) <= EPILOGUE_RTOL * mag + 1e-30)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 400), data=st.data(), T=st.integers(1, 4))
def test_share_mixed_tiles_the_pairs_and_evens_the_cost(n, data, T):
    p0 = data.draw(st.integers(0, n))
    p1 = data.draw(st.integers(p0, n))
    q6 = data.draw(st.booleans())                        # q6 rows (q8_tab[.., 3] = 1) cost Q6_COST
    tab = np.array([data.draw(st.sampled_from([-1, 0, 10])), p0, p1, int(q6)], np.int64)
    parts = [_share_mixed(n, t, T, tab) for t in range(T)]
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(parts[t][1] == parts[t + 1][0] for t in range(T - 1)) and all(a <= b for a, b in parts)
    if tab[0] < 0:
        assert parts == [(n * t // T, n * (t + 1) // T) for t in range(T)]
        return
    c8 = Q6_COST if q6 else Q8_COST
    cost = lambda a, b: sum(c8 if p0 <= i < p1 else Q4_COST for i in range(a, b))
    total = cost(0, n)
    assert all(abs(cost(a, b) - total / T) <= 2 * Q8_COST for a, b in parts)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 2000), T=st.integers(1, 4), c=st.integers(1, 40), data=st.data())
def test_claims_tile_the_range_in_shrinking_chunks(n, T, c, data):
    """The B-row step's work sharing (sync.claim, chunk_bounds): threads claiming in any order from one
    counter get disjoint chunks that cover 0 .. n−1 exactly; none is larger than half of what was left
    split T ways (or c), the last ones hold at most c items, and there are few of them."""
    from minilm_edge.kernels.sync import claim
    counter = np.zeros(16, np.int64)
    chunks, done = [], [False] * T
    while not all(done):
        t = data.draw(st.sampled_from([t for t in range(T) if not done[t]]))       # the next thread to claim
        a, e = claim(counter, 8, n, T, c)
        if a >= e:
            done[t] = True
        else:
            chunks.append((a, e))
    chunks.sort()
    assert [a for a, _ in chunks] == [0, *(e for _, e in chunks)][:len(chunks)]
    assert (chunks[-1][1] if chunks else 0) == n
    sizes = [e - a for a, e in chunks]                   # in claim order: chunk k starts where k − 1 ended
    assert all(x >= y for x, y in zip(sizes, sizes[1:]))
    assert not sizes or sizes[0] <= max(c, n // (2 * T))
    assert all(x <= c for x in sizes[-T:]) or n < 2 * T * c
    assert len(chunks) <= T * np.log2(max(n / (2 * T * c), 1)) + 5 * T
