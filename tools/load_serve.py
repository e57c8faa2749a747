"""Load test of `minilm-edge serve`: N concurrent streaming chat clients for T seconds, then one
client alone, and the two side by side.

Each client sends streamed /v1/chat/completions requests back to back (a question from a small
list, `--max-tokens` tokens, sampled with a per-request seed) until the time is up; requests
started before then are waited for. A request is ok when its stream ends with a finish_reason and
`data: [DONE]`; failed when the server answers an error (HTTP status or an `error` event) or the
connection breaks; lost when the stream ends without [DONE]. Reported per phase: requests ok /
failed / lost, completion tokens per second over the phase's wall time, and p50 / p95 of the time
to first token (request sent -> first content byte).

Without --url the tool starts the server itself (`python -m minilm_edge serve MODEL --port 0`,
plus --server-args) and stops it with SIGTERM at the end; its exit code is then checked too.

examples:
  python tools/load_serve.py                                  # default model, 16 clients x 120 s, then 1 client
  python tools/load_serve.py --clients 4 --seconds 20 --single-seconds 10 --json
  python tools/load_serve.py --url http://127.0.0.1:8080 --api-key s3cret
"""
from __future__ import annotations

import argparse
import http.client
import json
import re
import signal
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

QUESTIONS = [
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Give me three tips for a job interview.",
    "Write a haiku about a factory at night.",
    "What does a CPU cache do?",
    "Name four vegetables that grow well in cold weather.",
    "How do I boil an egg?",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
]


def one_request(url, key, model, question, max_tokens, seed, timeout):
    """Send one streamed chat request; returns (status, ttft_s or None, completion_tokens, error)."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}], "stream": True,
                       "max_tokens": max_tokens, "temperature": 0.7, "seed": seed,
                       "stream_options": {"include_usage": True}})
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    t0 = time.perf_counter()
    ttft, tokens, finished, done = None, 0, False, False
    try:
        conn.request("POST", "/v1/chat/completions", body, headers)
        r = conn.getresponse()
        if r.status != 200:
            return "failed", None, 0, f"HTTP {r.status}: {r.read()[:200]!r}"
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return "failed", ttft, tokens, f"error event: {chunk['error'].get('message')}"
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices", []):
                if c["delta"].get("content") and ttft is None:
                    ttft = time.perf_counter() - t0
                finished = finished or c.get("finish_reason") is not None
    except (OSError, ValueError, http.client.HTTPException) as e:
        return "failed", ttft, tokens, f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    if not (done and finished):
        return "lost", ttft, tokens, "the stream ended without finish_reason and [DONE]"
    return "ok", ttft, tokens, None


def percentile(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


def phase(url, key, model, clients, seconds, max_tokens, timeout):
    results, lock = [], threading.Lock()
    end = time.monotonic() + seconds

    def client(c):
        i = 0
        while time.monotonic() < end:
            res = one_request(url, key, model, QUESTIONS[(c + i) % len(QUESTIONS)], max_tokens, c * 100003 + i,
                              timeout)
            with lock:
                results.append(res)
            i += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    wall = time.perf_counter() - t0
    ttfts = [r[1] for r in results if r[0] == "ok" and r[1] is not None]
    errors = sorted({r[3] for r in results if r[3]})
    count = lambda s: sum(r[0] == s for r in results)
    return {"clients": clients, "seconds": round(wall, 1), "requests": len(results), "ok": count("ok"),
            "failed": count("failed"), "lost": count("lost"),
            "completion_tokens": sum(r[2] for r in results if r[0] == "ok"),
            "tokens_per_s": round(sum(r[2] for r in results if r[0] == "ok") / wall, 2),
            "requests_per_min": round(60 * count("ok") / wall, 1),
            "ttft_p50_s": _round(percentile(ttfts, 50)), "ttft_p95_s": _round(percentile(ttfts, 95)),
            "errors": errors[:5]}


def _round(x):
    return None if x is None else round(x, 3)


def _drain(stream):
    for _ in stream:
        pass


def start_server(model, server_args):
    cmd = [sys.executable, "-m", "minilm_edge", "serve", *([model] if model else []), "--port", "0", *server_args]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 1800                    # the first use of the default model quantizes it
    while time.monotonic() < end:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        print(line, end="", file=sys.stderr)
        m = re.search(r"at (http://\S+)/ ", line)
        if m:
            # keep draining stderr (the access log) so the server never blocks on a full pipe
            threading.Thread(target=_drain, args=(proc.stderr,), daemon=True).start()
            return proc, m.group(1)
    proc.kill()
    sys.exit(f"load_serve: the server did not start ({' '.join(cmd)})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("examples:")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="model for the server this tool starts (default: the default model)")
    p.add_argument("--url", help="an already running server (then MODEL and --server-args are not used)")
    p.add_argument("--api-key", help="key for --url")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    p.add_argument("--seconds", type=float, default=120, help="length of the concurrent phase (default 120)")
    p.add_argument("--single-seconds", type=float, default=60, help="length of the 1-client phase (default 60)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per answer (default 64)")
    p.add_argument("--timeout", type=float, default=600, help="seconds one request may take (default 600)")
    p.add_argument("--server-args", default="", help="extra serve flags, e.g. '--max-batch 16'")
    p.add_argument("--json", action="store_true", help="print JSON")
    a = p.parse_args(argv)
    proc = None
    url = a.url
    if url is None:
        proc, url = start_server(a.model, a.server_args.split())
    try:
        u = urlsplit(url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {a.api_key}"} if a.api_key else {})
        info = json.loads(conn.getresponse().read())["data"][0]
        print(f"load: {a.clients} clients for {a.seconds:g} s, then 1 client for {a.single_seconds:g} s "
              f"against {info['id']} ({info['version']}) at {url}", file=sys.stderr)
        many = phase(url, a.api_key, info["id"], a.clients, a.seconds, a.max_tokens, a.timeout)
        one = phase(url, a.api_key, info["id"], 1, a.single_seconds, a.max_tokens, a.timeout)
    finally:
        rc = None
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(120)
    res = {"model": info["id"], "version": info["version"], "max_tokens": a.max_tokens,
           "concurrent": many, "single": one, "server_exit_code": rc}
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        rows = [("clients", "clients"), ("requests ok", "ok"), ("requests failed", "failed"),
                ("requests lost", "lost"), ("completion tokens", "completion_tokens"),
                ("throughput tokens/s", "tokens_per_s"), ("requests/min", "requests_per_min"),
                ("TTFT p50 (s)", "ttft_p50_s"), ("TTFT p95 (s)", "ttft_p95_s")]
        print(f"{'':22s}{'concurrent':>12s}{'single':>12s}")
        for label, k in rows:
            print(f"{label:22s}{str(many[k]):>12s}{str(one[k]):>12s}")
        for e in many["errors"] + one["errors"]:
            print("error:", e)
        if rc is not None:
            print(f"server exit code after SIGTERM: {rc}")
    bad = many["failed"] + many["lost"] + one["failed"] + one["lost"] or (rc not in (None, 0))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
