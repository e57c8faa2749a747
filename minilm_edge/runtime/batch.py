"""Batched decoding: B sequences at their own positions advance one token per step together.

`BatchDecoder` holds up to `max_batch` sequences, each in its own region (slot) of one KV pool
`[max_batch, L, Hkv, S, Dh]`. `add` takes a prompt into a free slot; the next `step` first prefills
every prompt that joined since the last one, together (`Model.prefill_batch`: each prompt's logits
those of its own prefill, bit for bit, the weights read once for all of them); then it samples one
token for every active sequence and runs all their new tokens through the model in one batched
step (`Model.decode_batch`: the B activation rows meet each int4 weight once, attention per
sequence over its own slot; with a decode plan (int4 blocks, int8 linears among them or not), one
compiled call for every block and row, whose buffers `batch_step.BatchStep` holds:
kernels/decode_step_batch.py). Sequences join (`add`) and leave (`remove`, or by themselves after
their final event) between steps. One active sequence steps through today's fused single-stream
decode, so B = 1 is no slower.

Sampling is generation.py's, per sequence: its `Sampler` (seed, repetition penalty, temperature,
top-k, top-p), stop strings held back until they cannot start a stop string, EOS. A sequence's
tokens are those it would get decoded alone (greedy: identical; tests/test_batch.py), up to the
float rounding of a batched product.

Not thread-safe: drive one BatchDecoder from one thread.
"""
from __future__ import annotations

import dataclasses
from collections import deque
from typing import Iterator

import numpy as np

from ..errors import MiniLMError, UsageError
from .generation import (
    Sampler,
    SamplingSettings,
    _check_fits,
    _find_stop,
    _finite,
    _settings,
    _stop_prefix_len,
)
from .model import KVCache, lazy_zeros
from .tokenizer import TextStream

MAX_LOGPROBS = 20            # most alternatives a step reports per token (as OpenAI's API)


class TokenEvent:
    """One step's outcome for one sequence:

        seq            sequence id returned by add()
        token          the token id chosen this step
        text           new text released this step ("" while a stop string or a UTF-8 char is pending)
        logprob        log-probability of `token` under the raw distribution (temperature 1, no top-k/p)
        top_logprobs   [(id, logprob)] the `logprobs` most likely tokens, most likely first
        finish         None while running; "stop" (EOS, stop string); "length" (max_new_tokens, context full)

    `logprob` and `top_logprobs` are computed when first read (a softmax over the vocabulary: ~70 µs
    a step for SmolLM2's 49k, which a single-stream decode does not pay when nobody reads them)."""
    __slots__ = ("seq", "token", "text", "finish", "_logits", "_k", "_lp")

    def __init__(self, seq: int, token: int, text: str, logits: np.ndarray, k: int, finish: str | None):
        self.seq, self.token, self.text, self.finish = seq, token, text, finish
        self._logits, self._k, self._lp = logits, k, None      # logits [V]: this step's, never written again

    def _logprobs(self):
        if self._lp is None:
            self._lp = raw_logprobs(self._logits, self.token, self._k)
            self._logits = None
        return self._lp

    @property
    def logprob(self) -> float:
        return self._logprobs()[0]

    @property
    def top_logprobs(self) -> list:
        return self._logprobs()[1]

    def __repr__(self):
        return (f"TokenEvent(seq={self.seq}, token={self.token}, text={self.text!r}, logprob={self.logprob}, "
                f"top_logprobs={self.top_logprobs}, finish={self.finish!r})")


@dataclasses.dataclass
class _Seq:
    """One sequence's state between steps."""
    id: int
    slot: int
    cache: KVCache
    settings: SamplingSettings
    sampler: Sampler
    stream: TextStream
    logprobs: int
    logits: np.ndarray       # [V] float32: the distribution of its next token (None until prefilled)
    history: list            # prompt + generated ids (for the repetition penalty; empty when it is off)
    pending: str = ""        # text held back because it might start a stop string
    n_new: int = 0


def raw_logprobs(logits: np.ndarray, token: int, k: int):
    """log softmax(logits)[token], and the k most likely (id, logprob), most likely first (ties: lower
    id). The exponentials in float32, summed in float64 (every step pays this, so it is kept cheap)."""
    m = logits.max()
    lse = float(m) + float(np.log(np.exp(logits - m).sum(dtype=np.float64)))
    top = []
    if k:
        z = logits
        idx = np.argpartition(-z, k - 1)[:k] if k < z.size else np.arange(z.size)
        idx = idx[np.lexsort((idx, -z[idx]))]
        top = [(int(i), float(z[i]) - lse) for i in idx]
    return float(logits[token]) - lse, top


