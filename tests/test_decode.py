"""The one-call decode step (kernels/decode_step.py, planned by runtime/decode.py) against the Python
path, on int4 tiny models; its attention parts and the spin barrier it relies on."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from numba import prange

import minilm_edge
from minilm_edge.errors import UsageError
from minilm_edge.kernels.decode_step import attend_part, merge_parts
from minilm_edge.kernels.policy import compile_time_choice, kernel, parallel_kernel, threads
from minilm_edge.kernels.quant_i8_matmul import INT8_DOT
from minilm_edge.kernels.sync import atomic_add, atomic_load, barrier
from minilm_edge.quant.quantize import quantize
from tinymodel import make_model_dir

QUANTIZABLE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)


def salient_hook(layer, name, w):
    """Salient channels as AWQ picks them: per input (layer, K), so q|k|v and gate|up share them;
    different counts per layer exercise the stack's padding."""
    k = w.shape[1]
    m = 1 + (layer * 3 + k) % 5
    return w, np.sort(np.random.default_rng([layer, k]).choice(k, m, replace=False)).astype(np.int32)


@pytest.mark.parametrize("variant", [{}, dict(model_type="qwen2"), dict(num_key_value_heads=4)])
@pytest.mark.parametrize("hook", [None, salient_hook])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_one_call_decode_matches_prefill(tmp_path, variant, hook, n_threads):
    src, cfg, _ = make_model_dir(tmp_path / "src", **{**QUANTIZABLE, **variant})
    model = minilm_edge.load(quantize(src, tmp_path / "q", method="rtn", group_size=64, progress=False,
                                      linear_hook=hook, quantize_head="int8"),
                             int8_activations=False)   # the exact prefill
    assert model.decode_plan is not None and model.fused_decode
    ids = np.random.default_rng(3).integers(0, cfg["vocab_size"], 30)
    full = model.forward(ids)                               # prefill path: per-layer Python calls
    cache = model.new_cache(40)
    with threads(n_threads):
        steps = [model.forward(ids[:1], cache)] + [model.forward([t], cache) for t in ids[1:]]
    np.testing.assert_allclose(np.concatenate(steps), full, atol=1e-4)


@pytest.mark.skipif(not INT8_DOT, reason="no int8 dot (AVX2 or VNNI) on this target: decode runs in float32")
@pytest.mark.parametrize("hook", [None, salient_hook])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_int8_decode_matches_int8_prefill(tmp_path, hook, n_threads):
    """With int8 activations (the default with an int8 dot) a decoded token meets the same int8 activations
    as in a prefill (one quantizer), so the hidden states agree up to float summation order; and
    the decode plan and the per-linear path (no plan) agree too."""
    src, cfg, _ = make_model_dir(tmp_path / "src", **QUANTIZABLE)
    model = minilm_edge.load(quantize(src, tmp_path / "q", method="rtn", group_size=64, progress=False,
                                      linear_hook=hook))
    assert model.fused_decode and model.decode_plan.int8 and model.decode_plan.int8_ok
    ids = np.random.default_rng(4).integers(0, cfg["vocab_size"], 30)
    full = model.hidden_states(ids)                         # T = 30: the int8 prefill kernels
    cache = model.new_cache(40)
    with threads(n_threads):
        steps = np.concatenate([model.hidden_states([t], cache) for t in ids])
    np.testing.assert_allclose(steps, full, atol=2e-4)
    model.fused_decode = False                              # the same steps through Q4.matvec
    cache = model.new_cache(40)
    no_plan = np.concatenate([model.hidden_states([t], cache) for t in ids])
    model.fused_decode = True
    np.testing.assert_allclose(no_plan, full, atol=2e-4)
    assert not np.array_equal(no_plan, steps)               # the A/B did take the other path
    f32 = minilm_edge.load(tmp_path / "q", int8_activations=False).hidden_states(ids)
    rel = np.linalg.norm(full - f32) / np.linalg.norm(f32)
    assert 1e-4 < rel < 0.1                                 # int8 activations do change the numbers, a little


