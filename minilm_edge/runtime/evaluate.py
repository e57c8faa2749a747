"""Perplexity of a model on a text, and the comparison of two models on the same tokens (docs/DESIGN.md §7).

Protocol (as the AWQ paper's WikiText evaluation, with the two choices it leaves open made explicit):
- The text is used as is: a file is read as bytes and decoded as UTF-8, with no newline translation
  (WikiText: the raw `wiki.test.raw`, nothing joined or stripped).
- It is tokenized once, as the model's tokenizer does by default (`add_special_tokens=True`, what
  Hugging Face `tokenizer(text)` does): a Llama-2 style tokenizer puts one BOS at the very start of
  the text, SmolLM2's adds nothing. No BOS is inserted per window.
- `max_tokens` keeps the first N of those tokens. They are cut into non-overlapping windows of `ctx`
  tokens; every window starts from an empty context (no sliding, no carried-over cache).
- In a window of n tokens, positions 1..n-1 are predicted from their prefix: n - 1 tokens scored.
  The final window may be shorter than ctx; it is scored the same way (n - 1 tokens) if n ≥ 2, and
  dropped if it is a single token (nothing to predict).
- nll = mean over all scored tokens of -log p(token | prefix), in nats; ppl = exp(nll).
  (The paper's script takes each window's mean and multiplies it by ctx instead of ctx - 1; with
  equal windows that gives the same number.)

Memory: the final hidden states of one window [T, D] are kept, and the lm_head is applied to
`TOKEN_CHUNK` tokens at a time, so at most [TOKEN_CHUNK, V] logits exist at once (a 2048-token
window's full logits would be 400 MB in float32 at V = 49152). Log-softmax is done in float64.

KL divergence (`compare`): per scored position, KL(p_base || p_model) = Σ_v p_base(v) · (log p_base(v)
− log p_model(v)), from float64 log-softmax of both models' logits; the mean over positions is
reported. It is 0 for identical models and measures how far the quantized model's whole next-token
distribution moved, which perplexity alone (one token per position) can hide.

Re-evaluation (`check`, docs/DESIGN.md §7) reports what llama.cpp's `perplexity --kl-divergence` reports:
the perplexity ratio model / reference, the mean and 99th percentile over scored positions of
KL(p_ref || p_model), and the same-top-token rate (how often argmax p_model = argmax p_ref). The
reference side can be saved once (`reference_scores`: per position the reference's top-K
log-probabilities and the log-probability of the actual next token), so the machine being checked
need not hold the full-precision model. Against a saved reference the KL is taken over the K saved
tokens plus one bucket for all the rest (`kl_topk`); by the data-processing inequality that is a
lower bound of the full KL, tight when the top K hold nearly all of p_ref's mass.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, UsageError

TOKEN_CHUNK = 128        # tokens per lm_head call: [128, 49152] float64 = 50 MB per array


# ---- input


def read_text(path) -> str:
    """The file's text exactly as stored (UTF-8, no newline translation); one clear error if not."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"data file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"data file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise UsageError(f"data file {path} is empty; give a text file to score")
    return text


def eval_tokens(model, text: str, max_tokens: int | None = None) -> np.ndarray:
    """The ids scored by `perplexity`: the whole text tokenized once, the first `max_tokens` kept.
    -> [n] int64"""
    if model.tokenizer is None:
        raise UsageError("the model was loaded without a tokenizer; perplexity needs one")
    if not isinstance(text, str) or not text:
        raise UsageError("the text to score is empty")
    if max_tokens is not None and max_tokens < 2:
        raise UsageError(f"max_tokens must be at least 2, got {max_tokens}")
    ids = np.asarray(model.tokenizer.encode(text), dtype=np.int64)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise UsageError(f"the text is {len(ids)} token long; at least 2 are needed to score one")
    return ids


def windows(n_tokens: int, ctx: int) -> list[tuple[int, int]]:
    """[start, end) of each window: full windows of ctx, then the remainder if it holds ≥ 2 tokens."""
    spans = [(s, min(s + ctx, n_tokens)) for s in range(0, n_tokens, ctx)]
    return [(s, e) for s, e in spans if e - s >= 2]


def check_ctx(model, ctx: int) -> None:
    limit = model.config.max_position_embeddings
    if not isinstance(ctx, (int, np.integer)) or ctx < 2:
        raise UsageError(f"ctx must be an integer of at least 2, got {ctx!r}")
    if ctx > limit:
        raise UsageError(f"ctx {ctx} exceeds the model's maximum context of {limit} tokens")


# ---- log-probabilities, one window at a time


