"""The conversation log (app/convlog.py): off by default, on by $MINILM_EDGE_LOG or <home>/config.json,
written by chat one row per turn, and read back by `check --from-log`."""
import io
import json
import sqlite3

import pytest

from minilm_edge.app import check, convlog
from minilm_edge.app.cli import main


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILM_EDGE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(convlog.ENV, raising=False)
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


def chat(model_dir, lines, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    code = main(["chat", str(model_dir), "--max-new-tokens", "5"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_off_by_default(tiny_model_dir, home, capsys, monkeypatch):
    chat(tiny_model_dir, ["Hello", "What is the capital of France?"], capsys, monkeypatch)
    assert not convlog.enabled()
    assert not (home / convlog.DB_NAME).exists()
    assert convlog.record("m", "v", "p", "a") is False and not (home / convlog.DB_NAME).exists()


def test_chat_logs_each_turn_when_on(tiny_model_dir, home, capsys, monkeypatch):
    monkeypatch.setenv(convlog.ENV, "1")
    out = chat(tiny_model_dir, ["Hello", "/reset", "What is the capital of France?"], capsys, monkeypatch)
    rows = convlog.turns()
    assert [r["prompt"] for r in rows] == ["Hello", "What is the capital of France?"]
    assert [r["answer"] for r in rows] == out.splitlines()          # what the user saw, in order
    for r in rows:
        assert r["source"] == "chat" and r["model"] == tiny_model_dir.name
        assert r["model_version"] == convlog.model_version(tiny_model_dir) and r["model_version"].startswith("weights:")
        assert 0 < r["answer_tokens"] <= 5 and r["prompt_tokens"] > 0 and r["seconds"] > 0
    con = sqlite3.connect(home / convlog.DB_NAME)
    assert con.execute("SELECT COUNT(*) FROM turns").fetchone()[0] == 2
    con.close()


@pytest.mark.parametrize("env, setting, on", [
    (None, True, True), (None, False, False), ("0", True, False), ("1", False, True), ("yes", None, True)])
def test_the_setting_and_the_environment(home, monkeypatch, env, setting, on):
    if env is not None:
        monkeypatch.setenv(convlog.ENV, env)
    if setting is not None:
        (home / "config.json").write_text(json.dumps({convlog.SETTING: setting}))
    assert convlog.enabled() is on
    assert convlog.record("m", "v", "p", "a", prompt_tokens=1, answer_tokens=1, seconds=0.1) is on


@pytest.mark.parametrize("env, config, pattern", [
    ("maybe", None, "MINILM_EDGE_LOG='maybe'"),
    (None, "[1]", "must hold a JSON object"),
    (None, '{"conversation_log": "yes"}', "must be true or false"),
    (None, "{", "not valid JSON"),
])
def test_bad_settings_are_usage_errors(tiny_model_dir, home, capsys, monkeypatch, env, config, pattern):
    if env is not None:
        monkeypatch.setenv(convlog.ENV, env)
    if config is not None:
        (home / "config.json").write_text(config)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    assert main(["chat", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 2 and pattern in err      # the "loaded ..." line, then the error


@pytest.mark.parametrize("text, seconds", [("7d", 7 * 86400), ("12h", 43200), ("30m", 1800), ("2w", 1209600),
                                           ("1.5h", 5400), ("90s", 90)])
def test_parse_since(text, seconds):
    assert convlog.parse_since(text) == seconds


def test_since_and_limit_select_recent_turns(home, monkeypatch):
    monkeypatch.setenv(convlog.ENV, "1")
    clock = iter([1000.0, 2000.0, 3000.0])
    monkeypatch.setattr(convlog.time, "time", lambda: next(clock))
    for p in "abc":
        convlog.record("m", "v", p, p.upper())
    monkeypatch.setattr(convlog.time, "time", lambda: 3500.0)
    assert [r["prompt"] for r in convlog.turns(1600)] == ["b", "c"]
    assert [r["prompt"] for r in convlog.turns(limit=2)] == ["b", "c"]
    assert convlog.operational_text(convlog.turns(600)) == "c\nC\n"


def test_check_from_log_scores_the_logged_turns(tiny_model_dir, home, capsys, monkeypatch):
    monkeypatch.setenv(convlog.ENV, "1")
    chat(tiny_model_dir, ["Hello there, the capital of France is?", "And of Italy?"], capsys, monkeypatch)
    text = convlog.operational_text(convlog.turns())
    code = main(["check", str(tiny_model_dir), "--baseline", str(tiny_model_dir), "--from-log", "--since", "1d"])
    out, err = capsys.readouterr()
    assert code == 0, err
    rec = check.history()[-1]
    assert rec["data"] == "log:1d:2 turns" and rec["data_sha256"] == check._sha256(text)
    assert rec["metrics"]["kl_mean"] == 0 and rec["metrics"]["same_top"] == 1


def test_a_store_reference_is_named_as_given(tmp_path):
    version = tmp_path / ("ab" * 32)                   # a store version's folder: named by its digest
    version.mkdir()
    assert convlog.model_name("smollm2-135m-instruct-awq:latest", version) == "smollm2-135m-instruct-awq:latest"
    assert convlog.model_name(str(version), version) == version.name
    assert convlog.model_name(None, version) == version.name