@pytest.mark.parametrize("hook", [None, salient_hook])
def test_stacks_view_the_file_and_decode_as_copies_do(tmp_path, hook):
    """A folder `quantize` wrote stores each stack's codes, zero points and scales back to back
    (formats/tensors.storage_rank): the plan views the mapped file instead of copying it. The same
    tensors written in another order are copied into the stacks, and both decode alike, bit for bit."""
    from minilm_edge.formats.folder import write_model_folder
    from minilm_edge.formats.tensors import TensorSource
    src, cfg, _ = make_model_dir(tmp_path / "src", **QUANTIZABLE)
    q = quantize(src, tmp_path / "q", method="rtn", group_size=64, progress=False, linear_hook=hook,
                 quantize_head="int8")
    mapped = minilm_edge.load(q, int8_activations=False)
    plan = mapped.decode_plan
    assert plan.mapped and not plan.qkv.qweight.flags.owndata and not plan.down.zeros.flags.writeable
    assert plan.gate_up.scales.dtype == np.uint16 and not plan.gate_up.scales.flags.writeable   # fp16 bits, mapped
    assert plan.qkv.qweight.shape == (cfg["num_hidden_layers"], 64 + 2 * 32, 32)
    ts = TensorSource(q)
    assert np.array_equal(plan.gate_up.qweight[1, 96:], ts.raw("model.layers.1.mlp.up_proj.qweight")[0])
    # the same tensors, the stacked parts in reverse order: copies
    import json
    tensors = {n: np.array(ts.raw(n)[0]) for n in sorted(ts.where, reverse=True)}
    config = json.loads((q / "config.json").read_text())
    from minilm_edge.formats import safetensors as st_mod
    write = st_mod.write_file
    st_mod.write_file = lambda path, t, meta, rank: write(path, t, meta)   # keep the given (reversed) order
    try:
        write_model_folder(q, tmp_path / "shuffled", tensors, config)
    finally:
        st_mod.write_file = write
    copied = minilm_edge.load(tmp_path / "shuffled", int8_activations=False)
    # copies live in their own (anonymous) memory: writable, where the file's views are read-only
    assert not copied.decode_plan.mapped and copied.decode_plan.qkv.qweight.flags.writeable
    assert copied.decode_plan.qkv.scales.flags.writeable
    ids = np.random.default_rng(5).integers(0, cfg["vocab_size"], 12)
    a, b = mapped.new_cache(20), copied.new_cache(20)
    for t in ids:
        np.testing.assert_array_equal(mapped.forward([t], a), copied.forward([t], b))


def test_plan_only_for_all_int4_models(tmp_path):
    src, _, _ = make_model_dir(tmp_path / "src", **QUANTIZABLE)
    model = minilm_edge.load(src)
    assert model.decode_plan is None and not model.fused_decode
    with pytest.raises(UsageError, match="fused decode needs every block linear in int4"):
        model.fused_decode = True


@parallel_kernel()
def _barrier_rounds(T, rounds, bar, seen):
    """Each round every thread writes its slot, passes a barrier, then reads all the slots: after
    the barrier it must see every thread's write of that round (seen[t, r] = sum of the slots)."""
    slots = np.zeros(T * 8, np.int64)
    for t in prange(T):
        k = 0
        for r in range(rounds):
            slots[8 * t] = r + 1
            k = barrier(bar, k, T)
            s = 0
            for u in range(T):
                s += slots[8 * u]
            seen[t, r] = s
            k = barrier(bar, k, T)       # nobody writes round r+1 before everyone has read round r


@pytest.mark.parametrize("n_threads", [1, 2])
def test_barrier_makes_every_write_visible(n_threads):
    rounds = 2000
    bar, seen = np.zeros(8, np.int64), np.zeros((n_threads, rounds), np.int64)
    with threads(n_threads):
        _barrier_rounds(n_threads, rounds, bar, seen)
    expected = n_threads * (np.arange(rounds) + 1)
    assert (seen == expected).all()
    assert bar[0] == 2 * rounds * n_threads


@kernel()
def _add_then_load(a):
    old = atomic_add(a, 1, 5)
    return old, atomic_load(a, 1)


def test_atomic_add_returns_old_value():
    a = np.array([0, 7, 0], np.int64)
    assert _add_then_load(a) == (7, 12)
    assert a.tolist() == [0, 12, 0]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), dh=st.sampled_from([16, 32, 48, 64, 128]), rep=st.integers(1, 3),
       parts=st.integers(1, 3), seed=st.integers(0, 2**16), spread=st.sampled_from([0.1, 3.0, 30.0]))
