"""`serve`: an OpenAI-compatible HTTP server over one model, with a chat page at `/`.

Endpoints (the OpenAI API's field names, statuses and server-sent events):
  GET  /health                 {"status": "ok", model, version, active, waiting}; no key needed
  GET  /v1/models              the one model served
  POST /v1/chat/completions    messages -> answer (stream: `data: {chunk}` events, then `data: [DONE]`)
  POST /v1/completions         prompt -> continuation; `logprobs` and `echo` (prompt scoring, as
                               lm-evaluation-harness's local-completions asks for)
  GET  /                       the chat page (static files of app/static, nothing fetched from elsewhere)

Threads: the standard library's ThreadingHTTPServer runs one handler thread per connection. One
engine thread owns the model and a runtime.batch.BatchDecoder (the model is not thread-safe).
Handlers put requests on a bounded waiting list and read their events from a per-request queue;
between decode steps the engine admits waiting requests into free slots (continuous batching) and
drops the ones whose client went away or whose time ran out.

Why the standard library: no dependency to install or keep up to date on a factory PC, and what
we need (threads, Content-Length bodies, server-sent events over a plain response) is small. The
price: HTTP/1.0 framing (one request per connection), which OpenAI clients handle as is.
"""
from __future__ import annotations

import argparse
import dataclasses
import hmac
import ipaddress
import json
import math
import queue
import select
import signal
import socket
import sys
import threading
import time
import uuid
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ..errors import ContextOverflowError, MiniLMError, UsageError

STATIC = Path(__file__).parent / "static"
STATIC_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
                "/chat.js": ("chat.js", "text/javascript; charset=utf-8"),
                "/chat.css": ("chat.css", "text/css; charset=utf-8")}
# Only this server's own files, no inline code: the page can reach nothing outside.
CSP = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'"
MAX_STOP = 4                  # stop strings per request (OpenAI's limit)
MAX_LOGPROBS_COMPLETIONS = 5  # /v1/completions `logprobs` (OpenAI's limit)
MAX_TOP_LOGPROBS_CHAT = 20    # /v1/chat/completions `top_logprobs`
POLL = 0.2                    # seconds between checks that a waiting client is still there


@dataclasses.dataclass(frozen=True)
class Limits:
    max_batch: int = 8            # sequences decoded together
    max_queue: int = 32           # requests waiting for a slot before 429
    max_tokens: int = 1024        # most tokens one request may ask for (and its default)
    max_body: int = 1 << 20       # bytes of a request body
    timeout: float = 300.0        # seconds a request may take, waiting included
    shutdown_grace: float = 10.0  # seconds in-flight requests get to finish on Ctrl-C / SIGTERM


