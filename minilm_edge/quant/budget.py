"""Mixed precision under a size budget (`quantize --target-bpw` / `--max-size`, docs/DESIGN.md §3.5):
which linears get a smaller int4 group size (more bits per weight), chosen by measurement.

Units. A unit is one AWQ scale group (awq.SCALE_GROUPS: q|k|v, o, gate|up, down) in every block at
once. That is the finest choice that keeps every kernel at full speed: the linears of a group are
fused into one at run time and must share a group size (linear.Q4.fuse), and the one-call decode
plan stacks each kind of linear across the blocks with one group size (runtime/decode.py stack_q4).
Any other split leaves the decode plan and runs the per-linear path. Every option is the same
minilm-q4 format and kernels; only g differs: bits per weight 4 + 24/g (4.1875, 4.375, 4.75 at
g = 128, 64, 32).

Sensitivity (measured, on calibration tokens; the same text AWQ then uses):

    S(u, g) = mean over tokens of KL( p_fp ‖ p_{u at g} )

    p_fp        the full-precision model's next-token distribution (NumPy, quant/llama_block.py)
    p_{u at g}  the same model with only unit u's linears, in every block, RTN-rounded at group size g

Allocation (greedy, the classic knapsack heuristic): start from every unit at its largest group
size; repeatedly take the step "unit u from g to its next smaller g'" with the largest drop
S(u, g) − S(u, g') per byte added, among the steps that still fit the budget; stop when none fits
or none lowers S. The KL of single-unit changes is assumed additive (measured on RTN, applied
before AWQ, which lowers every unit's error but not their order: BENCHMARKS.md, issue 17).

Sizes are predicted from the shapes (tensor bytes + the safetensors header), and the folder
written is checked against the budget before it appears (quantize.py).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import UsageError
from ..formats.q4 import GROUP_SIZES, choose_group_size

HEADER_BYTES_PER_TENSOR = 96        # safetensors JSON per tensor, beyond its name (dtype, shape, offsets)
CONFIG_BYTES = 64 * 1024            # room kept for config.json (per-layer group sizes are listed there)
SENSITIVITY_TOKENS = 512            # calibration tokens the KL is measured on


def linear_bytes(n: int, k: int, g: int, n_salient: int = 0) -> int:
    """Bytes of one minilm-q4 linear: codes, fp16 scale + uint8 zero per group, salient columns."""
    return n * k // 2 + 3 * n * (k // g) + n_salient * (2 * n + 4)


def q8_bytes(n: int, k: int, g: int) -> int:
    """Bytes of one int8 (Q8Linear) table: codes and an fp16 scale per group."""
    return n * k + 2 * n * (k // g)


@dataclasses.dataclass(frozen=True)
class Unit:
    name: str           # the scale group's name: "qkv", "o", "gate_up", "down"
    linears: tuple      # short linear names
    options: tuple      # group sizes it may take, largest first


def units(cfg, group_size: int) -> list:
    """The budget's units for this architecture, each with its group-size options."""
    from ..formats.tensors import block_linears
    from .awq import SCALE_GROUPS
    k_of = {key: k for _, key, _, (_, k) in block_linears(cfg, 0)}
    out = []
    for grp in SCALE_GROUPS.get(cfg.model_type, ()):
        k = k_of[grp.linears[0]]
        base = choose_group_size(k, group_size)
        out.append(Unit(grp.name, grp.linears, tuple(g for g in GROUP_SIZES if g <= base and k % g == 0)))
    return out


def weight_file_bytes(cfg, group_of: dict, group_size: int, embed: str, quantize_head: str | None,
                      salient_percent: float = 0.0) -> int:
    """Predicted bytes of model.safetensors for linears at group sizes `group_of` {short name: g}
    (others at choose_group_size(K, group_size)), the embedding "fp16"/"int8"/"q6", the head as
    quantize.quantized_tensors writes it, `salient_percent` of each linear's input channels in fp16
    (as awq.salient_channels rounds it)."""
    from ..formats.tensors import BIASED, GLOBAL_TENSORS, HEAD, block_linears, block_norms
    names, total = [], 0
    V, D = cfg.vocab_size, cfg.hidden_size
    g_d = choose_group_size(D, group_size)
    if embed in ("int8", "q6"):
        names += ["model.embed_tokens.qweight", "model.embed_tokens.scales"]
        total += q8_bytes(V, D, g_d) if embed == "int8" else q6_bytes(V, D, g_d)
    else:
        names.append(GLOBAL_TENSORS["embed"][0])
        total += 2 * V * D
    names.append(GLOBAL_TENSORS["norm"][0])
    total += 2 * D
    for i in range(cfg.num_hidden_layers):
        for _, name, (d,) in block_norms(cfg, i):
            names.append(name)
            total += 2 * d
        for _, key, prefix, (n, k) in block_linears(cfg, i):
            g = group_of.get(key) or choose_group_size(k, group_size)
            n_salient = int(round(salient_percent / 100.0 * k))
            names += [prefix + s for s in (".qweight", ".scales", ".zeros")]
            total += linear_bytes(n, k, g, n_salient)
            if n_salient:
                names += [prefix + ".salient_idx", prefix + ".salient_w"]
            if cfg.attention_bias and key in BIASED:
                names.append(prefix + ".bias")
                total += 4 * n
    head = HEAD[0]
    if not (embed != "fp16" and cfg.tie_word_embeddings) and (quantize_head or not cfg.tie_word_embeddings):
        if quantize_head == "int8":
            names += [head + ".qweight", head + ".scales"]
            total += q8_bytes(V, D, g_d)
        elif quantize_head == "int4":
            names += [head + s for s in (".qweight", ".scales", ".zeros")]
            total += linear_bytes(V, D, g_d)
        else:
            names.append(head + ".weight")
            total += 2 * V * D
    header = 8 + 64 + sum(len(n) + HEADER_BYTES_PER_TENSOR for n in names)
    return total + header


