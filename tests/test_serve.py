"""`serve`: the OpenAI-compatible server, driven by the official `openai` client.

Most tests run the server in-process on a free port over a tiny random model (fast); its answers
are byte soup, so they are checked against what the runtime computes for the same request, never
against hard-coded text. A real-model test checks an answer's content, and subprocess tests the
command itself (API key off loopback, SIGTERM).
"""
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest

import minilm_edge
from minilm_edge.app import cli
from minilm_edge.app.serve import Engine, Limits, Server
from minilm_edge.runtime.generation import SamplingSettings, stream_messages

MSG = [{"role": "user", "content": "hello, what is the capital of France?"}]
WAIT = 30          # seconds any wait in these tests may take before it fails


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tinymodel import make_model_dir
    path, _, _ = make_model_dir(tmp_path_factory.mktemp("serve") / "tiny")
    return minilm_edge.load(path)


class Gated:
    """The model with a hand on its decode steps: each waits `delay` seconds, and for `gate` when
    one is given, so a test can hold requests in their slots (queue full, disconnects, timeouts)."""

    def __init__(self, model, delay=0.0):
        self._m, self.delay, self.gate, self.steps = model, delay, threading.Event(), 0
        self.gate.set()

    def decode_batch(self, tokens, caches):
        self.gate.wait(WAIT)
        time.sleep(self.delay)
        self.steps += 1
        return self._m.decode_batch(tokens, caches)

    def __getattr__(self, name):
        return getattr(self._m, name)


@contextlib.contextmanager
def running(model, api_key=None, **limits):
    """The server on a free port in this process; always stopped at the end."""
    engine = Engine(model, Limits(**limits))
    log = io.StringIO()
    httpd = Server(("127.0.0.1", 0), engine, "tiny", "test-version", api_key, log=log)
    loop = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    loop.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", engine, log
    finally:
        if hasattr(model, "gate"):
            model.gate.set()
        engine.close(0)
        httpd.shutdown()
        httpd.server_close()


def client(url, key="none", timeout=WAIT):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=timeout)