class APIError(Exception):
    """An error answered as OpenAI-style JSON: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------
# Requests, as the engine sees them
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Job:
    """One sequence to generate. The engine writes to `out`: ("prompt", [(token, logprob|None, top)])
    when asked for prompt log-probs, ("token", TokenEvent) per step, then ("done", None) or
    ("error", APIError)."""
    prompt_ids: list
    settings: object              # runtime.generation.SamplingSettings; None: score the prompt only
    logprobs: int = 0             # alternatives per generated token
    prompt_logprobs: int | None = None   # None: none; k: log-probs of the prompt's tokens with k alternatives
    deadline: float = math.inf
    out: queue.Queue = dataclasses.field(default_factory=queue.Queue)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    seq: int | None = None


class Engine:
    """The thread that owns the model: admits jobs between decode steps and routes their events."""

    def __init__(self, model, limits: Limits, max_len: int | None = None):
        from ..runtime.batch import BatchDecoder
        self.model, self.limits = model, limits
        self.decoder = BatchDecoder(model, max_batch=limits.max_batch, max_len=max_len)
        self._waiting: deque[Job] = deque()
        self._active: dict[int, Job] = {}
        self._cv = threading.Condition()
        self._closing = False         # no new jobs
        self.hurry = threading.Event()  # set during close(): cut now instead of waiting out the grace
        self._cut = False             # end what is left now
        self._avg_seconds = 5.0       # running mean of a job's time in a slot (for Retry-After)
        self._started: dict[int, float] = {}
        self._thread = threading.Thread(target=self._run, name="minilm-engine", daemon=True)
        self._thread.start()

    @property
    def max_len(self) -> int:
        return self.decoder.max_len

    def counts(self) -> tuple[int, int]:
        with self._cv:
            return len(self._active), len(self._waiting)

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closing:
                raise APIError(503, "the server is shutting down", "server_error", code="shutting_down")
            if len(self._waiting) >= self.limits.max_queue:
                wait = max(1, math.ceil(self._avg_seconds * (1 + len(self._waiting) / self.limits.max_batch)))
                raise APIError(429, f"the server is busy ({len(self._waiting)} requests waiting); retry later",
                               "rate_limit_error", code="queue_full", headers={"Retry-After": str(wait)})
            self._waiting.append(job)
            self._cv.notify()

    def close(self, grace: float) -> None:
        """Take no new jobs; let the admitted and waiting ones finish for `grace` seconds, then cut
        the rest with an error event, and stop the thread."""
        with self._cv:
            self._closing = True
            end = time.monotonic() + grace
            while (self._active or self._waiting) and time.monotonic() < end and not self.hurry.is_set():
                self._cv.wait(min(0.1, max(0.0, end - time.monotonic())))
            self._cut = True
            self._cv.notify()
        self._thread.join(timeout=30)

    # ---- the engine thread
    def warm_up(self, prompt_ids: list) -> None:
        """Decode two short answers, alone and together, so that the kernels are compiled (or loaded
        from Numba's cache) before the first client waits for them."""
        from ..runtime.generation import SamplingSettings
        jobs = [Job(prompt_ids, SamplingSettings(max_new_tokens=n)) for n in (3, 2)]
        for job in jobs:
            self.submit(job)
        for job in jobs:
            while job.out.get(timeout=600)[0] not in ("done", "error"):
                pass

    def _run(self):
        while True:
            with self._cv:
                while not (self._waiting or self._active or self._cut):
                    self._cv.wait()
                if self._cut:
                    self._cut_all()
                    return
            try:
                self._drop_gone()
                self._admit()
                if self._active:
                    self._step()
            except Exception as e:     # a bug: its requests fail with a 500, the server keeps serving
                self._fail_active(APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))

    def _fail_active(self, err: APIError):
        for seq, job in list(self._active.items()):
            job.out.put(("error", err))
            self._finish(seq, remove=False)
            try:
                self.decoder.remove(seq)
            except MiniLMError:
                pass

    def _fail_dropped(self, err: APIError):
        """Fail the requests whose sequences the decoder dropped (a prefill that failed for them)."""
        for seq, job in list(self._active.items()):
            if not self.decoder.holds(seq):
                job.out.put(("error", err))
                self._finish(seq, remove=False)

    def _cut_all(self):
        err = APIError(503, "the server shut down before this request finished", "server_error", code="shutting_down")
        for job in list(self._active.values()) + list(self._waiting):
            job.out.put(("error", err))
        self._active.clear()
        self._waiting.clear()

    def _drop_gone(self):
        """Free the slots of clients that went away or ran out of time."""
        now = time.monotonic()
        timeout = APIError(504, f"the request took longer than the server's limit ({self.limits.timeout:g} s)",
                           "timeout_error", code="timeout")
        with self._cv:
            for job in [j for j in self._waiting if j.cancelled.is_set() or now > j.deadline]:
                self._waiting.remove(job)
                if not job.cancelled.is_set():
                    job.out.put(("error", timeout))
        for seq, job in list(self._active.items()):
            if job.cancelled.is_set() or now > job.deadline:
                self._finish(seq)
                if not job.cancelled.is_set():
                    job.out.put(("error", timeout))

    def _finish(self, seq: int, remove: bool = True):
        with self._cv:
            self._active.pop(seq, None)
            t0 = self._started.pop(seq, None)
            if t0 is not None:
                self._avg_seconds = 0.8 * self._avg_seconds + 0.2 * (time.monotonic() - t0)
            self._cv.notify_all()
        if remove:
            self.decoder.remove(seq)

    def _admit(self):
        while self.decoder.free_slots:
            with self._cv:
                if not self._waiting:
                    return
                job = self._waiting.popleft()
            try:
                if len(job.prompt_ids) >= self.max_len:
                    raise ContextOverflowError(f"the prompt is {len(job.prompt_ids)} tokens but the context holds "
                                               f"{self.max_len} (at least 1 must be left for the answer); shorten it")
                if job.prompt_logprobs is not None:
                    job.out.put(("prompt", prompt_logprobs(self.model, job.prompt_ids, job.prompt_logprobs)))
                if job.settings is None:             # echo with max_tokens 0: the prompt's scores only
                    job.out.put(("done", None))
                    continue
                seq = self.decoder.add(job.prompt_ids, job.settings, job.logprobs)
            except ContextOverflowError as e:
                job.out.put(("error", APIError(400, str(e), code="context_length_exceeded")))
                continue
            except UsageError as e:
                job.out.put(("error", APIError(400, str(e))))
                continue
            except MiniLMError as e:
                job.out.put(("error", APIError(500, str(e), "server_error")))
                continue
            with self._cv:
                job.seq = seq
                self._active[seq] = job
                self._started[seq] = time.monotonic()

    def _step(self):
        try:
            self.decoder.prefill()               # the prompts that joined: a failure there is theirs alone
        except Exception as e:                   # the decoder dropped them (and only them)
            self._fail_dropped(APIError(500, str(e), "server_error") if isinstance(e, MiniLMError) else
                               APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))
            if not self._active:
                return
        try:
            events = self.decoder.step()
        except MiniLMError as e:                 # the model itself failed: every active request fails
            self._fail_active(APIError(500, str(e), "server_error"))
            return
        for ev in events:
            job = self._active.get(ev.seq)
            if job is None:
                continue
            job.out.put(("token", ev))
            if ev.finish is not None:
                job.out.put(("done", None))
                self._finish(ev.seq, remove=False)    # a finished sequence left the decoder by itself


