"""Tokenizer and chat template of a model folder.

- `tokenizer.json` is read with Hugging Face `tokenizers` (byte-level BPE and friends).
- The chat template comes from `tokenizer_config.json` (`chat_template`, a string or a list of named
  templates) or from a separate `chat_template.jinja`. A template inside a downloaded model folder is
  untrusted code: it is rendered in Jinja2's immutable sandbox (CVE-2024-34359 was remote code
  execution through an unsandboxed chat template), with the same options Hugging Face uses
  (trim_blocks, lstrip_blocks) so the prompt is byte-identical to what the model was trained on.
- `TextStream` turns generated ids into text pieces without ever emitting half a UTF-8 character.
"""
from __future__ import annotations

import datetime
import json
from pathlib import Path

from ..errors import ModelNotFoundError, TokenizerError, UsageError
from .config import read_json


def _token_str(v):
    """tokenizer_config.json spells special tokens as strings or as {"content": ...} objects."""
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


class Tokenizer:
    def __init__(self, model_dir: Path):
        from tokenizers import Tokenizer as HFTokenizer

        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ModelNotFoundError(f"tokenizer.json not found in {model_dir}")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exception subclasses
            raise TokenizerError(f"cannot read {path}: {str(e).splitlines()[0][:200]}") from None
        cfg_path = model_dir / "tokenizer_config.json"
        tcfg = read_json(cfg_path, "tokenizer_config.json") if cfg_path.is_file() else {}
        self.bos_token = _token_str(tcfg.get("bos_token"))
        self.eos_token = _token_str(tcfg.get("eos_token"))
        self.chat_template = _chat_template(model_dir, tcfg)
        self._template = None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    # ---- ids <-> text
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:      # lone surrogates: bytes that were not UTF-8 (argv, stdin)
            raise UsageError("the text is not valid UTF-8 (it holds bytes that decode to no "
                             "character); save or type it as UTF-8") from None
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str):
        return self._tok.token_to_id(token) if token else None

    def special_ids(self) -> set[int]:
        return {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    # ---- chat
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise TokenizerError("this model has no chat template (tokenizer_config.json or chat_template.jinja)")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise UsageError("each chat message must be a dict with string 'role' and 'content'")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        try:
            pieces, size = [], 0
            for piece in self._template.generate(
                    messages=messages, add_generation_prompt=add_generation_prompt,
                    bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                    range=_bounded_range(TEMPLATE_MAX_LOOPS)):
                size += len(piece)
                if size > TEMPLATE_MAX_CHARS:
                    raise TokenizerError(f"the chat template writes more than {TEMPLATE_MAX_CHARS:,} characters")
                pieces.append(piece)
            return "".join(pieces)
        except TokenizerError:
            raise
        except Exception as e:   # SecurityError, UndefinedError, TypeError from a broken template
            raise TokenizerError(f"the chat template failed: {type(e).__name__}: {e}") from None

    def encode_chat(self, messages, add_generation_prompt=True) -> list[int]:
        # The rendered text already holds its special tokens: add none (as transformers does).
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)


def _chat_template(model_dir: Path, tcfg: dict):
    tpl = tcfg.get("chat_template")
    if isinstance(tpl, list):   # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default") or next(iter(named.values()), None)
    if tpl is None:
        jinja = model_dir / "chat_template.jinja"
        if jinja.is_file():
            try:
                tpl = jinja.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise TokenizerError(f"{jinja} cannot be read as UTF-8 text: {e}") from None
    return tpl if isinstance(tpl, str) and tpl else None


# A chat template comes with a downloaded model: untrusted code. Jinja2's sandbox keeps it from
# reaching Python; these bound what it may cost. A real template writes the conversation once and
# loops over the messages: a few characters per character of input, a handful of loops.
TEMPLATE_MAX_CHARS = 4 << 20        # characters a render may write, or a string or list it may build
TEMPLATE_MAX_LOOPS = 1 << 20        # iterations of range() in one render, nested loops counted in full
TEMPLATE_MAX_EXPONENT = 1024        # `**` beyond this builds numbers of millions of digits


def _bounded_range(budget: int):
    """range() for one render, refusing once the render's iterations would pass `budget`."""
    left = [budget]

    def bounded(*args):
        r = range(*args)
        left[0] -= len(r)
        if left[0] < 0:
            raise TokenizerError(f"the chat template loops more than {budget:,} times")
        return r
    return bounded


def _compile_template(source: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if (isinstance(seq, (str, list, tuple)) and isinstance(n, int)
                            and len(seq) * n > TEMPLATE_MAX_CHARS):
                        raise TokenizerError(f"the chat template builds a sequence of more than "
                                             f"{TEMPLATE_MAX_CHARS:,} items")
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > TEMPLATE_MAX_EXPONENT:
                raise TokenizerError(f"the chat template raises to a power over {TEMPLATE_MAX_EXPONENT}")
            return super().call_binop(context, operator, left, right)

    def raise_exception(message):
        raise TokenizerError(f"the chat template refused the conversation: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise TokenizerError(f"the chat template does not parse: {e}") from None


class TextStream:
    """Incremental detokenizer: feed ids, get the newly completed text.

    Byte-level BPE can split one UTF-8 character across tokens; decoding a prefix then ends in
    U+FFFD. We decode the ids generated since the last emitted boundary and hold the text back while
    it ends in U+FFFD, so no half character is ever printed.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens=True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.emitted = 0      # characters of decode(self.ids) already handed out
        self.held = 0         # tokens pushed since text was last handed out

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special_tokens=self.skip)
        # A UTF-8 character spans at most 4 bytes, so at most 4 byte-level tokens: hold back a
        # trailing U+FFFD only that long (a model can also emit bytes that never form a character).
        if text.endswith("\ufffd") and self.held < 3:
            self.held += 1
            return ""
        piece = text[self.emitted:]
        self.emitted, self.held = len(text), 0
        if len(self.ids) > 64:
            # Re-anchor so decoding stays O(1) per token. Keep a few ids as left context: some
            # decoders (SentencePiece's Strip) treat the first token of a decode specially.
            self.ids = self.ids[-4:]
            self.emitted = len(self.tok.decode(self.ids, skip_special_tokens=self.skip))
        return piece

    def flush(self) -> str:
        text = self.tok.decode(self.ids, skip_special_tokens=self.skip)
        piece = text[self.emitted:]
        self.ids, self.emitted = [], 0
        return piece
