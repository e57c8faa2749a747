"""`check`: re-evaluate a deployed model against its reference, keep a history, fail on regression.

One run compares MODEL with a reference on operational text (a file, or the conversation log) and
on a golden set of prompts with expected answers, and decides pass or fail from thresholds:

    ppl_ratio   perplexity of MODEL / perplexity of the reference, same tokens     ≤ ppl_ratio_max
    kl_mean     mean over scored tokens of KL(p_ref || p_model), nats               ≤ kl_mean_max
    kl_p99      99th percentile of the same per-token KL                            ≤ kl_p99_max
    same_top    fraction of tokens where both models' most likely token agrees      ≥ same_top_min
    golden_pass fraction of golden prompts whose greedy answer matches              ≥ golden_pass_min

(the metrics llama.cpp's `perplexity --kl-divergence` reports; the math is in runtime/evaluate.py,
docs/DESIGN.md §7). The reference is a model (folder or store name; exact KL over the vocabulary) or
a saved baseline file (`--save-baseline`: the reference's top-K log-probabilities per token, so the
checked machine need not hold the full-precision model; KL over the top K plus the rest lumped).

Every run appends a row to `<home>/check.sqlite` and rewrites `<home>/check-report.html` (the
metrics over time, and each checked version's own quantization report). Exit codes: 0 pass,
3 regression, 1 another error (the check could not run), 2 usage.
"""
from __future__ import annotations

import argparse
import hashlib
import html
import json
import math
import os
import re
import sqlite3
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from ..errors import ModelNotFoundError, UsageError
from ..formats.home import default_home

DATA = Path(__file__).parent / "data"
DEFAULT_THRESHOLDS = DATA / "check_thresholds.json"
GOLDEN_SETS = {"smollm2-135m-instruct": DATA / "golden_smollm2-135m-instruct.jsonl"}
HISTORY_DB = "check.sqlite"
REPORT_HTML = "check-report.html"
BASELINE_FORMAT = "minilm-check-baseline/1"
GOLDEN_MAX_NEW_TOKENS = 32     # greedy answer length for a golden prompt (a case may set max_new_tokens)
DEFAULT_CTX = 512
DEFAULT_MAX_TOKENS = 4096
REGRESSION_EXIT = 3            # exit code of a check that ran and found a regression (1: could not run)
LOG_LIMIT = 500                # most recent logged turns sampled by --from-log

# metric -> (threshold key, direction, label, how it is printed)
METRICS = {
    "ppl_ratio": ("ppl_ratio_max", "max", "ppl ratio", "{:.4f}"),
    "kl_mean": ("kl_mean_max", "max", "mean KL", "{:.4f}"),
    "kl_p99": ("kl_p99_max", "max", "p99 KL", "{:.4f}"),
    "same_top": ("same_top_min", "min", "same top", "{:.2%}"),
    "golden_pass": ("golden_pass_min", "min", "golden", "{:.2%}"),
}


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest() if Path(path).is_file() else ""


# ---- thresholds


def load_thresholds(path=None) -> dict:
    """The shipped thresholds, overridden key by key by the JSON file `path` (if given)."""
    th = json.loads(DEFAULT_THRESHOLDS.read_text(encoding="utf-8"))
    th.pop("_comment", None)
    if path is None:
        return th
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"thresholds file not found: {path}")
    try:
        given = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"thresholds file {path} is not valid JSON ({e})") from None
    if not isinstance(given, dict):
        raise UsageError(f"thresholds file {path} must hold a JSON object such as {{\"kl_mean_max\": 0.1}}")
    given.pop("_comment", None)
    for key, value in given.items():
        if key not in th:
            raise UsageError(f"thresholds file {path}: unknown key {key!r} (known: {', '.join(th)})")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise UsageError(f"thresholds file {path}: {key} must be a number or null (not checked), got {value!r}")
    return {**th, **given}


def verdict(metrics: dict, thresholds: dict) -> list[str]:
    """The failed thresholds, one sentence each ([] = pass). A metric not measured is not judged."""
    failed = []
    for name, (key, direction, label, fmt) in METRICS.items():
        limit, value = thresholds.get(key), metrics.get(name)
        if limit is None or value is None:
            continue
        bad = value > limit if direction == "max" else value < limit
        if bad:
            sign = "≤" if direction == "max" else "≥"
            failed.append(f"{label} {fmt.format(value)} (must be {sign} {fmt.format(limit)})")
    return failed


