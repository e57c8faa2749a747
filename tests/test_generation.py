"""Sampling, stopping, streaming text and multi-turn chat on tiny random models."""
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minilm_edge
from minilm_edge.runtime.generation import Sampler, SamplingSettings, _stop_prefix_len, settings_from_generation_config
from minilm_edge.runtime.tokenizer import TextStream
from tinymodel import make_model_dir


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, _, _ = make_model_dir(tmp_path_factory.mktemp("g") / "m")
    return minilm_edge.load(path)


# distinct values: no ties for the argmax
logit_vectors = st.lists(st.integers(-2000, 2000), min_size=2, max_size=40, unique=True).map(
    lambda v: np.array(v) / 100)


@settings(max_examples=50, deadline=None)
@given(logits=logit_vectors, seed=st.integers(0, 1000))
def test_greedy_and_degenerate_sampling_pick_the_argmax(logits, seed):
    best = int(np.argmax(logits))
    assert Sampler(SamplingSettings())(logits, []) == best
    assert Sampler(SamplingSettings(temperature=1.0, top_k=1, seed=seed))(logits, []) == best
    assert Sampler(SamplingSettings(temperature=1.0, top_p=1e-9, seed=seed))(logits, []) == best


@settings(max_examples=30, deadline=None)
@given(logits=logit_vectors, k=st.integers(1, 5), seed=st.integers(0, 1000))
def test_top_k_only_draws_from_the_top_k(logits, k, seed):
    s = Sampler(SamplingSettings(temperature=2.0, top_k=k, seed=seed))
    kth = np.sort(logits)[-min(k, len(logits))]
    for _ in range(10):
        assert logits[s(logits, [])] >= kth


def test_seed_makes_sampling_reproducible():
    logits = np.linspace(0, 3, 50)
    draw = lambda seed: Sampler(SamplingSettings(temperature=1.5, seed=seed))(logits, [])
    a = Sampler(SamplingSettings(temperature=1.5, seed=7))
    b = Sampler(SamplingSettings(temperature=1.5, seed=7))
    assert [a(logits, []) for _ in range(30)] == [b(logits, []) for _ in range(30)]
    assert len({draw(s) for s in range(40)}) > 1


def test_repetition_penalty_pushes_seen_tokens_down():
    logits = np.array([2.0, 1.9, -1.0])
    s = Sampler(SamplingSettings(repetition_penalty=1.5))
    assert s(logits, []) == 0
    assert s(logits, [0]) == 1          # 2.0 / 1.5 < 1.9


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1),
                                 dict(max_new_tokens=0), dict(repetition_penalty=0), dict(stop=("",))])
def test_bad_settings_are_usage_errors(bad):
    with pytest.raises(minilm_edge.UsageError):
        SamplingSettings(**bad)


def test_generation_config_defaults_and_overrides():
    gen = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.1}
    s = settings_from_generation_config(gen)
    assert (s.temperature, s.top_p, s.top_k, s.repetition_penalty) == (0.6, 0.9, 40, 1.1)
    assert settings_from_generation_config(gen, temperature=0.0, top_k=None).temperature == 0.0
    assert settings_from_generation_config({"temperature": 0.6}).temperature == 0.0   # no do_sample: greedy


def test_stop_prefix_len():
    # The hold-back rule is the unit here; through stream() it would need a model that emits chosen text.
    assert _stop_prefix_len("hello wor", ["world"]) == 3
    assert _stop_prefix_len("hello", ["world"]) == 0
    assert _stop_prefix_len("ab", ["b", "abc"]) == 2


def test_greedy_generation_is_deterministic_and_matches_forward(model):
    prompt = "hello the capital"
    g = model.stream(prompt, max_new_tokens=8)
    text = "".join(g)
    ids = model.tokenizer.encode(prompt)
    # Recompute greedily with full forward passes (no cache): the same tokens must come out.
    seq, eos = list(ids), model.eos_ids()
    for _ in range(8):
        nxt = int(np.argmax(model.forward(seq)[-1]))
        if nxt in eos:
            break
        seq.append(nxt)
    assert g.token_ids == seq[len(ids):]
    assert text == g.text == model.tokenizer.decode(g.token_ids, skip_special_tokens=True)
    assert g.finish_reason in ("eos", "length")


def test_max_new_tokens_and_finish_reason(model):
    g = model.stream("the", max_new_tokens=3, temperature=1.0, seed=0)
    text = "".join(g)
    assert len(g.token_ids) == 3 and g.finish_reason == "length"       # seed 0 draws no eos in 3 tokens
    assert text == g.text == model.tokenizer.decode(g.token_ids, skip_special_tokens=True)


def test_stop_string_cuts_the_output(model):
    full = model.stream("hello", max_new_tokens=12)
    text = "".join(full)
    assert len(text) >= 3 and full.finish_reason == "length"           # the fixture's greedy text
    stop = text[1:3]
    g = model.stream("hello", max_new_tokens=12, stop=[stop])
    out = "".join(g)
    assert out == text[:text.find(stop)] and g.finish_reason == "stop"


def test_context_overflow_message_has_counts(model):
    with pytest.raises(minilm_edge.ContextOverflowError, match=r"is \d+ tokens but the context holds 5"):
        model.generate("hello the capital of France", max_context=5)


