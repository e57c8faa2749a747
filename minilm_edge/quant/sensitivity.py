"""Which block linears of an int4 folder most deserve int8 or q6 (`sensitivity` command, docs/DESIGN.md
§3.5): measured, one linear at a time, on the runtime that will serve the folder.

    gain(t) = KL(p_src ‖ p_folder) − KL(p_src ‖ p_folder with t as int8)     (or as q6: fmt="q6")

    p_src      the full-precision source's next-token distributions (float32 activations)
    p_folder   the folder as it is, on the runtime (int8 activations where the CPU has them)
    KL         mean over the scored tokens, whole vocabulary, nats

"t as int8" is t's full-precision weight in the folder's basis, rounded to int8 (formats/q4.py
quantize_q8, the `--int8` format; with fmt "q6" quantize_q6 at INT6_GROUP_SIZE, the `--int6` format,
whose codes the runtime computes exactly like int8 ones). The folder's basis differs from the
source's: AWQ scaled t's input columns (its scales folded into the norm or linear before) and, for v
and up, its output rows (the scales of o and down folded into them). So the basis is fitted, not
recorded: per-row r and per-column c minimising ‖Q − diag(r)·W·diag(c)‖ (Q the stored weight
dequantized, W the source's) by alternating least squares; int4 rounding noise is uncorrelated with
W, so the fit recovers the scales to well under 1% (the fit's relative residual ≈ int4's rounding
noise, reported per linear).

Choice (greedy, the knapsack heuristic of budget.py): linears by gain per byte added (int8 at
INT8_GROUP_SIZE, or q6 at INT6_GROUP_SIZE, against the stored int4), largest first, while the bytes
fit; gains ≤ 0 never. Gains are assumed additive (each is measured alone, the others int4). The
printed spec is what `quantize --int8` (`--int6`) takes; quantize then redoes AWQ with those linears
int8 (their scale search scored with 8- or 6-bit rounding), which changes the folder slightly from
the one measured here.

Measured once (BENCHMARKS.md, "int8 linears chosen by measured KL"): on SmolLM2-135M, 150 linears
on 2,048 tokens, the spec chosen within Q4_K_M's size predicted 0.035 nats of KL gain against 0.023
for a hand-made v/down spec of the same size, yet its folder (AWQ redone) scored worse on
WikiText-2 validation (26.87 against 26.71): single-linear gains of a few 1e-4 nats are within the
noise of 2,048 tokens and do not add. So the default recipe keeps llama.cpp's pattern; this measures.
"""
from __future__ import annotations

import numpy as np

from ..errors import UsageError
from ..formats.q4 import choose_group_size
from .awq import INT6_GROUP_SIZE, INT8_GROUP_SIZE
from .budget import HEADER_BYTES_PER_TENSOR, linear_bytes, q6_bytes, q8_bytes
from .quantize import LINEAR_NAMES as KINDS


def fit_basis(w: np.ndarray, q: np.ndarray, iters: int = 6) -> tuple:
    """r [N], c [K] minimising ‖q − diag(r)·w·diag(c)‖ (alternating least squares, from r = c = 1);
    -> (diag(r)·w·diag(c) as float32, relative residual ‖q − fit‖ / ‖q‖)."""
    w = np.asarray(w, np.float32)
    q = np.asarray(q, np.float32)
    r = np.ones(w.shape[0], np.float32)
    c = np.ones(w.shape[1], np.float32)
    for _ in range(iters):
        a = r[:, None] * w
        c = (a * q).sum(0) / np.maximum((a * a).sum(0), 1e-30)
        b = w * c[None, :]
        r = (b * q).sum(1) / np.maximum((b * b).sum(1), 1e-30)
    fit = ((r[:, None] * w) * c[None, :]).astype(np.float32)
    return fit, float(np.linalg.norm(q - fit) / max(np.linalg.norm(q), 1e-30))


FORMATS = ("int8", "q6")