def final_hidden(model, ids: np.ndarray) -> np.ndarray:
    """Normed last hidden state of each token of one window, from an empty context.  [T] -> [T, D]

    `Model.hidden_states` is `Model.forward` without the lm_head, so that the head can be applied a
    few tokens at a time. The test checks it against `model.forward`.
    """
    return model.hidden_states(ids)


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    """log p = l - max(l) - log Σ exp(l - max(l)), in float64.   [t, V] float32 -> [t, V] float64"""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=1, keepdims=True))
    return z


def scoring_head(model):
    """The lm_head as a function [t, D] -> [t, V] float32, for scoring many tokens.

    An fp16 head (the tied embedding of an int4 model) is widened to float32 once here, instead of
    tile by tile on every call as the prefill kernel does (kernels/dense_f32.matmul_f16_f32): per
    TOKEN_CHUNK tokens that widening cost about twice the matrix product. The products are the
    same calls on the same float32 tiles (and one row goes to the head's own matvec, as
    `Linear.__call__` sends it), so the logits are the same bits (tested); the price is V·D·4
    bytes of memory while scoring (113 MB for SmolLM2).
    """
    from ..kernels.dense_f32 import matmul_tiles, widened_tiles
    from .linear import DenseF16
    head = model.weights.lm_head
    if not isinstance(head, DenseF16) or head.bias is not None:
        return head
    tiles = list(widened_tiles(head.w))
    return lambda x: head(x) if x.shape[0] == 1 else matmul_tiles(tiles, x, head.shape[0])


def _scored_chunks(model, ids: np.ndarray, head=None):
    """For one window, yield (logp [t, V] float64, targets [t]) for the positions 0..T-2 (each
    predicting the next token), TOKEN_CHUNK positions at a time. head: `scoring_head(model)`."""
    head = head or model.weights.lm_head
    h = final_hidden(model, ids)                                    # [T, D]
    for s in range(0, len(ids) - 1, TOKEN_CHUNK):
        e = min(s + TOKEN_CHUNK, len(ids) - 1)
        logits = head(np.ascontiguousarray(h[s:e]))                 # [t, D] -> [t, V] float32
        yield log_softmax64(logits), ids[s + 1:e + 1]


def _nll_sum(logp: np.ndarray, targets: np.ndarray) -> float:
    return -float(logp[np.arange(len(targets)), targets].sum())


def _bar(total, desc, enabled):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="tok", disable=not enabled, leave=False, dynamic_ncols=True)


# ---- public API


def perplexity(model, text: str, *, ctx: int = 2048, max_tokens: int | None = None,
               progress: bool = True) -> dict:
    """Perplexity of `model` on `text` by the protocol in the module docstring.

    Returns {"ppl", "nll" (mean nats per scored token), "tokens_scored", "windows", "ctx",
    "tokens" (tokens evaluated, after max_tokens), "last_window" (its length in tokens),
    "seconds"}.
    """
    check_ctx(model, ctx)
    t0 = time.perf_counter()
    ids = eval_tokens(model, text, max_tokens)
    spans = windows(len(ids), ctx)
    total, scored = 0.0, 0
    bar = _bar(sum(e - s - 1 for s, e in spans), "perplexity", progress)
    head = scoring_head(model)
    try:
        for s, e in spans:
            for logp, targets in _scored_chunks(model, ids[s:e], head):
                total += _nll_sum(logp, targets)
                scored += len(targets)
                bar.update(len(targets))
    finally:
        bar.close()
    nll = finite_nll(total / scored, model)
    return {"ppl": math.exp(nll), "nll": nll, "tokens_scored": scored, "windows": len(spans),
            "ctx": ctx, "tokens": len(ids), "last_window": spans[-1][1] - spans[-1][0],
            "seconds": time.perf_counter() - t0}


def finite_nll(nll: float, model) -> float:
    """nll itself; a NaN or infinite one means non-finite weights or config, not a perplexity."""
    if not math.isfinite(nll):
        who = getattr(model, "path", None) or "the model"
        raise CheckpointError(f"{who} computed a non-finite log-likelihood ({nll}): "
                              "its weights or config.json hold NaN or infinite numbers")
    return nll


