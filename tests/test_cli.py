"""The CLI in-process, with scripted stdin; every error is one line on stderr and an exit code."""
import io
import json

import pytest

from minilm_edge.app.cli import main
from tinymodel import make_model_dir


def run(argv, capsys, monkeypatch, stdin=""):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


COMMANDS = ["chat", "generate", "pull", "import-gguf", "quantize", "bench", "eval", "export-awq", "inspect",
            "sensitivity"]


def test_help_everywhere_has_examples(capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    listed = capsys.readouterr().out
    for cmd in COMMANDS:
        assert f"\n    {cmd} " in listed or f"\n    {cmd}\n" in listed, cmd
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "example" in capsys.readouterr().out, cmd


def test_scripted_chat_transcript(tiny_model_dir, capsys, monkeypatch):
    code, out, err = run(["chat", str(tiny_model_dir), "--max-new-tokens", "4", "--system", "be brief"],
                         capsys, monkeypatch, stdin="hello\n\n/reset\nthe capital\n")
    assert code == 0, err
    import minilm_edge
    model = minilm_edge.load(tiny_model_dir)
    system = {"role": "system", "content": "be brief"}
    first = model.chat([system, {"role": "user", "content": "hello"}], max_new_tokens=4)
    second = model.chat([system, {"role": "user", "content": "the capital"}], max_new_tokens=4)  # after /reset
    assert out == f"{first}\n{second}\n"                # two answers, each ended by a newline
    assert "(new conversation)" in err


def test_chat_answers_match_library(tiny_model_dir, capsys, monkeypatch):
    import minilm_edge
    model = minilm_edge.load(tiny_model_dir)
    expected = model.chat([{"role": "user", "content": "hello"}], max_new_tokens=5)
    code, out, _ = run(["chat", str(tiny_model_dir), "--max-new-tokens", "5"], capsys, monkeypatch, "hello\n")
    assert code == 0 and out == expected + "\n"


def test_generate(tiny_model_dir, capsys, monkeypatch):
    import minilm_edge
    expected = minilm_edge.load(tiny_model_dir).generate("hello", max_new_tokens=5)
    code, out, err = run(["generate", str(tiny_model_dir), "--prompt", "hello", "--max-new-tokens", "5",
                          "--temperature", "0"], capsys, monkeypatch)
    assert code == 0 and out == expected + "\n"
    code, out, _ = run(["generate", str(tiny_model_dir), "--prompt", "hello", "--chat", "--max-new-tokens",
                        "3", "--temperature", "0.7", "--top-p", "0.9", "--top-k", "5", "--seed", "3"],
                       capsys, monkeypatch)
    sampled = minilm_edge.load(tiny_model_dir).generate("hello", chat=True, max_new_tokens=3, temperature=0.7,
                                                         top_p=0.9, top_k=5, seed=3)
    assert code == 0 and out == sampled + "\n"


def one_line_error(code, err, expected_code, pattern):
    assert code == expected_code
    lines = err.strip("\n").split("\n")
    assert lines[-1].startswith("minilm-edge: error:") and err.count("minilm-edge: error") == 1, err
    assert pattern in lines[-1], err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, code, pattern", [
    (["generate", "{model}", "--prompt", ""], 2, "prompt is empty"),
    (["generate", "{model}", "--prompt", "hi", "--top-p", "2"], 2, "top_p"),
    (["generate", "{model}", "--prompt", "hi", "--max-new-tokens", "x"], 2, "invalid int value"),
    (["generate", "{model}"], 2, "--prompt"),
    (["chat", "{model}", "--bogus"], 2, "unrecognized arguments"),
    (["frobnicate"], 2, "invalid choice"),
    (["generate", "{missing}", "--prompt", "hi"], 1, "not an existing folder"),
    (["generate", "{model}", "--prompt", "hello " * 200, "--ctx", "16"], 1, "tokens but the context holds 16"),
    (["pull", "no-such-model"], 1, "smollm2-135m-instruct"),
    (["import-gguf", "{missing}", "{tmp}/out"], 1, "not found"),
])
def test_errors_are_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch, argv, code, pattern):
    monkeypatch.setenv("MINILM_EDGE_HOME", str(tmp_path / "home"))
    argv = [a.format(model=tiny_model_dir, missing=tmp_path / "missing", tmp=tmp_path) for a in argv]
    got, out, err = run(argv, capsys, monkeypatch)
    one_line_error(got, err, code, pattern)


