"""Aggregate decode speed of batched decoding (runtime/batch.py) against single-stream decode.

    python tools/bench_batch.py [MODEL] [--batch 1 --batch 2 --batch 4 --batch 8] [--tokens 64] [--rounds 5]

For each round, in turn (interleaved, so a busy machine disturbs every setting alike): today's
single-stream generation (generation.Generation: the fused step, sampler, detokenizer) of `--tokens`
tokens, then for each B a BatchDecoder with B sequences (different prompts, so different positions)
stepping `--tokens` steps. Both timings include the prompts' prefill (6-12 tokens each).
Reports the median decode tokens/s (aggregate over the B sequences)
and its ratio to single-stream, as a markdown table; the per-round numbers go to stderr.
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


def batched(model, prompts, n):
    """(seconds, tokens) of a BatchDecoder holding one sequence per prompt (greedy): prefill, then n steps."""
    from minilm_edge.runtime.batch import BatchDecoder
    from minilm_edge.runtime.generation import SamplingSettings
    dec = BatchDecoder(model, max_batch=len(prompts), max_len=max(map(len, prompts)) + n + 2)
    s = SamplingSettings(max_new_tokens=n + 1)      # no sequence ends early (EOS still could: counted)
    made = 0
    t = time.perf_counter()
    for p in prompts:
        dec.add(p, s)
    for _ in range(n):
        made += len(dec.step())
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
    args = p.parse_args(argv)
    sizes = args.batch or [1, 2, 4, 8]
    from minilm_edge.kernels.policy import threads
    model = minilm_edge.load(resolve_model(args.model))
    ids = [model.tokenizer.encode(t, add_special_tokens=True) for t in PROMPTS]
    ids = [ids[i % len(ids)] + [ids[i % len(ids)][-1]] * (i // len(ids)) for i in range(max(sizes))]
    single, agg = [], {b: [] for b in sizes}
    with threads(args.threads):
        single_stream(model, ids[0], 4)                     # JIT and caches warm
        for b in sizes:
            batched(model, ids[:b], 2)
        if model._batch_step is not None:
            model._batch_step.variant = {"tiled": 1, "per-row": 2}[args.row_kernel]
        for r in range(args.rounds):
            sec, made = single_stream(model, ids[0], args.tokens)
            single.append(made / sec)
            for b in sizes:
                sec, made = batched(model, ids[:b], args.tokens)
                agg[b].append(made / sec)
            print(f"round {r + 1}: single {single[-1]:.1f} tok/s, "
                  + ", ".join(f"B={b} {agg[b][-1]:.1f}" for b in sizes), file=sys.stderr)
    s = statistics.median(single)
    print(f"`{' '.join(['python', 'tools/bench_batch.py'] + (argv if argv is not None else sys.argv[1:]))}`\n")
    print("| decode | aggregate tok/s (median) | × single-stream |")
    print("|---|--:|--:|")
    print(f"| single-stream | {s:.1f} (range {min(single):.1f}–{max(single):.1f}) | 1.00× |")
    for b in sizes:
        m = statistics.median(agg[b])
        print(f"| batched, B = {b} | {m:.1f} (range {min(agg[b]):.1f}–{max(agg[b]):.1f}) | {m / s:.2f}× |")


if __name__ == "__main__":
    main()