def compare(model, baseline, text: str, *, ctx: int = 2048, max_tokens: int | None = None,
            progress: bool = True) -> dict:
    """Score `model` and `baseline` on the same tokens; report both perplexities, their difference,
    the mean KL(baseline || model) per scored token (nats), and how often their top-1 tokens agree.

    Both tokenizers must give the same ids for the text (the models must share a vocabulary).
    """
    check_ctx(model, ctx)
    check_ctx(baseline, ctx)
    if model.config.vocab_size != baseline.config.vocab_size:
        raise UsageError(f"the models have different vocabularies ({model.config.vocab_size} vs "
                         f"{baseline.config.vocab_size} tokens); they cannot be compared token by token")
    t0 = time.perf_counter()
    ids = eval_tokens(model, text, max_tokens)
    if not np.array_equal(ids, eval_tokens(baseline, text, max_tokens)):
        raise UsageError("the two models tokenize the text differently; compare models that share a tokenizer")
    spans = windows(len(ids), ctx)
    nll_m = nll_b = 0.0
    kls, agree = [], 0
    bar = _bar(sum(e - s - 1 for s, e in spans), "compare", progress)
    head_m, head_b = scoring_head(model), scoring_head(baseline)
    try:
        for s, e in spans:
            for (lp_m, targets), (lp_b, _) in zip(_scored_chunks(model, ids[s:e], head_m),
                                                  _scored_chunks(baseline, ids[s:e], head_b)):
                nll_m += _nll_sum(lp_m, targets)
                nll_b += _nll_sum(lp_b, targets)
                kls.append(kl_full(lp_b, lp_m))
                agree += int((lp_m.argmax(axis=1) == lp_b.argmax(axis=1)).sum())
                bar.update(len(targets))
    finally:
        bar.close()
    res = comparison(nll_m, nll_b, np.concatenate(kls), agree, model, baseline)
    return {**res, "windows": len(spans), "ctx": ctx, "tokens": len(ids),
            "last_window": spans[-1][1] - spans[-1][0], "seconds": time.perf_counter() - t0}


# ---- re-evaluation metrics (check)

KL_PERCENTILE = 99.0     # the tail llama.cpp reports ("99.0%   KLD")
REFERENCE_TOP_K = 64     # log-probs saved per position: [4096, 64] x 8 bytes = 2 MB


def kl_full(lp_ref: np.ndarray, lp_model: np.ndarray) -> np.ndarray:
    """KL(p_ref || p_model) per position over the whole vocabulary, in nats.   [t, V], [t, V] -> [t]

    KL = Σ_v p_ref(v) · (log p_ref(v) − log p_model(v)); both arguments are float64 log-softmax rows.
    """
    return (np.exp(lp_ref) * (lp_ref - lp_model)).sum(axis=1)


def kl_topk(top_ids: np.ndarray, top_lp_ref: np.ndarray, lp_model: np.ndarray) -> np.ndarray:
    """KL(p_ref || p_model) per position over the reference's top K tokens plus one bucket "the rest".
    [t, K] int, [t, K] float, [t, V] float64 -> [t]

    KL_K = Σ_{i ≤ K} p_i (log p_i − log q_i) + r (log r − log q_r), with p_i = p_ref(top_i),
    q_i = p_model(top_i), r = 1 − Σ p_i and q_r = 1 − Σ q_i (the term is 0 when r = 0). Merging the
    tail into one outcome can only lose information, so KL_K ≤ the full KL, with equality when the
    top K hold all of p_ref.
    """
    lp_ref = top_lp_ref.astype(np.float64)
    lq = np.take_along_axis(lp_model, top_ids.astype(np.int64), axis=1)     # [t, K]
    head = (np.exp(lp_ref) * (lp_ref - lq)).sum(axis=1)
    r = np.clip(1.0 - np.exp(lp_ref).sum(axis=1), 0.0, 1.0)
    q_r = np.clip(1.0 - np.exp(lq).sum(axis=1), 1e-300, 1.0)                # the model's rest is never 0 in float64
    tail = np.where(r > 0, r * (np.log(np.maximum(r, 1e-300)) - np.log(q_r)), 0.0)
    return np.maximum(head + tail, 0.0)     # ≥ 0 in exact arithmetic; float32 saved log-probs can dip below


def comparison(nll_model_sum: float, nll_ref_sum: float, kl: np.ndarray, same_top: int, model, reference) -> dict:
    """The check metrics from sums over the scored positions and the per-position KL [N]."""
    n = len(kl)
    nll_m = finite_nll(nll_model_sum / n, model)
    nll_b = finite_nll(nll_ref_sum / n, reference)
    ppl_m, ppl_b = math.exp(nll_m), math.exp(nll_b)
    return {"ppl": ppl_m, "nll": nll_m, "baseline_ppl": ppl_b, "baseline_nll": nll_b,
            "ppl_diff": ppl_m - ppl_b, "ppl_ratio": ppl_m / ppl_b, "kl_mean": float(kl.mean()),
            "kl_p99": float(np.percentile(kl, KL_PERCENTILE)), "kl_max": float(kl.max()),
            "top1_agreement": same_top / n, "same_top": same_top / n, "tokens_scored": n}


