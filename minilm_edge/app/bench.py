"""Speed and memory of a model on this machine: load time, time to first token, prefill and decode
tokens/s, peak RSS, weight bytes read per token, and decode speed against the memory-bandwidth floor.

Decode is memory-bound: each token reads every weight once, so bytes_per_token / bandwidth is the
fastest a token can be. `fraction_of_floor` = achieved tokens/s ÷ (bandwidth / bytes_per_token).
"""
from __future__ import annotations

import resource
import statistics
import time

import numpy as np
from numba import prange

from ..kernels.policy import FASTMATH_REDUCE, parallel_kernel, threads


@parallel_kernel(fastmath=FASTMATH_REDUCE)
def _sum_rows(a):
    """Sum of a [R, C] float32 array, rows split across threads: a pure streaming read."""
    acc = np.zeros(a.shape[0], np.float32)
    for r in prange(a.shape[0]):
        s = np.float32(0.0)
        for c in range(a.shape[1]):
            s += a[r, c]
        acc[r] = s
    return acc.sum()


def memory_bandwidth(n_threads: int | None = None, mbytes: int = 1024, passes: int = 5, buffers: int = 3) -> float:
    """Read bandwidth in GB/s, the way STREAM-like tools report it: the best of `passes` timed passes
    (after one untimed) over each of `buffers` buffers of `mbytes` MB (20x this machine's 48 MiB L3),
    allocated one after the other, all threads reading (rows split between them).

    Best, not median: what the memory can deliver, which is what the floor needs; a pass that another
    process or a frequency dip slowed is not it. Several fresh buffers: one buffer's pages can sit
    where reading them is slower (a VM's memory), and the probe read 33-52 GB/s from run to run as
    the median of 7 passes over one 512 MB buffer (BENCHMARKS.md, "Memory and load time that scale")."""
    rows = mbytes * 1024 * 1024 // 4 // 4096
    best = 0.0
    with threads(n_threads):
        for _ in range(buffers):
            a = np.ones((rows, 4096), np.float32)          # written once: every page resident
            _sum_rows(a)
            for _ in range(passes):
                t0 = time.perf_counter()
                _sum_rows(a)
                best = max(best, a.nbytes / (time.perf_counter() - t0) / 1e9)
            del a
    return best


def weight_bytes_per_token(model) -> int:
    """Bytes of weights a decode step reads: every linear, the norms, one embedding row."""
    w = model.weights
    total = w.lm_head.nbytes + w.norm.nbytes + w.embed.nbytes // w.embed.shape[0]   # one row, as stored
    for b in w.blocks:
        total += b.attn_norm.nbytes + b.mlp_norm.nbytes
        total += sum(getattr(b, n).nbytes for n in ("q", "k", "v", "o", "gate", "up", "down"))
    return total


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux reports KiB


def run(model_dir, n_threads: int | None = None, prompt_tokens: int = 512, new_tokens: int = 128,
        repeats: int = 3, progress=None, int8_activations: bool = True) -> dict:
    """Measure one model; `repeats` runs of prefill and decode, medians reported.
    int8_activations=False: prefill in float32 (model.load)."""
    from ..kernels.int8_dot import INT8_DOT, INT8_ISA
    from ..runtime.model import load

    say = progress or (lambda msg: None)
    with threads(n_threads):
        t0 = time.perf_counter()
        model = load(model_dir, int8_activations=int8_activations)
        load_s = time.perf_counter() - t0
        tok = model.tokenizer
        ids = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
        t0 = time.perf_counter()
        cache = model.new_cache(max(prompt_tokens, 68) + new_tokens + len(ids) + 1)
        nxt = int(np.argmax(model.forward(ids, cache, last_only=True)[0]))
        ttft = load_s + time.perf_counter() - t0

        rng = np.random.default_rng(0)
        prompt = rng.integers(100, model.config.vocab_size - 100, prompt_tokens)
        say("warming up")              # compile or load every code path the timed runs take
        cache.truncate(0)
        model.forward(prompt[:64], cache, last_only=True)
        for t in prompt[64:68]:
            model.forward([t], cache, last_only=True)
        prefill, decode = [], []
        for r in range(repeats):
            say(f"run {r + 1}/{repeats}")
            cache.truncate(0)
            t0 = time.perf_counter()
            logits = model.forward(prompt, cache, last_only=True)
            prefill.append(prompt_tokens / (time.perf_counter() - t0))
            nxt = int(np.argmax(logits[0]))
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                nxt = int(np.argmax(model.forward([nxt], cache, last_only=True)[0]))
            decode.append(new_tokens / (time.perf_counter() - t0))
        rss = peak_rss_mb()            # before the bandwidth probe's own 512 MB buffer
        say("measuring memory bandwidth")
        bw = memory_bandwidth(n_threads)
    bpt = weight_bytes_per_token(model)
    dec = statistics.median(decode)
    import numba
    return {
        "model": str(model_dir),
        "threads": n_threads or numba.get_num_threads(),
        "load_s": round(load_s, 3),
        "time_to_first_token_s": round(ttft, 3),
        "prefill_tokens_per_s": round(statistics.median(prefill), 1),
        "prefill_tokens": prompt_tokens,
        "prefill_int8_activations": int8_activations and INT8_DOT,
        "int8_isa": INT8_ISA if int8_activations else None,
        "decode_tokens_per_s": round(dec, 1),
        "decode_tokens": new_tokens,
        "peak_rss_mb": round(rss, 1),
        "weight_bytes_per_token": bpt,
        "memory_bandwidth_gb_s": round(bw, 1),
        "bandwidth_floor_tokens_per_s": round(bw * 1e9 / bpt, 1),
        "fraction_of_floor": float(f"{dec / (bw * 1e9 / bpt):.3g}"),   # 3 significant digits: tiny for tiny models
        "runs": repeats,
    }