def wait_until(cond, what):
    end = time.monotonic() + WAIT
    while not cond():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def post(url, body: bytes, headers=None):
    """(status, headers, JSON) of a raw POST, for what the openai client does not send."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=WAIT) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def assert_openai_error(body, status_type):
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == status_type and body["error"]["message"]


# ---- chat completions
def test_chat_matches_the_runtime_and_counts_usage(tiny):
    expected = stream_messages(tiny, MSG, settings=SamplingSettings(max_new_tokens=12))
    text = "".join(expected)
    with running(tiny) as (url, _, log):
        r = client(url).chat.completions.create(model="tiny", messages=MSG, max_tokens=12)
    assert r.object == "chat.completion" and r.model == "tiny"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == ("length" if expected.finish_reason == "length" else "stop")
    assert r.usage.prompt_tokens == len(tiny.tokenizer.encode_chat(MSG))
    assert r.usage.completion_tokens == len(expected.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert re.search(r'"POST /v1/chat/completions" 200 .*completion=\d+', log.getvalue())


def test_conversation_log_records_served_turns_only_when_on(tiny, tmp_path, monkeypatch):
    from minilm_edge.app import convlog
    from minilm_edge.app.serve import _turn_logger
    monkeypatch.setenv("MINILM_EDGE_HOME", str(tmp_path))
    monkeypatch.delenv("MINILM_EDGE_LOG", raising=False)
    assert _turn_logger("tiny", "v1") is None                      # off by default
    monkeypatch.setenv("MINILM_EDGE_LOG", "1")
    expected = "".join(stream_messages(tiny, MSG, settings=SamplingSettings(max_new_tokens=8)))
    engine = Engine(tiny, Limits())
    httpd = Server(("127.0.0.1", 0), engine, "tiny", "v1", None, log=io.StringIO())
    httpd.turn_log = _turn_logger("tiny", "v1")
    loop = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    loop.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        client(url).chat.completions.create(model="tiny", messages=MSG, max_tokens=8)
        list(client(url).chat.completions.create(model="tiny", messages=MSG, max_tokens=8, stream=True))
    finally:
        engine.close(0)
        httpd.shutdown()
        httpd.server_close()
    rows = convlog.turns()
    assert [(r["source"], r["model"], r["model_version"]) for r in rows] == [("serve", "tiny", "v1")] * 2
    assert all(r["prompt"] == MSG[0]["content"] and r["answer"] == expected for r in rows)
    assert all(r["answer_tokens"] >= 1 and r["prompt_tokens"] == len(tiny.tokenizer.encode_chat(MSG)) for r in rows)


def test_streamed_chat_equals_the_non_streamed_answer(tiny):
    with running(tiny) as (url, _, _):
        c = client(url)
        whole = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=16)
        chunks = list(c.chat.completions.create(model="tiny", messages=MSG, max_tokens=16, stream=True,
                                                stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
    assert "".join(pieces) == whole.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_string_cuts_the_answer(tiny):
    with running(tiny) as (url, _, _):
        c = client(url)
        full = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=24).choices[0].message.content
        stop = full[6:8]
        assert len(stop) == 2, "the tiny model's answer is too short for this test"
        cut = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=24, stop=[stop])
        streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="tiny", messages=MSG, max_tokens=24, stop=stop, stream=True))
    assert cut.choices[0].message.content == full[:full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert streamed == full[:full.find(stop)]


def test_seed_reproduces_a_sampled_answer(tiny):
    kw = dict(model="tiny", messages=MSG, max_tokens=24, temperature=1.0, top_p=0.95)
    with running(tiny) as (url, _, _):
        c = client(url)
        a = c.chat.completions.create(seed=7, **kw).choices[0].message.content
        b = c.chat.completions.create(seed=7, **kw).choices[0].message.content
        other = c.chat.completions.create(seed=8, **kw).choices[0].message.content
    assert a == b
    assert a != other


def test_concurrent_requests_share_the_batch_and_match_alone(tiny):
    slow = Gated(tiny, delay=0.01)
    prompts = [[{"role": "user", "content": f"question number {i}"}] for i in range(5)]
    alone = ["".join(stream_messages(tiny, p, settings=SamplingSettings(max_new_tokens=10))) for p in prompts]
    with running(slow, max_batch=4) as (url, engine, _):
        c = client(url)
        out = [None] * len(prompts)
        peak = [0]

        def ask(i):
            out[i] = c.chat.completions.create(model="tiny", messages=prompts[i], max_tokens=10)

        def watch():
            while any(o is None for o in out):
                peak[0] = max(peak[0], engine.counts()[0])
                time.sleep(0.005)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))] + [threading.Thread(
            target=watch)]
        [t.start() for t in threads]
        [t.join(WAIT) for t in threads]
    assert [o.choices[0].message.content for o in out] == alone
    assert peak[0] > 1, "requests were never decoded together"


# ---- completions (what lm-evaluation-harness's local-completions sends)
def test_completions_echo_logprobs_score_the_prompt(tiny):
    prompt = "the capital of France and"
    ids = tiny.tokenizer.encode(prompt)
    logits = tiny.forward(ids).astype(np.float64)                     # [T, V]
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(
        1, keepdims=True)
    with running(tiny) as (url, _, _):
        c = client(url)
        r = c.completions.create(model="tiny", prompt=prompt, max_tokens=1, logprobs=2, echo=True, temperature=0)
        ids_in = c.completions.create(model="tiny", prompt=[ids, ids], max_tokens=0, logprobs=1, echo=True)
    ch = r.choices[0]
    lp = ch.logprobs
    assert ch.text.startswith(prompt) and len(lp.tokens) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = [logp[i, ids[i + 1]] for i in range(len(ids) - 1)]
    np.testing.assert_allclose(lp.token_logprobs[1:len(ids)], want, atol=1e-4)
    nxt = int(np.argmax(logits[-1]))                                  # greedy: the most likely token
    assert lp.token_logprobs[-1] == pytest.approx(logp[-1, nxt], abs=1e-4)
    assert all(len(t) <= 2 for t in lp.top_logprobs[1:])
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 1
    # token ids in, two prompts, nothing generated: the same scores, once per prompt
    assert [c.index for c in ids_in.choices] == [0, 1]
    for c in ids_in.choices:
        np.testing.assert_allclose(c.logprobs.token_logprobs[1:], want, atol=1e-4)


def test_streamed_completion_equals_the_runtime(tiny):
    expected = "".join(tiny.stream("the capital", settings=SamplingSettings(max_new_tokens=10)))
    with running(tiny) as (url, _, _):
        chunks = list(client(url).completions.create(model="tiny", prompt="the capital", max_tokens=10, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


# ---- errors, as OpenAI-style JSON
@pytest.mark.parametrize("field, value", [("temperature", 3), ("top_p", -1), ("max_tokens", 0), ("max_tokens", 10**6),
                                          ("stop", ["a", "b", "c", "d", "e"]), ("seed", "x"), ("n", 2),
                                          ("messages", []), ("frequency_penalty", 0.5)])
def test_bad_parameters_are_400_with_openai_error_json(tiny, field, value):
    body = {"model": "tiny", "messages": MSG, field: value}
    with running(tiny) as (url, _, _):
        status, _, err = post(url + "/v1/chat/completions", json.dumps(body).encode())
        with pytest.raises(openai.BadRequestError) as e:
            client(url).chat.completions.create(**body)
    assert status == 400
    assert_openai_error(err, "invalid_request_error")
    assert err["error"]["param"] == field
    assert e.value.status_code == 400


def test_unknown_model_is_404_and_not_json_is_400(tiny):
    with running(tiny) as (url, _, _):
        with pytest.raises(openai.NotFoundError) as e:
            client(url).chat.completions.create(model="gpt-4", messages=MSG)
        status, _, err = post(url + "/v1/chat/completions", b"{not json")
    assert e.value.body["code"] == "model_not_found"
    assert status == 400
    assert_openai_error(err, "invalid_request_error")


def test_prompt_longer_than_the_context_is_400(tiny):
    long = [{"role": "user", "content": "hello " * 200}]              # the tiny model holds 128 positions
    with running(tiny) as (url, _, _):
        with pytest.raises(openai.BadRequestError) as e:
            client(url).chat.completions.create(model="tiny", messages=long)
        with pytest.raises(openai.BadRequestError) as e2:
            client(url).completions.create(model="tiny", prompt="hello " * 200, max_tokens=0, echo=True, logprobs=0)
    assert e.value.body["code"] == e2.value.body["code"] == "context_length_exceeded"


class Broken(Gated):
    """A model whose first decode step hits a bug."""

    def decode_batch(self, tokens, caches):
        if self.steps == 0:
            self.steps += 1
            raise RuntimeError("a bug")
        return super().decode_batch(tokens, caches)


def test_a_bug_in_a_step_is_a_500_and_the_server_goes_on(tiny):
    with running(Broken(tiny)) as (url, engine, _):
        with pytest.raises(openai.InternalServerError) as e:
            client(url).chat.completions.create(model="tiny", messages=MSG, max_tokens=4)
        after = client(url).chat.completions.create(model="tiny", messages=MSG, max_tokens=4)
        free = engine.decoder.free_slots
    assert e.value.body["type"] == "server_error" and "RuntimeError" in e.value.body["message"]
    assert after.usage.completion_tokens >= 1 and free == engine.limits.max_batch


class Poisoned(Gated):
    """A model whose prefill gives non-finite logits for one prompt (`bad`, token ids)."""

    def __init__(self, model, bad, delay=0.0):
        super().__init__(model, delay)
        self.bad = bad

    def prefill_batch(self, prompts, caches):
        logits = self._m.prefill_batch(prompts, caches)
        for row, ids in zip(logits, prompts):
            if list(ids) == self.bad:
                row[:] = np.nan
        return logits


def test_a_prompt_that_fails_its_prefill_fails_alone(tiny):
    """A joining prompt whose prefill fails (non-finite logits) gets a 500; the requests already being
    decoded go on to their own answers."""
    bad_msg = [{"role": "user", "content": "this prompt breaks the model"}]
    alone = "".join(stream_messages(tiny, MSG, settings=SamplingSettings(max_new_tokens=40)))
    model = Poisoned(tiny, tiny.tokenizer.encode_chat(bad_msg), delay=0.01)
    with running(model, max_batch=4) as (url, engine, _):
        c, out = client(url), []
        first = threading.Thread(target=lambda: out.append(
            c.chat.completions.create(model="tiny", messages=MSG, max_tokens=40)))
        first.start()
        wait_until(lambda: model.steps >= 2, "the first request to be decoding")
        with pytest.raises(openai.InternalServerError) as e:
            c.chat.completions.create(model="tiny", messages=bad_msg, max_tokens=40)
        first.join(WAIT)
        free = engine.decoder.free_slots
    assert "non-finite" in e.value.body["message"] and e.value.body["type"] == "server_error"
    assert len(out) == 1 and out[0].choices[0].message.content == alone
    assert free == 4


def test_api_key_is_checked(tiny):
    with running(tiny, api_key="s3cret") as (url, _, _):
        with pytest.raises(openai.AuthenticationError) as e:
            client(url, key="wrong").chat.completions.create(model="tiny", messages=MSG, max_tokens=2)
        ok = client(url, key="s3cret").chat.completions.create(model="tiny", messages=MSG, max_tokens=2)
        models = client(url, key="s3cret").models.list()
        with urllib.request.urlopen(url + "/health", timeout=WAIT) as r:     # health needs no key
            health = json.loads(r.read())
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    assert ok.usage.completion_tokens >= 1
    assert [m.id for m in models.data] == ["tiny"]
    assert health["status"] == "ok" and health["model"] == "tiny"


def test_body_too_big_is_413(tiny):
    with running(tiny, max_body=2000) as (url, _, _):
        with pytest.raises(openai.APIStatusError) as e:
            client(url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x" * 5000}])
        small = client(url).chat.completions.create(model="tiny", messages=MSG, max_tokens=2)
    assert e.value.status_code == 413
    assert_openai_error(e.value.response.json(), "invalid_request_error")
    assert small.choices[0].message.content is not None


def test_full_queue_is_429_with_retry_after(tiny):
    gated = Gated(tiny)
    gated.gate.clear()                                # decode steps wait: requests stay where they are
    with running(gated, max_batch=1, max_queue=1) as (url, engine, _):
        c = client(url)
        results = []
        ask = lambda: results.append(c.chat.completions.create(model="tiny", messages=MSG, max_tokens=3))
        first, second = threading.Thread(target=ask), threading.Thread(target=ask)
        first.start()
        wait_until(lambda: engine.counts() == (1, 0), "the first request to take the slot")
        second.start()
        wait_until(lambda: engine.counts() == (1, 1), "the second request to wait")
        status, headers, err = post(url + "/v1/chat/completions", json.dumps(
            {"model": "tiny", "messages": MSG}).encode())
        gated.gate.set()
        first.join(WAIT)
        second.join(WAIT)
    assert status == 429 and int(headers["Retry-After"]) >= 1
    assert_openai_error(err, "rate_limit_error")
    assert len(results) == 2 and all(r.choices[0].finish_reason for r in results)


def test_client_that_disconnects_frees_its_slot(tiny):
    slow = Gated(tiny, delay=0.02)
    with running(slow, max_batch=2) as (url, engine, log):
        stream = client(url).chat.completions.create(model="tiny", messages=MSG, max_tokens=100, stream=True)
        next(iter(stream))                            # the first chunk: the request holds a slot
        assert engine.counts()[0] == 1
        stream.close()                                # the client goes away mid-answer
        wait_until(lambda: engine.counts() == (0, 0) and engine.decoder.free_slots == 2, "the slot to be freed")
        steps = slow.steps
    assert steps < 90, "the answer ran on after its client left"
    wait_until(lambda: "client went away" in log.getvalue(), "the access log line")


def test_request_timeout_is_an_error(tiny):
    slow = Gated(tiny, delay=0.05)
    with running(slow, timeout=0.3) as (url, engine, _):
        with pytest.raises(openai.APIStatusError) as e:
            client(url).chat.completions.create(model="tiny", messages=MSG, max_tokens=100)
        wait_until(lambda: engine.decoder.free_slots == engine.limits.max_batch, "the slot to be freed")
    assert e.value.status_code == 504 and e.value.body["type"] == "timeout_error"


def test_shutdown_cuts_a_running_stream_with_an_error(tiny):
    slow = Gated(tiny, delay=0.02)
    with running(slow) as (url, engine, _):
        stream = client(url).chat.completions.create(model="tiny", messages=MSG, max_tokens=100, stream=True)
        it = iter(stream)
        next(it)
        engine.close(0)                               # no grace: what runs is cut
        with pytest.raises(openai.APIError, match="shut down"):
            for _ in it:
                pass
        status, _, err = post(url + "/v1/chat/completions", json.dumps({"model": "tiny", "messages": MSG}).encode())
    assert status == 503
    assert_openai_error(err, "server_error")


# ---- the command
def test_non_loopback_needs_an_api_key(tiny, capsys, monkeypatch):
    monkeypatch.delenv("MINILM_EDGE_API_KEY", raising=False)
    assert cli.main(["serve", str(tiny.path), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--api-key" in err[0]


def _start(args, env=None):
    proc = subprocess.Popen([sys.executable, "-m", "minilm_edge", "serve", *args, "--port", "0"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    lines = []
    end = time.monotonic() + 120
    while time.monotonic() < end:
        line = proc.stderr.readline()
        lines.append(line)
        m = re.search(r"at (http://\S+)/ ", line)
        if m:
            return proc, m.group(1)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    pytest.fail("the server did not start: " + "".join(lines))


def stop(proc):
    """SIGTERM, then SIGKILL if the server has not exited within two minutes."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_sigterm_finishes_requests_in_flight_then_exits_0(tiny):
    proc, url = _start([str(tiny.path), "--shutdown-grace", "60"])
    try:
        stream = client(url, timeout=120).chat.completions.create(model="tiny", messages=MSG, max_tokens=60,
                                                                  stream=True)
        it = iter(stream)
        next(it)
        proc.send_signal(signal.SIGTERM)
        rest = list(it)                               # the answer still ends normally
        rc = proc.wait(120)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rest and rest[-1].choices[0].finish_reason in ("stop", "length")
    assert rc == 0
    assert "shutting down" in err and "stopped" in err and "Traceback" not in err


def test_sigterm_ends_the_server_even_when_its_log_reader_is_gone(tiny):
    proc, url = _start([str(tiny.path)])
    try:
        proc.stderr.close()                           # whoever read the log quit (a `| head`, a closed terminal)
        client(url).chat.completions.create(model="tiny", messages=MSG, max_tokens=2)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0


@pytest.mark.real_model
def test_real_model_answers_the_question(real_model_dir):
    proc, url = _start([str(real_model_dir)])
    try:
        c = client(url, timeout=300)                  # the first answer may compile kernels (a busy machine)
        model = c.models.list().data[0].id
        question = [{"role": "user", "content": "What is the capital of France?"}]
        r = c.chat.completions.create(model=model, messages=question, max_tokens=24, temperature=0)
    finally:
        stop(proc)
    assert "Paris" in r.choices[0].message.content