class ReferenceScores:
    """What a check needs of the reference model, per scored position (the saved baseline).

    ids [n] int64 (the text's tokens, as `eval_tokens` gives them), ctx (window length), top_ids [N, K]
    int32 and top_logp [N, K] float32 (the reference's K most likely next tokens, most likely first, and
    their log-probabilities), target_logp [N] float64 (log p_ref of the actual next token), in the
    order `windows` scores them.
    """

    def __init__(self, ids, ctx, top_ids, top_logp, target_logp):
        self.ids = np.asarray(ids, dtype=np.int64)
        self.ctx = int(ctx)
        self.top_ids = np.asarray(top_ids, dtype=np.int32)
        self.top_logp = np.asarray(top_logp, dtype=np.float32)
        self.target_logp = np.asarray(target_logp, dtype=np.float64)
        n = sum(e - s - 1 for s, e in windows(len(self.ids), self.ctx))
        if not (self.top_ids.shape == self.top_logp.shape and self.top_ids.ndim == 2
                and len(self.top_ids) == n == len(self.target_logp)):
            raise UsageError(f"the saved reference is inconsistent: {len(self.ids)} tokens at ctx {self.ctx} "
                             f"score {n} positions, but it holds {self.top_ids.shape} top tokens and "
                             f"{self.target_logp.shape} target log-probabilities")


def _top_k(lp: np.ndarray, k: int):
    """The k largest entries of each row, largest first.   [t, V] -> [t, k] int32, [t, k] float32"""
    k = min(k, lp.shape[1])
    idx = np.argpartition(-lp, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(lp, idx, axis=1), axis=1, kind="stable")
    idx = np.take_along_axis(idx, order, axis=1)
    return idx.astype(np.int32), np.take_along_axis(lp, idx, axis=1).astype(np.float32)


def reference_scores(reference, text: str, *, ctx: int = 512, max_tokens: int | None = None,
                     top_k: int = REFERENCE_TOP_K, progress: bool = True) -> ReferenceScores:
    """Score `text` with the reference model once and keep what `compare_to_reference` needs."""
    check_ctx(reference, ctx)
    if not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise UsageError(f"top_k must be a positive integer, got {top_k!r}")
    ids = eval_tokens(reference, text, max_tokens)
    spans = windows(len(ids), ctx)
    tops, top_lps, targets_lp = [], [], []
    bar = _bar(sum(e - s - 1 for s, e in spans), "reference", progress)
    head = scoring_head(reference)
    try:
        for s, e in spans:
            for lp, targets in _scored_chunks(reference, ids[s:e], head):
                t, l = _top_k(lp, top_k)
                tops.append(t)
                top_lps.append(l)
                targets_lp.append(lp[np.arange(len(targets)), targets])
                bar.update(len(targets))
    finally:
        bar.close()
    return ReferenceScores(ids, ctx, np.concatenate(tops), np.concatenate(top_lps), np.concatenate(targets_lp))


def compare_to_reference(model, ref: ReferenceScores, text: str, *, progress: bool = True) -> dict:
    """`compare` against a saved reference: the same metrics, KL over the saved top K (`kl_topk`).

    The model must tokenize `text` into exactly the reference's ids (same text, same tokenizer)."""
    check_ctx(model, ref.ctx)
    t0 = time.perf_counter()
    ids = eval_tokens(model, text, len(ref.ids))
    if not np.array_equal(ids, ref.ids):
        raise UsageError("the model tokenizes the text differently from the saved reference (another text "
                         "or another tokenizer); save the reference again for this text")
    if int(ref.top_ids.max(initial=0)) >= model.config.vocab_size:
        raise UsageError(f"the saved reference holds token ids beyond the model's vocabulary "
                         f"({model.config.vocab_size}); it was made for another model family")
    spans = windows(len(ids), ref.ctx)
    nll_m, kls, agree, pos = 0.0, [], 0, 0
    bar = _bar(len(ref.target_logp), "compare", progress)
    head = scoring_head(model)
    try:
        for s, e in spans:
            for lp_m, targets in _scored_chunks(model, ids[s:e], head):
                t = len(targets)
                top_ids, top_lp = ref.top_ids[pos:pos + t], ref.top_logp[pos:pos + t]
                nll_m += _nll_sum(lp_m, targets)
                kls.append(kl_topk(top_ids, top_lp, lp_m))
                agree += int((lp_m.argmax(axis=1) == top_ids[:, 0]).sum())
                pos += t
                bar.update(t)
    finally:
        bar.close()
    res = comparison(nll_m, -float(ref.target_logp.sum()), np.concatenate(kls), agree, model, None)
    return {**res, "windows": len(spans), "ctx": ref.ctx, "tokens": len(ids),
            "last_window": spans[-1][1] - spans[-1][0], "seconds": time.perf_counter() - t0}