class BatchDecoder:
    """Up to `max_batch` sequences decoded together (see the module docstring).

    max_len: positions per sequence (prompt + answer); None: the model's context, at most
    model.DEFAULT_CONTEXT. The pool is mapped lazily: only written positions use memory.
    """

    def __init__(self, model, max_batch: int = 8, max_len: int | None = None):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise UsageError(f"max_batch must be a whole number ≥ 1, got {max_batch}")
        probe = model.new_cache(max_len)              # validates max_len (UsageError) and sizes the pool
        self.model, self.max_batch, self.max_len = model, max_batch, probe.max_len
        c = model.config
        shape = (max_batch, c.num_hidden_layers, c.num_key_value_heads, self.max_len, c.head_dim)
        self._k, self._v = lazy_zeros(shape), lazy_zeros(shape)    # [B, L, Hkv, S, Dh] each
        self._free = list(range(max_batch - 1, -1, -1))
        self._seqs: dict[int, _Seq] = {}
        self._next_id = 0
        self._joining: dict[int, list] = {}          # sequence id -> prompt ids, added and not yet prefilled
        self._eos = model.eos_ids()

    @property
    def active(self) -> int:
        return len(self._seqs)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def add(self, prompt_ids: list[int], settings: SamplingSettings, logprobs: int = 0) -> int:
        """Take `prompt_ids` into a free slot; returns the sequence id its events carry. The prompt
        is prefilled by the next `prefill` (which `step` calls first), together with every prompt
        that joined since the last step. ContextOverflowError when the prompt leaves no room for an
        answer, UsageError when no slot is free (check `free_slots`) or an argument is bad."""
        if not isinstance(settings, SamplingSettings):
            raise UsageError("settings must be a SamplingSettings")
        if not isinstance(logprobs, int) or not 0 <= logprobs <= MAX_LOGPROBS:
            raise UsageError(f"logprobs must be a whole number in 0..{MAX_LOGPROBS}, got {logprobs}")
        ids = [int(i) for i in prompt_ids]
        _check_fits(len(ids), self.max_len, "prompt")
        V = self.model.config.vocab_size
        if not ids or min(ids) < 0 or max(ids) >= V:
            raise UsageError(f"a prompt needs at least one token, each id in 0..{V - 1}")
        if not self._free:
            raise UsageError(f"the batch is full ({self.max_batch} sequences); wait for a free slot")
        slot = self._free.pop()
        cache = KVCache(self.model.config, self.max_len, pool=(self._k, self._v, slot))
        seq = _Seq(self._next_id, slot, cache, settings, Sampler(settings), TextStream(self.model.tokenizer),
                   logprobs, None, list(ids) if settings.repetition_penalty != 1.0 else [])
        self._next_id += 1
        self._seqs[seq.id] = seq
        self._joining[seq.id] = ids
        return seq.id

    def prefill(self) -> None:
        """Prefill every prompt added since the last step, in one pass where the model can
        (Model.prefill_batch: each prompt's logits bit for bit those of its own forward). A prompt
        whose logits are not finite is removed and the others stay; if the model call itself fails,
        every joining prompt is removed. Either way the error is then raised (`holds` tells which
        sequences are gone); the sequences that were already decoding are untouched."""
        if not self._joining:
            return
        joining, self._joining = self._joining, {}
        seqs = [self._seqs[i] for i in joining]
        try:
            logits = self.model.prefill_batch(list(joining.values()), [s.cache for s in seqs])    # [n, V]
        except BaseException:
            for s in seqs:
                self.remove(s.id)
            raise
        error = None
        for s, row in zip(seqs, logits):
            try:
                s.logits = _finite(row, self.model)
            except MiniLMError as e:
                self.remove(s.id)
                error = e
        if error is not None:
            raise error

    def holds(self, seq: int) -> bool:
        """Whether sequence `seq` is still in the batch (added, not finished, not removed)."""
        return seq in self._seqs

    def remove(self, seq: int) -> None:
        """Free a sequence's slot now (its client went away). A sequence that already finished (it
        left by itself) is fine; an id never handed out is a UsageError."""
        if not isinstance(seq, int) or not 0 <= seq < self._next_id:
            raise UsageError(f"no sequence {seq} was added")
        s = self._seqs.pop(seq, None)
        if s is not None:
            self._joining.pop(seq, None)
            self._free.append(s.slot)

    def step(self) -> list[TokenEvent]:
        """One token for every active sequence, in the order they were added. A finished sequence
        (its event has `finish` set) leaves by itself."""
        self.prefill()
        events, going = [], []
        for s in list(self._seqs.values()):
            ev = self._advance(s)
            events.append(ev)
            if ev.finish is None:
                going.append((s, ev.token))
            else:
                self.remove(s.id)
        if going:
            logits = self.model.decode_batch([t for _, t in going], [s.cache for s, _ in going])   # [B, V]
            _finite(logits, self.model)
            for (s, _), row in zip(going, logits):
                s.logits = row
        return events

    def _advance(self, s: _Seq) -> TokenEvent:
        """Sample s's next token and turn it into an event (text released, finish)."""
        tok = s.sampler(s.logits, s.history)
        logits, k = s.logits, s.logprobs            # the event computes the log-probs if they are read
        s.n_new += 1
        stops = s.settings.stop
        if tok in self._eos:
            return TokenEvent(s.id, tok, self._final_text(s), logits, k, "stop")
        if s.history:
            s.history.append(tok)
        s.pending += s.stream.push(tok)
        cut = _find_stop(s.pending, stops)
        if cut is not None:
            text, s.pending = s.pending[:cut], ""
            return TokenEvent(s.id, tok, text, logits, k, "stop")
        # The token fills position cache.length; the last position ends the sequence (as Generation).
        if s.n_new >= s.settings.max_new_tokens or s.cache.length + 1 >= s.cache.max_len:
            return TokenEvent(s.id, tok, self._final_text(s), logits, k, "length")
        keep = _stop_prefix_len(s.pending, stops)
        out, s.pending = s.pending[:len(s.pending) - keep], s.pending[len(s.pending) - keep:]
        return TokenEvent(s.id, tok, out, logits, k, None)

    @staticmethod
    def _final_text(s: _Seq) -> str:
        text = s.pending + s.stream.flush()
        cut = _find_stop(text, s.settings.stop)
        s.pending = ""
        return text if cut is None else text[:cut]


