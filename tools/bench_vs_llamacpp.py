#!/usr/bin/env python3
"""minilm_edge side by side with llama.cpp on this machine, in one sitting.

Each model is measured with both engines: llama.cpp `llama-bench` on a Q4_0 GGUF and minilm_edge
`python -m minilm_edge bench MODEL_DIR --json` on an int4 folder of the same shapes. Rounds are
interleaved (A, B, C, A, B, C, ... with the order rotated every round, so a noisy neighbour or
thermal drift hits every engine alike); medians over --runs rounds are reported, as a markdown
table with each row's ratio to llama.cpp Q4_0 of the same model at the same thread count.

Models (any mix):
  --shape 135m 1b 1.5b 3b    the standard pairs in --data-dir (made by tools/setup_llamacpp.sh with
                             LLAMACPP_SHAPES=...): SmolLM2-135M (the store's float model, RTN int4 +
                             int8 head, vs the Q4_0 of setup's step 4) and the random-weight shape
                             models of Llama-3.2-1B, Qwen2.5-1.5B and Llama-3.2-3B
                             (tools/make_shape_model.py; ours RTN int4 + int8 head, llama.cpp's Q4_0
                             made by llama-quantize from the same weights' F16 GGUF)
  --pair LABEL DIR GGUF      any other pair
  --models DIR ...           minilm_edge folders (or known names) against SmolLM2-135M's Q4_0

Instruction set (--arch): `native` uses the -march=native llama.cpp build and Numba's host target
(AVX-512 VNNI here); `avx2` uses llama.cpp built with AVX2/FMA/F16C and every AVX-512 option off
(`LLAMACPP_ARCH=avx2 bash tools/setup_llamacpp.sh`) and compiles minilm_edge for the AVX2 target CI
uses (.ci/run: NUMBA_CPU_NAME=haswell, NUMBA_CPU_FEATURES without AVX-512 or AVX-VNNI), with its own
Numba cache folder. Both run on this AVX-512 machine: the AVX2 rows say what the same code does
on an AVX2 CPU of this machine's speed, not on a slower desktop part.

Busy (--busy): one competing CPU-bound process (a spinning Python interpreter, same nice value)
runs for the whole sitting and is killed at the end: the "PC doing something else" case.

Decode at the same depth: minilm_edge's bench decodes its --new-tokens after the --prompt-tokens
prefill, so llama-bench runs twice per measurement: `-p PP -n 0` (prefill at depth 0) and
`-p 0 -n TG -d PP` (decode after a PP-token context). llama-bench warms up before it measures;
minilm_edge's bench has a warm-up pass too, and before round 1 each minilm_edge model gets one
short untimed bench call so the Numba cache is filled (load time and time to first token are then
the warm ones).

Reported per row: prefill and decode tokens/s (median, min-max), the ratio to llama.cpp Q4_0; for
minilm_edge also bench's bandwidth floor (measured read bandwidth / weight bytes per token), decode
as a fraction of it, peak RSS (from bench itself, before its bandwidth probe), load time and time
to first token (load + a 37-token chat prompt's prefill); for llama.cpp the peak RSS of the
llama-bench process (its context included).

examples:
  bash tools/setup_llamacpp.sh                                  # once: llama-bench, SmolLM2's GGUFs
  LLAMACPP_ARCH=avx2 bash tools/setup_llamacpp.sh               # once: the AVX2 llama-bench
  LLAMACPP_SHAPES="135m 1b 1.5b 3b" bash tools/setup_llamacpp.sh    # once: the shape models (~33 GB)
  python tools/bench_vs_llamacpp.py --shape 135m 1b --threads 1 2
  python tools/bench_vs_llamacpp.py --shape 135m --arch avx2 --busy
  python tools/bench_vs_llamacpp.py --models smollm2-135m-instruct --with-q4-1 --json
  python tools/bench_vs_llamacpp.py --shape 1b --runs 1 --reps-per-call 1 \\
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
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_LLAMACPP_DIR = os.environ.get("LLAMACPP_DIR", "/work/llamacpp")
DEFAULT_DATA_DIR = os.environ.get("LLAMACPP_SHAPES_DIR", "/work/wt/data/llamacpp")
SETUP_HINT = "run tools/setup_llamacpp.sh (LLAMACPP_DIR=... to choose where)"
LLAMA_QUANTS = ("Q4_0", "Q4_1")
PATHS_ENV = {"native": "paths.env", "avx2": "paths-avx2.env"}
# The AVX2 target of .ci/run's second pass (keep the two in step): Haswell's instruction set,
# every AVX-512 feature and the 256-bit AVX-VNNI off.
AVX2_NUMBA_ENV = {
    "NUMBA_CPU_NAME": "haswell",
    "NUMBA_CPU_FEATURES": "+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+f16c,+fma,+fsgsbase,+lzcnt,+mmx,+movbe,"
                          "+popcnt,+sse,+sse2,+sse3,+sse4.1,+sse4.2,+ssse3,+xsave,-avx512f,-avx512vnni,-avx512bw,"
                          "-avx512dq,-avx512vl,-avx512cd,-avxvnni",
}
# --shape NAME: (label, minilm_edge folder in --data-dir, llama.cpp Q4_0 GGUF in --data-dir, or None
# for SmolLM2's Q4_0 from paths.env). Folder names are the ones tools/setup_llamacpp.sh writes.
SHAPES = {
    "135m": ("SmolLM2-135M", "smollm2-135m-rtn-h8", None),
    "1b": ("Llama-3.2-1B shape", "llama-3.2-1b-rtn-h8", "llama-3.2-1b-q4_0.gguf"),
    "1.5b": ("Qwen2.5-1.5B shape", "qwen2.5-1.5b-rtn-h8", "qwen2.5-1.5b-q4_0.gguf"),
    "3b": ("Llama-3.2-3B shape", "llama-3.2-3b-rtn-h8", "llama-3.2-3b-q4_0.gguf"),
}


class BenchError(Exception):
    """A one-line, user-facing failure."""


# ---- locating the llama.cpp build made by tools/setup_llamacpp.sh
def read_paths_env(llamacpp_dir: Path, arch: str) -> dict:
    env_file = llamacpp_dir / PATHS_ENV[arch]
    if not env_file.is_file():
        hint = SETUP_HINT if arch == "native" else f"run LLAMACPP_ARCH={arch} bash tools/setup_llamacpp.sh"
        raise BenchError(f"llama.cpp {arch} build not found: {env_file} is missing; {hint}")
    out = {}
    for line in env_file.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def find_llamacpp(llamacpp_dir: Path, arch: str) -> tuple[Path, dict[str, Path], str]:
    """(llama-bench path, {quant: SmolLM2 gguf path}, llama-cpp-python version), or BenchError."""
    paths = read_paths_env(llamacpp_dir, arch)
    bench = Path(paths.get("LLAMA_BENCH", ""))
    if not paths.get("LLAMA_BENCH") or not (bench.is_file() and os.access(bench, os.X_OK)):
        raise BenchError(f"llama-bench not found at '{paths.get('LLAMA_BENCH', '')}'; {SETUP_HINT}")
    if paths.get("LLAMACPP_ARCH", "native") != arch:
        raise BenchError(f"{llamacpp_dir / PATHS_ENV[arch]} describes a {paths.get('LLAMACPP_ARCH')} build, "
                         f"not {arch}")
    ggufs = {q: Path(paths[f"GGUF_{q}"]) for q in LLAMA_QUANTS if paths.get(f"GGUF_{q}")}
    return bench, ggufs, paths.get("LLAMA_CPP_PYTHON_VERSION", "?")


# ---- one process, its output and its peak RSS
def _run(cmd: list[str], nice: int, timeout: float, env=None) -> tuple[str, float]:
    """Run `cmd` (under nice), return (stdout, peak RSS in MB of that process, from wait4)."""
    full = (["nice", "-n", str(nice)] if nice else []) + cmd    # nice execs: same pid, same rusage
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        try:
            p = subprocess.Popen(full, stdout=fo, stderr=fe, env=env, cwd=REPO)
        except OSError as e:
            raise BenchError(f"cannot run {cmd[0]}: {e}") from None
        timed_out = threading.Event()

        def kill():
            timed_out.set()
            p.kill()
        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(p.pid, 0)
        except BaseException:
            p.kill()
            p.wait()
            raise
        finally:
            timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read().decode(errors="replace"), fe.read().decode(errors="replace")
    if timed_out.is_set():
        raise BenchError(f"timed out after {timeout:.0f}s: {shlex.join(cmd)}")
    if p.returncode != 0:
        tail = (err.strip().splitlines() or ["(no stderr)"])[-1]
        raise BenchError(f"exit {p.returncode} from {shlex.join(cmd)}: {tail}")
    return out, usage.ru_maxrss / 1024


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
    """Two llama-bench calls (each warms up, then `reps` repetitions): pp at depth 0 and tg at depth
    pp. Returns ({prefill, decode, peak_rss_mb, info}, the two commands)."""
    base = [str(bench), "-m", str(gguf), "-t", str(threads), "-r", str(reps), "-o", "json"]
    cmds = [base + ["-p", str(pp), "-n", "0", "-d", "0"], base + ["-p", "0", "-n", str(tg), "-d", str(pp)]]
    got, rss = {}, 0.0
    for cmd in cmds:
        out, r = _run(cmd, nice, timeout)
        rss = max(rss, r)
        try:
            rows = _json_in(out, "[")
        except ValueError:
            raise BenchError(f"llama-bench printed no JSON: {shlex.join(cmd)}") from None
        for row in rows:
            ts = statistics.median(row["samples_ts"]) if row.get("samples_ts") else float(row["avg_ts"])
            if row.get("n_prompt", 0) > 0 and row.get("n_gen", 0) == 0:
                got["prefill"] = ts
            elif row.get("n_gen", 0) > 0 and row.get("n_prompt", 0) == 0 and row.get("n_depth", 0) == pp:
                got["decode"] = ts
            got.setdefault("info", {k: row.get(k) for k in (
                "build_commit", "build_number", "cpu_info", "model_type", "model_size", "model_n_params",
                "n_batch", "n_ubatch", "type_k", "type_v")})
    if "prefill" not in got or "decode" not in got:
        raise BenchError(f"llama-bench JSON lacks the pp/tg rows: {shlex.join(cmds[0])}")
    got["peak_rss_mb"] = rss
    return got, " ; ".join(shlex.join(c) for c in cmds)


OUR_KEYS = ("load_s", "time_to_first_token_s", "peak_rss_mb", "weight_bytes_per_token", "memory_bandwidth_gb_s",
            "bandwidth_floor_tokens_per_s", "fraction_of_floor", "prefill_int8_activations", "int8_isa")


def minilm_env(arch: str, numba_cache: Path | None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for k in AVX2_NUMBA_ENV:
        env.pop(k, None)
    if arch == "avx2":
        env.update(AVX2_NUMBA_ENV)
        env["NUMBA_CACHE_DIR"] = str(numba_cache)
    return env


def minilm_bench_once(model: str, threads: int, pp: int, tg: int, reps: int, nice: int, timeout: float, env: dict,
                      arch: str):
    """One `python -m minilm_edge bench` call (`reps` runs after its warm-up pass, their median)."""
    cmd = [sys.executable, "-m", "minilm_edge", "bench", model, "--threads", str(threads), "--json",
           "--runs", str(reps), "--prompt-tokens", str(pp), "--new-tokens", str(tg)]
    out, _ = _run(cmd, nice, timeout, env=env)
    try:
        res = _json_in(out, "{")
        got = {"prefill": float(res["prefill_tokens_per_s"]), "decode": float(res["decode_tokens_per_s"])}
    except (ValueError, KeyError, TypeError):
        raise BenchError(f"minilm_edge bench printed no usable JSON: {shlex.join(cmd)}") from None
    if arch == "avx2" and res.get("int8_isa") not in ("avx2", None):
        raise BenchError(f"minilm_edge bench ran int8 activations on {res.get('int8_isa')} under --arch avx2: "
                         "the AVX2 target did not take effect")
    for k in OUR_KEYS:
        if res.get(k) is not None:
            got[k] = res[k]
    got["info"] = {"model": res.get("model"), "weight_bytes_per_token": res.get("weight_bytes_per_token"),
                   "prefill_int8_activations": res.get("prefill_int8_activations"), "int8_isa": res.get("int8_isa")}
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items() if k.startswith("NUMBA_CPU"))
    return got, (prefix + " " if prefix else "") + shlex.join(cmd)


# ---- the competing process of --busy
class Spinner:
    """One CPU-bound process for the whole sitting (a spinning interpreter at the same nice value)."""

    def __init__(self, nice: int):
        cmd = (["nice", "-n", str(nice)] if nice else []) + [sys.executable, "-c", "while True: pass"]
        self.p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.cpu0 = self._cpu()

    def _cpu(self) -> float:
        try:
            f = open(f"/proc/{self.p.pid}/stat").read().rsplit(")", 1)[1].split()
            return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return 0.0

    def check(self):
        if self.p.poll() is not None:
            raise BenchError(f"the --busy competitor exited (status {self.p.returncode})")

    def stop(self) -> float:
        """Kill it; return the CPU seconds it got."""
        cpu = self._cpu() - self.cpu0
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()
        return round(cpu, 1)


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


def model_groups(args, ggufs: dict[str, Path]) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """[(model label, [(engine label, kind, target), ...]), ...] in the order given."""
    groups = []
    data = Path(args.data_dir)
    for name in dict.fromkeys(args.shape):
        label, ours, gguf = SHAPES[name]
        g = ggufs.get("Q4_0") if gguf is None else data / gguf
        if g is None or not Path(g).is_file():
            raise BenchError(f"--shape {name}: llama.cpp GGUF {g} not found; make it with "
                             f"LLAMACPP_SHAPES={name} bash tools/setup_llamacpp.sh")
        if not (data / ours / "config.json").is_file():
            raise BenchError(f"--shape {name}: model folder {data / ours} not found; make it with "
                             f"LLAMACPP_SHAPES={name} bash tools/setup_llamacpp.sh")
        engines = [("llama.cpp Q4_0", "llama", str(g))]
        if gguf is None and args.with_q4_1 and "Q4_1" in ggufs:
            engines.append(("llama.cpp Q4_1", "llama", str(ggufs["Q4_1"])))
        groups.append((label, engines + [("minilm_edge int4 + int8 head", "minilm", str(data / ours))]))
    for label, ours, gguf in args.pair:
        if not Path(gguf).is_file():
            raise BenchError(f"--pair {label}: GGUF {gguf} not found")
        groups.append((label, [("llama.cpp Q4_0", "llama", gguf), ("minilm_edge", "minilm", ours)]))
    if args.models:
        if "Q4_0" not in ggufs or not ggufs["Q4_0"].is_file():
            raise BenchError(f"SmolLM2's Q4_0 GGUF not found ('{ggufs.get('Q4_0', '')}'); {SETUP_HINT}")
        engines = [("llama.cpp Q4_0", "llama", str(ggufs["Q4_0"]))]
        if args.with_q4_1 and "Q4_1" in ggufs:
            engines.append(("llama.cpp Q4_1", "llama", str(ggufs["Q4_1"])))
        groups.append(("SmolLM2-135M", engines + [(f"minilm_edge {m}", "minilm", m) for m in args.models]))
    labels = [g[0] for g in groups]
    if len(set(labels)) != len(labels):
        raise BenchError("the same model was given twice (--shape / --pair / --models)")
    if not groups:
        raise BenchError("nothing to measure: give --shape, --pair or --models")
    return groups


def run_sitting(args) -> dict:
    args.threads = list(dict.fromkeys(args.threads))
    bench, ggufs, lcpp_ver = find_llamacpp(Path(args.llamacpp_dir), args.arch)
    groups = model_groups(args, ggufs)
    numba_cache = Path(args.numba_cache_dir or Path(args.llamacpp_dir) / f"numba-cache-{args.arch}")
    env = minilm_env(args.arch, numba_cache)
    engines = [(g, lab, kind, tgt) for g, es in groups for lab, kind, tgt in es]
    slots = [(e, t) for t in args.threads for e in engines]
    samples = {(e[0], e[1], t): {} for e in engines for t in args.threads}
    info, commands = {}, {}
    machine = machine_info()
    started = time.time()
    spinner = None
    try:
        if not args.no_warm_cache:
            for g, lab, kind, tgt in engines:
                if kind == "minilm":
                    say(args, f"warm-up (untimed, fills the Numba cache): {g}, {lab}")
                    minilm_bench_once(tgt, args.threads[0], 16, 4, 1, args.nice, args.timeout, env, args.arch)
        if args.busy:
            spinner = Spinner(args.nice)
            say(args, f"--busy: competing process {spinner.p.pid} spinning")
        for r in range(args.runs):
            k = r % len(slots)
            for (g, lab, kind, tgt), t in slots[k:] + slots[:k]:      # rotate the order every round
                say(args, f"round {r + 1}/{args.runs}: {g}, {lab}, {t} thread(s)")
                if kind == "llama":
                    got, cmd = llama_bench_once(bench, Path(tgt), t, args.prompt_tokens, args.new_tokens,
                                                args.reps_per_call, args.nice, args.timeout)
                else:
                    got, cmd = minilm_bench_once(tgt, t, args.prompt_tokens, args.new_tokens, args.reps_per_call,
                                                 args.nice, args.timeout, env, args.arch)
                if spinner:
                    spinner.check()
                s = samples[(g, lab, t)]
                for key, v in got.items():
                    if key != "info" and isinstance(v, (int, float)) and not isinstance(v, bool):
                        s.setdefault(key, []).append(v)
                info.setdefault(f"{g}, {lab}", got["info"])
                commands.setdefault(f"{g}, {lab}, {t} thread(s)", cmd)
                say(args, f"    prefill {got['prefill']:.1f} tok/s, decode {got['decode']:.1f} tok/s")
    finally:
        busy_cpu = spinner.stop() if spinner else None
    wall = time.time() - started

    rows = []
    med = lambda xs: statistics.median(xs) if xs else None     # noqa: E731
    for g, es in groups:
        for t in args.threads:
            base = samples.get((g, "llama.cpp Q4_0", t), {})
            base_pf, base_dc = med(base.get("prefill", [])), med(base.get("decode", []))
            for lab, _, _ in es:
                s = samples[(g, lab, t)]
                pf, dc = med(s["prefill"]), med(s["decode"])
                row = {
                    "model": g, "engine": lab, "threads": t, "runs": len(s["prefill"]),
                    "prefill_tokens_per_s": round(pf, 1), "decode_tokens_per_s": round(dc, 1),
                    "prefill_min_max": [round(min(s["prefill"]), 1), round(max(s["prefill"]), 1)],
                    "decode_min_max": [round(min(s["decode"]), 1), round(max(s["decode"]), 1)],
                    "prefill_vs_llamacpp_q4_0": round(pf / base_pf, 3) if base_pf else None,
                    "decode_vs_llamacpp_q4_0": round(dc / base_dc, 3) if base_dc else None,
                    "peak_rss_mb": round(max(s["peak_rss_mb"]), 1) if s.get("peak_rss_mb") else None,
                    "samples": s,
                }
                for key in ("bandwidth_floor_tokens_per_s", "fraction_of_floor", "memory_bandwidth_gb_s", "load_s",
                            "time_to_first_token_s"):
                    if s.get(key):
                        row[key] = round(med(s[key]), 3)
                rows.append(row)
    machine["loadavg_end"] = list(os.getloadavg())
    return {
        "arch": args.arch, "busy": args.busy, "busy_competitor_cpu_s": busy_cpu,
        "numba_env": {k: env[k] for k in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES", "NUMBA_CACHE_DIR") if k in env},
        "machine": machine,
        "llama_cpp_python_sdist": lcpp_ver, "llama_bench": str(bench),
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "runs": args.runs,
        "reps_per_call": args.reps_per_call,
        "nice": args.nice, "wall_s": round(wall, 1),
        "commands": commands, "engine_info": info, "rows": rows,
    }


def markdown(res: dict) -> str:
    pp, tg = res["prompt_tokens"], res["new_tokens"]
    ratio = lambda x: "—" if x is None else f"{x:.2f}×"                           # noqa: E731
    num = lambda x, f: "—" if x is None else format(x, f)                          # noqa: E731
    lines = [
        f"**{'AVX2 build / AVX2 target' if res['arch'] == 'avx2' else 'native (AVX-512 VNNI)'}, "
        f"{'BUSY: one competing CPU-bound process' if res['busy'] else 'no competing process started'}**",
        "",
        f"| model | engine | threads | prefill tok/s (pp{pp}) | decode tok/s (tg{tg} @{pp}) "
        f"| prefill vs Q4_0 | decode vs Q4_0 | floor tok/s | decode / floor | peak RSS MB | load s | first token s |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in res["rows"]:
        pr, dr = r["prefill_min_max"], r["decode_min_max"]
        rng = lambda a, n=r["runs"]: "" if n < 2 else f" ({a[0]:.1f}–{a[1]:.1f})"   # noqa: E731
        lines.append(
            f"| {r['model']} | {r['engine']} | {r['threads']} | {r['prefill_tokens_per_s']:.1f}{rng(pr)} "
            f"| {r['decode_tokens_per_s']:.1f}{rng(dr)} | {ratio(r['prefill_vs_llamacpp_q4_0'])} "
            f"| {ratio(r['decode_vs_llamacpp_q4_0'])} | {num(r.get('bandwidth_floor_tokens_per_s'), '.1f')} "
            f"| {num(r.get('fraction_of_floor'), '.2f')} | {num(r.get('peak_rss_mb'), ',.0f')} "
            f"| {num(r.get('load_s'), '.2f')} | {num(r.get('time_to_first_token_s'), '.2f')} |")
    m = res["machine"]
    lines += ["", f"Medians of {res['runs']} interleaved rounds (each: median of {res['reps_per_call']} "
              f"repetitions in one process), ranges min–max; {m['cpu']}, {m['cores']} cores; load average "
              f"{m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end; {res['wall_s'] / 60:.1f} min"
              + (f"; run under nice {res['nice']}" if res["nice"] else "") + "."
              + (f" The competing process got {res['busy_competitor_cpu_s']:.0f} CPU-s in that time."
                 if res["busy"] else ""),
              f"Both decode after a {pp}-token context (llama-bench -d {pp}). Floor: bench's measured read "
              f"bandwidth ÷ the weight bytes a decode step reads (minilm_edge's file); peak RSS: bench's own "
              f"(before its bandwidth probe) for minilm_edge, the llama-bench process for llama.cpp."]
    lc = next((v for k, v in res["engine_info"].items() if k.endswith("llama.cpp Q4_0")), None)
    if lc:
        lines.append(f"llama.cpp: llama-bench build {lc.get('build_number')} (commit {lc.get('build_commit')}), "
                     f"vendored in llama-cpp-python {res['llama_cpp_python_sdist']}; CPU backend, "
                     + ("-march=native." if res["arch"] == "native" else
                        "GGML_NATIVE=OFF, AVX2+FMA+F16C+BMI2, AVX-512/AVX-VNNI/AMX off.")
                     + (f" minilm_edge compiled for NUMBA_CPU_NAME={res['numba_env'].get('NUMBA_CPU_NAME')} "
                        "(the AVX2 target of .ci/run)." if res["arch"] == "avx2" else ""))
    if res["runs"] < 5:
        lines.append(f"**Smoke run only: {res['runs']} round(s) per cell, fewer than the 5 a result needs.**")
    return "\n".join(lines)


def say(args, msg):
    if not args.quiet:
        print(msg, file=sys.stderr, flush=True)


def build_parser():
    p = argparse.ArgumentParser(prog="bench_vs_llamacpp.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", nargs="+", default=[], choices=sorted(SHAPES), metavar="NAME",
                   help=f"standard model pairs in --data-dir: {', '.join(SHAPES)}")
    p.add_argument("--pair", nargs=3, action="append", default=[], metavar=("LABEL", "DIR", "GGUF"),
                   help="a minilm_edge folder and a llama.cpp Q4_0 GGUF of the same model (repeatable)")
    p.add_argument("--models", nargs="+", default=[], metavar="DIR",
                   help="minilm_edge model folders or known names, against SmolLM2-135M's Q4_0")
    p.add_argument("--with-q4-1", action="store_true", help="also llama.cpp Q4_1 (SmolLM2 only)")
    p.add_argument("--arch", choices=sorted(PATHS_ENV), default="native",
                   help="instruction set of both engines (default native; avx2: see above)")
    p.add_argument("--busy", action="store_true", help="one competing CPU-bound process during the whole sitting")
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2], metavar="N", help="thread counts (default 1 2)")
    p.add_argument("--runs", type=int, default=5, metavar="N", help="interleaved rounds, medians reported (default 5)")
    p.add_argument("--reps-per-call", type=int, default=3, metavar="N",
                   help="repetitions inside one llama-bench / minilm_edge bench process, their median is one "
                        "round's value (default 3)")
    p.add_argument("--json", action="store_true", help="print JSON (all samples) instead of the markdown table")
    p.add_argument("--save", metavar="FILE", help="also write the JSON (all samples) to FILE")
    p.add_argument("--llamacpp-dir", default=DEFAULT_LLAMACPP_DIR, metavar="DIR",
                   help="where tools/setup_llamacpp.sh put paths.env (default $LLAMACPP_DIR or /work/llamacpp)")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, metavar="DIR",
                   help="where the --shape models are (default $LLAMACPP_SHAPES_DIR or /work/wt/data/llamacpp)")
    p.add_argument("--numba-cache-dir", metavar="DIR",
                   help="NUMBA_CACHE_DIR for --arch avx2 (default LLAMACPP_DIR/numba-cache-avx2)")
    p.add_argument("--no-warm-cache", action="store_true", help="skip the untimed warm-up call per minilm_edge model")
    p.add_argument("--prompt-tokens", type=int, default=512, metavar="N", help="prefill length (default 512)")
    p.add_argument("--new-tokens", type=int, default=128, metavar="N", help="decode length (default 128)")
    p.add_argument("--nice", type=int, default=0, metavar="N",
                   help="run every process (the --busy competitor too) under nice -n N (default 0)")
    p.add_argument("--timeout", type=float, default=3600, metavar="S", help="per-process timeout (default 3600)")
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
    if args.save:
        try:
            Path(args.save).write_text(json.dumps(res, indent=2) + "\n")
        except OSError as e:
            print(f"bench_vs_llamacpp: error: cannot write {args.save}: {e}", file=sys.stderr)
            print(json.dumps(res, indent=2))
            return 1
    print(json.dumps(res, indent=2) if args.json else markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