def q6_bytes(n: int, k: int, g: int) -> int:
    """Bytes of one q6 table (formats/q4.py pack_q6): codes 4 in 3 bytes and an fp16 scale per group."""
    return 3 * n * k // 4 + 2 * n * (k // g)


@dataclasses.dataclass
class Allocation:
    group_of: dict          # short linear name -> group size
    unit_groups: dict       # unit name -> group size
    predicted_bytes: int    # model.safetensors
    budget_bytes: int       # model.safetensors may take at most this many
    sensitivity: dict       # unit name -> {g: mean KL per token}

    def record(self) -> dict:
        """For quantization_config["mixed_precision"]."""
        return {"group_size": self.unit_groups, "predicted_weight_bytes": self.predicted_bytes,
                "weight_budget_bytes": self.budget_bytes, "sensitivity_kl": self.sensitivity,
                "sensitivity_tokens": SENSITIVITY_TOKENS, "unit": "AWQ scale group in every block"}


def weight_budget(cfg, target_bpw: float | None, max_size: int | None, other_bytes: int) -> int:
    """The budget as bytes of model.safetensors: target_bpw × parameters / 8 (whole-file bits per
    weight, describe.file_bpw), or max_size less the folder's other files and config.json's room."""
    from ..formats.tensors import parameter_count
    if (target_bpw is None) == (max_size is None):
        raise UsageError("give one of --target-bpw and --max-size")
    if target_bpw is not None:
        if not (np.isfinite(target_bpw) and target_bpw > 0):
            raise UsageError(f"--target-bpw must be a positive number of bits per weight, got {target_bpw}")
        return int(target_bpw * parameter_count(cfg) / 8)
    if max_size <= 0:
        raise UsageError(f"--max-size must be a positive number of bytes, got {max_size}")
    return max_size - other_bytes - CONFIG_BYTES


def check_fits(unit_list: list, budget: int, size_of) -> None:
    """UsageError (one line) unless every unit at its largest group size fits the budget."""
    size = size_of({u.name: u.options[0] for u in unit_list})
    if size > budget:
        raise UsageError(f"the budget leaves {budget:,} bytes for model.safetensors, but int4 at the largest "
                         f"group sizes needs {size:,}; raise the budget (or store the embedding int8: --embed int8)")


def allocate(unit_list: list, sensitivity: dict, budget: int, size_of) -> dict:
    """Greedy choice of each unit's group size (module docstring). size_of({unit: g}) -> bytes.
    Returns {unit name: g}; UsageError if even the largest group sizes do not fit."""
    check_fits(unit_list, budget, size_of)
    choice = {u.name: u.options[0] for u in unit_list}
    size = size_of(choice)
    while True:
        best = None
        for u in unit_list:
            i = u.options.index(choice[u.name])
            if i + 1 == len(u.options):
                continue
            g, g2 = u.options[i], u.options[i + 1]
            trial = {**choice, u.name: g2}
            cost = size_of(trial) - size
            gain = sensitivity[u.name][g] - sensitivity[u.name][g2]
            if gain > 0 and size + cost <= budget and (best is None or gain / cost > best[0]):
                best = (gain / cost, trial)
        if best is None:
            return choice
        choice = best[1]
        size = size_of(choice)


def unit_sensitivity(src, cfg, ids: np.ndarray, unit_list: list, progress: bool = True) -> dict:
    """S(u, g) for every unit and option (module docstring) on calibration ids [n, T] (the first
    SENSITIVITY_TOKENS tokens of them, whole samples). -> {unit: {g: mean KL}}"""
    from tqdm import tqdm

    from ..formats.tensors import GLOBAL_TENSORS, HEAD
    from .awq import fake_quantize
    from .llama_block import BlockShape, block_forward, load_block, rms_norm, rope_tables

    n, T = ids.shape
    ids = ids[:max(1, min(n, SENSITIVITY_TOKENS // T))]
    bs = BlockShape.of(cfg)
    cos, sin = rope_tables(cfg, ids.shape[1])
    blocks = [load_block(src, cfg, i) for i in range(cfg.num_hidden_layers)]
    en, es = GLOBAL_TENSORS["embed"]
    embed = src.float32(en, es(cfg))
    head = embed if HEAD[0] + ".weight" not in src else src.float32(HEAD[0] + ".weight", HEAD[1](cfg))
    nn, ns = GLOBAL_TENSORS["norm"]
    norm = src.float32(nn, ns(cfg))

    def logp(swap):                       # swap: {short name: g} linears RTN-rounded; -> [tokens, V]
        x = embed[ids].astype(np.float32)                                    # [B, T, D]
        for w in blocks:
            wq = {**w, **{k: fake_quantize(w[k], 4, g) for k, g in swap.items()}}
            x = block_forward(wq, bs, x, cos, sin)["out"]
        z = rms_norm(x, norm, bs.eps).reshape(-1, x.shape[-1]) @ head.T      # [tokens, V]
        z = z.astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        return (z - np.log(np.exp(z).sum(axis=1, keepdims=True))).astype(np.float32)

    trials = [(u, g) for u in unit_list for g in u.options]
    bar = tqdm(total=len(trials) + 1, desc="sensitivity", unit="pass", disable=not progress, leave=False)
    ref = logp({})
    p_ref = np.exp(ref)
    bar.update(1)
    out = {}
    for u, g in trials:
        kl = float(np.mean(np.sum(p_ref * (ref - logp({k: g for k in u.linears})), axis=1)))
        out.setdefault(u.name, {})[g] = kl
        bar.update(1)
    bar.close()
    return out