def stream_batch(model, prompts: list[str], settings: SamplingSettings | None = None, chat: bool = False,
                 max_batch: int = 8, max_len: int | None = None) -> list[Iterator[str]]:
    """Continue every prompt (or, with chat=True, answer each as one user turn) in one batch:
    returns one iterator of text pieces per prompt, in order. The iterators share one BatchDecoder:
    reading any of them advances all; prompts beyond `max_batch` join as others finish. Settings
    default to the model's generation_config (one SamplingSettings for all prompts)."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise UsageError("stream_batch needs a non-empty list of prompts")
    s = _settings(model, settings, {})
    tok = model.tokenizer
    ids = []
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise UsageError("a prompt is empty")
        ids.append(tok.encode_chat([{"role": "user", "content": p}]) if chat
                   else tok.encode(p, add_special_tokens=True))
    dec = BatchDecoder(model, max_batch=min(max_batch, len(prompts)), max_len=max_len)
    for i in ids:
        _check_fits(len(i), dec.max_len, "prompt")
    driver = _Driver(dec, ids, s)
    return [driver.stream(i) for i in range(len(prompts))]


class _Driver:
    """Feeds waiting prompts into free slots and routes each step's text to per-prompt queues."""

    def __init__(self, dec: BatchDecoder, ids: list, settings: SamplingSettings):
        self.dec, self.settings = dec, settings
        self.waiting = deque(range(len(ids)))
        self.ids = ids
        self.queues = [deque() for _ in ids]
        self.done = [False] * len(ids)
        self.index: dict[int, int] = {}              # sequence id -> prompt index

    def stream(self, i: int) -> Iterator[str]:
        while True:
            while self.queues[i]:
                yield self.queues[i].popleft()
            if self.done[i]:
                return
            self._step()

    def _step(self):
        while self.waiting and self.dec.free_slots:
            i = self.waiting.popleft()
            self.index[self.dec.add(self.ids[i], self.settings)] = i
        for ev in self.dec.step():
            i = self.index[ev.seq]
            if ev.text:
                self.queues[i].append(ev.text)
            if ev.finish is not None:
                self.done[i] = True
