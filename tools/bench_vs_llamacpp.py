#!/usr/bin/env python3
"""minilm_edge side by side with llama.cpp on this machine, in one sitting.

Engines measured (each one measurement per round, rounds interleaved A, B, C, A, B, C, ... with the
order rotated every round, so a noisy neighbour or thermal drift hits every engine alike):

  * llama.cpp `llama-bench` on SmolLM2-135M-Instruct Q4_0 and Q4_1 (pp512 and tg128, `-o json`,
    `-r N` per call; the binary and the GGUFs come from tools/setup_llamacpp.sh, outside the repo)
  * minilm_edge `python -m minilm_edge bench MODEL_DIR --threads N --json --runs N` for each --models
    entry (a model folder or a known name such as smollm2-135m-instruct)

for every --threads value. One run = one process doing --reps-per-call repetitions (llama-bench
warms up first; minilm_edge's bench has no warm-up, so its first repetition is cold and the median of
3 drops it). Reported: medians over --runs rounds (at least 5 for a real result), as a markdown table
with the ratio of each row to llama.cpp Q4_0 at the same thread count.

Decode at the same depth: minilm_edge's bench decodes its 128 tokens after the 512-token prefill
(a 512..640-token KV cache), so llama-bench runs with `-d 0,512`: its prefill is pp512 at depth 0
and its decode tg128 at depth 512, the same work. (Its tg128 from an empty context is kept in the
JSON as `decode_depth0`: plain `llama-bench -n 128` reports that one, and it is faster.)

examples:
  bash tools/setup_llamacpp.sh                     # once: builds llama-bench, makes the GGUFs
  python tools/bench_vs_llamacpp.py --models smollm2-135m-instruct
  python tools/bench_vs_llamacpp.py --models ./smollm2-fp16 ./smollm2-int4 --threads 1 2 --runs 7 --json
  python tools/bench_vs_llamacpp.py --models smollm2-135m-instruct --runs 1 --reps-per-call 1 \
      --prompt-tokens 64 --new-tokens 16 --nice 19                        # smoke only
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_LLAMACPP_DIR = os.environ.get("LLAMACPP_DIR", "/work/llamacpp")
SETUP_HINT = "run tools/setup_llamacpp.sh (LLAMACPP_DIR=... to choose where)"
LLAMA_QUANTS = ("Q4_0", "Q4_1")


class BenchError(Exception):
    """A one-line, user-facing failure."""


# ---- locating the llama.cpp build made by tools/setup_llamacpp.sh
def read_paths_env(llamacpp_dir: Path) -> dict:
    env_file = llamacpp_dir / "paths.env"
    if not env_file.is_file():
        raise BenchError(f"llama.cpp build not found: {env_file} is missing; {SETUP_HINT}")
    out = {}
    for line in env_file.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def find_llamacpp(llamacpp_dir: Path) -> tuple[Path, dict[str, Path], str]:
    """(llama-bench path, {quant: gguf path}, llama-cpp-python version), or BenchError."""
    paths = read_paths_env(llamacpp_dir)
    bench = Path(paths.get("LLAMA_BENCH", ""))
    if not paths.get("LLAMA_BENCH") or not (bench.is_file() and os.access(bench, os.X_OK)):
        raise BenchError(f"llama-bench not found at '{paths.get('LLAMA_BENCH', '')}'; {SETUP_HINT}")
    ggufs = {}
    for q in LLAMA_QUANTS:
        p = Path(paths.get(f"GGUF_{q}", ""))
        if not paths.get(f"GGUF_{q}") or not p.is_file():
            raise BenchError(f"{q} GGUF not found at '{paths.get(f'GGUF_{q}', '')}'; {SETUP_HINT}")
        ggufs[q] = p
    return bench, ggufs, paths.get("LLAMA_CPP_PYTHON_VERSION", "?")


# ---- one measurement of each engine
def _run(cmd: list[str], nice: int, timeout: float, env=None) -> str:
    full = (["nice", "-n", str(nice)] if nice else []) + cmd
    try:
        p = subprocess.run(full, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        raise BenchError(f"timed out after {timeout:.0f}s: {shlex.join(cmd)}") from None
    except OSError as e:
        raise BenchError(f"cannot run {cmd[0]}: {e}") from None
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        raise BenchError(f"exit {p.returncode} from {shlex.join(cmd)}: {tail}")
    return p.stdout


def _json_in(text: str, opener: str):
    """The JSON value starting at the first line that begins with `opener` (skips stray log lines)."""
    pos = 0
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith(opener):
            return json.JSONDecoder().raw_decode(text[pos:].lstrip())[0]
        pos += len(line)
    raise ValueError("no JSON found")


def llama_bench_once(bench: Path, gguf: Path, threads: int, pp: int, tg: int, reps: int, nice: int,
                     timeout: float):
    """One llama-bench call (its own warm-up, then `reps` repetitions): median tokens/s of pp and tg."""
    cmd = [str(bench), "-m", str(gguf), "-t", str(threads), "-p", str(pp), "-n", str(tg), "-d", f"0,{pp}",
           "-r", str(reps), "-o", "json"]
    out = _run(cmd, nice, timeout)
    try:
        rows = _json_in(out, "[")
    except ValueError:
        raise BenchError(f"llama-bench printed no JSON: {shlex.join(cmd)}") from None
    got = {}
    for r in rows:
        ts = statistics.median(r["samples_ts"]) if r.get("samples_ts") else float(r["avg_ts"])
        depth = r.get("n_depth", 0)
        if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0 and depth == 0:
            got["prefill"] = ts
        elif r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0:
            got["decode" if depth == pp else "decode_depth0"] = ts
        got.setdefault("info", {k: r.get(k) for k in ("build_commit", "build_number", "cpu_info", "model_type",
                                                       "model_size", "model_n_params", "n_batch", "n_ubatch")})
    if "prefill" not in got or "decode" not in got:
        raise BenchError(f"llama-bench JSON lacks the pp/tg rows: {shlex.join(cmd)}")
    return got, cmd


def minilm_bench_once(model: str, threads: int, pp: int, tg: int, reps: int, nice: int, timeout: float):
    """One `python -m minilm_edge bench` call (`reps` runs, its median; the first run is cold)."""
    cmd = [sys.executable, "-m", "minilm_edge", "bench", model, "--threads", str(threads), "--json",
           "--runs", str(reps), "--prompt-tokens", str(pp), "--new-tokens", str(tg)]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    out = _run(cmd, nice, timeout, env=env)
    try:
        res = _json_in(out, "{")
        got = {"prefill": float(res["prefill_tokens_per_s"]), "decode": float(res["decode_tokens_per_s"])}
    except (ValueError, KeyError, TypeError):
        raise BenchError(f"minilm_edge bench printed no usable JSON: {shlex.join(cmd)}") from None
    got["info"] = {k: res.get(k) for k in ("model", "load_s", "peak_rss_mb", "weight_bytes_per_token",
                                           "memory_bandwidth_gb_s", "bandwidth_floor_tokens_per_s")}
    return got, cmd


# ---- the sitting
def machine_info() -> dict:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "loadavg_start": list(os.getloadavg())}


def run_sitting(args) -> dict:
    engines = []       # (label, kind, target)
    bench, lcpp_ver = None, None
    args.threads = list(dict.fromkeys(args.threads))
    if not args.no_llamacpp:
        bench, ggufs, lcpp_ver = find_llamacpp(Path(args.llamacpp_dir))
        for q in LLAMA_QUANTS:
            engines.append((f"llama.cpp {q}", "llama", ggufs[q]))
    for m in args.models:
        engines.append((f"minilm_edge {m}", "minilm", m))
    if not engines:
        raise BenchError("nothing to measure: give --models and/or drop --no-llamacpp")
    labels = [e[0] for e in engines]
    if len(set(labels)) != len(labels):
        raise BenchError("the same model was given twice in --models")

    samples = {(e[0], t): {"prefill": [], "decode": []} for e in engines for t in args.threads}
    info, commands = {}, {}
    slots = [(e, t) for t in args.threads for e in engines]
    machine = machine_info()
    started = time.time()
    for r in range(args.runs):
        k = r % len(slots)
        for (label, kind, target), t in slots[k:] + slots[:k]:      # rotate the order every round
            say(args, f"round {r + 1}/{args.runs}: {label}, {t} thread(s)")
            if kind == "llama":
                got, cmd = llama_bench_once(bench, target, t, args.prompt_tokens, args.new_tokens,
                                            args.reps_per_call, args.nice, args.timeout)
            else:
                got, cmd = minilm_bench_once(target, t, args.prompt_tokens, args.new_tokens, args.reps_per_call,
                                             args.nice, args.timeout)
            samples[(label, t)]["prefill"].append(got["prefill"])
            samples[(label, t)]["decode"].append(got["decode"])
            if "decode_depth0" in got:
                samples[(label, t)].setdefault("decode_depth0", []).append(got["decode_depth0"])
            info.setdefault(label, got["info"])
            commands.setdefault(f"{label}, {t} thread(s)", shlex.join(cmd))
            say(args, f"    prefill {got['prefill']:.1f} tok/s, decode {got['decode']:.1f} tok/s")

    rows = []
    for t in args.threads:
        base = samples.get(("llama.cpp Q4_0", t))
        base_pf = statistics.median(base["prefill"]) if base else None
        base_dc = statistics.median(base["decode"]) if base else None
        for label, _, _ in engines:
            s = samples[(label, t)]
            pf, dc = statistics.median(s["prefill"]), statistics.median(s["decode"])
            rows.append({
                "engine": label, "threads": t, "runs": len(s["prefill"]),
                "prefill_tokens_per_s": round(pf, 1), "decode_tokens_per_s": round(dc, 1),
                "prefill_min_max": [round(min(s["prefill"]), 1), round(max(s["prefill"]), 1)],
                "decode_min_max": [round(min(s["decode"]), 1), round(max(s["decode"]), 1)],
                "prefill_vs_llamacpp_q4_0": round(pf / base_pf, 3) if base_pf else None,
                "decode_vs_llamacpp_q4_0": round(dc / base_dc, 3) if base_dc else None,
                "samples": s,
            })
            if "decode_depth0" in s:
                rows[-1]["decode_depth0_tokens_per_s"] = round(statistics.median(s["decode_depth0"]), 1)
    machine["loadavg_end"] = list(os.getloadavg())
    return {
        "machine": machine,
        "llama_cpp_python_sdist": lcpp_ver,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "runs": args.runs,
        "reps_per_call": args.reps_per_call,
        "nice": args.nice, "wall_s": round(time.time() - started, 1),
        "commands": commands, "engine_info": info, "rows": rows,
    }


def markdown(res: dict) -> str:
    pp, tg = res["prompt_tokens"], res["new_tokens"]
    ratio = lambda x: "—" if x is None else f"{x:.2f}×"
    lines = [
        f"| engine / model | threads | prefill tok/s (pp{pp}) | decode tok/s (tg{tg}) "
        f"| prefill vs llama.cpp Q4_0 | decode vs llama.cpp Q4_0 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(f"| {r['engine']} | {r['threads']} | {r['prefill_tokens_per_s']:.1f} "
                     f"| {r['decode_tokens_per_s']:.1f} | {ratio(r['prefill_vs_llamacpp_q4_0'])} "
                     f"| {ratio(r['decode_vs_llamacpp_q4_0'])} |")
    m = res["machine"]
    lines += ["", f"Medians of {res['runs']} interleaved runs each (each run: median of "
              f"{res['reps_per_call']} repetitions in one process); {m['cpu']}, {m['cores']} cores; "
              f"load average {m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end"
              + (f"; run under nice {res['nice']}" if res["nice"] else "") + ".",
              f"Decode at the same depth: both decode after a {pp}-token context (llama-bench -d {pp})."]
    lc = res["engine_info"].get("llama.cpp Q4_0")
    if lc:
        lines.append(f"llama.cpp: llama-bench build {lc.get('build_number')} (commit {lc.get('build_commit')}), "
                     f"vendored in llama-cpp-python {res['llama_cpp_python_sdist']}; CPU backend, -march=native.")
    if res["runs"] < 5:
        lines.append(f"**Smoke run only: {res['runs']} run(s) per cell, fewer than the 5 a result needs.**")
    return "\n".join(lines)


def say(args, msg):
    if not args.quiet:
        print(msg, file=sys.stderr, flush=True)


def build_parser():
    p = argparse.ArgumentParser(prog="bench_vs_llamacpp.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=[], metavar="DIR",
                   help="minilm_edge model folders or known names (several allowed)")
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2], metavar="N", help="thread counts (default 1 2)")
    p.add_argument("--runs", type=int, default=5, metavar="N", help="interleaved rounds, medians reported (default 5)")
    p.add_argument("--reps-per-call", type=int, default=3, metavar="N",
                   help="repetitions inside one llama-bench / minilm_edge bench process, their median is one "
                        "run; >= 3 lets the median drop minilm_edge's cold first run (default 3)")
    p.add_argument("--json", action="store_true", help="print JSON (all samples) instead of the markdown table")
    p.add_argument("--llamacpp-dir", default=DEFAULT_LLAMACPP_DIR, metavar="DIR",
                   help="where tools/setup_llamacpp.sh put paths.env (default $LLAMACPP_DIR or /work/llamacpp)")
    p.add_argument("--no-llamacpp", action="store_true", help="measure only minilm_edge (no ratios)")
    p.add_argument("--prompt-tokens", type=int, default=512, metavar="N", help="prefill length (default 512)")
    p.add_argument("--new-tokens", type=int, default=128, metavar="N", help="decode length (default 128)")
    p.add_argument("--nice", type=int, default=0, metavar="N",
                   help="run every measurement under nice -n N (for smoke runs on a shared machine; default 0)")
    p.add_argument("--timeout", type=float, default=1800, metavar="S", help="per-measurement timeout (default 1800)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        counts = (args.runs, args.reps_per_call, args.prompt_tokens, args.new_tokens, *args.threads)
        if min(counts) < 1:
            raise BenchError("--runs, --reps-per-call, --threads, --prompt-tokens and --new-tokens must be at least 1")
        if args.runs < 5:
            say(args, f"warning: --runs {args.runs} < 5: a smoke run, not a result")
        res = run_sitting(args)
    except BenchError as e:
        print(f"bench_vs_llamacpp: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench_vs_llamacpp: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(res, indent=2) if args.json else markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
