"""formats/q4.py, the minilm-q4 v1 format and RTN quantizer: properties, agreement with
reference/q4.py, validation errors."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minilm_edge.errors import QuantFormatError, UsageError
from minilm_edge.formats import q4
from reference import q4 as ref

AWKWARD_N = [1, 2, 3, 5, 7, 15, 17, 31, 33]
EPS32 = float(np.finfo(np.float32).eps)
# Dequant error bound beyond scale/2: fp32 rounding of w/scale and of (q - z) * scale.
ROUND_SLACK = 4 * EPS32

SETTINGS = settings(max_examples=40, deadline=None)


def weights(seed, n, k, g, kind):
    """float32 [n, k] of a given character: normal, huge, tiny, constant groups, or mixed."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    if kind == "huge":
        w *= 3e3
    elif kind == "tiny":
        w *= 1e-7
    elif kind == "constant":
        w = np.repeat(rng.standard_normal((n, k // g)), g, axis=1).astype(np.float32)
    elif kind == "mixed":   # each group of its own magnitude, some constant, some positive-only
        mag = 10.0 ** rng.integers(-6, 4, (n, k // g))
        w = (w.reshape(n, k // g, g) * mag[..., None]).reshape(n, k).astype(np.float32)
        w[:, :g] = 0.5
        if k > g:
            w[:, g: 2 * g] = np.abs(w[:, g: 2 * g]) + 1.0
    return w


shapes = st.tuples(st.sampled_from(AWKWARD_N), st.sampled_from(q4.GROUP_SIZES), st.integers(1, 4))
kinds = st.sampled_from(["normal", "huge", "tiny", "constant", "mixed"])


@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**32 - 1))
def test_pack_unpack_round_trip_exact(shape, seed):
    n, g, groups = shape
    codes = np.random.default_rng(seed).integers(0, 16, (n, g * groups), dtype=np.uint8)
    packed = q4.pack_nibbles(codes)
    assert packed.shape == (n, g * groups // 2)
    assert np.array_equal(packed, ref.pack_nibbles(codes))
    assert np.array_equal(q4.unpack_nibbles(packed), codes)


@SETTINGS
@given(shape=shapes, bits=st.sampled_from([3, 4, 8]), kind=kinds, seed=st.integers(0, 2**32 - 1))
def test_rtn_codes_in_range_and_error_at_most_half_scale(shape, bits, kind, seed):
    n, g, groups = shape
    k = g * groups
    w = weights(seed, n, k, g, kind)
    q, scales, zeros = q4.rtn_codes(w, bits, g)
    rq, rs, rz = ref.rtn_quantize(w, bits, g)
    assert np.array_equal(q, rq) and np.array_equal(scales, rs) and np.array_equal(zeros, rz)
    qmax = 2 ** bits - 1
    assert q.max() <= qmax and zeros.max() <= qmax
    w_hat = q4.pseudo_quantize(w, bits, g)
    assert np.array_equal(w_hat, ref.pseudo_quantize(w, bits, g))
    s = np.repeat(scales.astype(np.float32), g, axis=1)                    # [N, K]
    z = np.repeat(zeros.astype(np.float32), g, axis=1)
    unclamped = np.round(w / s) + z
    inside = (unclamped >= 0) & (unclamped <= qmax)
    bound = s / 2 + ROUND_SLACK * np.maximum(np.abs(w), s * qmax)
    err = np.abs(w_hat - w)
    assert np.all(err[inside] <= bound[inside])


def quantize_both(w, g, idx):
    """quantize_q4 and the reference on the same input; they must agree bit for bit."""
    n, k = w.shape
    lin = q4.quantize_q4(w, g, idx)
    lin.validate(n, k)
    rq, rs, rz, ridx, rsw = ref.quantize_q4(w, g, idx)
    assert np.array_equal(lin.qweight, rq) and np.array_equal(lin.scales, rs)
    assert np.array_equal(lin.zeros, rz)
    w_hat = q4.dequantize(lin)
    assert np.array_equal(w_hat, ref.dequantize_q4(rq, rs, rz, g, ridx, rsw))
    return lin, w_hat


@SETTINGS
@given(shape=shapes, kind=kinds, seed=st.integers(0, 2**32 - 1), data=st.data())
def test_quantize_q4_matches_reference_with_salient(shape, kind, seed, data):
    n, g, groups = shape
    k = g * groups
    w = weights(seed, n, k, g, kind)
    m = data.draw(st.integers(1, min(k, 24)))
    idx = np.array(sorted(data.draw(st.sets(st.integers(0, k - 1), min_size=m, max_size=m))), np.int32)
    lin, w_hat = quantize_both(w, g, idx)
    codes = q4.unpack_nibbles(lin.qweight)
    assert np.array_equal(codes[:, idx], lin.zeros[:, idx // g])      # salient codes == zero point
    assert np.array_equal(w_hat[:, idx], w[:, idx].astype(np.float16).astype(np.float32))


@SETTINGS
@given(shape=shapes, kind=kinds, seed=st.integers(0, 2**32 - 1), empty=st.booleans())
def test_quantize_q4_matches_reference_without_salient(shape, kind, seed, empty):
    n, g, groups = shape
    w = weights(seed, n, g * groups, g, kind)
    idx = np.zeros(0, np.int32) if empty else None                   # no salient channels, said two ways
    _, w_hat = quantize_both(w, g, idx)
    assert np.array_equal(w_hat, q4.pseudo_quantize(w, 4, g))


@SETTINGS
@given(shape=shapes, kind=kinds, seed=st.integers(0, 2**32 - 1))
def test_q8_round_trip(shape, kind, seed):
    n, g, groups = shape
    w = weights(seed, n, g * groups, g, kind)
    lin = q4.quantize_q8(w, g)
    rq, rs = ref.quantize_q8(w, g)
    assert np.array_equal(lin.qweight, rq) and np.array_equal(lin.scales, rs)
    assert np.abs(lin.qweight.astype(np.int32)).max() <= q4.Q8_MAX
    w_hat = q4.dequantize_q8(lin)
    s = np.repeat(lin.scales.astype(np.float32), g, axis=1)
    inside = np.abs(np.round(w / s)) <= q4.Q8_MAX
    bound = s / 2 + ROUND_SLACK * np.maximum(np.abs(w), s * q4.Q8_MAX)
    assert np.all(np.abs(w_hat - w)[inside] <= bound[inside])


def test_choose_group_size():
    assert q4.choose_group_size(576) == 64           # SmolLM2 hidden size
    assert q4.choose_group_size(1536) == 128
    assert q4.choose_group_size(96) == 32
    assert q4.choose_group_size(1536, preferred=64) == 64
    with pytest.raises(QuantFormatError, match="not divisible"):
        q4.choose_group_size(100)
    with pytest.raises(UsageError):
        q4.choose_group_size(576, preferred=48)


def test_bits_per_weight():
    assert q4.bits_per_weight(64) == 4.375
    assert q4.bits_per_weight(128, n_salient=6, k=576) == pytest.approx(4.1875 + 16 * 6 / 576)


def _valid(n=3, k=64, g=32, m=2):
    lin = q4.quantize_q4(np.random.default_rng(0).standard_normal((n, k)).astype(np.float32), g,
                         np.arange(m, dtype=np.int32) * 3 if m else None)
    return dict(qweight=lin.qweight, scales=lin.scales, zeros=lin.zeros, group_size=g,
                salient_idx=lin.salient_idx, salient_w=lin.salient_w)


@pytest.mark.parametrize("change, message", [
    (dict(qweight=np.zeros((3, 32), np.int8)), "qweight: expected dtype uint8, got int8"),
    (dict(scales=np.zeros((3, 2), np.float32)), "scales: expected dtype float16, got float32"),
    (dict(scales=np.zeros((3, 3), np.float16)), r"scales: expected shape \(3, 2\), got \(3, 3\)"),
    (dict(zeros=np.zeros((2, 2), np.uint8)), r"zeros: expected shape \(3, 2\), got \(2, 2\)"),
    (dict(zeros=np.full((3, 2), 16, np.uint8)), "zeros: expected values in 0..15"),
    (dict(scales=np.full((3, 2), np.inf, np.float16)), "scales: expected finite"),
    (dict(group_size=48), "group_size: expected one of"),
    (dict(salient_idx=np.array([0, 64], np.int32)), "salient_idx: expected sorted unique"),
    (dict(salient_idx=np.array([-1, 3], np.int32)), "salient_idx: expected sorted unique"),
    (dict(salient_idx=np.array([3, 3], np.int32)), "salient_idx: expected sorted unique"),
    (dict(salient_idx=np.array([3, 0], np.int32)), "salient_idx: expected sorted unique"),
    (dict(salient_idx=np.array([0, 3], np.int64)), "salient_idx: expected dtype int32"),
    (dict(salient_w=np.zeros((3, 2), np.float32)), "salient_w: expected dtype float16"),
    (dict(salient_w=None), "give both or neither"),
    (dict(salient_w=np.full((3, 2), np.nan, np.float16)), "salient_w: expected finite"),
])
def test_q4linear_validation_names_tensor(change, message):
    args = _valid()
    args.update(change)
    with pytest.raises(QuantFormatError, match=message):
        q4.Q4Linear(**args)


def test_validate_against_expected_shape():
    lin = q4.Q4Linear(**_valid())
    lin.validate(3, 64)
    with pytest.raises(QuantFormatError, match=r"qweight: expected shape \(4, 32\), got \(3, 32\)"):
        lin.validate(4, 64)


def test_q8linear_validation():
    with pytest.raises(QuantFormatError, match="qweight: expected dtype int8"):
        q4.Q8Linear(np.zeros((2, 64), np.uint8), np.zeros((2, 1), np.float16), 64)
    with pytest.raises(QuantFormatError, match=r"scales: expected shape \(2, 2\)"):
        q4.Q8Linear(np.zeros((2, 64), np.int8), np.zeros((2, 1), np.float16), 32)


def test_quantizer_refuses_bad_input():
    with pytest.raises(UsageError, match="inf or nan"):
        q4.quantize_q4(np.full((2, 64), np.nan, np.float32), 64)
    with pytest.raises(UsageError, match="not a multiple"):
        q4.quantize_q4(np.zeros((2, 96), np.float32), 64)
    with pytest.raises(UsageError, match="bits"):
        q4.pseudo_quantize(np.zeros((2, 64), np.float32), 9, 64)
    with pytest.raises(QuantFormatError, match="fp16"):
        q4.quantize_q4(np.array([[0.0, 1e7] * 16], np.float32), 32)