def prompt_logprobs(model, ids: list, k: int) -> list:
    """[(token, logprob or None, top [(id, logprob)])] for each prompt token: log p(ids[i] | ids[:i])
    from one forward pass over the prompt; the first token has no context, so no log-prob. The head
    runs on a few positions at a time, so a long prompt never holds [T, V] logits."""
    from ..runtime.batch import raw_logprobs
    x = model.hidden_states(ids)                                          # [T, D]
    rows = [(ids[0], None, [])]
    for i in range(0, len(ids) - 1, 64):
        logits = model.weights.lm_head(x[i:min(i + 64, len(ids) - 1)])    # [t, V]: the next token's scores
        for j, row in enumerate(logits):
            tok = ids[i + j + 1]
            lp, top = raw_logprobs(row, tok, k)
            rows.append((tok, lp, top))
    return rows


# ---------------------------------------------------------------------------------------------
# OpenAI parameters -> SamplingSettings
# ---------------------------------------------------------------------------------------------
def _number(body, name, lo, hi, integer=False, default=None):
    v = body.get(name, default)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not (lo <= v <= hi) or (not integer and not math.isfinite(v)):
        kind = "a whole number" if integer else "a number"
        raise APIError(400, f"'{name}' must be {kind} in [{lo}, {hi}], got {json.dumps(v)}", param=name,
                       code="invalid_value")
    return v


def _unsupported(body, name, default_ok):
    if name in body and body[name] is not None and not default_ok(body[name]):
        raise APIError(400, f"'{name}' = {json.dumps(body[name])} is not supported by this server", param=name,
                       code="unsupported_parameter")


def sampling(model, body: dict, limits: Limits, allow_zero_tokens=False):
    """SamplingSettings from an OpenAI request body (None: max_tokens 0, nothing to generate).
    Unset values come from the model's generation_config.json (greedy for most instruct models),
    as the CLI does; values this server cannot honour are refused, never ignored."""
    from ..runtime.generation import settings_from_generation_config
    for name in ("presence_penalty", "frequency_penalty"):
        _unsupported(body, name, lambda v: v == 0)
    _unsupported(body, "n", lambda v: v == 1)
    _unsupported(body, "best_of", lambda v: v == 1)
    _unsupported(body, "logit_bias", lambda v: v == {})
    _unsupported(body, "tools", lambda v: v == [])
    _unsupported(body, "response_format", lambda v: isinstance(v, dict) and v.get("type") == "text")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    n_max = _number(body, name, 0 if allow_zero_tokens else 1, limits.max_tokens, integer=True,
                    default=limits.max_tokens)
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1)
    if top_p == 0:
        top_p, temperature = 1.0, 0.0         # OpenAI accepts 0: only the most likely token
    seed = _number(body, "seed", 0, 2**63 - 1, integer=True)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOP
                             or not all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them",
                       param="stop", code="invalid_value")
    if n_max == 0:
        return None
    try:
        return settings_from_generation_config(model.generation_config, max_new_tokens=n_max,
                                               temperature=temperature, top_p=top_p, seed=seed, stop=stop)
    except UsageError as e:
        raise APIError(400, str(e)) from None