def test_corrupt_weights_and_unknown_architecture(tmp_path, capsys, monkeypatch):
    path, cfg, _ = make_model_dir(tmp_path / "m")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    one_line_error(*run(["generate", str(path), "--prompt", "hi"], capsys, monkeypatch)[::2], 1, "truncated")
    path, cfg, _ = make_model_dir(tmp_path / "n")
    (path / "config.json").write_text(json.dumps(dict(cfg, model_type="bert")))
    one_line_error(*run(["chat", str(path)], capsys, monkeypatch, "hi\n")[::2], 1, "bert")


def test_chat_empty_input_exits_cleanly(tiny_model_dir, capsys, monkeypatch):
    code, out, err = run(["chat", str(tiny_model_dir)], capsys, monkeypatch, stdin="\n  \n")
    assert code == 0 and out == ""
    assert err.startswith("loaded ") and err.count("\n") == 1, err     # the load line, nothing else


def test_ctrl_c_stops_the_answer_not_the_chat(tiny_model_dir, capsys, monkeypatch):
    """A KeyboardInterrupt during an answer ends that answer; the next line is still answered."""
    import minilm_edge
    from minilm_edge.runtime.model import Model
    real_forward = Model.forward
    calls = {"n": 0}

    def interrupt_first(self, *args, **kw):        # Ctrl-C lands in the first answer's prefill
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        return real_forward(self, *args, **kw)

    monkeypatch.setattr(Model, "forward", interrupt_first)
    code, out, err = run(["chat", str(tiny_model_dir), "--max-new-tokens", "3"], capsys, monkeypatch,
                         stdin="hello\nthe\n")
    monkeypatch.undo()
    # The stopped answer (empty) stays in the conversation, as the user saw it.
    conversation = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": ""},
                    {"role": "user", "content": "the"}]
    expected = minilm_edge.load(tiny_model_dir).chat(conversation, max_new_tokens=3)
    assert code == 0 and err.count("(stopped)") == 1 and calls["n"] > 1
    assert out == expected + "\n"


def test_bench_json(tmp_path, capsys, monkeypatch):
    path, _, _ = make_model_dir(tmp_path / "m", max_position_embeddings=256)
    code, out, err = run(["bench", str(path), "--runs", "1", "--prompt-tokens", "16", "--new-tokens", "4",
                          "--json"], capsys, monkeypatch)
    assert code == 0, err
    res = json.loads(out)
    for key in ("load_s", "time_to_first_token_s", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_mb",
                "weight_bytes_per_token", "memory_bandwidth_gb_s", "fraction_of_floor"):
        assert res[key] > 0, key


def test_a_negative_seed_is_a_bad_flag(tiny_model_dir, capsys, monkeypatch):
    code, out, err = run(["generate", str(tiny_model_dir), "--prompt", "hi", "--seed", "-1"], capsys, monkeypatch)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "seed" in err


def test_a_bad_generation_config_is_the_model_folders_fault(tiny_model_dir, capsys, monkeypatch):
    # exit 1 (a model-folder problem), not 2: no flag was wrong
    (tiny_model_dir / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_p": "x"}))
    code, out, err = run(["generate", str(tiny_model_dir), "--prompt", "hi"], capsys, monkeypatch)
    assert code == 1 and out == ""
    assert _error_lines(err) == [l for l in err.splitlines() if "generation_config.json" in l]


def test_a_prompt_that_is_not_utf8_is_a_usage_error(tiny_model_dir, capsys, monkeypatch):
    # argv bytes that are not UTF-8 arrive as lone surrogates (Python's surrogateescape)
    code, out, err = run(["generate", str(tiny_model_dir), "--prompt", "caf\udce9"], capsys, monkeypatch)
    assert code == 2 and out == ""
    assert _error_lines(err) == [l for l in err.splitlines() if "not valid UTF-8" in l]


def _error_lines(err):
    lines = [l for l in err.splitlines() if "error" in l]
    assert len(lines) == 1, err                                 # one line, whatever else was said
    return lines


class _Terminal(io.TextIOWrapper):
    def isatty(self):
        return True


@pytest.mark.parametrize("stdin, code, answered", [(_Terminal, 0, True), (io.TextIOWrapper, 2, False)])
def test_a_chat_line_that_is_not_utf8(tiny_model_dir, capsys, monkeypatch, stdin, code, answered):
    # In a terminal the line gets a one-line error and the conversation goes on ("hello" is
    # answered); from a pipe it is a usage error (exit 2). Never an internal error.
    monkeypatch.setattr("sys.stdin", stdin(io.BytesIO(b"caf\xe9\nhello\n"), encoding="utf-8"))
    assert main(["chat", str(tiny_model_dir), "--max-new-tokens", "3"]) == code
    out, err = capsys.readouterr()
    assert _error_lines(err) == [l for l in err.splitlines() if "not valid UTF-8" in l]
    assert bool(out.replace("> ", "").strip()) is answered        # the terminal prints "> " prompts
