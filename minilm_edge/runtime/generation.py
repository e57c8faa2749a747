"""Generation: sampling settings, the sampler, the token loop, stop handling and streaming text.

Sampling order (as Hugging Face applies it): repetition penalty -> temperature -> top-k -> top-p
-> draw. Temperature 0 means greedy (argmax). Generation ends at any of the model's eos ids, at a
stop string, at `max_new_tokens`, or when the context is full; `Generation.finish_reason` says which.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..errors import CheckpointError, ContextOverflowError, UnsupportedModelError, UsageError
from .tokenizer import TextStream


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0           # 0: greedy
    top_k: int = 0                     # 0: off
    top_p: float = 1.0                 # 1: off
    repetition_penalty: float = 1.0    # 1: off (HF/CTRL form: divide positive logits, multiply negative)
    seed: int | None = None
    stop: tuple[str, ...] = ()         # stop strings (not included in the output)

    def __post_init__(self):
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}"),
            (self.temperature >= 0 and math.isfinite(self.temperature),
             f"temperature must be ≥ 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be ≥ 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty),
             f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty"),
            (self.seed is None or (isinstance(self.seed, int) and self.seed >= 0),
             f"seed must be a whole number ≥ 0, got {self.seed}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UsageError(msg)


def settings_from_generation_config(gen: dict, **overrides) -> SamplingSettings:
    """Defaults from the model's generation_config.json (HF semantics: no do_sample means greedy),
    then explicit overrides (None values are ignored). A bad value in the file is the model
    folder's fault (UnsupportedModelError), a bad override the caller's (UsageError)."""
    base = {}
    try:
        if gen.get("do_sample"):
            base["temperature"] = float(gen.get("temperature", 1.0))
            base["top_k"] = int(gen.get("top_k", 50) or 0)
            base["top_p"] = float(gen.get("top_p", 1.0))
        if gen.get("repetition_penalty"):
            base["repetition_penalty"] = float(gen["repetition_penalty"])
        if gen.get("max_new_tokens"):
            base["max_new_tokens"] = int(gen["max_new_tokens"])
        SamplingSettings(**base)
    except (UsageError, TypeError, ValueError) as e:
        raise UnsupportedModelError(f"generation_config.json: {e}") from None
    base.update({k: v for k, v in overrides.items() if v is not None})
    if "stop" in base:
        base["stop"] = tuple(base["stop"])
    return SamplingSettings(**base)


def token_probabilities(logits: np.ndarray, temperature: float, top_k: int = 0) -> np.ndarray:
    """softmax(logits / temperature) over each row's top-k logits (0: all; ties with the k-th
    kept), in float64.                                        logits [..., V] -> p [..., V]"""
    z = logits.astype(np.float64) / temperature
    if 0 < top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[..., -top_k:][..., :1]
        z[z < kth] = -np.inf
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return p


def nucleus(p: np.ndarray, top_p: float):
    """Each row's tokens in descending probability (ties: the lower id first) and their
    probabilities, zeroed past the smallest prefix whose mass reaches top_p (the nucleus).
                                                    p [..., V] -> order [..., V], ps [..., V]"""
    order = np.argsort(-p, axis=-1, kind="stable")
    ps = np.take_along_axis(p, order, axis=-1)
    cum = np.cumsum(ps, axis=-1)
    n_keep = (cum < top_p).sum(axis=-1, keepdims=True) + 1      # the first prefix with mass ≥ top_p
    return order, np.where(np.arange(p.shape[-1]) < n_keep, ps, 0.0)


class Sampler:
    def __init__(self, s: SamplingSettings):
        self.s = s
        self.rng = np.random.default_rng(s.seed)

    def __call__(self, logits: np.ndarray, history) -> int:
        """Pick the next id from logits [V] given the ids seen so far (prompt + generated)."""
        s = self.s
        penalize = s.repetition_penalty != 1.0 and len(history)
        if s.temperature == 0 and not penalize:
            return int(np.argmax(logits))       # float32 -> float64 is exact: the same argmax, no copy of [V]
        logits = logits.astype(np.float64)
        if penalize:
            seen = np.unique(np.asarray(history, dtype=np.int64))
            val = logits[seen]
            logits[seen] = np.where(val > 0, val / s.repetition_penalty, val * s.repetition_penalty)
        if s.temperature == 0:
            return int(np.argmax(logits))
        p = token_probabilities(logits, s.temperature, s.top_k)
        if s.top_p < 1.0:
            order, ps = nucleus(p, s.top_p)
            p[order] = ps
            p /= p.sum()
        return int(self.rng.choice(p.size, p=p))


def sample_rows(logits: np.ndarray, temperature: float, top_p: float, rng) -> np.ndarray:
    """One draw per row from softmax(logits / temperature) restricted to the top-p nucleus: one
    rng.random() per row, mapped through the nucleus's cumulative mass in descending probability.
                                                                  logits [B, V] -> ids [B] int64
    The batched sampler of self-generated calibration. It draws differently from `Sampler` (which
    maps its uniform through Generator.choice over the ids in vocabulary order): each keeps the
    outputs a seed has always given (the calibration set's tokens_sha256; seeded generations).
    """
    from ..kernels.sampling import nucleus_draw
    B, V = logits.shape
    p = token_probabilities(logits, temperature)                   # [B, V] float64
    u = rng.random(B)
    out = np.empty(B, np.int64)
    nucleus_draw(p, float(top_p), u, out)     # the full sort's draw, sorting only the nucleus's bins
    return out


def _finite(logits: np.ndarray, model) -> np.ndarray:
    """logits as they are; NaN or infinite ones (non-finite weights, a NaN rms_norm_eps) would be
    sampled into a silent wrong answer: a typed error instead."""
    if not np.isfinite(logits).all():
        raise CheckpointError(f"{model.path or 'the model'} computed non-finite logits: its weights or "
                              "config.json hold NaN or infinite numbers")
    return logits


class Generation:
    """An iterator of text pieces; after it ends, `finish_reason`, `token_ids` and `text` are set.

    finish_reason: "eos", "stop" (a stop string), "length" (max_new_tokens), "context" (the context
    is full), or "interrupted" (KeyboardInterrupt, then re-raised).
    """

    def __init__(self, model, cache, prompt_ids: list[int], settings: SamplingSettings):
        self.model, self.cache, self.settings = model, cache, settings
        self.prompt_ids = list(prompt_ids)
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason = None
        self._it = self._run()

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self._it)

    def _ids(self):
        """Prefill the prompt, then yield one new id at a time (eos not yielded)."""
        m, cache, s = self.model, self.cache, self.settings
        eos = m.eos_ids()
        sampler = Sampler(s)
        history = list(cache.tokens[:cache.length]) if s.repetition_penalty != 1.0 else []
        logits = _finite(m.forward(self.prompt_ids, cache, last_only=True)[0], m)
        history += self.prompt_ids
        for _ in range(s.max_new_tokens):
            nxt = sampler(logits, history)
            if nxt in eos:
                self.finish_reason = "eos"
                return
            if cache.length >= cache.max_len:     # no room to hold this token: the context is full
                self.finish_reason = "context"
                return
            yield nxt
            history.append(nxt)
            logits = _finite(m.forward([nxt], cache, last_only=True)[0], m)
        self.finish_reason = "length"


    def _run(self):
        stream = TextStream(self.model.tokenizer)
        stops = self.settings.stop
        pending = ""           # text held back because it might be the start of a stop string
        try:
            for t in self._ids():
                self.token_ids.append(t)
                pending += stream.push(t)
                cut = _find_stop(pending, stops)
                if cut is not None:
                    pending = pending[:cut]
                    self.finish_reason = "stop"
                    break
                keep = _stop_prefix_len(pending, stops)
                if len(pending) > keep:
                    out, pending = pending[:len(pending) - keep], pending[len(pending) - keep:]
                    self.text += out
                    yield out
            else:
                pending += stream.flush()
                cut = _find_stop(pending, stops)
                if cut is not None:
                    pending, self.finish_reason = pending[:cut], "stop"
        except KeyboardInterrupt:
            self.finish_reason = "interrupted"
            raise
        if pending:
            self.text += pending
            yield pending


def _find_stop(text: str, stops) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _stop_prefix_len(text: str, stops) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def _check_fits(n_prompt: int, max_len: int, what: str):
    if n_prompt == 0:
        raise UsageError(f"the {what} is empty")
    if n_prompt >= max_len:
        raise ContextOverflowError(
            f"the {what} is {n_prompt} tokens but the context holds {max_len} "
            f"(at least 1 must be left for the answer); shorten it")


def _settings(model, settings, kw) -> SamplingSettings:
    if settings is not None:
        if kw:
            raise UsageError("pass either settings= or keyword overrides, not both")
        return settings
    return settings_from_generation_config(model.generation_config, **kw)


def stream_prompt(model, prompt: str, *, chat: bool = False, settings: SamplingSettings | None = None,
                  max_context: int | None = None, **kw) -> Generation:
    """Stream the continuation of a plain prompt (or, with chat=True, the answer to it as one user turn)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise UsageError("the prompt is empty")
    if chat:
        return stream_messages(model, [{"role": "user", "content": prompt}], settings=settings,
                               max_context=max_context, **kw)
    s = _settings(model, settings, kw)
    ids = model.tokenizer.encode(prompt, add_special_tokens=True)
    cache = model.new_cache(max_context)
    _check_fits(len(ids), cache.max_len, "prompt")
    return Generation(model, cache, ids, s)


def stream_messages(model, messages, *, settings: SamplingSettings | None = None,
                    max_context: int | None = None, **kw) -> Generation:
    """Stream the assistant's answer to a conversation (a list of {"role", "content"} dicts)."""
    if not messages:
        raise UsageError("the conversation is empty")
    s = _settings(model, settings, kw)
    ids = model.tokenizer.encode_chat(messages)
    cache = model.new_cache(max_context)
    _check_fits(len(ids), cache.max_len, "conversation")
    return Generation(model, cache, ids, s)


class ChatSession:
    """A multi-turn conversation that keeps its KV cache between turns.

    Each turn renders the whole conversation with the chat template, finds the longest common prefix
    with the ids already in the cache, and prefills only the rest.
    """

    def __init__(self, model, system: str | None = None, settings: SamplingSettings | None = None,
                 max_context: int | None = None):
        self.model = model
        self.system = system
        self.settings = settings or settings_from_generation_config(model.generation_config)
        self.cache = model.new_cache(max_context)
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cache.truncate(0)

    def send(self, text: str) -> Generation:
        if not isinstance(text, str) or not text.strip():
            raise UsageError("the message is empty")
        msgs = self.messages + [{"role": "user", "content": text}]
        ids = self.model.tokenizer.encode_chat(msgs)
        if len(ids) >= self.cache.max_len:
            raise ContextOverflowError(
                f"the conversation is {len(ids)} tokens but the context holds {self.cache.max_len}; "
                "use /reset to start a new one")
        common = 0
        for a, b in zip(self.cache.tokens, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)     # at least one token to prefill: its logits start the answer
        self.cache.truncate(common)
        self.messages = msgs
        gen = Generation(self.model, self.cache, ids[common:], self.settings)
        return _RecordAnswer(gen, self.messages)


class _RecordAnswer:
    """Wraps a Generation so the answer (even a partial one) joins the conversation when it ends."""

    def __init__(self, gen: Generation, messages: list):
        self.gen, self.messages = gen, messages
        self._done = False

    def __iter__(self):
        try:
            yield from self.gen
        finally:
            if not self._done:
                self._done = True
                self.messages.append({"role": "assistant", "content": self.gen.text})

    def __getattr__(self, name):
        return getattr(self.gen, name)
