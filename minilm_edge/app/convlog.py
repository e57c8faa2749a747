"""The conversation log: an opt-in record of prompts and answers, for checking a model on real use.

Off by default. It is on when the environment says MINILM_EDGE_LOG=1 (0 turns it off whatever the
store says), else when the store's settings file `<home>/config.json` holds {"conversation_log": true}.
Each turn is one row of `<home>/conversations.sqlite`: time, which front end wrote it (chat, serve),
the model's name and version, the prompt, the answer, and timing (prompt tokens, answer tokens,
seconds). `check --from-log --since 7d` samples it as operational text (app/check.py).

`record(...)` is the one call a front end makes per turn; it does nothing when the log is off.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import time
from pathlib import Path

from ..errors import UsageError
from ..formats.home import default_home
from ..formats.manifest import manifest_digest

ENV = "MINILM_EDGE_LOG"
SETTING = "conversation_log"          # key of <home>/config.json
DB_NAME = "conversations.sqlite"
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}

SCHEMA = """
CREATE TABLE IF NOT EXISTS turns (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,              -- seconds since the epoch (UTC)
    source TEXT NOT NULL,            -- chat, serve
    model TEXT NOT NULL,             -- folder name
    model_version TEXT NOT NULL,     -- see model_version()
    prompt TEXT NOT NULL,
    answer TEXT NOT NULL,
    prompt_tokens INTEGER,
    answer_tokens INTEGER,
    seconds REAL
)"""


def _home(home) -> Path:
    return Path(home) if home is not None else default_home()


def enabled(home=None) -> bool:
    """Whether turns are logged: $MINILM_EDGE_LOG if set, else <home>/config.json, else off."""
    env = os.environ.get(ENV)
    if env is not None:
        value = env.strip().lower()
        if value not in _TRUE | _FALSE:
            raise UsageError(f"{ENV}={env!r}: use 1 to log conversations or 0 not to")
        return value in _TRUE
    return bool(store_settings(home).get(SETTING, False))


def store_settings(home=None) -> dict:
    """<home>/config.json as a dict ({} when absent); one clear error when it is not a JSON object."""
    path = _home(home) / "config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path} is not valid JSON ({e}); fix or remove it") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} must hold a JSON object such as {{\"{SETTING}\": true}}")
    if SETTING in data and not isinstance(data[SETTING], bool):
        raise UsageError(f"{path}: \"{SETTING}\" must be true or false, got {data[SETTING]!r}")
    return data


def model_name(arg, folder) -> str:
    """How the user named the model: a store reference as given (smollm2-135m-instruct-awq, NAME:TAG),
    a folder by its name (a store version's folder is named by its digest, which says nothing)."""
    return Path(folder).name if arg is None or Path(str(arg)).expanduser().exists() else str(arg)


_VERSIONS: dict = {}


def model_version(folder) -> str:
    """A model folder's version: "manifest:<digest>" (the store's version name, formats/manifest.py)
    when the folder has a manifest, else "weights:<sha256 over its *.safetensors files>" (first 16 hex
    digits). The weights' hash is computed once per folder and modification time in a process."""
    folder = Path(folder)
    digest = manifest_digest(folder)
    if digest is not None:
        return f"manifest:{digest[:16]}"
    files = sorted(folder.glob("*.safetensors"))
    key = (str(folder.resolve()), tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files))
    if key not in _VERSIONS:
        h = hashlib.sha256()
        for f in files:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        _VERSIONS[key] = f"weights:{h.hexdigest()[:16]}"
    return _VERSIONS[key]


def _connect(home) -> sqlite3.Connection:
    path = _home(home) / DB_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=10)
    con.execute(SCHEMA)
    return con


def record(model: str, model_version: str, prompt: str, answer: str, *, prompt_tokens: int | None = None,
           answer_tokens: int | None = None, seconds: float | None = None, source: str = "chat",
           home=None) -> bool:
    """Log one turn if the log is on (see `enabled`); returns whether it was written."""
    if not enabled(home):
        return False
    with _connect(home) as con:
        con.execute("INSERT INTO turns (time, source, model, model_version, prompt, answer, prompt_tokens, "
                    "answer_tokens, seconds) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (time.time(), source, model, model_version, prompt, answer, prompt_tokens,
                     answer_tokens, seconds))
    con.close()
    return True


_SPAN = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str) -> float:
    """"7d", "12h", "30m", "90s", "2w" -> seconds."""
    m = _SPAN.fullmatch(str(text).strip().lower())
    if not m or float(m.group(1)) <= 0:
        raise UsageError(f"--since {text!r}: give a positive duration such as 7d, 12h, 30m or 2w")
    return float(m.group(1)) * _UNIT[m.group(2)]


def turns(since_seconds: float | None = None, *, limit: int | None = None, model: str | None = None,
          home=None) -> list[dict]:
    """Logged turns of the last `since_seconds` (all if None), oldest first; at most `limit`, the most
    recent ones. An empty list when nothing was logged."""
    path = _home(home) / DB_NAME
    if not path.is_file():
        return []
    where, params = [], []
    if since_seconds is not None:
        where.append("time >= ?")
        params.append(time.time() - since_seconds)
    if model is not None:
        where.append("model = ?")
        params.append(model)
    sql = "SELECT * FROM turns" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY time DESC"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    con = _connect(home)
    con.row_factory = sqlite3.Row
    try:
        rows = [dict(r) for r in con.execute(sql, params)]
    finally:
        con.close()
    return rows[::-1]


def operational_text(rows: list[dict]) -> str:
    """The logged turns as one text to score: each prompt and its answer, turns separated by a blank line."""
    return "\n\n".join(f"{r['prompt']}\n{r['answer']}" for r in rows) + "\n"