def test_empty_prompt_and_conversation(model):
    for bad in ("", "   \n"):
        with pytest.raises(minilm_edge.UsageError, match="empty"):
            model.generate(bad)
    with pytest.raises(minilm_edge.UsageError):
        model.chat([])


def test_context_full_stops_generation(model):
    n = len(model.tokenizer.encode("hello"))
    g = model.stream("hello", max_new_tokens=50, max_context=n + 3, temperature=1.0, seed=1)
    text = "".join(g)
    # prompt + 3 tokens fill the context (the third is sampled, never forwarded); seed 1 draws no eos
    assert g.finish_reason == "context" and len(g.token_ids) == 3 and text == g.text


def test_chat_session_reuses_cache_and_matches_fresh_chat(model):
    session = model.chat_session(system="be brief", settings=SamplingSettings(max_new_tokens=6))
    a1 = "".join(session.send("hello"))
    n_after_first = session.cache.length
    a2_gen = session.send("and France")
    assert len(a2_gen.prompt_ids) < len(model.tokenizer.encode_chat(session.messages))  # only new tokens
    a2 = "".join(a2_gen)
    assert session.messages[-1] == {"role": "assistant", "content": a2} and n_after_first > 0
    fresh = model.chat(session.messages[:-1], max_new_tokens=6)
    assert fresh == a2
    session.reset()
    assert session.cache.length == 0 and session.messages == [{"role": "system", "content": "be brief"}]
    assert "".join(session.send("hello")) == a1


@settings(max_examples=60, deadline=None)
@given(text=st.text(min_size=1, max_size=30))
def test_text_stream_never_splits_a_character(model, text):
    """Pushing byte-level tokens one by one yields pieces whose concatenation is the text, and the
    pieces hold no U+FFFD (a half character decoded on its own) beyond those of the text."""
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    stream = TextStream(model.tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert sum(p.count("\ufffd") for p in pieces) == text.count("\ufffd")


def test_chat_template_from_jinja_file_and_named_list(tmp_path):
    path, _, _ = make_model_dir(tmp_path / "m")
    tc = json.loads((path / "tokenizer_config.json").read_text())
    tpl = tc.pop("chat_template")
    (path / "tokenizer_config.json").write_text(json.dumps(tc))
    (path / "chat_template.jinja").write_text(tpl)
    msgs = [{"role": "user", "content": "hi"}]
    expected = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert minilm_edge.load(path).tokenizer.render_chat(msgs) == expected
    (path / "chat_template.jinja").unlink()
    tc["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": tpl}]
    (path / "tokenizer_config.json").write_text(json.dumps(tc))
    assert minilm_edge.load(path).tokenizer.render_chat(msgs) == expected


@pytest.mark.parametrize("evil", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{% set x = messages.append({'role': 'x'}) %}",
    "{{ raise_exception('no system role') }}",
    "{% for m in messages %}{{ m.content | nosuchfilter }}{% endfor %}",
    # resource bombs: each used to run for minutes or take gigabytes; now refused at once
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% set x = 'a' * 10**9 %}{{ x | length }}",
    "{% set x = [0] * 10**9 %}{{ x | length }}",
    "{{ 2 ** 100000000 }}",
    "{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}",
])
def test_untrusted_chat_templates_are_sandboxed(tmp_path, evil):
    path, _, _ = make_model_dir(tmp_path / "m")
    tc = json.loads((path / "tokenizer_config.json").read_text())
    tc["chat_template"] = evil
    (path / "tokenizer_config.json").write_text(json.dumps(tc))
    model = minilm_edge.load(path)
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(minilm_edge.TokenizerError):
        model.tokenizer.render_chat(msgs)
    assert msgs == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("where", ["weight", "rms_norm_eps"])
def test_non_finite_numbers_are_an_error_not_a_silent_answer(tmp_path, where):
    # A NaN weight (or eps) made every logit NaN: greedy chat answered nothing and exited 0,
    # perplexity printed nan. Both are now a typed error naming the cause.
    from safetensors.numpy import load_file, save_file
    path, cfg, _ = make_model_dir(tmp_path / "m")
    if where == "weight":
        w = load_file(str(path / "model.safetensors"))
        w["model.layers.0.mlp.down_proj.weight"][0, 0] = np.nan
        save_file(w, str(path / "model.safetensors"))
        model = minilm_edge.load(path)
    else:
        model = minilm_edge.load(path)
        model.config.__dict__["rms_norm_eps"] = float("nan")      # config.json refuses it (test_checkpoint)
    with pytest.raises(minilm_edge.CheckpointError, match="non-finite"):
        model.generate("hello", max_new_tokens=3)
    with pytest.raises(minilm_edge.CheckpointError, match="non-finite"):
        minilm_edge.perplexity(model, "hello world " * 20, ctx=16)


def test_a_chat_template_file_that_is_not_utf8_is_a_tokenizer_error(tmp_path):
    path, _, _ = make_model_dir(tmp_path / "m")
    tc = json.loads((path / "tokenizer_config.json").read_text())
    del tc["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(tc))
    (path / "chat_template.jinja").write_bytes(b"{{ messages }}\xff\xfe")
    with pytest.raises(minilm_edge.TokenizerError, match="chat_template.jinja"):
        minilm_edge.load(path)
