"""AWQ: activation-aware weight quantization (Lin et al. 2024, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration", MLSys), as docs/DESIGN.md §5 specifies it.

The idea: a few input channels of each linear carry much larger activations than the rest, and the
rounding error of the weights that meet them dominates the output error. Multiplying those weight
columns by s > 1 before rounding (and dividing the activations by s, folded into the op before)
shrinks their relative rounding error by about 1/s while the group's quantization step barely moves.
The scale per channel is searched, per group of linears sharing one input, to minimise

    L(s) = || Q(W·diag(s)) · (diag(s)⁻¹ · X) − W · X ||²          (mean over outputs and tokens)

    W        the group's weights [N, K] (q|k|v or gate|up stacked, or o, or down)
    X        the group's full-precision input on calibration tokens [K, tokens]
    s        one positive scale per input channel [K]:  s = x_mean^α (paper), or the "duo" form
             x_mean^α / (w_mean^(1−α) + 1e-4);  then s = max(s, 1e-4), s /= sqrt(max(s)·min(s))
    x_mean   mean_t |X[t, j]| over all calibration tokens  (the activation statistic)
    w_mean   mean over rows of |W| / max|W| of its (row, group)   (duo form only)
    α        on the grid 0, 0.05, …, 0.95 (α = 0 gives s = 1: plain RTN is always a candidate); with
             `search_coarse` c, every c-th α first, then the best one's neighbours at c/2, c/4, …, 1
             grid steps (9 losses instead of 20 for c = 4: the grid's argmin where the loss is unimodal)
    Q        the int4 (or int3) per-group min/max round-to-nearest quantizer of q4.py (docs/DESIGN.md §4)

The "·X … W·X" part is measured through the module the group feeds, not the linear alone: the whole
attention (RoPE, causal mask, GQA, then o) for q/k/v, the whole SwiGLU MLP for gate/up, the single
linear for o and down (llama_block.py). Then the scales are folded into the previous op (RMSNorm
weight ÷ s, or the output rows of the previous linear ÷ s) and the group's weight columns × s: the
full-precision function is unchanged. Last, the clip search (clip.py) shrinks each (row, group)'s
range, skipped for q and k, whose errors pass through the softmax.

Blocks are calibrated one after the other; block l+1 sees the full-precision output of block l
(computed before any change), so errors do not compound during calibration. Calibration tokens run in
chunks of samples, so memory is bounded by a few [chunk, T, F] activations plus [n, T, D] hidden
states; the attention's scale loss is measured on the first `search_samples` samples (whole
sequences), the MLP's and single linears' on `search_tokens` tokens drawn from every sample, the
statistic and the clip search over all tokens.

Choices beyond the paper and the first specification (docs/DESIGN.md §5 lists them), each measured
better on the validation split (BENCHMARKS.md) and each switched off by an AWQSettings field: the
clip search on every calibration token through per-group second moments (clip_all_tokens; otherwise
~512 random tokens plus every sample's attention sink); the token-wise losses on tokens from every
sample (search_tokens); the two-sided clamps (clip_two_sided); each α's loss measured on the weights
clipped as they will be stored (search_clip: the symmetric clip search inside the scale search); and
the clamps of a row's groups chosen together on the row's whole output error (clip_joint_tokens,
clip_sweeps).

Which norm or linear feeds which linears is per-architecture knowledge, kept in one table
(`SCALE_GROUPS`). Everything here is pure functions on NumPy arrays; `run_awq` orchestrates.
Readable twins: reference/awq.py (the formulas, the α search on one block, the loop over blocks).

Shapes as in config.py: B samples in a chunk, T tokens per sample, D, H, Hkv, Dh, F; K = a linear's
input size, N its output size.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..errors import UsageError
from .clip import clip_search, clip_token_index, group_gram, scaled_gram, second_moments
from .llama_block import BlockShape, attention, block_forward, embed_rows, load_block, mlp, rope_tables, stored_norm
from .parallel import parallel_map

# ----------------------------------------------------------------------------------------------
# Per-architecture knowledge: which op's output is divided by s, and which linears' columns are × s.


@dataclasses.dataclass(frozen=True)
class ScaleGroup:
    name: str                # for reports and progress
    prev: str                # op whose output feeds the group: a norm weight [K] or a linear [K, ·]
    linears: tuple           # linears reading that output (their columns are multiplied by s)
    module: str              # what the loss runs: "attention" | "mlp" | "linear" (see MODULES)
    inp: str                 # which cached activation is the group's input (see block_forward)


LLAMA_GROUPS = (
    ScaleGroup("qkv", prev="attn_norm", linears=("q", "k", "v"), module="attention", inp="attn_in"),
    # v -> o folds only when v's output size equals o's input size (not for GQA: there each v row
    # feeds rep = H/Hkv different o columns, which would need rep different scales).
    ScaleGroup("o", prev="v", linears=("o",), module="linear", inp="o_in"),
    ScaleGroup("gate_up", prev="mlp_norm", linears=("gate", "up"), module="mlp", inp="mlp_in"),
    ScaleGroup("down", prev="up", linears=("down",), module="linear", inp="down_in"),
)
# Qwen3 and Gemma 3 have the same groups: their q/k norms come after q and k, their post-norms
# after o and down, so scaling the inputs of q|k|v, gate|up and down folds as in Llama (Gemma's norm
# weights are folded as multiplied, 1 + w: llama_block.load_block).
SCALE_GROUPS = {"llama": LLAMA_GROUPS, "mistral": LLAMA_GROUPS, "qwen2": LLAMA_GROUPS, "qwen3": LLAMA_GROUPS,
                "gemma3_text": LLAMA_GROUPS}
NO_CLIP = ("q", "k")           # their error passes through q·k and the softmax: clipping hurts (paper)

N_GRID = 20                                        # α = 0, 0.05, …, 0.95
INT8_GROUP_SIZE = 128          # the int8 block linears' scale groups as quantize.py stores them (fp16 scale per
                               # 128 weights: 8.125 bits; choose_group_size falls back where 128 does not divide K)
INT6_GROUP_SIZE = 128          # the q6 block linears' (6.125 bits; BENCHMARKS.md "q6" measures 32/64/128)
SCALE_FLOOR = 1e-4



@dataclasses.dataclass(frozen=True)
class AWQSettings:
    bits: int = 4                 # 3 or 4
    group_size: int = 128         # preferred; q4.choose_group_size falls back per layer
    duo: bool = False             # the "duo" scale form (x_mean and w_mean) instead of x_mean^α
    keep_salient: float = 0.0     # percent of input channels (top x_mean) kept in fp16
    clip: bool = True             # clip search on every linear except q, k
    clip_tokens: int = 512        # random calibration tokens the clip search measures on (+ first tokens)
    clip_all_tokens: bool = True  # the clip search on every calibration token (per-group Gram matrices)
    clip_two_sided: bool = True   # the clip search also cuts each end of a group's range on its own
    search_samples: int = 4       # samples (whole sequences) the attention's scale loss is measured on
    search_tokens: int = 4096     # tokens drawn from all samples for the MLP / linear losses (0: the search samples')
    search_clip: bool = True      # each α's loss sees the clipped linears clipped first (needs clip_all_tokens)
    clip_joint_tokens: int = 16384  # tokens for the cross-group moments of the joint clip (0: per group only)
    clip_sweeps: int = 2          # passes of the joint clip over each row's groups
    chunk_samples: int = 8        # samples per chunk of the full-precision pass (memory bound)
    seed: int = 0
    grid: int = N_GRID            # α on 0, 1/grid, …, (grid−1)/grid
    search_coarse: int = 0        # 0: every α of the grid; c: every c-th, then refined (search_scale)
    group_sizes: tuple = ()       # (linear short name, preferred g) pairs overriding group_size (quant/budget.py)
    int8: tuple = ()              # (block, linear short name) pairs stored int8 (quantize.py): not clipped,
                                  # and searched with 8-bit rounding
    int6: tuple = ()              # the same for pairs stored q6 (formats/q4.py quantize_q6): 6-bit rounding
    gptq: bool = False            # GPTQ chooses the codes for the clip's quantizers (gptq.py, docs/DESIGN.md §5.1)
    gptq_damp: float = 0.1        # GPTQ's dampening λ = gptq_damp · mean(diag H) (the paper: 0.01; 0.1 measured better)
    gptq_linears: tuple = ("q", "k")  # the linears GPTQ rounds (the others: RTN on the clip's ranges); q and k
                                      # only: on the others GPTQ over-fits the calibration (BENCHMARKS.md)

    def __post_init__(self):
        if self.bits not in (3, 4):
            raise UsageError(f"bits must be 3 or 4, got {self.bits}")
        if not (0.0 <= self.keep_salient < 100.0 and math.isfinite(self.keep_salient)):
            raise UsageError(f"keep-salient must be a percent in [0, 100), got {self.keep_salient}")
        if self.search_tokens < 0:
            raise UsageError(f"search_tokens must be >= 0, got {self.search_tokens}")
        if self.clip_joint_tokens < 0 or self.clip_sweeps < 0:
            raise UsageError("clip_joint_tokens and clip_sweeps must be >= 0")
        known = ("q", "k", "v", "o", "gate", "up", "down")
        if not self.gptq_linears or any(n not in known for n in self.gptq_linears):
            raise UsageError(f"gptq linears must be some of {', '.join(known)}, got {', '.join(self.gptq_linears)}")
        if not (0.0 < self.gptq_damp and math.isfinite(self.gptq_damp)):
            raise UsageError(f"gptq_damp must be a positive number, got {self.gptq_damp}")
        if self.gptq and self.keep_salient:
            raise UsageError("--gptq and --keep-salient do not combine (GPTQ would have to update the fp16 "
                             "channels too); drop one of them")
        if self.search_coarse < 0:
            raise UsageError(f"search_coarse must be >= 0, got {self.search_coarse}")
        for name in ("clip_tokens", "search_samples", "chunk_samples", "grid"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be at least 1, got {getattr(self, name)}")


# ----------------------------------------------------------------------------------------------
# The formulas (each has a readable twin in reference/awq.py)


def channel_abs_sum(x: np.ndarray) -> np.ndarray:
    """sum_t |X[t, j]| in float64, for accumulating x_mean over chunks.     [..., K] -> [K]"""
    return np.abs(x.reshape(-1, x.shape[-1])).sum(axis=0, dtype=np.float64)


def activation_mean(x: np.ndarray) -> np.ndarray:
    """x_mean[j] = mean_t |X[t, j]|.                                        [..., K] -> [K] float32"""
    x2 = x.reshape(-1, x.shape[-1])
    return (channel_abs_sum(x2) / x2.shape[0]).astype(np.float32)


def weight_mean(ws, group_size: int) -> np.ndarray:
    """w_mean[j]: mean over the rows of the group's stacked linears of |W| / max|W| of its
    (row, group).                                          list of [N_i, K] -> [K] float32"""
    w = np.abs(np.concatenate(ws, axis=0))                                    # [ΣN, K]
    n, k = w.shape
    wg = w.reshape(n, k // group_size, group_size)                            # [ΣN, G, g]
    rel = wg / (wg.max(axis=2, keepdims=True) + 1e-6)
    return rel.reshape(n, k).mean(axis=0).astype(np.float32)


def awq_scales(x_mean: np.ndarray, alpha: float, w_mean: np.ndarray | None = None) -> np.ndarray:
    """s = x_mean^α (or x_mean^α / (w_mean^(1−α) + 1e-4)), s = max(s, 1e-4), s /= sqrt(max·min).

    [K] -> [K] float32. α = 0 gives s = 1 exactly in the paper form.
    """
    xm = x_mean.astype(np.float64)
    s = xm ** alpha
    if w_mean is not None:
        s = s / (w_mean.astype(np.float64) ** (1.0 - alpha) + 1e-4)
    s = np.maximum(s, SCALE_FLOOR)
    s = s / np.sqrt(s.max() * s.min())
    return s.astype(np.float32)


def salient_channels(x_mean: np.ndarray, percent: float) -> np.ndarray | None:
    """The round(percent/100·K) input channels of largest x_mean, sorted; None when none."""
    m = int(round(percent / 100.0 * x_mean.size))
    if m == 0:
        return None
    top = np.argsort(-x_mean, kind="stable")[:m]
    return np.sort(top).astype(np.int32)


def fake_quantize(w: np.ndarray, bits: int, group_size: int, salient_idx=None) -> np.ndarray:
    """Q then dequant as stored (q4.rtn_codes, fp16 scales); salient columns stay (fp16) and take
    no part in their groups' ranges, as in q4.quantize_q4.            [N, K] -> [N, K] float32"""
    from ..formats.q4 import rtn_codes
    w = np.asarray(w, np.float32)
    if salient_idx is not None:
        w = w.copy()
        w[:, salient_idx] = 0.0
    q, scales, zeros = rtn_codes(w, bits, group_size)
    n, k = w.shape
    qg = q.reshape(n, k // group_size, group_size).astype(np.float32)
    w_hat = ((qg - zeros[..., None]) * scales[..., None].astype(np.float32)).reshape(n, k)
    if salient_idx is not None:
        w_hat[:, salient_idx] = 0.0         # codes equal the zero point there (q4.quantize_q4)
    return w_hat


def scaled_fake_quantize(w, s, bits, group_size, salient_idx=None, gram=None):
    """Q(W·diag(s))·diag(s)⁻¹: the weight the group's linear effectively has after scaling and
    rounding, in the original basis (salient columns exact up to fp16).    [N, K] -> [N, K]

    With gram (mean x_g x_gᵀ per group of the unscaled input, [G, g, g]), W·diag(s) is first
    clipped by the symmetric clip search on x ÷ s, as the clip step would: Q(clip(W·diag(s)))."""
    ws = w * s[None, :]
    if gram is not None:
        ws, _ = clip_search(ws, None, bits, group_size, salient_idx, scaled_gram(gram, s, group_size))
    w_hat = fake_quantize(ws, bits, group_size, salient_idx)
    if salient_idx is not None:
        w_hat[:, salient_idx] = ws[:, salient_idx].astype(np.float16).astype(np.float32)
    return w_hat / s[None, :]


# ----------------------------------------------------------------------------------------------
# Folding: the scales move into the op before, the fp function stays


def fold_scales(w: dict, group: ScaleGroup, s: np.ndarray) -> dict:
    """Divide the previous op's output by s and multiply the group's columns by s; a new dict.

    A norm weight [K] ÷ s; a previous linear's rows (and bias) ÷ s. The fp function is unchanged.
    """
    w = dict(w)
    prev = w[group.prev]
    if prev.ndim == 1:
        w[group.prev] = prev / s
    else:
        w[group.prev] = prev / s[:, None]
        if w.get(group.prev + "_bias") is not None:
            w[group.prev + "_bias"] = w[group.prev + "_bias"] / s
    for name in group.linears:
        w[name] = w[name] * s[None, :]
    return w


def can_fold(w: dict, group: ScaleGroup) -> bool:
    """The previous op's output size equals the group's input size (false for v -> o under GQA)."""
    return w[group.prev].shape[0] == w[group.linears[0]].shape[1]


# What each group's loss runs, from the group's input and the (possibly fake-quantized) weights.
MODULES = {
    "attention": lambda w, bs, x, cos, sin, lin: attention(w, bs, x, cos, sin) @ w["o"].T,
    "mlp": lambda w, bs, x, cos, sin, lin: mlp(w, x, bs.activation) @ w["down"].T,
    "linear": lambda w, bs, x, cos, sin, lin: x @ w[lin[0]].T,
}


# ----------------------------------------------------------------------------------------------
# Scale search for one group


@dataclasses.dataclass
class GroupResult:
    name: str
    scales: np.ndarray            # [K] the chosen s (ones if skipped or nothing finite)
    alpha: float | None           # None when the group was not searched
    losses: list                  # loss per α on the grid (nan for non-finite, or not measured: search_coarse)
    note: str = ""

    @property
    def loss_identity(self):
        return self.losses[0] if self.losses else None

    @property
    def loss_best(self):
        fin = [l for l in self.losses if np.isfinite(l)]
        return min(fin) if fin else None


def search_scale(w, bs, group: ScaleGroup, x, x_mean, cos, sin, bits, group_sizes, salient_idx=None,
                 duo=False, n_grid=N_GRID, grams=None, bits_of=None, coarse=0) -> GroupResult:
    """argmin over the α grid of L(s) = mean (Y_fp − Y_q)² through the group's module (with
    `coarse` c > 1: over every c-th α, then refined around the best; `coarse_to_fine`).

    w: the block's fp weights; x: the group's input on the search samples [B, T, K]; x_mean [K];
    group_sizes: {linear: g}; grams: {linear: mean x_g x_gᵀ [G, g, g]} for the linears that the
    clip search will clip (None: none): for each α, those are clipped before rounding, so the loss
    is that of weights as they will be stored (`scaled_fake_quantize`); bits_of: {linear: bits}
    where a linear is stored at other than `bits` (int8). Returns the chosen scales and every α's loss.
    """
    module = MODULES[group.module]
    y_fp = module(w, bs, x, cos, sin, group.linears)
    w_mean = None
    if duo:
        g = min(group_sizes[n] for n in group.linears)
        w_mean = weight_mean([w[n] for n in group.linears], g)

    def trial(alpha):
        s = awq_scales(x_mean, alpha, w_mean)
        wq = dict(w)
        for n in group.linears:
            wq[n] = scaled_fake_quantize(w[n], s, (bits_of or {}).get(n, bits), group_sizes[n], salient_idx,
                                         (grams or {}).get(n))
        with np.errstate(over="ignore", invalid="ignore"):
            d = module(wq, bs, x, cos, sin, group.linears) - y_fp
            return s, float(np.mean(np.square(d, dtype=np.float64)))

    losses, best, best_loss = [float("nan")] * n_grid, None, np.inf

    def measure(idx):                 # grid indices, in order (the same choice on any thread count)
        nonlocal best, best_loss
        for i, (s, loss) in zip(idx, parallel_map(lambda i: trial(i / n_grid), idx)):
            if np.isfinite(loss):
                losses[i] = loss
                if loss < best_loss:
                    best, best_loss = (i, s), loss
    for idx in coarse_to_fine(n_grid, coarse, lambda: None if best is None else best[0]):
        measure(idx)
    if best is None:
        return GroupResult(group.name, np.ones_like(x_mean), None, losses,
                           "every loss was non-finite: scales left at 1")
    return GroupResult(group.name, best[1], best[0] / n_grid, losses)


def coarse_to_fine(n_grid: int, coarse: int, best):
    """The grid indices search_scale measures, batch by batch: all of 0..n_grid−1 (coarse ≤ 1), else
    every coarse-th first, then for step = coarse/2, coarse/4, …, 1 the two neighbours best() ± step
    (best(): the index of the lowest loss so far, None if none was finite) not measured yet."""
    if coarse <= 1:
        yield list(range(n_grid))
        return
    seen = list(range(0, n_grid, coarse))
    yield seen
    step = coarse
    while step > 1:
        step //= 2
        b = best()
        if b is None:
            return
        idx = [i for i in (b - step, b + step) if 0 <= i < n_grid and i not in seen]
        seen += idx
        if idx:
            yield idx


# ----------------------------------------------------------------------------------------------
# Orchestration: block by block over the calibration set


@dataclasses.dataclass
class AWQResult:
    tensors: dict        # HF name -> float32 array: every block norm and linear (and bias) after AWQ
    salient: dict        # linear prefix (HF name without .weight) -> int32 salient channels
    layers: list         # per block: a JSON-able dict for the report
    notes: list          # things the user should know (one line each)



def _group_of_linear(groups):
    return {lin: g for g in groups for lin in g.linears}


def awq_block(w, bs, groups, x_all, cos, sin, settings: AWQSettings, group_sizes, clip_rows_idx,
              search_rows_idx=None, joint_rows_idx=None, int8=frozenset(), int8_group_size=128, int6=frozenset()):
    """AWQ on one block. x_all [n, T, D] fp block inputs; clip_rows_idx, search_rows_idx,
    joint_rows_idx: flat token indices (sample·T + position) of the clip search's tokens, of the
    scale loss's tokens for the token-wise modules (MLP, single linear; None: the search samples'
    tokens, as attention), and of the joint clip's cross-group moments (None: no joint clip).
    int8: the block's linears stored int8 (not clipped; 8-bit rounding in the scale search), in scale
    groups of int8_group_size (preferred; choose_group_size falls back per linear). int6: the same for
    linears stored q6 (6-bit rounding in the scale search).
    With settings.gptq, GPTQ chooses every linear's codes for the clip's quantizers (gptq.py): the
    weights dict then has the dequantized GPTQ weights and, under "gptq", {linear: Q4Linear | Q8Linear}.

    Returns (new weights dict, {linear: salient idx}, report dict, next block input [n, T, D]).
    """
    n, T, D = x_all.shape
    cs = settings.chunk_samples
    sums = {g.inp: 0.0 for g in groups}
    clip_rows = {g.inp: [] for g in groups}
    tok_rows = {g.inp: [] for g in groups if g.module != "attention" and search_rows_idx is not None}
    # per-group second moments of each clipped linear's input, over every calibration token
    no_clip = set(NO_CLIP) | set(int8) | set(int6)
    bits_of = {lin: 8 for lin in int8} | {lin: 6 for lin in int6}
    gsz = {g.inp: group_sizes[g.linears[0]] for g in groups if any(l not in no_clip for l in g.linears)}
    grams = {k: 0.0 for k in gsz} if settings.clip and settings.clip_all_tokens else {}
    fulls = {k: 0.0 for k in grams} if joint_rows_idx is not None else {}
    # GPTQ's H = mean x xᵀ over every calibration token, per input (the joint clip's `fulls` when those
    # moments already saw every token)
    all_joint = joint_rows_idx is not None and len(joint_rows_idx) == n * T
    hess = {g.inp: 0.0 for g in groups if not (all_joint and g.inp in fulls)} if settings.gptq else {}

    def rows_in(idx, a, b):                              # flat token indices inside samples [a, b)
        return idx[(idx >= a * T) & (idx < b * T)] - a * T

    def chunk(a):                                        # one chunk's share of every statistic
        b = min(n, a + cs)
        inter = block_forward(w, bs, x_all[a:b], cos, sin)
        flat = {key: inter[key].reshape(-1, inter[key].shape[-1]) for key in sums}
        st = {"out": inter["out"],
              "sums": {key: channel_abs_sum(inter[key]) for key in sums},
              "clip": {key: flat[key][rows_in(clip_rows_idx, a, b)] for key in sums},
              "grams": {key: group_gram(inter[key], gsz[key]) for key in grams}}
        if fulls:
            sel = rows_in(joint_rows_idx, a, b)
            st["fulls"] = {key: second_moments(flat[key][sel]) for key in fulls}
        st["hess"] = {key: second_moments(flat[key]) for key in hess}
        if search_rows_idx is not None:
            st["tok"] = {key: flat[key][rows_in(search_rows_idx, a, b)] for key in tok_rows}
        return a, b, st

    x_next = np.empty_like(x_all)
    for a, b, st in parallel_map(chunk, range(0, n, cs)):   # summed in chunk order: as serial
        x_next[a:b] = st["out"]
        for key in sums:
            sums[key] = sums[key] + st["sums"][key]
            clip_rows[key].append(st["clip"][key])
        for key in grams:
            grams[key] = grams[key] + st["grams"][key]
        for key in fulls:
            fulls[key] = fulls[key] + st["fulls"][key]
        for key in hess:
            hess[key] = hess[key] + st["hess"][key]
        for key in tok_rows:
            tok_rows[key].append(st["tok"][key])
        del st
    x_mean = {k: (v / (n * T)).astype(np.float32) for k, v in sums.items()}
    grams = {k: v / (n * T) for k, v in grams.items()}                  # mean x_g x_gᵀ
    fulls = {k: v / len(joint_rows_idx) for k, v in fulls.items()}      # mean x xᵀ on a token subset
    hess = {k: v / (n * T) for k, v in hess.items()}
    if settings.gptq:
        hess.update({g.inp: fulls[g.inp] for g in groups if g.inp not in hess})
    clip_x = {k: np.concatenate(v) for k, v in clip_rows.items()}

    ns = min(settings.search_samples, n)
    search = block_forward(w, bs, x_all[:ns], cos, sin)
    if search_rows_idx is not None:                      # token-wise modules: tokens from every sample
        search.update({k: np.concatenate(v)[None] for k, v in tok_rows.items()})   # [1, tokens, K]
    results, salient = {}, {}
    for g in groups:
        sal = salient_channels(x_mean[g.inp], settings.keep_salient)
        for lin in g.linears:
            salient[lin] = sal
        if not can_fold(w, g):
            results[g.name] = GroupResult(g.name, np.ones(w[g.linears[0]].shape[1], np.float32), None, [],
                                          f"not scaled: {g.prev} output {w[g.prev].shape[0]} ≠ "
                                          f"{g.linears[0]} input {w[g.linears[0]].shape[1]}")
            continue
        clipped = {}
        if settings.search_clip and g.inp in grams:
            clipped = {lin: grams[g.inp] for lin in g.linears if lin not in no_clip}
        results[g.name] = search_scale(w, bs, g, search[g.inp], x_mean[g.inp], cos, sin, settings.bits,
                                       group_sizes, sal, settings.duo, n_grid=settings.grid, grams=clipped,
                                       bits_of=bits_of, coarse=settings.search_coarse)
    del search

    w_new = w
    for g in groups:
        if results[g.name].alpha is not None:
            w_new = fold_scales(w_new, g, results[g.name].scales)

    of = _group_of_linear(groups)

    def finish(lin):                                     # clip one linear, measure its output error
        g = of[lin]
        s = results[g.name].scales
        wl, clip_rep = w_new[lin], None
        if settings.clip and lin not in no_clip:
            gram = full = None
            if g.inp in grams:                                  # mean x xᵀ per group, of x ÷ s
                gram = scaled_gram(grams[g.inp], s, gsz[g.inp])
            if g.inp in fulls:
                full = scaled_gram(fulls[g.inp][None], s, s.size)[0]
            wl, kept = clip_search(wl, clip_x[g.inp] / s[None, :], settings.bits, group_sizes[lin], salient[lin],
                                   gram, settings.clip_two_sided, full, settings.clip_sweeps)
            clip_rep = {"mean": float(kept.mean()), "min": float(kept.min()),     # range kept
                        "frac_clipped": float(np.mean(kept < 1.0))}
        err = _output_errors(w[lin], wl, s, clip_x[g.inp], bits_of.get(lin, settings.bits), group_sizes[lin],
                             salient[lin])
        packed = None
        if settings.gptq and lin in settings.gptq_linears:   # the codes for the clip's quantizers (gptq.py)
            from ..formats.q4 import choose_group_size
            from .gptq import gptq_linear
            bits = bits_of.get(lin, settings.bits)
            h = scaled_gram(hess[g.inp][None], s, s.size)[0]                # mean x xᵀ of x ÷ s
            g8 = choose_group_size(wl.shape[1], int8_group_size)              # as quantize.py stores int8
            packed, wl = gptq_linear(w_new[lin], wl, h, bits, g8 if bits == 8 else group_sizes[lin], settings.gptq_damp)
            err["gptq"] = _relative_error(w[lin], wl / s[None, :], clip_x[g.inp])
        return lin, wl, clip_rep, err, packed

    clip_report, err_report, packs = {}, {}, {}
    for lin, wl, clip_rep, err, packed in parallel_map(finish, list(of)):
        w_new[lin] = wl
        if packed is not None:
            packs[lin] = packed
        if clip_rep is not None:
            clip_report[lin] = clip_rep
        err_report[lin] = err

    if packs:
        w_new["gptq"] = packs                            # {linear: Q4Linear | Q8Linear}: stored as they are
    report = {
        "groups": {name: {"alpha": r.alpha, "loss_identity": r.loss_identity, "loss_best": r.loss_best,
                          "losses": r.losses, "note": r.note} for name, r in results.items()},
        "top_channels": {g.inp: _top(x_mean[g.inp]) for g in groups},
        "salient": {lin: (None if v is None else v.tolist()) for lin, v in salient.items()},
        "clip": clip_report,
        "output_error": err_report,
        "x_mean": {g.inp: x_mean[g.inp] for g in groups},
        "notes": [f"{r.name}: {r.note}" for r in results.values() if r.note],
    }
    return w_new, salient, report, x_next


def _top(x_mean, k=8):
    idx = np.argsort(-x_mean, kind="stable")[:k]
    return [[int(i), float(x_mean[i])] for i in idx]


def _relative_error(w_fp, w_hat, x):
    """||X(Ŵ−W)ᵀ|| / ||XWᵀ||."""
    ref = x @ w_fp.T
    return float(np.linalg.norm(x @ w_hat.T - ref)) / (float(np.linalg.norm(ref)) or 1.0)


def _output_errors(w_fp, w_awq, s, x, bits, g, sal):
    """Relative output error ||X(Ŵ−W)ᵀ|| / ||XWᵀ|| on the clip tokens: RTN vs AWQ (scaled, clipped,
    salient), and the relative weight error of each."""
    ref = x @ w_fp.T
    norm = float(np.linalg.norm(ref)) or 1.0
    w_rtn = fake_quantize(w_fp, bits, g)
    w_hat = scaled_fake_quantize(w_awq / s[None, :], s, bits, g, sal)
    return {"rtn": float(np.linalg.norm(x @ w_rtn.T - ref)) / norm,
            "awq": float(np.linalg.norm(x @ w_hat.T - ref)) / norm,
            "rtn_weight": float(np.linalg.norm(w_rtn - w_fp) / np.linalg.norm(w_fp)),
            "awq_weight": float(np.linalg.norm(w_hat - w_fp) / np.linalg.norm(w_fp))}


def run_awq(src, cfg, ids: np.ndarray, settings: AWQSettings, progress: bool = True) -> AWQResult:
    """AWQ over every block of the model in `src` (a checkpoint.TensorSource) on calibration token
    ids [n, T]. Deterministic for a seed. The result holds fp tensors ready for the int4 writer
    (the whole model in float32: `awq_blocks` streams them block by block instead)."""
    res = AWQResult({}, {}, [], [])
    for _, tensors, _ in awq_blocks(src, cfg, ids, settings, res, progress):
        res.tensors.update(tensors)
    return res


def awq_blocks(src, cfg, ids: np.ndarray, settings: AWQSettings, res: AWQResult, progress: bool = True):
    """AWQ block after block: yields (block index, that block's fp tensors, its salient channels)
    and records each block's report and notes in `res` (res.salient too; res.tensors untouched).
    What is held at once: the calibration inputs of one block ([n, T, D] float32, and the next
    block's), one block's weights, and the statistics of one chunk of samples (awq_block)."""
    from tqdm import tqdm

    from ..formats.q4 import choose_group_size
    from ..formats.safetensors import to_float32
    from ..formats.tensors import BIASED, GLOBAL_TENSORS, block_linears, block_norms, check_shape

    groups = SCALE_GROUPS.get(cfg.model_type)
    if groups is None:
        raise UsageError(f"AWQ has no scale-group table for model_type {cfg.model_type!r}")
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.size == 0:
        raise UsageError("calibration ids must be a non-empty [samples, tokens] array")
    n, T = ids.shape
    emb_name, emb_shape = GLOBAL_TENSORS["embed"]
    emb, emb_dt = src.raw(emb_name)
    check_shape(emb_name, emb.shape, emb_shape(cfg))
    x_all = embed_rows(cfg, to_float32(emb[ids], emb_dt))       # [n, T, D]; only the rows used are read
    clip_idx = clip_token_index(n, T, settings.clip_tokens, settings.seed)
    search_idx = None
    if settings.search_tokens:
        rng = np.random.default_rng([settings.seed, 1])
        search_idx = np.sort(rng.choice(n * T, size=min(settings.search_tokens, n * T), replace=False))
    joint_idx = None
    if settings.clip and settings.clip_all_tokens and settings.clip_joint_tokens:
        rng = np.random.default_rng([settings.seed, 2])
        joint_idx = np.sort(rng.choice(n * T, size=min(settings.clip_joint_tokens, n * T), replace=False))

    bar = tqdm(total=cfg.num_hidden_layers, desc=f"AWQ W{settings.bits}", unit="block", disable=not progress)
    try:        # the caller may stop asking for blocks (an error while writing): the bar closes anyway
        for i in range(cfg.num_hidden_layers):
            w = load_block(src, cfg, i)
            bs = BlockShape.of(cfg, i)
            cos, sin = rope_tables(cfg, T, i)
            linears = list(block_linears(cfg, i))
            pref = dict(settings.group_sizes)
            gs = {k: choose_group_size(k_in, pref.get(k, settings.group_size)) for _, k, _, (_, k_in) in linears}
            w_new, sal, rep, x_all = awq_block(w, bs, groups, x_all, cos, sin, settings, gs, clip_idx, search_idx,
                                                  joint_rows_idx=joint_idx,
                                                  int8=frozenset(k for j, k in settings.int8 if j == i),
                                                  int8_group_size=INT8_GROUP_SIZE,
                                                  int6=frozenset(k for j, k in settings.int6 if j == i))
            del w
            src.release_pages()            # the block's mapped source pages are read (TensorSource.release_pages)
            tensors, salient = {}, {}
            for k, name, _ in block_norms(cfg, i):
                tensors[name] = stored_norm(cfg, w_new[k])
            for _, k, prefix, _ in linears:
                tensors[prefix + ".weight"] = w_new[k].astype(np.float32)
                packed = w_new.get("gptq", {}).get(k)
                if packed is not None:                  # GPTQ's codes: the writer stores these, not RTN's
                    tensors[prefix + ".qweight"], tensors[prefix + ".scales"] = packed.qweight, packed.scales
                    if hasattr(packed, "zeros"):
                        tensors[prefix + ".zeros"] = packed.zeros
                if cfg.attention_bias and k in BIASED:
                    tensors[prefix + ".bias"] = w_new[k + "_bias"].astype(np.float32)
                if sal.get(k) is not None:
                    salient[prefix] = sal[k]
            del w_new
            rep["layer"] = i
            rep["group_size"] = gs
            res.notes += [f"block {i}: {m}" for m in rep["notes"] if "non-finite" in m]
            res.layers.append(rep)
            res.salient.update(salient)
            bar.set_postfix_str(" ".join(f"{k}={_fmt_alpha(v['alpha'])}" for k, v in rep["groups"].items()))
            bar.update(1)
            yield i, tensors, salient
    finally:
        bar.close()


def _fmt_alpha(a):
    return "—" if a is None else f"{a:.2f}"
