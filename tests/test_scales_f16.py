"""The kernels read the weight scales as the file stores them, fp16 bits in place (kernels/simd.as_f32,
load_f32), instead of float32 copies made at load: fp16 -> float32 is exact, so every kernel must give
bit for bit what it gave with the float32 copies. Each kernel is run twice on the same prepared linear,
once with its fp16 bits and once with `widened` (a float32 copy, as load made before), on ragged shapes:
odd row counts, a last partial 128-channel chunk (K % 128 = 64), group counts that are not a multiple
of 16, every groups-per-chunk case of the int8 matvec (g = 32, 64, 128), salient channels. Then whole
models: the one-call decode step (int4, int8 and q6 rows in its stacks, the head) and the batched step.
"""
import dataclasses

import numpy as np
import pytest

import minilm_edge
from minilm_edge.formats.q4 import quantize_q4, quantize_q6, quantize_q8
from minilm_edge.kernels import quant_f32 as kf, quant_q6 as k6
from minilm_edge.kernels.int8_dot import INT8_DOT
from minilm_edge.kernels.policy import threads
from minilm_edge.kernels.quant_i8_matmul import matmul_q4_i8, matmul_q8_i8
from minilm_edge.kernels.quant_i8_matvec import matvec_q4_i8
from minilm_edge.quant.quantize import quantize
from minilm_edge.runtime.batch import BatchDecoder
from minilm_edge.runtime.generation import SamplingSettings
from tinymodel import make_model_dir

QUANTIZABLE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
# (N, K, g): g 32/64/128 (4, 2, 1 groups per chunk), K % 128 = 64 (a partial chunk), G = 18 (not a
# multiple of 16: the zero points' masked tail)
SHAPES = [(7, 192, 32), (5, 576, 32), (9, 192, 64), (6, 640, 128), (3, 256, 128)]
needs_int8_dot = pytest.mark.skipif(not INT8_DOT, reason="this target has no int8 dot (AVX2 or VNNI)")


def widened(p):
    """The same prepared linear with a float32 copy of its scales (what load made before)."""
    assert p.scales.dtype == np.uint16
    return dataclasses.replace(p, scales=p.scales.view(np.float16).astype(np.float32))


def weight(n, k, seed):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, k)) * np.exp(rng.standard_normal((n, 1)))).astype(np.float32)


def inputs(k, seed, t=5):
    rng = np.random.default_rng(seed + 1)
    return rng.standard_normal(k).astype(np.float32), rng.standard_normal((t, k)).astype(np.float32)


def same(f, p, *args):
    a, b = f(p, *args), f(widened(p), *args)
    assert a.dtype == np.float32 and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b, err_msg=f.__name__)


@pytest.mark.parametrize("n,k,g", SHAPES)
@pytest.mark.parametrize("m", [0, 3])
def test_int4_kernels_fp16_scales_bit_for_bit(n, k, g, m):
    w = weight(n, k, n + k + g)
    sal = np.array([1, k // 2, k - 3])[:m] if m else None
    p = kf.prepare_q4(quantize_q4(w, g, salient_idx=sal))
    x, X = inputs(k, n)
    same(kf.matvec_q4_f32, p, x)
    same(kf.matmul_q4_f32, p, X)
    if INT8_DOT:
        same(matvec_q4_i8, p, x)
        same(matmul_q4_i8, p, X)


@pytest.mark.parametrize("n,k,g", SHAPES)
def test_int8_and_q6_kernels_fp16_scales_bit_for_bit(n, k, g):
    w = weight(n, k, 3 * n + k + g)
    x, X = inputs(k, n)
    p8 = kf.prepare_q8(quantize_q8(w, g))
    same(kf.matvec_q8_f32, p8, x)
    same(kf.matmul_q8_f32, p8, X)
    p6 = k6.prepare_q6_codes(quantize_q6(w, g))
    same(k6.matvec_q6_f32, p6, x)
    same(k6.matmul_q6_f32, p6, X)
    same(k6.matvec_rows_q6, p6, X)
    if INT8_DOT:
        same(matmul_q8_i8, p8, X)
        if k6.i8_ok(p6):
            same(k6.matvec_q6_i8, p6, x)
            same(k6.matvec_rows_q6_i8, p6, X)
            same(k6.matmul_q6_i8, p6, X)


def widen_plan(model):
    """Give the model's decode plan (and head) float32 copies of every scale array its kernels read."""
    f32 = lambda s: s.view(np.float16).astype(np.float32)
    plan = model.decode_plan
    plan.stacks = tuple(st._replace(scales=f32(st.scales)) for st in plan.stacks)
    plan.q8 = tuple(q._replace(scales=f32(q.scales), q6s=f32(q.q6s)) for q in plan.q8)
    model.weights.lm_head.p = widened(model.weights.lm_head.p)


@pytest.fixture(scope="module", params=["int4-int8", "q6-default"])
def folder(request, tmp_path_factory):
    """Two folders between them hold every kind of row the one-call steps take (a stack mixes int4 with
    one other kind): int4 with int8 rows and an int8 table as the tied head, and int4 with q6 rows and a
    q6 table. Not a third, all-int4 folder: its rows are in both, and every float32-scale twin compiles
    the decode and batched steps again for its own argument types (minutes of CI on 2 cores)."""
    d = tmp_path_factory.mktemp("s")
    src, cfg, _ = make_model_dir(d / "src", **QUANTIZABLE)
    kw = dict(group_size=32, quantize_head="int8", embed="int8", int8="v@0,down@1,gate@0,up@0")
    if request.param == "q6-default":
        kw = dict(group_size=32, embed="q6", embed_group_size=64, int6="v@1,down@0,o@1,gate@0,up@0")
    return quantize(src, d / "q", method="rtn", progress=False, **kw), cfg


@pytest.mark.parametrize("int8", [True, False])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_decode_step_fp16_scales_bit_for_bit(folder, int8, n_threads):
    """The one-call decode step (int4, int8 and q6 rows) and the head, scales read as fp16 bits in place,
    give exactly the logits of the same step over float32 copies of the scales; and so does the
    batched step, row for row."""
    q, cfg = folder
    a, b = minilm_edge.load(q, int8_activations=int8), minilm_edge.load(q, int8_activations=int8)
    assert a.decode_plan is not None and a.decode_plan.stacks[0].scales.dtype == np.uint16
    widen_plan(b)
    ids = np.random.default_rng(7).integers(0, cfg["vocab_size"], 12)
    ca, cb = a.new_cache(32), b.new_cache(32)
    with threads(n_threads):
        np.testing.assert_array_equal(a.forward(ids[:5], ca), b.forward(ids[:5], cb))          # prefill
        for t in ids[5:]:
            np.testing.assert_array_equal(a.forward([t], ca, last_only=True), b.forward([t], cb, last_only=True))
        caches = []
        for m in (a, b):
            dec = BatchDecoder(m, max_batch=3, max_len=32)
            caches.append([dec._seqs[dec.add(list(ids[:2 + 3 * i]), SamplingSettings())].cache for i in range(3)])
        for step in range(3):
            toks = ids[step:step + 3]
            np.testing.assert_array_equal(a.decode_batch(toks, caches[0]), b.decode_batch(toks, caches[1]))
    assert a._batch_step is not None and b._batch_step is not None