def chat_prompt_ids(model, body: dict) -> list:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    plain = []
    for i, m in enumerate(msgs):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):              # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}]: only text content parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise APIError(400, f"messages[{i}] must have a string 'role' and text 'content'", param="messages")
        plain.append({"role": m["role"], "content": content})
    try:
        return model.tokenizer.encode_chat(plain)
    except MiniLMError as e:
        raise APIError(400, str(e), param="messages") from None


def completion_prompts(model, body: dict) -> list:
    """The prompt(s) of /v1/completions as [(text, ids)]: a string, a list of strings, a list of
    token ids, or a list of such lists (lm-evaluation-harness sends ids)."""
    p = body.get("prompt")
    V = model.config.vocab_size
    is_ids = lambda x: isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
    if isinstance(p, str) or is_ids(p):
        p = [p]
    if not isinstance(p, list) or not p or not all(isinstance(x, str) or is_ids(x) for x in p):
        raise APIError(400, "'prompt' must be a string, a list of strings, or token ids", param="prompt")
    out = []
    for x in p:
        if isinstance(x, str):
            if not x:
                raise APIError(400, "a prompt is empty", param="prompt")
            ids = model.tokenizer.encode(x, add_special_tokens=True)
            out.append((x, ids))
        else:
            if min(x) < 0 or max(x) >= V:
                raise APIError(400, f"token ids must be in 0..{V - 1}", param="prompt")
            out.append((model.tokenizer.decode(x), list(x)))
        if not out[-1][1]:
            raise APIError(400, "a prompt is empty", param="prompt")
    return out


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------
class Server(ThreadingHTTPServer):
    daemon_threads = False            # server_close() waits for handlers: in-flight answers end cleanly
    block_on_close = True
    # The standard library's backlog of 5 resets connections when a burst of clients arrives while the
    # accepting thread waits for the GIL (measured: 2 of 16 clients reset at start under load).
    request_queue_size = 128

    def __init__(self, addr, engine: Engine, model_name: str, version: str, api_key: str | None, log=sys.stderr):
        self.engine, self.model_name, self.version, self.api_key, self.log = engine, model_name, version, api_key, log
        self.created = int(time.time())
        self.log_lock = threading.Lock()
        self.turn_log = None          # f(prompt, answer, prompt_tokens, answer_tokens, seconds): the conversation log
        super().__init__(addr, Handler)


