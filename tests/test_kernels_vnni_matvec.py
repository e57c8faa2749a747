"""The decode int4 x int8 matvec (kernels/quant_i8_matvec) against its NumPy twin
(reference/q4.matmul_q4_i8, one token), over ragged shapes: rows odd and even, K with every chunk tail (K % 128
in 0, 32, 64, 96), all group sizes, salient sets from none to many, extreme and constant groups."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from kernel_cases import activations, epilogue_bound, int4_layer, ref_args

from minilm_edge.errors import UsageError
from minilm_edge.formats import q4
from minilm_edge.kernels import quant_f32 as kq, quant_i8_matmul as kv, quant_i8_matvec as km
from minilm_edge.kernels.policy import threads
from reference import q4 as ref

pytestmark = pytest.mark.skipif(not kv.INT8_DOT, reason="this target has no int8 dot (AVX2 or VNNI): "
                                                    "the int8 matvec is never used here, the float32 one is")
SETTINGS = settings(max_examples=60, deadline=None)
AWKWARD_N = [1, 2, 3, 7, 16, 17, 33, 100]

layers = st.tuples(st.integers(0, 2**32 - 1), st.sampled_from(AWKWARD_N), st.sampled_from(q4.GROUP_SIZES),
                   st.integers(1, 13), st.sampled_from([-1, 0, 1, 5, 17, 40]),
                   st.sampled_from(["normal", "mixed"]))


@SETTINGS
@given(params=layers, xkind=st.sampled_from(["normal", "outliers", "blocks", "zero"]))
def test_matvec_q4_i8_matches_reference(params, xkind):
    seed, n, g, groups, m, kind = params
    lin = int4_layer(seed, n, g, groups, min(m, g * groups), kind)
    x = activations(np.random.default_rng(seed + 1), 2, lin.shape[1], xkind)[:1]     # [1, K]
    y = km.matvec_q4_i8(kq.prepare_q4(lin), x[0])
    y_ref = ref.matmul_q4_i8(*ref_args(lin), x, kv.ACT_BLOCK)[0]
    assert np.all(np.abs(y.astype(np.float64) - y_ref) <= epilogue_bound(lin, x, kv.ACT_BLOCK)[0])


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), blocks=st.integers(1, 40), g=st.sampled_from(q4.GROUP_SIZES),
       xkind=st.sampled_from(["normal", "outliers", "blocks", "zero"]), m=st.integers(0, 6))
def test_vector_quantization_is_the_prefill_quantization_bit_for_bit(seed, blocks, g, xkind, m):
    """The decode prologue gives a token the same int8 codes and scales as a prefill does (so a
    decoded token and the same token in a prompt see the same activations), zero-padded."""
    k = -(-32 * blocks // g) * g
    rng = np.random.default_rng(seed)
    x = activations(rng, 2, k, xkind)[0]
    sal = np.sort(rng.choice(k, size=min(m, k), replace=False)).astype(np.int64)
    s = km.VecScratch(k + 256)                                     # a bigger buffer, as in decode
    s.qe[:], s.qo[:], s.sxl[:], s.nzt[:] = 7, 7, np.nan, np.nan      # stale values must not survive
    km.quantize_vec(x, sal, sal.size, g, s.xz, s.qe, s.qo, s.sxl, s.nzt)
    xz = x.copy()
    xz[sal] = 0.0
    qx_ref, sx_ref = ref.quantize_activations_i8(xz[None], kv.ACT_BLOCK)
    _, _, zt = kv.quantize_activations(xz[None], g)
    assert np.array_equal(s.qe[:k // 2], qx_ref[0, 0::2]) and np.array_equal(s.qo[:k // 2], qx_ref[0, 1::2])
    assert not s.qe[k // 2:].any() and not s.qo[k // 2:].any()
    assert np.array_equal(s.sxl[:k // 8], np.repeat(sx_ref[0], kv.ACT_BLOCK // 8)) and not s.sxl[k // 8:].any()
    assert np.array_equal(s.nzt[:k // g], -zt[0]) and not s.nzt[k // g:].any()


def test_nan_or_inf_in_x_makes_every_output_nan():
    p = kq.prepare_q4(int4_layer(2, 40, 64, 3, 0, "normal"))
    x = activations(np.random.default_rng(0), 2, p.shape[1], "normal")[0]
    for bad in (np.nan, np.inf):
        xb = x.copy()
        xb[70] = bad
        assert np.all(np.isnan(km.matvec_q4_i8(p, xb)))


def test_threads_agree_and_stacked_rows_are_addressed_by_offset():
    """Rows are independent of the thread split, and a weight seen as [rows, ·] of a bigger stack
    gives the same rows as the linear alone."""
    lin = int4_layer(7, 301, 64, 9, 9, "mixed")
    p = kq.prepare_q4(lin)
    x = activations(np.random.default_rng(3), 2, p.shape[1], "outliers")[0]
    with threads(1):
        y1 = km.matvec_q4_i8(p, x)
    with threads(2):
        y2 = km.matvec_q4_i8(p, x)
    assert np.array_equal(y1, y2)
    y_ref = ref.matmul_q4_i8(*ref_args(lin), x[None], kv.ACT_BLOCK)[0]
    assert np.all(np.abs(y1 - y_ref) <= epilogue_bound(lin, x[None], kv.ACT_BLOCK)[0])


def test_int8_matvec_error_is_small_on_typical_activations():
    """Against the exact float product, not the twin: ~0.5% on Gaussian activations, as in prefill."""
    lin = int4_layer(5, 256, 64, 9, 0, "normal")
    x = activations(np.random.default_rng(6), 2, lin.shape[1], "normal")[0]
    y = km.matvec_q4_i8(kq.prepare_q4(lin), x)
    y_ref = ref.matvec_q4(*ref_args(lin), x)
    assert np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref) < 0.01


def test_wrapper_checks_arguments():
    p = kq.prepare_q4(int4_layer(0, 4, 32, 2, 0, "normal"))
    with pytest.raises(UsageError, match=r"x: expected contiguous float32 \[64\]"):
        km.matvec_q4_i8(p, np.zeros(32, np.float32))
    with pytest.raises(UsageError, match="group size dividing or a multiple of 128"):
        odd = kq.Q4Prepared(np.zeros((2, 48), np.uint8), np.ones((2, 1), np.float32), np.zeros((2, 1), np.uint8), 96,
                            np.zeros(0, np.int64), np.zeros((2, 0), np.float32), 0)   # no format makes g = 96 (yet)
        km.matvec_q4_i8(odd, np.ones(96, np.float32))
    assert km.supports_i8(64, 576) and km.supports_i8(128, 1536) and km.supports_i8(32, 96)
    assert not km.supports_i8(48, 96) and not km.supports_i8(64, 80) and not km.supports_i8(192, 576)