def int8_extra_bytes(n: int, k: int, g4: int, fmt: str = "int8") -> int:
    """Bytes one [n, k] linear adds as int8 (or q6) instead of int4 at group size g4 (one tensor fewer in
    the header: int8 and q6 have no zero points)."""
    more = (q8_bytes(n, k, choose_group_size(k, INT8_GROUP_SIZE)) if fmt == "int8"
            else q6_bytes(n, k, choose_group_size(k, INT6_GROUP_SIZE)))
    return more - linear_bytes(n, k, g4) - HEADER_BYTES_PER_TENSOR


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float32)
    z -= z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def int8_gains(folder, source, ids: np.ndarray, kinds=KINDS, progress: bool = True, fmt: str = "int8") -> dict:
    """gain(t) for every int4 block linear t of `folder` whose kind is in `kinds`, stored as `fmt`
    ("int8" or "q6") instead (module docstring).

    folder, source: model folders (the int4 folder, its full-precision source); ids [n, T] token rows.
    -> {"base_kl", "tokens", "linears": [{"layer", "linear", "gain", "extra_bytes", "fit_residual"}, ...]}
    """
    from tqdm import tqdm

    from ..formats.q4 import dequantize, quantize_q6, quantize_q8
    from ..formats.tensors import TensorSource
    from ..runtime import model as runtime_model
    from ..runtime.checkpoint import load_weights
    from ..runtime.config import load_config
    from ..runtime.linear import Q8
    from .llama_block import load_block
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}: choose from {', '.join(FORMATS)}")
    rounding, g_more = (quantize_q8, INT8_GROUP_SIZE) if fmt == "int8" else (quantize_q6, INT6_GROUP_SIZE)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise UsageError(f"unknown linear {bad[0]!r}: choose from {', '.join(KINDS)}")
    cfg = load_config(folder)
    src_cfg = load_config(source)
    if (src_cfg.hidden_size, src_cfg.num_hidden_layers) != (cfg.hidden_size, cfg.num_hidden_layers):
        raise UsageError(f"{source} is not the source of {folder}: their shapes differ")

    def logp(model) -> np.ndarray:
        return np.concatenate([_log_softmax(model.forward(row)) for row in ids])

    todo = []
    probe = load_weights(folder, cfg)
    for k in kinds:
        for i, b in enumerate(probe.blocks):
            if getattr(b, k).kind == "q4":
                todo.append((i, k))
    del probe
    bar = tqdm(total=len(todo) + 2, desc=f"{fmt} sensitivity", unit="pass", disable=not progress)
    ref = logp(runtime_model.load(source, tokenizer=False, int8_activations=False))
    p_ref = np.exp(ref)
    bar.update(1)

    def kl(lp) -> float:
        return float(np.mean(np.sum(p_ref * (ref - lp), axis=1), dtype=np.float64))

    base = kl(logp(runtime_model.load(folder, tokenizer=False)))
    bar.update(1)
    src = TensorSource(source)
    out, block, block_i = [], None, -1
    for i, k in sorted(todo):
        w = load_weights(folder, cfg)                         # Model() turns the linears into stack views
        q4 = getattr(w.blocks[i], k).q4
        if block_i != i:
            block, block_i = load_block(src, cfg, i), i
        fit, resid = fit_basis(block[k], dequantize(q4))
        setattr(w.blocks[i], k, Q8(rounding(fit, choose_group_size(fit.shape[1], g_more))))
        gain = base - kl(logp(runtime_model.Model(cfg, w, None)))
        n, kk = fit.shape
        out.append({"layer": i, "linear": k, "gain": gain, "extra_bytes": int8_extra_bytes(n, kk, q4.group_size, fmt),
                    "fit_residual": resid})
        bar.update(1)
    bar.close()
    return {"base_kl": base, "tokens": int(ids.size), "format": fmt, "linears": out}


def choose_int8(linears: list, budget: int) -> list:
    """The linears to store int8 within `budget` extra bytes: by gain per byte, largest first, skipping
    what no longer fits; never a gain ≤ 0. -> [(layer, linear), ...] sorted.

    One rule of the fused decode (runtime/decode.py `_stack_mixed`): a block's int8 rows of q|k|v must
    be adjacent, so q and v int8 in one layer take k with them (its bytes counted, its gain too).
    gate and up need no such rule: they are the only two parts of their stack, so any of gate, up or
    both is adjacent (the step computes such a block in row pairs: kernels/decode_step._rows_gate_up_mixed)."""
    if budget < 0:
        raise UsageError(f"the budget is {budget:,} bytes: nothing can be added")
    by = {(t["layer"], t["linear"]): t for t in linears}
    chosen, used = set(), 0
    for t in sorted(linears, key=lambda t: t["gain"] / t["extra_bytes"], reverse=True):
        i, k = t["layer"], t["linear"]
        if t["gain"] <= 0 or (i, k) in chosen:
            continue
        take = [(i, k)]
        other = {"q": "v", "v": "q"}.get(k)
        if other and (i, other) in chosen and (i, "k") not in chosen:
            if (i, "k") not in by:           # k is not int4 (or not measured): leave this one out
                continue
            take.append((i, "k"))
        cost = sum(by[x]["extra_bytes"] for x in take)
        if used + cost <= budget:
            chosen.update(take)
            used += cost
    return sorted(chosen)


def int8_spec(chosen: list) -> str:
    """(layer, linear) pairs as `quantize --int8` takes them: "v@0+3-5,down@1" ("" for none)."""
    by = {}
    for i, k in chosen:
        by.setdefault(k, []).append(i)
    parts = []
    for k in KINDS:
        if k not in by:
            continue
        idx, runs = sorted(by[k]), []
        for i in idx:
            if runs and i == runs[-1][1] + 1:
                runs[-1][1] = i
            else:
                runs.append([i, i])
        parts.append(k + "@" + "+".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs))
    return ",".join(parts)