# ---- golden set


def golden_path(arg) -> Path:
    """A golden JSONL file, or the name of a shipped set (GOLDEN_SETS)."""
    if arg in GOLDEN_SETS and not Path(arg).exists():
        return GOLDEN_SETS[arg]
    path = Path(arg)
    if not path.is_file():
        raise UsageError(f"golden set not found: {arg} (a JSONL file, or one of: {', '.join(GOLDEN_SETS)})")
    return path


def load_golden(path) -> list[dict]:
    """One case per line: {"prompt": str, "contains": str} or {"prompt": str, "regex": str}, optionally
    "max_new_tokens": int. Blank lines are skipped; any other bad line is a usage error naming it."""
    path = golden_path(path)
    cases = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"golden set {path} line {n}"
        try:
            case = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where} is not JSON ({e.msg})") from None
        if not isinstance(case, dict) or not isinstance(case.get("prompt"), str) or not case["prompt"].strip():
            raise UsageError(f"{where}: needs a non-empty \"prompt\"")
        kinds = [k for k in ("contains", "regex") if k in case]
        if len(kinds) != 1 or not isinstance(case[kinds[0]], str) or not case[kinds[0]]:
            raise UsageError(f"{where}: needs exactly one of \"contains\" or \"regex\" (a non-empty string)")
        if "regex" in case:
            try:
                re.compile(case["regex"])
            except re.error as e:
                raise UsageError(f"{where}: bad regex ({e})") from None
        mnt = case.get("max_new_tokens", GOLDEN_MAX_NEW_TOKENS)
        if isinstance(mnt, bool) or not isinstance(mnt, int) or mnt < 1:
            raise UsageError(f"{where}: max_new_tokens must be a positive integer")
        unknown = set(case) - {"prompt", "contains", "regex", "max_new_tokens"}
        if unknown:
            raise UsageError(f"{where}: unknown keys {sorted(unknown)}")
        cases.append(case)
    if not cases:
        raise UsageError(f"golden set {path} holds no cases")
    return cases


def answer_matches(case: dict, answer: str) -> bool:
    return case["contains"] in answer if "contains" in case else re.search(case["regex"], answer) is not None