class Handler(BaseHTTPRequestHandler):
    server: Server
    timeout = 60                      # seconds a socket read or write may block (a stalled client)
    server_version = "minilm-edge"

    # ---- plumbing
    def log_message(self, format, *args):     # noqa: A002 - the access log is written by _access_log
        pass

    def _access_log(self, status, t0, extra=""):
        with self.server.log_lock:
            try:
                print(f'{self.client_address[0]} "{self.command} {self.path}" {status} '
                      f'{time.perf_counter() - t0:.3f}s{extra}', file=self.server.log, flush=True)
            except (OSError, ValueError):     # a closed log stops no request
                pass

    def _send_json(self, status, obj, headers=None):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _peer_closed(self) -> bool:
        """True when the client closed its end (a readable socket with nothing to read)."""
        try:
            r, _, _ = select.select([self.connection], [], [], 0)
            return bool(r) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _authorize(self):
        key = self.server.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")

    def _body(self) -> dict:
        n = self.headers.get("Content-Length")
        if n is None or not n.isdigit():
            raise APIError(411 if self.headers.get("Transfer-Encoding") else 400,
                           "the request needs a Content-Length header")
        if int(n) > self.server.engine.limits.max_body:
            raise APIError(413, f"the request body is {int(n)} bytes; this server takes at most "
                                f"{self.server.engine.limits.max_body}", code="request_too_large")
        try:
            body = json.loads(self.rfile.read(int(n)))
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.server.model_name:
            raise APIError(404, f"the model '{model}' does not exist; this server has '{self.server.model_name}'",
                           param="model", code="model_not_found")
        return body

    def _handle(self, route):
        t0 = time.perf_counter()
        status, extra = 200, ""
        try:
            status, extra = route() or (200, "")
        except APIError as e:
            status = e.status
            self._send_json(e.status, e.body(), e.headers)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            status, extra = 499, " (client went away)"
        except Exception as e:   # a bug: the client still gets JSON, the log the type
            status = 500
            try:
                self._send_json(500, APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error").body())
            except OSError:
                pass
        self._access_log(status, t0, extra)

    def do_GET(self):
        self._handle(self._get)

    def do_POST(self):
        routes = {"/v1/chat/completions": self._chat, "/v1/completions": self._completions}
        route = routes.get(self.path.split("?")[0])
        if route is None:
            return self._handle(self._not_found)
        self._handle(lambda: (self._authorize(), route(self._body()))[1])

    def _not_found(self):
        raise APIError(404, f"no route {self.command} {self.path}", code="not_found")

    def _get(self):
        path = self.path.split("?")[0]
        if path in STATIC_FILES:
            name, ctype = STATIC_FILES[path]
            data = (STATIC / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Content-Security-Policy", CSP)
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            self.wfile.write(data)
            return None
        s = self.server
        if path == "/health":
            active, waiting = s.engine.counts()
            self._send_json(200, {"status": "ok", "model": s.model_name, "version": s.version,
                                  "active": active, "waiting": waiting})
            return None
        if path == "/v1/models":
            self._authorize()
            self._send_json(200, {"object": "list", "data": [
                {"id": s.model_name, "object": "model", "created": s.created, "owned_by": "minilm_edge",
                 "version": s.version, "context_length": s.engine.max_len}]})
            return None
        return self._not_found()

    # ---- generation
    def _submit(self, job: Job):
        engine = self.server.engine
        job.deadline = time.monotonic() + engine.limits.timeout
        engine.submit(job)

    def _run_job(self, job: Job, on_event, submit=True):
        """Submit `job` (unless done already) and hand its events to `on_event` until it is done.
        Cancels the job when the client goes away (a write fails, or the socket closes while we wait)."""
        if submit:
            self._submit(job)
        try:
            while True:
                try:
                    kind, value = job.out.get(timeout=POLL)
                except queue.Empty:
                    if self._peer_closed():
                        raise BrokenPipeError("the client closed the connection") from None
                    continue
                if kind == "error":
                    raise value
                if kind == "done":
                    return
                on_event(kind, value)
        except BaseException:
            job.cancelled.set()
            raise

    def _start_sse(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()

    def _sse(self, obj):
        self.wfile.write(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")
        self.wfile.flush()

    def _stream_error(self, e: APIError):
        try:
            self._sse(e.body())
        except OSError:
            pass

    def _chat(self, body):
        t0 = time.perf_counter()
        model = self.server.engine.model
        ids = chat_prompt_ids(model, body)
        settings = sampling(model, body, self.server.engine.limits)
        want_lp = bool(body.get("logprobs"))
        k = _number(body, "top_logprobs", 0, MAX_TOP_LOGPROBS_CHAT, integer=True, default=0) if want_lp else 0
        stream = body.get("stream") is True
        job = Job(ids, settings, logprobs=k)
        rid, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), self.server.model_name
        tok = model.tokenizer
        st = {"n": 0, "text": [], "lp": [], "finish": None}
        eos = model.eos_ids()

        def lp_entry(ev):
            return {"token": tok.decode([ev.token]), "logprob": ev.logprob,
                    "top_logprobs": [{"token": tok.decode([i]), "logprob": lp} for i, lp in ev.top_logprobs]}

        def chunk(delta, finish=None, lp=None):
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}]}

        def on_event(kind, ev):
            if ev.token not in eos:
                st["n"] += 1
                if want_lp:
                    st["lp"].append(lp_entry(ev))
            st["finish"] = ev.finish
            st["text"].append(ev.text)
            if stream and (ev.text or ev.finish):
                lp = {"content": st["lp"][-1:]} if want_lp and ev.token not in eos else None
                if ev.text:
                    self._sse(chunk({"content": ev.text}, None, lp))
                if ev.finish:
                    self._sse(chunk({}, ev.finish))

        usage = lambda: {"prompt_tokens": len(ids), "completion_tokens": st["n"], "total_tokens": len(ids) + st["n"]}
        if not stream:
            self._run_job(job, on_event)
            msg = {"role": "assistant", "content": "".join(st["text"])}
            self._send_json(200, {"id": rid, "object": "chat.completion", "created": created, "model": name,
                                  "choices": [{"index": 0, "message": msg, "finish_reason": st["finish"],
                                               "logprobs": {"content": st["lp"]} if want_lp else None}],
                                  "usage": usage()})
        else:
            self._stream(job, on_event, lambda: self._sse(chunk({"role": "assistant", "content": ""})), body, usage,
                         lambda u: {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                                    "choices": [], "usage": u})
        if self.server.turn_log is not None and st["finish"] is not None:
            self.server.turn_log(_last_user_text(body), "".join(st["text"]), len(ids), st["n"],
                                 time.perf_counter() - t0)
        return 200, f" prompt={len(ids)} completion={st['n']}"

    def _stream(self, job, on_event, first, body, usage, usage_chunk):
        """Run a streamed job. The 200 and the first chunk go out with the job's first event, so a full
        queue or a prompt too long is still a plain HTTP error; an error after the 200 becomes an
        `error` event that ends the stream; `data: [DONE]` ends a good one."""
        started = []

        def on(kind, value):
            if not started:
                self._start_sse()
                first()
                started.append(True)
            on_event(kind, value)

        try:
            self._run_job(job, on)
        except APIError as e:
            if not started:
                raise
            self._stream_error(e)
            return
        if not started:
            self._start_sse()
            first()
        opts = body.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage"):
            self._sse(usage_chunk(usage()))
        self._sse(b"[DONE]")

    def _completions(self, body):
        model = self.server.engine.model
        tok = model.tokenizer
        prompts = completion_prompts(model, body)
        echo = body.get("echo") is True
        k = _number(body, "logprobs", 0, MAX_LOGPROBS_COMPLETIONS, integer=True)
        settings = sampling(model, body, self.server.engine.limits, allow_zero_tokens=echo)
        stream = body.get("stream") is True
        if stream and len(prompts) > 1:
            raise APIError(400, "streaming takes one prompt per request", param="prompt")
        rid, created, name = f"cmpl-{uuid.uuid4().hex}", int(time.time()), self.server.model_name
        eos = model.eos_ids()
        jobs = [Job(ids, settings, logprobs=k or 0, prompt_logprobs=k if (echo and k is not None) else None)
                for _, ids in prompts]
        if stream:
            return self._stream_completion(body, jobs[0], prompts[0][0], echo, k, rid, created)
        try:
            for job in jobs:                   # all at once: a batch of prompts is decoded together
                self._submit(job)
        except APIError:
            for job in jobs:
                job.cancelled.set()
            raise
        choices, n_prompt, n_gen = [], 0, 0
        for index, ((text, ids), job) in enumerate(zip(prompts, jobs)):
            st = {"prompt": None, "events": []}

            def on_event(kind, value, st=st):
                if kind == "prompt":
                    st["prompt"] = value
                else:
                    st["events"].append(value)

            try:
                self._run_job(job, on_event, submit=False)
            except BaseException:
                for j in jobs:
                    j.cancelled.set()
                raise
            evs = st["events"]
            out = "".join(ev.text for ev in evs)
            lp = None
            if k is not None:
                lp = _completion_logprobs(tok, st["prompt"] or [], evs, k, eos, len(text) if echo else 0)
            choices.append({"index": index, "text": (text if echo else "") + out, "logprobs": lp,
                            "finish_reason": evs[-1].finish if evs else "length"})
            n_prompt += len(ids)
            n_gen += sum(ev.token not in eos for ev in evs)
        self._send_json(200, {"id": rid, "object": "text_completion", "created": created, "model": name,
                              "choices": choices, "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen,
                                                            "total_tokens": n_prompt + n_gen}})
        return 200, f" prompt={n_prompt} completion={n_gen}"

    def _stream_completion(self, body, job, text, echo, k, rid, created):
        tok, name = self.server.engine.model.tokenizer, self.server.model_name
        eos = self.server.engine.model.eos_ids()
        evs = []
        head = {"id": rid, "object": "text_completion", "created": created, "model": name}

        def on_event(kind, value):
            if kind == "prompt":
                return
            evs.append(value)
            if value.text or value.finish:
                lp = _completion_logprobs(tok, [], [value], k, eos, 0) if k is not None else None
                self._sse({**head, "choices": [{"index": 0, "text": value.text, "logprobs": lp,
                                                "finish_reason": value.finish}]})

        gen = lambda: sum(ev.token not in eos for ev in evs)
        n = len(job.prompt_ids)
        usage = lambda: {"prompt_tokens": n, "completion_tokens": gen(), "total_tokens": n + gen()}
        first = (lambda: self._sse({**head, "choices": [{"index": 0, "text": text, "logprobs": None,
                                                         "finish_reason": None}]})) if echo else (lambda: None)
        self._stream(job, on_event, first, body, usage, lambda u: {**head, "choices": [], "usage": u})
        return 200, f" prompt={n} completion={gen()}"