def test_attention_parts_joined_are_softmax_attention(n, dh, rep, parts, seed, spread):
    """The positions split in `parts` (some empty when n < parts), each part over the rep query
    heads of one kv head, then joined: softmax(q·k / sqrt(dh)) v for every head."""
    rng = np.random.default_rng(seed)
    H, S = 2 * rep, n + 5                                  # two kv heads; the part is for kv head 1
    q = rng.standard_normal(H * dh).astype(np.float32)
    k = (rng.standard_normal((S, dh)) * spread).astype(np.float32)
    v = rng.standard_normal((S, dh)).astype(np.float32)
    s = np.full((H, S), np.nan, np.float32)
    pm, pl = np.zeros((parts, H), np.float32), np.zeros((parts, H), np.float32)
    po = np.zeros((parts, H, dh), np.float32)
    scale = np.float32(1 / np.sqrt(dh))
    for t in range(parts):
        attend_part(q, 0, rep, dh, k, v, 0, 0, scale, s, pm[t], pl[t], po[t])     # kv head 0: nothing
        attend_part(q, 1, rep, dh, k, v, n * t // parts, n * (t + 1) // parts, scale, s, pm[t], pl[t], po[t])
    out = np.empty(H * dh, np.float32)
    merge_parts(parts, H, dh, pm, pl, po, out)
    for r in range(rep):
        h = rep + r
        z = (k[:n].astype(np.float64) @ q[h * dh:(h + 1) * dh]) * scale
        p = np.exp(z - z.max())
        np.testing.assert_allclose(out[h * dh:(h + 1) * dh], (p / p.sum()) @ v[:n], rtol=1e-4, atol=1e-5)


MIXED_INT8 = "v@0+2,down@1+2,o@1,k@2,gate@0+2,up@1+2"   # gate|up: gate alone (0), up alone (1), both (2)


def _mixed_folder(tmp_path):
    src, cfg, _ = make_model_dir(tmp_path / "src", num_hidden_layers=3, **QUANTIZABLE)
    q = quantize(src, tmp_path / "q", method="rtn", group_size=32, progress=False, int8=MIXED_INT8)
    return src, cfg, q


@pytest.mark.parametrize("n_threads", [1, 2])
def test_mixed_int4_int8_folder_decodes_fused_as_unfused(tmp_path, n_threads):
    """int8 block linears (quantize --int8) run in the one-call step as int8 rows (decode.stack_q8,
    one pass, shared out by cost): in float32 the fused step gives the prefill's hidden states and
    the same greedy tokens as the per-linear path (Q8 kernels)."""
    from minilm_edge.runtime.linear import Q8
    src, cfg, q = _mixed_folder(tmp_path)
    model = minilm_edge.load(q, int8_activations=False)
    plan = model.decode_plan
    assert model.fused_decode and plan.down.q8 is not None and plan.gate_up.q8 is not None and plan.has_int8
    assert isinstance(model.weights.blocks[2].down, Q8) and isinstance(model.weights.blocks[0].v, Q8)
    blocks = model.weights.blocks
    assert [(type(b.gate).__name__, type(b.up).__name__) for b in blocks] == [("Q8", "Q4"), ("Q4", "Q8"), ("Q8", "Q8")]
    F = cfg["intermediate_size"]
    # gate|up's int8 row pairs per block (first row, pairs p0, p1 of the block's 2F rows, q6 or not): gate, up, both
    assert plan.q8_table[2].tolist() == [[0, 0, F // 2, 0], [F, F // 2, F, 0], [2 * F, 0, F, 0]]
    ids = np.random.default_rng(6).integers(0, cfg["vocab_size"], 24)
    full = model.hidden_states(ids)
    runs = {}
    for fused in (True, False):
        model.fused_decode = fused
        cache = model.new_cache(64)
        with threads(n_threads):
            steps = np.concatenate([model.hidden_states([t], cache) for t in ids])
            tok, gen = int(ids[-1]), []
            for _ in range(8):
                tok = int(np.argmax(model.forward([tok], cache)[-1]))
                gen.append(tok)
        np.testing.assert_allclose(steps, full, atol=2e-4)
        runs[fused] = gen
    assert runs[True] == runs[False]
    rtn = minilm_edge.load(quantize(src, tmp_path / "q4", method="rtn", group_size=32, progress=False),
                           int8_activations=False)
    assert np.linalg.norm(rtn.hidden_states(ids) - full) > 1e-3 * np.linalg.norm(full)   # int8 did change them


@pytest.mark.skipif(not INT8_DOT, reason="no int8 dot (AVX2 or VNNI) on this target: decode runs in float32")
def test_mixed_folder_fused_with_int8_activations(tmp_path):
    """With int8 activations the int8 rows meet the int4 kernels' activation quantizer (int8 x int8,
    quant_i8_matvec.dot2_q8_i8), the unfused Q8 matvec float32 ones: both stay as close to the
    float32 prefill as int8 activations allow."""
    _, cfg, q = _mixed_folder(tmp_path)
    ids = np.random.default_rng(6).integers(0, cfg["vocab_size"], 24)
    f32 = minilm_edge.load(q, int8_activations=False).hidden_states(ids)
    model = minilm_edge.load(q)
    assert model.fused_decode and model.decode_plan.int8_ok
    for fused in (True, False):
        model.fused_decode = fused
        cache = model.new_cache(64)
        steps = np.concatenate([model.hidden_states([t], cache) for t in ids])
        assert np.linalg.norm(steps - f32) / np.linalg.norm(f32) < 0.1


@pytest.mark.parametrize("spec", ["up@1", "gate@0", "gate@1,up@1"])
@pytest.mark.parametrize("int8_act", [False, True])
def test_int8_gate_up_alone_decode_fused_as_unfused(tmp_path, spec, int8_act):
    """Only gate and/or up int8 (the int4 stacks of q|k|v, o, down without int8 rows): the one-call step
    takes them (kernels/decode_step._rows_gate_up_mixed) and gives the per-linear path's hidden states,
    in float32 to float precision and with int8 activations (where the two quantize the activations of
    the int8 rows differently) as close as int8 activations allow."""
    src, cfg, _ = make_model_dir(tmp_path / "src", **QUANTIZABLE)
    q = quantize(src, tmp_path / "q", method="rtn", group_size=32, progress=False, int8=spec)
    model = minilm_edge.load(q, int8_activations=int8_act)
    assert model.fused_decode and model.decode_plan.has_int8 and model.decode_plan.gate_up.q8 is not None
    assert model.decode_plan.int8_ok == INT8_DOT
    ids = np.random.default_rng(7).integers(0, cfg["vocab_size"], 20)
    runs = {}
    for fused in (True, False):
        model.fused_decode = fused
        cache = model.new_cache(32)
        runs[fused] = np.concatenate([model.hidden_states([t], cache) for t in ids])
    err = np.linalg.norm(runs[True] - runs[False]) / np.linalg.norm(runs[False])
    assert err < (0.1 if int8_act and INT8_DOT else 1e-5)


def test_compile_time_choice_compiles_only_the_chosen_kernel():
    """policy.compile_time_choice (how the decode steps pick their row kernels by activation kind): a
    constant kind, written at the call or handed down as an argument, types and compiles the chosen
    kernel only; the other one is never compiled. A kind known only at run time is refused rather than
    compiling every kernel. Plain (uncached) jit functions: their signatures are what got compiled."""
    import numba
    from numba.core.errors import TypingError

    @numba.njit
    def plus_one(x):
        return x + 1.0

    @numba.njit
    def twice(x):
        return x * 2.0

    @compile_time_choice(plus_one, twice)
    def pick(kind, x):
        """plus_one or twice."""

    @numba.njit
    def written(x):
        return pick(1, x)

    @numba.njit
    def handed(kind, x):
        return pick(kind, x)

    @numba.njit
    def handed_down(x):
        return handed(0, x)

    assert written(3.0) == 6.0
    assert twice.signatures and not plus_one.signatures
    assert handed_down(3.0) == 4.0 and len(plus_one.signatures) == 1 and len(twice.signatures) == 1
    assert pick(1, 3.0) == 6.0 and pick.__doc__ == "plus_one or twice."        # from Python: chosen then
    with pytest.raises(TypingError, match="compile-time constant"):
        handed(1, 3.0)
