"""Aggregate decode speed of batched decoding (runtime/batch.py) against single-stream decode.

    python tools/bench_batch.py [MODEL] [--batch 1 --batch 2 --batch 4 --batch 8] [--tokens 64] [--rounds 5]
    python tools/bench_batch.py /path/to/folder --batch 4 --batch 8 --path both     # one-call step vs per-linear

For each round, in turn (interleaved, so a busy machine disturbs every setting alike): today's
single-stream generation (generation.Generation: the fused step, sampler, detokenizer) of `--tokens`
tokens, then for each B a BatchDecoder with B sequences (different prompts, so different positions)
stepping `--tokens` steps. Both timings include the prompts' prefill (6-12 tokens each).
Reports the median decode tokens/s (aggregate over the B sequences)
and its ratio to single-stream, as a markdown table; the per-round numbers go to stderr.
`--path per-linear` steps B >= 2 rows through the general per-linear batched path (what a folder
without a one-call step gets; Model.decode_batch) instead of the one-call step, `both` runs the two
interleaved in each round (an A/B); B = 1 is the single-stream step either way.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without install

PROMPTS = [
    "The capital of France is", "Write a short poem about the sea.", "def fibonacci(n):",
    "Once upon a time, in a small village,", "Explain how photosynthesis works in simple terms.",
    "The history of the Roman Empire", "List three uses of a paperclip:", "Q: What is a prime number?\nA:",
]


def single_stream(model, ids, n):
    """(seconds, tokens) of today's single-stream generation (generation.Generation: prefill, then
    greedy decode through the fused step, sampler and detokenizer) of up to n tokens."""
    from minilm_edge.runtime.generation import Generation, SamplingSettings
    g = Generation(model, model.new_cache(len(ids) + n + 1), ids, SamplingSettings(max_new_tokens=n))
    t = time.perf_counter()
    for _ in g:
        pass
    return time.perf_counter() - t, len(g.token_ids) + (g.finish_reason == "eos")


def batched(model, prompts, n, per_linear=False):
    """(seconds, tokens) of a BatchDecoder holding one sequence per prompt (greedy): prefill, then n steps.
    per_linear: B >= 2 rows through the per-linear batched path, not the one-call step (an A/B: the
    model's fused-decode switch is off during the run; one row steps through forward, which B >= 2 never does)."""
    from minilm_edge.runtime.batch import BatchDecoder
    from minilm_edge.runtime.generation import SamplingSettings
    dec = BatchDecoder(model, max_batch=len(prompts), max_len=max(map(len, prompts)) + n + 2)
    s = SamplingSettings(max_new_tokens=n + 1)      # no sequence ends early (EOS still could: counted)
    made = 0
    off = per_linear and len(prompts) > 1 and model.fused_decode
    t = time.perf_counter()
    for p in prompts:
        dec.add(p, s)
    if off:
        model.fused_decode = False
    try:
        for _ in range(n):
            made += len(dec.step())
    finally:
        if off:
            model.fused_decode = True
    return time.perf_counter() - t, made


def main(argv=None):
    import minilm_edge
    from minilm_edge.app.store import resolve_model
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="smollm2-135m-instruct-awq", help="model folder or known name")
    p.add_argument("--batch", type=int, action="append", help="batch sizes (repeatable; default 1 2 4 8)")
    p.add_argument("--tokens", type=int, default=64, help="decoded tokens per sequence and round")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (medians are reported)")
    p.add_argument("--threads", type=int, help="Numba threads (default: all)")
    p.add_argument("--row-kernel", choices=["tiled", "per-row"], default="tiled",
                   help="the one-call batched step's int8 row kernel (runtime/batch_step.BatchStep.variant): four "
                        "activation rows per pass over a weight pair (tiled, the default) or one (per-row); an A/B")
    p.add_argument("--path", choices=["one-call", "per-linear", "both"], default="one-call",
                   help="B >= 2 through the one-call batched step (default), the per-linear path (what a model "
                        "without one gets), or both interleaved per round (an A/B)")
    args = p.parse_args(argv)
    sizes = args.batch or [1, 2, 4, 8]
    paths = {"one-call": [False], "per-linear": [True], "both": [False, True]}[args.path]
    runs = [(b, pl) for b in sizes for pl in paths if not (pl and b == 1 and len(paths) > 1)]
    from minilm_edge.kernels.policy import threads
    model = minilm_edge.load(resolve_model(args.model))
    ids = [model.tokenizer.encode(t, add_special_tokens=True) for t in PROMPTS]
    ids = [ids[i % len(ids)] + [ids[i % len(ids)][-1]] * (i // len(ids)) for i in range(max(sizes))]
    single, agg = [], {run: [] for run in runs}
    name = lambda b, pl: f"B = {b}" + (", per-linear" if pl and b > 1 else "")
    with threads(args.threads):
        single_stream(model, ids[0], 4)                     # JIT and caches warm
        for b, pl in runs:
            batched(model, ids[:b], 2, pl)
        if model._batch_step is not None:
            model._batch_step.variant = {"tiled": 1, "per-row": 2}[args.row_kernel]
        for r in range(args.rounds):
            sec, made = single_stream(model, ids[0], args.tokens)
            single.append(made / sec)
            for run in runs:
                sec, made = batched(model, ids[:run[0]], args.tokens, run[1])
                agg[run].append(made / sec)
            print(f"round {r + 1}: single {single[-1]:.1f} tok/s, "
                  + ", ".join(f"{name(*run)} {agg[run][-1]:.1f}" for run in runs), file=sys.stderr)
    s = statistics.median(single)
    print(f"`{' '.join(['python', 'tools/bench_batch.py'] + (argv if argv is not None else sys.argv[1:]))}`\n")
    print("| decode | aggregate tok/s (median) | × single-stream |")
    print("|---|--:|--:|")
    print(f"| single-stream | {s:.1f} (range {min(single):.1f}–{max(single):.1f}) | 1.00× |")
    for run in runs:
        m = statistics.median(agg[run])
        print(f"| batched, {name(*run)} | {m:.1f} (range {min(agg[run]):.1f}–{max(agg[run]):.1f}) | {m / s:.2f}× |")


if __name__ == "__main__":
    main()