def _completion_logprobs(tok, prompt_rows, events, k, eos, offset0):
    """The legacy completions `logprobs` object: tokens, token_logprobs, top_logprobs (a dict per
    token; None for the first prompt token, which has no context), text_offset."""
    rows = list(prompt_rows) + [(ev.token, ev.logprob, ev.top_logprobs) for ev in events if ev.token not in eos]
    tokens, lps, tops, offsets = [], [], [], []
    pos = 0
    for i, (t, lp, top) in enumerate(rows):
        s = tok.decode([t])
        if i == len(prompt_rows):
            pos = offset0            # generated text starts right after the echoed prompt
        tokens.append(s)
        lps.append(lp)
        tops.append(None if lp is None else {tok.decode([j]): v for j, v in top[:k]})
        offsets.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


# ---------------------------------------------------------------------------------------------
# Command
# ---------------------------------------------------------------------------------------------
SERVE_HELP = """\
Serve a model over HTTP with the OpenAI API (chat completions, completions, models) and a chat
page at http://HOST:PORT/. Concurrent requests are decoded together (continuous batching, up to
--max-batch at once; up to --max-queue more wait, beyond that 429 with Retry-After). One access-log
line per request on stderr (never the text). Ctrl-C or SIGTERM stops taking requests, lets the
running ones finish for --shutdown-grace seconds, and ends the rest with an error (at once on a
second Ctrl-C).

Binding to anything but 127.0.0.1 / ::1 / localhost needs an API key (--api-key, or the
environment variable MINILM_EDGE_API_KEY, which other users cannot read from the process list).
Requests that leave out temperature / top_p get the model's generation_config.json defaults
(greedy for SmolLM2-Instruct), as the CLI does.

examples:
  python -m minilm_edge serve                                   # default model, http://127.0.0.1:8080/
  python -m minilm_edge serve ./my-model --port 9000
  MINILM_EDGE_API_KEY=s3cret python -m minilm_edge serve --host 0.0.0.0
  curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "smollm2-135m-instruct-awq", "messages": [{"role": "user", "content": "Hi!"}]}'
  python -c 'import openai; c = openai.OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="none");
  print(c.chat.completions.create(model="smollm2-135m-instruct-awq",
        messages=[{"role": "user", "content": "Hi!"}]).choices[0].message.content)'
"""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def model_version(path: Path) -> str:
    """The version the conversation log and `check` record too (app/convlog.py): the manifest's
    digest, else a digest of the weights."""
    from .convlog import model_version as version_of
    return version_of(path)


