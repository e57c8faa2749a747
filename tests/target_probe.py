"""Every int8-activation product of minilm_edge on fixed inputs, written to one .npz: run by
tests/test_targets.py in a subprocess per compile target (NUMBA_CPU_NAME / NUMBA_CPU_FEATURES), whose
files must agree to the bit. Usage: python target_probe.py OUT.npz SCRATCH_DIR [asm]

    int4 x int8    matvec_q4_i8 (decode rows), matmul_q4_i8 (prefill tiles)   int4 codes 0..15
    int8 x int8    matmul_q8_i8                                                codes + 128: 1..255
    q6 x int8      matvec_q6_i8, matvec_rows_q6_i8, matmul_q6_i8               codes + 32, + 128
    a tiny model   prefill logits, fused decode steps (int4, int8 and q6 rows, q6 head), the batched step

With `asm`: nothing is run; the decode row kernel is compiled and its assembly written instead (the
AVX-VNNI target: this machine may lack the instructions, the assembler text does not).
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from kernel_cases import activations, int4_layer  # noqa: E402

# shapes: rows odd and even, K with a short last chunk (K % 128 = 32, 64) or whole ones, every group case
CASES = [(17, 64, 3, 5), (8, 128, 3, -1), (33, 32, 5, 0), (6, 128, 5, 3)]       # (n, g, groups, salient)
Q6_CASES = [(6, 576, 64), (5, 160, 32)]                                          # (n, k, g)


def kernels(out):
    from minilm_edge.formats import q4
    from minilm_edge.kernels import quant_f32 as kq, quant_i8_matmul as kv, quant_i8_matvec as km, quant_q6 as k6
    for i, (n, g, groups, m) in enumerate(CASES):
        lin = int4_layer(i, n, g, groups, m, "mixed" if i % 2 else "normal")
        p = kq.prepare_q4(lin)
        rng = np.random.default_rng(100 + i)
        X = activations(rng, 13, lin.shape[1], "outliers" if i % 2 else "blocks")
        out[f"matvec_q4_i8/{i}"] = km.matvec_q4_i8(p, X[1])
        out[f"matmul_q4_i8/{i}"] = kv.matmul_q4_i8(p, X)
        w = rng.standard_normal((n, lin.shape[1])).astype(np.float32)
        w[0, :] = np.linspace(-1, 1, lin.shape[1])               # codes -127 .. 127: bytes 1 .. 255
        out[f"matmul_q8_i8/{i}"] = kv.matmul_q8_i8(kq.prepare_q8(q4.quantize_q8(w, g)), X)
    for i, (n, k, g) in enumerate(Q6_CASES):
        rng = np.random.default_rng(200 + i)
        p6 = k6.prepare_q6_codes(q4.quantize_q6(rng.standard_normal((n, k)).astype(np.float32), g))
        X = activations(rng, 9, k, "outliers")
        out[f"matvec_q6_i8/{i}"] = k6.matvec_q6_i8(p6, X[0])
        out[f"matvec_rows_q6_i8/{i}"] = k6.matvec_rows_q6_i8(p6, X[:5])
        out[f"matmul_q6_i8/{i}"] = k6.matmul_q6_i8(p6, X)


def model(scratch: Path, out):
    import minilm_edge
    from minilm_edge.quant.quantize import quantize
    from minilm_edge.runtime.batch import BatchDecoder
    from minilm_edge.runtime.generation import SamplingSettings
    from tinymodel import make_model_dir
    shape = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
    src, _, _ = make_model_dir(scratch / "src", **shape)
    q = quantize(src, scratch / "q", method="rtn", group_size=64, progress=False, embed="q6", embed_group_size=64,
                 int8="v@0,down@1,o@0,gate@0,up@0+1", int6="v@1,down@0,o@1")
    m = minilm_edge.load(q)
    assert m.decode_plan is not None and m.decode_plan.int8 and m.decode_plan.int8_ok
    rng = np.random.default_rng(7)
    V = m.config.vocab_size
    cache = m.new_cache(48)
    out["model/prefill"] = m.forward(list(rng.integers(0, V, 11)), cache)
    out["model/decode"] = np.concatenate([m.forward([int(t)], cache, last_only=True) for t in rng.integers(0, V, 4)])
    dec = BatchDecoder(m, max_batch=5, max_len=48)
    caches = [dec._seqs[dec.add(list(rng.integers(0, V, 3 + 4 * b)), SamplingSettings())].cache for b in range(5)]
    out["model/batch"] = np.concatenate([m.decode_batch(rng.integers(0, V, 5), caches) for _ in range(3)])


def asm(out_path: str):
    """The assembly of the int4 x int8 decode row pair (quant_i8_matvec.dot2_q4_i8), compiled, not run."""
    import numba

    from minilm_edge.kernels import quant_f32 as kq, quant_i8_matvec as km
    from minilm_edge.kernels.policy import FASTMATH_REDUCE

    @numba.njit(fastmath=FASTMATH_REDUCE)
    def pair(qw, sc, z, sw, gpc, gidx, g0s, qe, qo, sxl, nzt, xsal):
        return km.dot2_q4_i8(qw, sc, z, sw, 0, 1, gpc, gidx, g0s, qe, qo, sxl, nzt, xsal)

    lin = int4_layer(0, 2, 64, 4, -1, "normal")
    p = kq.prepare_q4(lin)
    s = km.VecScratch(lin.shape[1], p.sal_idx.shape[0])
    args = (p.qweight, p.scales, p.zeros, p.sal_w, *km.group_index(64, lin.shape[1]), s.qe, s.qo, s.sxl, s.nzt,
            s.x_sal)
    sig = tuple(numba.typeof(a) for a in args)
    pair.compile(sig)
    Path(out_path).write_text(pair.inspect_asm(sig))


def main(out_path: str, scratch: str, mode: str = "run"):
    from minilm_edge.kernels.int8_dot import INT8_ISA
    if mode == "asm":
        asm(out_path)
        return
    out = {"isa": np.array(str(INT8_ISA))}
    kernels(out)
    model(Path(scratch), out)
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(*sys.argv[1:])