def run_golden(model, cases: list[dict], progress: bool = True) -> list[dict]:
    """Greedy chat answers to each golden prompt: [{"prompt", "answer", "passed"}]."""
    from ..runtime.generation import SamplingSettings
    out, t0 = [], time.perf_counter()
    for i, case in enumerate(cases):
        settings = SamplingSettings(max_new_tokens=case.get("max_new_tokens", GOLDEN_MAX_NEW_TOKENS), temperature=0.0)
        answer = model.chat([{"role": "user", "content": case["prompt"]}], settings=settings)
        out.append({"prompt": case["prompt"], "answer": answer, "passed": answer_matches(case, answer)})
        if progress:
            spent = time.perf_counter() - t0
            eta = spent / (i + 1) * (len(cases) - i - 1)
            print(f"\rgolden {i + 1}/{len(cases)}  ETA {eta:.0f} s ", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return out


# ---- saved baseline (the reference's side, computed once)


def save_baseline(path, ref, *, text_sha256: str, tokenizer_sha256: str, reference: str, golden=None) -> Path:
    """Write the reference scores as an .npz (no pickles) next to its metadata; atomic (temp + rename)."""
    import numpy as np
    path = Path(path)
    if path.suffix != ".npz":
        raise UsageError(f"--save-baseline {path}: the file name must end in .npz")
    if not path.parent.is_dir():
        raise UsageError(f"--save-baseline {path}: folder {path.parent} does not exist")
    meta = {"format": BASELINE_FORMAT, "text_sha256": text_sha256, "tokenizer_sha256": tokenizer_sha256,
            "reference": reference, "ctx": ref.ctx, "tokens": len(ref.ids), "top_k": int(ref.top_ids.shape[1]),
            "golden": golden, "created": _now_iso()}
    tmp = path.with_name(path.name + ".tmp.npz")
    try:
        np.savez(tmp, ids=ref.ids, top_ids=ref.top_ids, top_logp=ref.top_logp, target_logp=ref.target_logp,
                 meta=np.array(json.dumps(meta)))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_baseline(path):
    """(ReferenceScores, meta) from a file written by `save_baseline`; one clear error if it is not one."""
    import zipfile

    import numpy as np

    from ..runtime.evaluate import ReferenceScores
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("format") != BASELINE_FORMAT:
                raise UsageError(f"{path} is not a check baseline ({meta.get('format')!r})")
            ref = ReferenceScores(z["ids"], meta["ctx"], z["top_ids"], z["top_logp"], z["target_logp"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise UsageError(f"{path} is not a readable check baseline ({type(e).__name__}: {e}); "
                         "make it with check --baseline REF --data FILE --save-baseline FILE.npz") from None
    return ref, meta


def _is_baseline_file(arg) -> bool:
    return str(arg).endswith(".npz")


# ---- one check


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _load(path, progress):
    from ..runtime.model import load
    t0 = time.perf_counter()
    model = load(path)
    if progress:
        print(f"loaded {path} in {time.perf_counter() - t0:.2f} s", file=sys.stderr)
    return model


def make_baseline(ref_path, text: str, out, *, ctx: int | None, max_tokens: int | None, golden=None,
                  progress: bool = True) -> Path:
    """Score `text` (and the golden set) with the reference model once and save it to `out`."""
    from ..runtime.evaluate import reference_scores
    ref = _load(ref_path, progress)
    ctx = ctx or min(DEFAULT_CTX, ref.config.max_position_embeddings)
    scores = reference_scores(ref, text, ctx=ctx, max_tokens=max_tokens, progress=progress)
    gold = None
    if golden is not None:
        res = run_golden(ref, golden, progress)
        gold = {"sha256": _sha256(json.dumps(golden, sort_keys=True)),
                "pass": sum(r["passed"] for r in res) / len(res), "answers": res}
    return save_baseline(out, scores, text_sha256=_sha256(text), reference=str(ref_path), golden=gold,
                         tokenizer_sha256=_file_sha256(Path(ref_path) / "tokenizer.json"))


def run_check(model_path, baseline, text: str, *, data_label: str, golden=None, thresholds=None,
              ctx: int | None = None, max_tokens: int | None = DEFAULT_MAX_TOKENS, progress: bool = True,
              model_name: str | None = None) -> dict:
    """Compare the model folder `model_path` with `baseline` (a model folder or a saved .npz) on
    `text` and the golden cases; return the run's record (metrics, failures, passed). `model_name`:
    how the user named it (default: the folder's name)."""
    from ..runtime.evaluate import compare, compare_to_reference
    from .convlog import model_version
    thresholds = load_thresholds() if thresholds is None else thresholds
    model_path = Path(model_path)
    if _is_baseline_file(baseline):
        ref, meta = load_baseline(baseline)
        if meta["text_sha256"] != _sha256(text):
            raise UsageError(f"baseline {baseline} was computed on another text (sha256 {meta['text_sha256'][:12]}, "
                             f"this text {_sha256(text)[:12]}); save it again for this text")
        tok = _file_sha256(model_path / "tokenizer.json")
        if meta["tokenizer_sha256"] and tok != meta["tokenizer_sha256"]:
            raise UsageError(f"baseline {baseline} was computed with another tokenizer than {model_path}'s; "
                             "save it again from this model's reference")
        if ctx is not None and ctx != ref.ctx:
            raise UsageError(f"baseline {baseline} was computed with ctx {ref.ctx}, not {ctx}; "
                             "drop --ctx or save it again")
        model = _load(model_path, progress)
        res = compare_to_reference(model, ref, text, progress=progress)
        baseline_id = f"file:{Path(baseline).name}:{_file_sha256(baseline)[:16]}"
        ref_golden = (meta.get("golden") or {})
    else:
        base_path = Path(baseline)
        model, ref_model = _load(model_path, progress), _load(base_path, progress)
        ctx = ctx or min(DEFAULT_CTX, model.config.max_position_embeddings)
        res = compare(model, ref_model, text, ctx=ctx, max_tokens=max_tokens, progress=progress)
        baseline_id = f"model:{base_path.name}:{model_version(base_path)}"
        ref_golden = {}
    metrics = {k: res[k] for k in ("ppl", "baseline_ppl", "ppl_ratio", "kl_mean", "kl_p99", "kl_max", "same_top")}
    answers = None
    if golden is not None:
        answers = run_golden(model, golden, progress)
        metrics["golden_pass"] = sum(a["passed"] for a in answers) / len(answers)
        if ref_golden.get("sha256") == _sha256(json.dumps(golden, sort_keys=True)):
            metrics["baseline_golden_pass"] = ref_golden["pass"]
    failures = verdict(metrics, thresholds)
    return {"time": _now_iso(), "model": model_name or model_path.name, "model_path": str(model_path),
            "model_version": model_version(model_path), "baseline": baseline_id, "data": data_label,
            "data_sha256": _sha256(text), "tokens_scored": res["tokens_scored"], "ctx": res["ctx"],
            "metrics": metrics, "thresholds": thresholds, "failures": failures, "passed": not failures,
            "golden_answers": answers, "seconds": res["seconds"]}


# ---- history (SQLite in the store)

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    time TEXT NOT NULL,             -- UTC, ISO 8601
    model TEXT NOT NULL,            -- folder name
    model_path TEXT NOT NULL,
    model_version TEXT NOT NULL,    -- manifest or weights digest (convlog.model_version)
    baseline TEXT NOT NULL,         -- model:<name>:<version> or file:<name>:<sha256>
    data TEXT NOT NULL,             -- the data file, or the log sample
    data_sha256 TEXT NOT NULL,
    tokens_scored INTEGER NOT NULL,
    metrics TEXT NOT NULL,          -- JSON
    thresholds TEXT NOT NULL,       -- JSON
    failures TEXT NOT NULL,         -- JSON list
    passed INTEGER NOT NULL
)"""


def _db(home) -> sqlite3.Connection:
    home = Path(home) if home is not None else default_home()
    home.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(home / HISTORY_DB, timeout=10)
    con.execute(SCHEMA)
    return con


def record_run(rec: dict, home=None) -> None:
    con = _db(home)
    try:
        with con:
            con.execute("INSERT INTO runs (time, model, model_path, model_version, baseline, data, data_sha256, "
                        "tokens_scored, metrics, thresholds, failures, passed) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                        (rec["time"], rec["model"], rec["model_path"], rec["model_version"], rec["baseline"],
                         rec["data"], rec["data_sha256"], rec["tokens_scored"], json.dumps(rec["metrics"]),
                         json.dumps(rec["thresholds"]), json.dumps(rec["failures"]), int(rec["passed"])))
    finally:
        con.close()


def history(model: str | None = None, home=None) -> list[dict]:
    """Recorded runs, oldest first; `model` filters by folder name or path."""
    home = Path(home) if home is not None else default_home()
    if not (home / HISTORY_DB).is_file():
        return []
    con = _db(home)
    con.row_factory = sqlite3.Row
    try:
        rows = [dict(r) for r in con.execute("SELECT * FROM runs ORDER BY id")]
    finally:
        con.close()
    for r in rows:
        for k in ("metrics", "thresholds", "failures"):
            r[k] = json.loads(r[k])
        r["passed"] = bool(r["passed"])
    if model is not None:
        rows = [r for r in rows if model in (r["model"], r["model_path"])
                or str(Path(model).expanduser().resolve()) == str(Path(r["model_path"]).resolve())]
    return rows


def format_history(rows: list[dict]) -> str:
    head = f"{'time':20s} {'model':28s} {'version':25s} {'data':10s} " + " ".join(
        f"{METRICS[m][2]:>9s}" for m in METRICS) + "  result"
    lines = [head]
    for r in rows:
        cells = []
        for m, (_, _, _, fmt) in METRICS.items():
            v = r["metrics"].get(m)
            cells.append(f"{'-' if v is None else fmt.format(v):>9s}")
        lines.append(f"{r['time']:20s} {r['model'][:28]:28s} {r['model_version'][:25]:25s} "
                     f"{r['data_sha256'][:10]:10s} " + " ".join(cells) + ("  PASS" if r["passed"] else "  FAIL"))
    return "\n".join(lines)


# ---- HTML report: the history plotted, and each version's quantization report

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]


def _svg_metric(rows, metric, width=640, height=170):
    """One metric over the runs (x: run number), a line per model, the threshold dashed, failed runs red."""
    key, direction, label, fmt = METRICS[metric]
    pts = [(i, r) for i, r in enumerate(rows) if r["metrics"].get(metric) is not None]
    if not pts:
        return f"<p>{label}: not measured.</p>"
    limits = [r["thresholds"].get(key) for _, r in pts if r["thresholds"].get(key) is not None]
    vals = [r["metrics"][metric] for _, r in pts] + limits
    lo, hi = min(vals), max(vals)
    lo, hi = (lo - 0.5, hi + 0.5) if hi == lo else (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    L, R, T, B = 60, 10, 20, 30
    x = lambda i: L + (width - L - R) * (i / max(len(rows) - 1, 1))
    y = lambda v: T + (height - T - B) * (1 - (v - lo) / (hi - lo))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
           f'<text x="{L}" y="14" font-size="12">{html.escape(label)} ({"≤" if direction == "max" else "≥"} '
           f'threshold, dashed)</text>',
           f'<line x1="{L}" y1="{height - B}" x2="{width - R}" y2="{height - B}" stroke="#999"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{height - B}" stroke="#999"/>']
    for v in (lo, hi):
        out.append(f'<text x="{L - 4}" y="{y(v) + 4:.1f}" font-size="10" text-anchor="end">'
                   f'{html.escape(fmt.format(v))}</text>')
    if limits:
        out.append(f'<line x1="{L}" y1="{y(limits[-1]):.1f}" x2="{width - R}" y2="{y(limits[-1]):.1f}" '
                   'stroke="#555" stroke-dasharray="5,4"/>')
    models = list(dict.fromkeys(r["model"] for _, r in pts))
    for j, name in enumerate(models):
        mine = [(i, r) for i, r in pts if r["model"] == name]
        color = _COLORS[j % len(_COLORS)]
        path = " ".join(f"{x(i):.1f},{y(r['metrics'][metric]):.1f}" for i, r in mine)
        out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        for i, r in mine:
            fill = color if r["passed"] else "#fff"
            out.append(f'<circle cx="{x(i):.1f}" cy="{y(r["metrics"][metric]):.1f}" r="4" fill="{fill}" '
                       f'stroke="{color}"><title>{html.escape(r["time"])} {html.escape(name)}: '
                       f'{html.escape(fmt.format(r["metrics"][metric]))}{"" if r["passed"] else " (FAIL)"}'
                       '</title></circle>')
    out.append(f'<text x="{L}" y="{height - 8}" font-size="10">run 1 … {len(rows)} (filled: pass, open: fail)</text>')
    return "\n".join(out) + "</svg>"


def _quant_section(model_path: str) -> str:
    """The version's own quantization: quantization_config, and report.json per layer if present."""
    folder = Path(model_path)
    esc = html.escape
    out = [f"<h3>{esc(folder.name)}</h3>"]
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return out[0] + "<p>config.json not readable (the folder has moved?).</p>"
    q = cfg.get("quantization_config")
    if not q:
        return out[0] + "<p>Not quantized (full precision).</p>"
    summary = {k: v for k, v in q.items() if not isinstance(v, (dict, list))}
    out.append("<p>" + ", ".join(f"{esc(str(k))}: {esc(str(v))}" for k, v in summary.items()) + "</p>")
    rep_path = folder / "report.json"
    if not rep_path.is_file():
        out.append("<p>No report.json in the folder (quantized without --report).</p>")
        return "\n".join(out)
    try:
        rep = json.loads(rep_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "\n".join(out + ["<p>report.json is not readable.</p>"])
    out.append(f'<p>Full report: <a href="{esc((folder / "report.html").as_uri())}">report.html</a></p>')
    out.append("<table><tr><th>layer</th><th>scale group: α, error before → after</th>"
               "<th>protected (fp16) channels</th><th>clipped linears</th></tr>")
    for layer in rep.get("layers", []):
        groups = "; ".join(f"{esc(str(g))}: α={v.get('alpha')}, {_f(v.get('loss_identity'))} → {_f(v.get('loss_best'))}"
                           for g, v in (layer.get("groups") or {}).items())
        salient = sum(len(v) for v in (layer.get("salient") or {}).values() if v)
        clip = len(layer.get("clip") or {})
        out.append(f"<tr><td>{esc(str(layer.get('layer')))}</td><td>{groups}</td><td>{salient}</td>"
                   f"<td>{clip}</td></tr>")
    return "\n".join(out) + "</table>"


def _f(v):
    return "-" if not isinstance(v, (int, float)) else f"{v:.3g}"


def render_html(rows: list[dict]) -> str:
    esc = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>minilm_edge check history</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;"
             "font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}.fail{color:#b00}</style></head><body>",
             "<h1>Check history</h1>"]
    if not rows:
        parts.append("<p>No runs recorded yet.</p>")
    else:
        parts.append("<h2>Metrics over time</h2>")
        parts += [_svg_metric(rows, m) for m in METRICS]
        parts.append("<h2>Runs</h2><table><tr><th>#</th><th>time</th><th>model</th><th>version</th>"
                     "<th>baseline</th><th>data</th>" + "".join(f"<th>{esc(METRICS[m][2])}</th>" for m in METRICS)
                     + "<th>result</th></tr>")
        for i, r in enumerate(rows, 1):
            cells = "".join(f"<td>{'-' if r['metrics'].get(m) is None else esc(METRICS[m][3].format(r['metrics'][m]))}"
                            "</td>" for m in METRICS)
            result = "PASS" if r["passed"] else "FAIL: " + "; ".join(r["failures"])
            parts.append(f"<tr><td>{i}</td><td>{esc(r['time'])}</td><td>{esc(r['model'])}</td>"
                         f"<td>{esc(r['model_version'])}</td><td>{esc(r['baseline'])}</td><td>{esc(r['data'])}</td>"
                         f"{cells}<td class='{'' if r['passed'] else 'fail'}'>{esc(result)}</td></tr>")
        parts.append("</table><h2>Quantization of each checked version</h2>")
        latest = {r["model_path"]: r for r in rows}
        parts += [_quant_section(p) for p in latest]
    return "\n".join(parts + ["</body></html>"])


def write_html(path, rows) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_html(rows), encoding="utf-8")
    os.replace(tmp, path)
    return path


# ---- command line

CHECK_HELP = """\
Re-evaluate a deployed model against its reference on operational text, record the result, and
fail on regression. Metrics (as llama.cpp's perplexity --kl-divergence): perplexity ratio
model/reference, mean and 99th-percentile KL(reference || model) per token, same-top-token rate;
plus the pass rate of a golden set of prompts (JSONL lines {"prompt": ..., "contains": ...} or
{"prompt": ..., "regex": ...}, answered greedily). Thresholds: the shipped ones, overridden by
--thresholds FILE (JSON: ppl_ratio_max, kl_mean_max, kl_p99_max, same_top_min, golden_pass_min;
null skips one).

--baseline is a model (folder or store name; exact KL) or a saved baseline .npz made once with
--save-baseline (the reference's top-64 log-probabilities per token and its golden answers), so the
checked PC need not hold the full-precision model. Text: --data FILE (first --max-tokens tokens,
windows of --ctx), or --from-log [--since 7d] (the conversation log, see the README).

Each run appends to <home>/check.sqlite and rewrites <home>/check-report.html (metrics over time,
and each version's quantization report); --history prints the trend. With --cluster ADDRESS several
MODELs × several --data files run as independent Dask jobs. Exit: 0 pass, 3 regression (a metric
past its threshold), 1 the check could not run (a missing model, an unreadable file; with --cluster
also when only some jobs failed), 2 usage. A nightly job can so tell "the model got worse" from "the
check is broken".

examples:
  python -m minilm_edge check smollm2-135m-instruct-awq --baseline smollm2-135m-instruct --data wiki.txt \\
      --golden smollm2-135m-instruct
  python -m minilm_edge check --baseline smollm2-135m-instruct --data ops.txt --golden gold.jsonl \\
      --save-baseline base.npz                           # on the big machine, once
  python -m minilm_edge check ./deployed --baseline base.npz --data ops.txt --golden gold.jsonl
  python -m minilm_edge check ./deployed --baseline smollm2-135m-instruct --from-log --since 7d
  python -m minilm_edge check --history ./deployed
"""


def add_parser(sub):
    c = sub.add_parser("check", help="re-evaluate a model against its reference; record; fail on regression",
                       description=CHECK_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("models", nargs="*", metavar="MODEL", help="model folder or store name (several with --cluster)")
    c.add_argument("--baseline", metavar="REF", help="reference model (folder or store name) or a saved .npz")
    c.add_argument("--data", action="append", metavar="FILE", help="operational text file (repeatable with --cluster)")
    c.add_argument("--from-log", action="store_true", help="use the conversation log as the text")
    c.add_argument("--since", default="7d", metavar="SPAN", help="with --from-log: turns of the last SPAN (default 7d)")
    c.add_argument("--golden", metavar="FILE", help="golden JSONL file, or a shipped set: smollm2-135m-instruct")
    c.add_argument("--thresholds", metavar="FILE", help="JSON thresholds overriding the shipped ones")
    c.add_argument("--ctx", type=int, metavar="N",
                   help=f"window length in tokens (default {DEFAULT_CTX}, or the model's maximum if smaller)")
    c.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, metavar="N",
                   help=f"score the first N tokens of the text (default {DEFAULT_MAX_TOKENS})")
    c.add_argument("--save-baseline", metavar="FILE.npz", help="save the reference's side to FILE.npz")
    c.add_argument("--history", action="store_true", help="print the recorded runs (of MODEL if given)")
    c.add_argument("--html", metavar="FILE", help="also write the HTML report to FILE")
    c.add_argument("--json", action="store_true", help="print the run's record as JSON")
    c.add_argument("--cluster", metavar="ADDRESS", help="run MODEL × --data jobs on this Dask scheduler")
    c.set_defaults(func=cmd_check)


def _text_and_label(args):
    from ..runtime.evaluate import read_text
    from . import convlog
    if args.from_log:
        if args.data:
            raise UsageError("give --data FILE or --from-log, not both")
        since = convlog.parse_since(args.since)
        rows = convlog.turns(since, limit=LOG_LIMIT)
        if not rows:
            raise UsageError(f"the conversation log has no turns in the last {args.since} (it is off by default; "
                             f"set {convlog.ENV}=1 or {{\"{convlog.SETTING}\": true}} in <home>/config.json)")
        return convlog.operational_text(rows), f"log:{args.since}:{len(rows)} turns"
    if not args.data:
        raise UsageError("give the operational text: --data FILE or --from-log")
    if len(args.data) > 1:
        raise UsageError("several --data files need --cluster (one job per model and file)")
    return read_text(args.data[0]), str(args.data[0])


def _check_flags(args):
    if args.ctx is not None and args.ctx < 2:
        raise UsageError(f"--ctx must be at least 2, got {args.ctx}")
    if args.max_tokens < 2:
        raise UsageError(f"--max-tokens must be at least 2, got {args.max_tokens}")


def _resolve(arg):
    from .store import resolve_model
    return arg if _is_baseline_file(arg) else resolve_model(arg)


def _report_path(home=None) -> Path:
    return (Path(home) if home is not None else default_home()) / REPORT_HTML


def print_record(rec: dict) -> None:
    m = rec["metrics"]
    print(f"check {rec['model']} ({rec['model_version']}) against {rec['baseline']}")
    print(f"  on {rec['data']}: {rec['tokens_scored']} tokens scored, ctx {rec['ctx']}; "
          f"ppl {m['ppl']:.4f} vs {m['baseline_ppl']:.4f}")
    for name, (key, direction, label, fmt) in METRICS.items():
        if m.get(name) is None:
            continue
        limit = rec["thresholds"].get(key)
        sign = "≤" if direction == "max" else "≥"
        bound = "(not checked)" if limit is None else f"{sign} {fmt.format(limit)}"
        bad = limit is not None and (m[name] > limit if direction == "max" else m[name] < limit)
        print(f"  {label:10s} {fmt.format(m[name]):>10s}   {bound:14s} {'FAIL' if bad else 'ok'}")
    for a in rec.get("golden_answers") or []:
        if not a["passed"]:
            print(f"  golden miss: {a['prompt']!r} -> {a['answer'][:80]!r}")
    print("PASS" if rec["passed"] else "REGRESSION: " + "; ".join(rec["failures"]))


def cmd_check(args):
    _check_flags(args)
    if args.history:
        if len(args.models) > 1:
            raise UsageError("--history takes at most one MODEL")
        rows = history(args.models[0] if args.models else None)
        if not rows and args.models and not _known_model(args.models[0]):
            raise ModelNotFoundError(f"{args.models[0]} is neither a model folder, a store name, nor a model "
                                     f"with recorded checks (`check --history` lists them all)")
        print(format_history(rows) if rows else
              "no checks recorded yet" + (f" for {args.models[0]}" if args.models else ""))
        if args.html:
            print(f"report: {write_html(args.html, rows)}", file=sys.stderr)
        return 0
    if not args.baseline:
        raise UsageError("--baseline REF is required (a model folder, store name or saved .npz)")
    thresholds = load_thresholds(args.thresholds)
    golden = load_golden(args.golden) if args.golden else None
    if args.cluster:
        return check_jobs(args, thresholds, golden)
    if not args.models and not args.save_baseline:
        raise UsageError("give MODEL to check (or only --save-baseline FILE.npz to save the reference's side)")
    if len(args.models) > 1:
        raise UsageError("several MODELs need --cluster (one job per model and file)")
    from .convlog import model_name
    text, label = _text_and_label(args)
    baseline = _resolve(args.baseline)
    if args.save_baseline:
        if _is_baseline_file(baseline):
            raise UsageError("--save-baseline needs a reference model as --baseline, not a saved file")
        out = make_baseline(baseline, text, args.save_baseline, ctx=args.ctx,
                            max_tokens=args.max_tokens, golden=golden)
        print(f"baseline saved: {out}", file=sys.stderr)
        if not args.models:
            return 0
    path = _resolve(args.models[0])
    rec = run_check(path, baseline, text, data_label=label, golden=golden, thresholds=thresholds, ctx=args.ctx,
                    max_tokens=args.max_tokens, model_name=model_name(args.models[0], path))
    return finish(rec, args)


def _known_model(arg: str) -> bool:
    from .store import knows
    return Path(arg).expanduser().is_dir() or knows(arg)


def finish(rec: dict, args) -> int:
    """Record the run, rewrite the report, print the result; the exit code (0 pass, 3 regression)."""
    record_run(rec)
    rows = history()
    report = write_html(_report_path(), rows)
    if args.html:
        write_html(args.html, [r for r in rows if r["model"] == rec["model"]] or rows)
    if args.json:
        print(json.dumps(rec, indent=2))
    else:
        print_record(rec)
    print(f"recorded in {default_home() / HISTORY_DB}; report {report}", file=sys.stderr)
    return 0 if rec["passed"] else REGRESSION_EXIT


# ---- many models × data files on a Dask cluster (app/cluster.py)


def check_job(model_path, baseline, data_path, golden, thresholds, ctx, max_tokens, name) -> dict:
    """One check on a worker; the record comes back and is written here (this machine's store)."""
    from ..runtime.evaluate import read_text
    return run_check(model_path, baseline, read_text(data_path), data_label=str(data_path), golden=golden,
                     thresholds=thresholds, ctx=ctx, max_tokens=max_tokens, progress=False, model_name=name)


def check_jobs(args, thresholds, golden) -> int:
    """`check MODEL... --data FILE... --cluster ADDRESS`: every model on every file; each run recorded.
    Exit 0 when all pass, 1 when any job could not run, else 3 when any regressed."""
    import itertools

    from .cluster import fail_line, run_jobs
    from .convlog import model_name
    if args.from_log or args.save_baseline or not args.models or not args.data:
        raise UsageError("check --cluster takes MODEL... and --data FILE... (not --from-log or --save-baseline)")
    for d in args.data:
        if not Path(d).is_file():
            raise UsageError(f"data file not found: {d}")
    models, baseline = [(_resolve(m), m) for m in args.models], _resolve(args.baseline)
    jobs = [(str(m), str(baseline), str(Path(d).resolve()), golden, thresholds, args.ctx, args.max_tokens,
             model_name(arg, m)) for (m, arg), d in itertools.product(models, args.data)]
    failed = regressed = False
    for job, res in zip(jobs, run_jobs(args.cluster, check_job, jobs, "check")):
        if isinstance(res, Exception):
            print(fail_line(job[:3], res), file=sys.stderr)
            failed = True
        else:
            regressed |= finish(res, args) != 0
    return 1 if failed else REGRESSION_EXIT if regressed else 0