def _last_user_text(body) -> str:
    """The conversation log's prompt: the last user message's text."""
    for m in reversed(body.get("messages") or []):
        if isinstance(m, dict) and m.get("role") == "user":
            c = m.get("content")
            return c if isinstance(c, str) else json.dumps(c, ensure_ascii=False)
    return ""


def _turn_logger(name: str, version: str):
    """Records a served chat turn when the conversation log is on (app/convlog.py), else None."""
    from . import convlog
    if not convlog.enabled():
        return None
    return lambda prompt, answer, n_prompt, n_answer, seconds: convlog.record(
        name, version, prompt, answer, prompt_tokens=n_prompt, answer_tokens=n_answer, seconds=seconds,
        source="serve")


def check_args(args) -> Limits:
    import os
    args.api_key = args.api_key or os.environ.get("MINILM_EDGE_API_KEY") or None
    if not is_loopback(args.host) and not args.api_key:
        raise UsageError(f"serving on {args.host} (not loopback) needs --api-key KEY or MINILM_EDGE_API_KEY")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    for name in ("max_batch", "max_queue", "max_tokens", "max_body"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if not args.timeout > 0 or args.shutdown_grace < 0:
        raise UsageError("--timeout must be > 0 and --shutdown-grace ≥ 0")
    if args.ctx is not None and args.ctx < 2:
        raise UsageError(f"--ctx must be at least 2, got {args.ctx}")
    return Limits(max_batch=args.max_batch, max_queue=args.max_queue, max_tokens=args.max_tokens,
                  max_body=args.max_body, timeout=args.timeout, shutdown_grace=args.shutdown_grace)


def cmd_serve(args):
    from .store import resolve_model
    limits = check_args(args)
    path = resolve_model(args.model_dir or args.default_model)
    model = args.load_model(str(path))
    if model.tokenizer is None or not model.tokenizer.chat_template:
        print("note: this model has no chat template; /v1/chat/completions will refuse requests", file=sys.stderr)
    engine = Engine(model, limits, max_len=args.ctx)
    try:                                      # bound now (a taken port fails at once); served after the warm-up
        from .convlog import model_name
        name = model_name(args.model_dir or args.default_model, path)
        httpd = Server((args.host, args.port), engine, name, model_version(path), args.api_key)
        httpd.turn_log = _turn_logger(name, httpd.version)
    except OSError as e:
        engine.close(0)
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    _say("warming up (compiling kernels on first use)")
    engine.warm_up(model.tokenizer.encode("Hello") or [0])
    stop = threading.Event()

    def on_signal(*_):                        # the first asks to stop, a second not to wait
        (engine.hurry if stop.is_set() else stop).set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    host, port = httpd.server_address[:2]
    loop = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="minilm-http")
    loop.start()
    try:
        _say(f"serving {path.name} ({httpd.version}) at http://{host}:{port}/ "
             f"(batch {limits.max_batch}, queue {limits.max_queue}); Ctrl-C stops")
        while not stop.wait(0.5):
            pass
        _say(f"shutting down: finishing requests in flight (at most {limits.shutdown_grace:g} s)")
    finally:                                  # whatever happens here, the threads end and the process exits
        engine.close(limits.shutdown_grace)   # new requests get 503 meanwhile
        httpd.shutdown()
        loop.join()
        httpd.server_close()                  # waits for handler threads to write their last bytes
    _say("stopped")
    return 0


