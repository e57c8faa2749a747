"""Measure the int4/int8 kernels on SmolLM2-135M shapes: GB/s of weight bytes read, calls/s, and
for the prefill matmuls GFLOP/s (= 2 x GMAC/s).

    python tools/bench_kernels.py            # table
    python tools/bench_kernels.py --json     # machine-readable
    python tools/bench_kernels.py --quick    # fewer rounds

GB/s = bytes the kernel reads per call (packed codes + float32 scales + uint8 zeros [+ salient]) /
time per call. "hot": the same matrix every call (it stays in L2/L3 - an upper bound set by compute);
"cold": calls cycle through copies totalling > 2x L3, as in a real decode pass over all layers.
Decode rows: the float32 matvecs (kernels/quant_f32) and, with an int8 dot (AVX2 or VNNI), the int4 x
int8-activation one (kernels/quant_i8_matvec; its per-call quantization of x included). Prefill rows: matmul_q4_f32
(dequantized tiles x OpenBLAS), matmul_q4_i8 (int8 activations, where the CPU has an int8 dot)
and a float32 BLAS product, at T = 16, 128, 512 tokens; BLAS gets as many threads as Numba
(kernels/policy.blas_threads), as in model.forward.
The reference point is a float32 matvec (same Numba vector code, float32 weights) on a cold matrix
set: the machine's memory bandwidth as a Numba kernel sees it.

The machine drifts and is shared: variants are interleaved round by round and medians reported.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from numba import prange

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without install
from minilm_edge.formats import q4
from minilm_edge.kernels import quant_f32 as kq, quant_i8_matmul as kv, quant_i8_matvec as km, simd
from minilm_edge.kernels.policy import FASTMATH_REDUCE, blas_threads, parallel_kernel, threads

# name, N, K, group size (SmolLM2-135M: hidden 576, intermediate 1536, vocab 49152)
SHAPES = [
    ("k/v", 192, 576, 64),
    ("q/o", 576, 576, 64),
    ("qkv", 960, 576, 64),
    ("gate_up", 3072, 576, 64),
    ("down", 576, 1536, 128),
    ("head", 49152, 576, 64),
]
COLD_BYTES = 96 << 20           # > 2x the 32 MiB L3 of the development machine


@parallel_kernel(fastmath=FASTMATH_REDUCE)
def _matvec_f32(w, x, out):
    """out = w @ x, float32 weights, 16-lane vectors: the memory-bandwidth reference."""
    for n in prange(w.shape[0]):
        row = w[n]
        acc = simd.v_zeros()
        for o in range(0, w.shape[1], simd.LANES):
            acc = simd.v_fma(simd.v_load(row, o), simd.v_load(x, o), acc)
        out[n] = simd.v_hsum(acc)


def _copies(make, nbytes, cold):
    return [make(i) for i in range(max(1, -(-COLD_BYTES // nbytes)) if cold else 1)]


def _q4_layer(seed, n, k, g):
    rng = np.random.default_rng(seed)
    lin = q4.Q4Linear(rng.integers(0, 256, (n, k // 2), dtype=np.uint8),
                      rng.random((n, k // g), dtype=np.float32).astype(np.float16),
                      rng.integers(0, 16, (n, k // g), dtype=np.uint8), g)
    return kq.prepare_q4(lin)


def _q8_layer(seed, n, k, g):
    rng = np.random.default_rng(seed)
    lin = q4.Q8Linear(rng.integers(-127, 128, (n, k), dtype=np.int8),
                      rng.random((n, k // g), dtype=np.float32).astype(np.float16), g)
    return kq.prepare_q8(lin)


def _time_per_call(fn, objs, min_time):
    """Seconds per call, cycling over objs, for at least min_time seconds."""
    calls, t0 = 0, time.perf_counter()
    while True:
        for o in objs:
            fn(o)
        calls += len(objs)
        t = time.perf_counter() - t0
        if t >= min_time:
            return t / calls


def variants(quick):
    """(kernel, shape name, n_threads, temperature, fn, objs, bytes per call, flops per call)."""
    out = []
    for name, n, k, g in SHAPES:
        if name == "head" and quick:
            continue
        x = np.random.default_rng(0).standard_normal(k).astype(np.float32)
        y = np.empty(n, np.float32)
        for cold in (False, True):
            temp = "cold" if cold else "hot"
            nb = _q4_layer(0, n, k, g).nbytes
            objs = _copies(lambda i: _q4_layer(i, n, k, g), nb, cold)
            out.append(("matvec_q4_f32", name, temp, lambda p, x=x, y=y: kq.matvec_q4_f32(p, x, y),
                        objs, nb, 2 * n * k))
            if kv.INT8_DOT:
                out.append(("matvec_q4_i8", name, temp, lambda p, x=x, y=y: km.matvec_q4_i8(p, x, y),
                            objs, nb, 2 * n * k))
            if name in ("head", "q/o"):
                nb8 = _q8_layer(0, n, k, g).nbytes
                objs8 = _copies(lambda i: _q8_layer(i, n, k, g), nb8, cold)
                out.append(("matvec_q8_f32", name, temp, lambda p, x=x, y=y: kq.matvec_q8_f32(p, x, y),
                            objs8, nb8, 2 * n * k))
            nbf = n * k * 4
            objsf = _copies(lambda i: np.random.default_rng(i).standard_normal((n, k)).astype(np.float32), nbf, cold)
            out.append(("matvec_f32 (ref)", name, temp, lambda w, x=x, y=y: _matvec_f32(w, x, y),
                        objsf, nbf, 2 * n * k))
        if name in ("q/o", "qkv", "gate_up", "down"):
            for t in (16, 128, 512):
                X = np.random.default_rng(1).standard_normal((t, k)).astype(np.float32)
                Y = np.empty((t, n), np.float32)
                p = _q4_layer(0, n, k, g)
                out.append((f"matmul_q4_f32 T={t}", name, "hot", lambda p, X=X, Y=Y: kq.matmul_q4_f32(p, X, Y),
                            [p], p.nbytes, 2 * n * k * t))
                if kv.INT8_DOT:
                    out.append((f"matmul_q4_i8 T={t}", name, "hot", lambda p, X=X, Y=Y: kv.matmul_q4_i8(p, X, Y),
                                [p], p.nbytes, 2 * n * k * t))
                W = np.random.default_rng(0).standard_normal((n, k)).astype(np.float32)
                out.append((f"matmul_f32 BLAS T={t}", name, "hot", lambda w, X=X: X @ w.T,
                            [W], W.nbytes, 2 * n * k * t))
    return out


def run(thread_counts, rounds, min_time, quick):
    vs = variants(quick)
    times = {}
    for th in thread_counts:
        with threads(th):
            blas_threads(th)
            for _, _, _, fn, objs, _, _ in vs:                  # warm up (JIT, page faults)
                fn(objs[0])
            for _ in range(rounds):                             # interleave variants round by round
                for kernel, shape, temp, fn, objs, _, _ in vs:
                    times.setdefault((kernel, shape, temp, th), []).append(_time_per_call(fn, objs, min_time))
    rows = []
    for (kernel, shape, temp, th), ts in times.items():
        nb, fl = next((v[5], v[6]) for v in vs if v[:3] == (kernel, shape, temp))
        t = statistics.median(ts)
        rows.append(dict(kernel=kernel, shape=shape, temp=temp, threads=th, us_per_call=t * 1e6,
                         calls_per_s=1 / t, gb_per_s=nb / t / 1e9, gflop_per_s=fl / t / 1e9,
                         bytes_per_call=nb, spread=(max(ts) - min(ts)) / t))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    ap.add_argument("--quick", action="store_true", help="3 rounds, skip the 49152-row head")
    ap.add_argument("--rounds", type=int, default=7, help="rounds of interleaved measurement (median)")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts, e.g. 1,2")
    args = ap.parse_args()
    rounds = 3 if args.quick else args.rounds
    rows = run([int(t) for t in args.threads.split(",")], rounds, 0.05 if args.quick else 0.1, args.quick)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'kernel':24} {'shape':8} {'temp':5} {'thr':>3} {'us/call':>9} {'calls/s':>9} "
          f"{'GB/s':>6} {'GFLOP/s':>8} {'spread':>6}")
    for r in sorted(rows, key=lambda r: (r["shape"], r["kernel"], r["temp"], r["threads"])):
        print(f"{r['kernel']:24} {r['shape']:8} {r['temp']:5} {r['threads']:3d} {r['us_per_call']:9.1f} "
              f"{r['calls_per_s']:9.0f} {r['gb_per_s']:6.1f} {r['gflop_per_s']:8.1f} {r['spread']:6.2f}")


if __name__ == "__main__":
    main()
