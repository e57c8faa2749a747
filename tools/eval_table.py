"""The perplexity table for BENCHMARKS.md: every model × data file × ctx, scored by
`minilm_edge.perplexity` (docs/DESIGN.md §7), printed as markdown with the exact command line that made it.

    python tools/eval_table.py fp=smollm2-135m-instruct rtn-w4=/tmp/rtn-w4 \\
        --data /work/shared/data/wikitext2-test.txt --ctx 512 --max-tokens 16384 --baseline fp

Columns: perplexity, tokens scored, the difference from the baseline model (same data and ctx), and,
with --kl, the mean KL(baseline || model) per token (that scores the baseline again alongside each
model, doubling the time); bits per weight measured from the bytes stored (block linears, and the
whole weight file over all parameters) and the weight file size. Progress goes to stderr; the
table to stdout; --json-out also saves the raw rows.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path


def parse_models(pairs):
    models = {}
    for pair in pairs:
        label, sep, path = pair.partition("=")
        if not sep or not label or not path:
            raise SystemExit(f"eval_table: expected LABEL=DIR, got {pair!r}")
        if label in models:
            raise SystemExit(f"eval_table: label {label!r} given twice")
        models[label] = path
    return models


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", metavar="LABEL=DIR", help="model folder (or known name) with its label")
    p.add_argument("--data", action="append", required=True, metavar="FILE", help="text file (repeatable)")
    p.add_argument("--ctx", action="append", type=int, metavar="N", help="window length (repeatable; default 2048)")
    p.add_argument("--max-tokens", type=int, metavar="N", help="score only the first N tokens of each file")
    p.add_argument("--baseline", metavar="LABEL", help="the row the others are compared with (default: the first)")
    p.add_argument("--kl", action="store_true", help="also the mean KL(baseline || model) per token")
    p.add_argument("--json-out", metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--f32-activations", action="store_true",
                   help="int4/int8 linears multiply float32 activations (no int8 activation rounding): "
                        "the weights' own error, comparable with float32 references")
    args = p.parse_args(argv)

    import minilm_edge
    from minilm_edge.app.describe import describe
    from minilm_edge.app.store import resolve_model
    from minilm_edge.runtime.evaluate import compare, perplexity, read_text

    command = "python tools/eval_table.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    models = {label: resolve_model(path) for label, path in parse_models(args.models).items()}
    baseline = args.baseline or next(iter(models))
    if baseline not in models:
        raise SystemExit(f"eval_table: --baseline {baseline!r} is not one of the labels {list(models)}")
    ctxs = args.ctx or [2048]
    texts = {d: read_text(d) for d in args.data}
    info = {label: describe(path) for label, path in models.items()}

    load = functools.partial(minilm_edge.load, int8_activations=not args.f32_activations)
    base_model = load(models[baseline]) if args.kl else None
    rows = []
    for label, path in models.items():
        model = base_model if (label == baseline and base_model is not None) else load(path)
        for d, text in texts.items():
            for ctx in ctxs:
                print(f"{label} on {Path(d).name}, ctx {ctx}", file=sys.stderr)
                kw = dict(ctx=ctx, max_tokens=args.max_tokens, progress=True)
                res = (compare(model, base_model, text, **kw) if args.kl and label != baseline
                       else perplexity(model, text, **kw))
                rows.append({"label": label, "path": str(path), "data": d, "ctx": ctx, **res,
                             "data_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
                             "linear_bpw": info[label]["linear_bpw"], "file_bpw": info[label]["file_bpw"],
                             "weights_bytes": info[label]["weights_bytes"]})
    print(render(rows, baseline, args, command, minilm_edge.__version__))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    return 0


def render(rows, baseline, args, command, version) -> str:
    base = {(r["data"], r["ctx"]): r["ppl"] for r in rows if r["label"] == baseline}
    kl = args.kl
    out = ["| model | data | ctx | ppl | Δ ppl vs " + baseline + (" | KL (nats/token)" if kl else "")
           + " | tokens scored | bits/weight (linears) | bits/param (file) | weights | time (s) |",
           "|---|---|---:|---:|---:|" + ("---:|" if kl else "") + "---:|---:|---:|---:|---:|"]
    for r in rows:
        delta = r["ppl"] - base[(r["data"], r["ctx"])] if (r["data"], r["ctx"]) in base else float("nan")
        kl_value = f"{r['kl_mean']:.4f}" if "kl_mean" in r else "0" if r["label"] == baseline else "-"
        kl_cell = f" | {kl_value}" if kl else ""
        out.append(f"| {r['label']} | {Path(r['data']).name} | {r['ctx']} | {r['ppl']:.2f} | {delta:+.2f}{kl_cell} "
                   f"| {r['tokens_scored']:,} | {r['linear_bpw']:.3f} | {r['file_bpw']:.2f} "
                   f"| {r['weights_bytes'] / 2**20:.1f} MiB | {r['seconds']:.0f} |")
    scope = (f"the first {args.max_tokens:,} tokens" if args.max_tokens else "the whole text")
    data = "; ".join(sorted({f"{Path(r['data']).name} sha256 {r['data_sha256'][:12]}…" for r in rows}))
    out += ["", f"Protocol (docs/DESIGN.md §7): each file read as is and tokenized once ({scope}), cut into "
            "non-overlapping windows of ctx tokens, each from an empty context; every predicted token "
            "scored (ctx − 1 per window; a final shorter window scored the same way); ppl = exp(mean NLL). "
            f"Data: {data}. minilm_edge {version}, {datetime.date.today().isoformat()}."
            + (" Activations float32 (--f32-activations)." if args.f32_activations
               else " Prefill activations of int4/int8 linears rounded to int8 where the CPU has AVX2 or VNNI."),
            "", "Command:", "", "    " + command]
    return "\n".join(out)


if __name__ == "__main__":
    from minilm_edge.errors import MiniLMError
    t0 = time.perf_counter()
    try:
        code = main()
    except MiniLMError as e:
        sys.exit(f"eval_table: error: {e}")
    print(f"eval_table: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    sys.exit(code)