def _say(line: str) -> None:
    """A status line on stderr; a closed stderr (the log piped into a reader that quit) stops nothing."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def add_parser(sub, default_model: str, load_model):
    """The `serve` subcommand; the CLI passes its default model and its loader (no import back)."""
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server and chat page", description=SERVE_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("model_dir", nargs="?", metavar="MODEL",
                   help="model folder or known name (default: the default model)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this PC only)")
    s.add_argument("--port", type=int, default=8080, help="TCP port (default 8080; 0 picks a free one)")
    s.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' (needed off loopback)")
    d = Limits()
    s.add_argument("--max-batch", type=int, default=d.max_batch, metavar="N",
                   help=f"requests decoded together (default {d.max_batch})")
    s.add_argument("--max-queue", type=int, default=d.max_queue, metavar="N",
                   help=f"requests waiting for a slot before 429 (default {d.max_queue})")
    s.add_argument("--max-tokens", type=int, default=d.max_tokens, metavar="N",
                   help=f"most tokens a request may generate, and the default (default {d.max_tokens})")
    s.add_argument("--max-body", type=int, default=d.max_body, metavar="BYTES",
                   help=f"largest request body (default {d.max_body})")
    s.add_argument("--timeout", type=float, default=d.timeout, metavar="S",
                   help=f"seconds a request may take, waiting included (default {d.timeout:g})")
    s.add_argument("--shutdown-grace", type=float, default=d.shutdown_grace, metavar="S",
                   help=f"seconds running requests get to finish on Ctrl-C / SIGTERM (default {d.shutdown_grace:g})")
    s.add_argument("--ctx", type=int, metavar="N", help="context per request in tokens (default: the model's)")
    s.set_defaults(func=cmd_serve, default_model=default_model, load_model=load_model)
