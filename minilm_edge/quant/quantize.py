"""Write a quantized model folder (minilm-q4 v1) from a full-precision one.

`quantize(src, out, method="rtn")` rounds every block linear to int4 per group (q4.py, docs/DESIGN.md §4);
`method="awq"` first transforms the full-precision weights with AWQ (awq.py: scales folded into the
norms and previous linears, clipped ranges, optional fp16 salient channels) on calibration tokens
(calibration.py: text files or self-generated), then hands them to the same writer.
Embeddings and norms are stored fp16, and lm_head fp16 unless `quantize_head` asks for int8/int4.
The output is a complete model folder (tokenizer and chat template files are copied), written to a
temporary folder next to `out` and renamed into place at the end: an interrupted run leaves nothing.
With `report=True` (AWQ), report.html and report.json are written into that folder too.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..formats.folder import check_free_space, check_out_dir, copied_files, write_model_folder
from ..formats.manifest import provenance, write_manifest
from ..formats.q4 import GROUP_SIZES, choose_group_size
from ..formats.tensors import (
    EMBED_PREFIX,
    GLOBAL_TENSORS,
    HEAD,
    TensorSource,
    block_linears,
    block_norms,
    check_block_count,
)
from ..runtime.config import load_config
from ..version import __version__
from .awq import INT6_GROUP_SIZE, INT8_GROUP_SIZE
from .calibration import GENERATORS

HEAD_FORMATS = ("int8", "int4")
EMBED_FORMATS = ("fp16", "int8", "q6")
METHODS = ("awq", "rtn")
DEFAULT_SAMPLES = 128                  # calibration samples drawn from text files
DEFAULT_SELF_GENERATED_SAMPLES = 64    # generating costs about one more pass: fewer keep AWQ ≤ 10 min


def _tool_version():
    return f"minilm_edge {__version__}"


# The source files whose code decides a quantized folder's bytes: this package's quantizers and the
# writers of the stored formats. Their digest goes into every folder's quantization_config and into
# the store's recipes, so that a changed quantizer makes a new version even when the package version
# stays the same (a development checkout, a patched install). Comments count too: a false "changed"
# costs one re-quantization, a false "unchanged" would serve a model today's code does not make.
QUANTIZER_SOURCES = ("quant/*.py", "formats/q4.py", "formats/safetensors.py")


def quantizer_code_digest(root=None) -> str:
    """'sha256:' + the first 16 hex digits of the sha256 over QUANTIZER_SOURCES (path and bytes,
    sorted by path, relative to the package folder `root`, this package's by default)."""
    root = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted({f for pattern in QUANTIZER_SOURCES for f in root.glob(pattern)}):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return "sha256:" + h.hexdigest()[:16]


def _progress(total, desc, enabled):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="layer", disable=not enabled, leave=False)


def quantize(src_dir, out_dir, *, method: str = "rtn", bits: int = 4, group_size: int = 128,
             quantize_head: str | None = None, embed: str = "fp16", progress: bool = True, linear_hook=None,
             extra_config: dict | None = None, calib=None, samples: int | None = None, seq_len: int = 512,
             keep_salient: float = 0.0, duo: bool = False, seed: int = 0, report: bool = False,
             eval_data=None, eval_ctx: int = 512, eval_tokens: int | None = 16384,
             target_bpw: float | None = None, max_size: int | None = None, int8: str | None = None,
             gptq: bool = False, awq_options: dict | None = None, generator: str = "int4",
             int6: str | None = None, embed_group_size: int | None = None) -> Path:
    """Quantize every block linear of `src_dir` and write the model folder `out_dir`.

    method "rtn" rounds the weights as they are; "awq" calibrates on `calib` (text files; None: text
    the model generates itself, `samples` × `seq_len` tokens, reproducible by `seed`), keeps
    `keep_salient` percent of input channels in fp16 (samples default: 128 from files, 64
    self-generated), and with `duo` uses the duo scale form. `generator` ("int4" or "float") is the
    model that writes self-generated text (calibration.py: the source rounded to int4 in memory and
    decoded by the int4 batched runtime, about 3x faster, or the full-precision model).
    `report` writes report.html/json (AWQ); `eval_data` (a text file) adds perplexities of the
    source, RTN and AWQ on its first `eval_tokens` tokens in windows of `eval_ctx`.
    `embed` "int8" stores the embedding as int8 (formats/q4.py Q8Linear); with tied embeddings that
    one table is also the head (no lm_head tensors), so `quantize_head` may only be None or "int8".
    `target_bpw` (bits per weight of the whole weight file) or `max_size` (bytes of the whole
    folder): mixed precision, each AWQ scale group's linears at the group size a measured
    sensitivity picks within the budget (budget.py); the folder written is checked against it.
    `int8` (see `int8_linears`, e.g. "v@all,down@more") stores those block linears as int8
    (formats/q4.py Q8Linear, g = 128 where it divides K): more bits where llama.cpp's k-quant
    recipes also put them; AWQ does not clip them and searches their scales with 8-bit rounding.
    `int6` (the same syntax): block linears stored q6 (formats/q4.py: 6-bit codes, 3 bytes per 4, an
    fp16 scale per INT6_GROUP_SIZE weights; mapped as stored); it takes precedence over `int8`, so
    int6="v@all,down@more" turns the default recipe's int8 linears 6-bit. `embed` "q6" stores the
    embedding that way; `embed_group_size` its scale groups (default: `group_size`).
    `gptq` (AWQ only): GPTQ error feedback chooses the codes for the quantizers AWQ's clip search fixed
    (gptq.py); the folder stores exactly those codes.
    `linear_hook(layer, name, w) -> (w, salient_idx)` lets a caller transform a weight before rounding.
    `awq_options`: further AWQSettings fields (awq.py), e.g. the store's first-run search settings.
    """
    import dataclasses

    from .awq import AWQSettings

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {method}")
    if bits not in (3, 4):
        raise UsageError(f"--bits must be 3 or 4 for the packed int4 format, got {bits}")
    if group_size not in GROUP_SIZES:
        raise UsageError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    if quantize_head not in (None, *HEAD_FORMATS):
        raise UsageError(f"--quantize-head must be one of {', '.join(HEAD_FORMATS)}, got {quantize_head}")
    if embed not in EMBED_FORMATS:
        raise UsageError(f"--embed must be one of {', '.join(EMBED_FORMATS)}, got {embed}")
    if method == "rtn" and (calib or keep_salient or duo or report or eval_data or gptq):
        raise UsageError("--calib, --keep-salient, --duo, --gptq, --report and --eval apply to --method awq only")
    budgeted = target_bpw is not None or max_size is not None
    if budgeted and method != "awq":
        raise UsageError("--target-bpw and --max-size measure on calibration text: use --method awq")
    if generator not in GENERATORS:
        raise UsageError(f"--generator must be one of {', '.join(GENERATORS)}, got {generator}")
    if calib and generator != "int4":
        raise UsageError("--generator chooses who writes self-generated calibration text: not with --calib")
    if eval_data and not report:
        raise UsageError("--eval fills in the report: give --report too")
    own = {"bits", "group_size", "duo", "keep_salient", "seed", "int8", "int6", "gptq"}   # quantize's own arguments
    unknown = set(awq_options or {}) - ({f.name for f in dataclasses.fields(AWQSettings)} - own)
    if unknown:
        raise UsageError(f"unknown AWQ settings: {', '.join(sorted(unknown))}")
    cfg0 = load_config(src_dir)
    six = int8_linears(int6, cfg0.num_hidden_layers, "--int6")
    eight = tuple(sorted(set(int8_linears(int8, cfg0.num_hidden_layers)) - set(six)))
    if six and gptq:
        raise UsageError("--int6 and --gptq do not combine (GPTQ writes int4 and int8 codes only)")
    if six and (budgeted or keep_salient):
        raise UsageError("--int6 does not combine with --target-bpw/--max-size or --keep-salient")
    embed_g = group_size if embed_group_size is None else embed_group_size
    if embed_g not in GROUP_SIZES:
        raise UsageError(f"--embed-group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {embed_g}")
    if embed_group_size is not None and budgeted:
        raise UsageError("--embed-group-size does not combine with --target-bpw/--max-size")
    if eight and (target_bpw is not None or max_size is not None):
        raise UsageError("--int8 picks its layers itself: give a --group-size instead of --target-bpw/--max-size")
    if eight and keep_salient:
        raise UsageError("--int8 and --keep-salient do not combine (the int8 format keeps no fp16 channels)")
    settings = AWQSettings(bits=bits, group_size=group_size, duo=duo, keep_salient=keep_salient, seed=seed,
                           int8=eight, int6=six, gptq=gptq, **(awq_options or {}))
    if samples is None:
        samples = DEFAULT_SAMPLES if calib else DEFAULT_SELF_GENERATED_SAMPLES
    if samples < 1 or seq_len < 2:
        raise UsageError(f"--samples must be ≥ 1 and --seq-len ≥ 2, got {samples} and {seq_len}")
    check_out_dir(out_dir)
    cfg = load_config(src_dir)
    copies = copied_files(src_dir)                         # before any work: links that leave the folder
    if cfg.quantization:
        raise UsageError(f"{src_dir} is already quantized; quantize a full-precision model")
    for _, _, _, (_, k) in block_linears(cfg, 0):      # fail before any work if a layer can't be stored
        choose_group_size(k, group_size)
    if embed != "fp16":
        choose_group_size(cfg.hidden_size, embed_g)
        if cfg.tie_word_embeddings and quantize_head == "int4":
            raise UsageError(f"--embed {embed} with tied embeddings makes the {embed} embedding the head too; "
                             "drop --quantize-head int4 or keep the embedding fp16 (--embed fp16)")
    if method == "awq" and seq_len > cfg.max_position_embeddings:
        raise UsageError(f"--seq-len {seq_len} exceeds the model's context of {cfg.max_position_embeddings}")
    eval_text = None
    if eval_data is not None:
        from ..runtime.evaluate import read_text
        eval_text = read_text(eval_data)
        eval_ctx = min(eval_ctx, cfg.max_position_embeddings)     # recorded in the report
    src = TensorSource(src_dir)
    check_block_count(src, cfg)
    src.check_finite()
    # An upper bound of the output: every tensor in fp16 (int4 linears take about a quarter of
    # that), plus a quantized head stored beside a tied embedding.
    numel = sum(int(np.prod(src.raw(n)[0].shape, dtype=np.int64)) for n in src.where)
    head = cfg.vocab_size * cfg.hidden_size if quantize_head and cfg.tie_word_embeddings and embed == "fp16" else 0
    check_free_space(out_dir, 2 * numel + head)
    plan = None
    if budgeted:
        from . import budget as B
        unit_list = B.units(cfg, group_size)
        size_of = lambda choice: B.weight_file_bytes(
            cfg, {lin: choice[u.name] for u in unit_list for lin in u.linears}, group_size, embed, quantize_head,
            keep_salient)
        other = sum(p.stat().st_size for p in copies.values())
        plan = (B, unit_list, size_of, B.weight_budget(cfg, target_bpw, max_size, other))
        B.check_fits(unit_list, plan[3], size_of)             # before any work
    block_fp, awq_res, calib_set, alloc = None, None, None, None
    if method == "awq":
        block_fp, awq_res, calib_set, alloc = _run_awq(src_dir, src, cfg, calib, samples, seq_len, settings,
                                                       progress, plan, generator)
    group_of = alloc.group_of if alloc is not None else None

    out, per_layer_g = quantized_tensors(src, cfg, method, bits, group_size, quantize_head, progress,
                                         linear_hook, block_fp=block_fp, embed=embed, group_of=group_of,
                                         int8=eight, int6=six, embed_group_size=embed_g)
    if method == "awq":
        for note in awq_res.notes:
            print(f"note: {note}", file=sys.stderr)
        extra_config = {"awq": _awq_config(settings, calib_set, awq_res), **(extra_config or {})}
        if alloc is not None:
            extra_config["mixed_precision"] = alloc.record()
    config = json.loads((src_dir / "config.json").read_text(encoding="utf-8"))
    config["torch_dtype"] = "float16"
    config["quantization_config"] = {
        "quant_method": "minilm-q4", "format_version": 1, "method": method, "bits": bits,
        "group_size": group_size, "group_size_per_layer": per_layer_g, "zero_point": True,
        "lm_head": _head_record(cfg, quantize_head, embed), "embed": "float16" if embed == "fp16" else embed,
        **({"embed_group_size": choose_group_size(cfg.hidden_size, embed_g)}       # as stored (falls back as int4)
           if embed != "fp16" and embed_g != group_size else {}),
        **({"int8_linears": int8, "int8_layers": _layers_of(eight)} if eight else {}),
        **({"int6_linears": int6, "int6_layers": _layers_of(six), "int6_group_size": INT6_GROUP_SIZE} if six else {}),
        "tool": _tool_version(), "code": quantizer_code_digest(),
        "source": {"path": str(src_dir.resolve()), "weights_sha256": weights_digest(src)},
        **(extra_config or {}),
    }
    qc = config["quantization_config"]

    def finish(tmp):
        if alloc is not None:
            _check_budget(tmp, alloc, max_size)
        if report:
            from .report import write_report
            write_report(tmp, src_dir, src, cfg, awq_res, calib_set, settings, qc,
                         lambda: quantized_tensors(src, cfg, "rtn", bits, group_size, quantize_head, False,
                                                   embed=embed, group_of=group_of,
                                                   embed_group_size=embed_g)[0],
                         eval_text, eval_ctx, eval_tokens, progress)
        calibration = calib_set.describe() if calib_set is not None else None
        recipe = {"kind": "quantize", "source_weights_sha256": qc["source"]["weights_sha256"],
                  "settings": {k: v for k, v in qc.items() if k in RECIPE_KEYS}, "calibration": calibration,
                  "awq": {k: v for k, v in (qc.get("awq") or {}).items() if k not in ("alpha", "notes")},
                  "tool": qc["tool"], "code": qc["code"]}
        write_manifest(tmp, recipe, provenance(source=qc["source"], method=method, calibration=calibration))
    return write_model_folder(src_dir, out_dir, out, config, before_rename=finish)


# quantization_config keys that are settings (the rest is provenance or a result)
RECIPE_KEYS = ("quant_method", "format_version", "method", "bits", "group_size", "group_size_per_layer", "zero_point",
               "lm_head", "embed", "mixed_precision", "int8_linears", "int8_layers", "embed_group_size",
               "int6_linears", "int6_layers", "int6_group_size")

LINEAR_NAMES = ("q", "k", "v", "o", "gate", "up", "down")


def more_bits_layers(n_layers: int) -> list:
    """The layers llama.cpp's Q4_K_M gives more bits (Q6_K) in attn_v and ffn_down (`use_more_bits` in
    src/llama-quant.cpp): the first and last eighth, and every third layer between."""
    a, b = n_layers // 8, 7 * n_layers // 8
    return [i for i in range(n_layers) if i < a or i >= b or (i - a) % 3 == 2]


def end_layers(n_layers: int) -> list:
    """The first and the last ⌈L/8⌉ layers: where the default recipe keeps o at 6 bits (on SmolLM2's 30
    layers 0-3 and 26-29, the spec measured on WikiText-2 validation, BENCHMARKS.md "q6 …")."""
    e = -(-n_layers // 8)
    return [i for i in range(n_layers) if i < e or i >= n_layers - e]


def _layers_of(pairs) -> dict:
    """{linear: [layers]} of (layer, linear) pairs, for quantization_config."""
    return {k: sorted(j for j, kk in pairs if kk == k) for k in sorted({k for _, k in pairs})}


def int8_linears(spec: str | None, n_layers: int, flag: str = "--int8") -> tuple:
    """Parse `--int8` (or `--int6`, named `flag` in errors): comma-separated LINEAR@LAYERS, LINEAR one of
    q k v o gate up down, LAYERS `all`,
    `more` (`more_bits_layers`), `ends` (`end_layers`) or indices and ranges joined by '+' (`0-2+27+29`).
    -> sorted ((layer, linear), ...); () for None or ""."""
    if not spec:
        return ()
    out = set()
    for item in spec.split(","):
        lin, _, layers = item.strip().partition("@")
        if lin not in LINEAR_NAMES or not layers:
            raise UsageError(f"{flag}: expected LINEAR@LAYERS with LINEAR one of {' '.join(LINEAR_NAMES)} "
                             f"and LAYERS all, more, ends or e.g. 0-2+27, got {item.strip()!r}")
        if layers == "all":
            idx = range(n_layers)
        elif layers == "more":
            idx = more_bits_layers(n_layers)
        elif layers == "ends":
            idx = end_layers(n_layers)
        else:
            idx = []
            for part in layers.split("+"):
                a, _, b = part.partition("-")
                if not a.isdigit() or (b and not b.isdigit()):
                    raise UsageError(f"{flag}: layers must be all, more, ends or N, N-M joined by '+', got {layers!r}")
                idx += range(int(a), int(b or a) + 1)
            if any(i >= n_layers for i in idx):
                raise UsageError(f"{flag}: layer {max(idx)} does not exist (the model has {n_layers})")
        out |= {(i, lin) for i in idx}
    return tuple(sorted(out))


def _head_record(cfg, quantize_head, embed) -> str:
    """quantization_config's "lm_head": the head's format, or that it is the int8 embedding."""
    if embed != "fp16" and cfg.tie_word_embeddings:
        return f"{embed} (the tied embedding, stored once)"
    return quantize_head or "float16"


def _check_budget(folder, alloc, max_size) -> None:
    """The folder as written against the budget, before it appears: UsageError if over (the
    prediction missed; nothing is left behind)."""
    weights = (folder / "model.safetensors").stat().st_size
    total = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    if weights > alloc.budget_bytes or (max_size is not None and total > max_size):
        raise UsageError(f"the folder came out at {total:,} bytes (weights {weights:,}), over the budget; "
                         "nothing was written: report this with the command line")


def _run_awq(src_dir, src, cfg, calib, samples, seq_len, settings, progress, plan=None, generator="int4"):
    """Calibration tokens, then (with a budget `plan`) the group sizes it allows, then AWQ as the
    writer asks for each block: (block_fp(i) -> (block i's fp tensors, its salient channels), the
    AWQResult it fills, Calibration, budget.Allocation or None). Blocks are transformed and quantized
    one at a time: the float32 model is never held whole."""
    import dataclasses

    from ..runtime.tokenizer import Tokenizer
    from .awq import AWQResult, awq_blocks
    from .calibration import from_files, self_generated
    tok = Tokenizer(src_dir)
    if calib:
        cal = from_files([calib] if isinstance(calib, (str, Path)) else calib, tok, samples, seq_len, settings.seed)
    else:
        cal = self_generated(src, cfg, tok, samples, seq_len, settings.seed, progress=progress, generator=generator)
    for note in cal.notes:
        print(f"note: {note}", file=sys.stderr)
    alloc = None
    if plan is not None:
        B, unit_list, size_of, budget = plan
        sens = B.unit_sensitivity(src, cfg, cal.ids, unit_list, progress)
        choice = B.allocate(unit_list, sens, budget, size_of)
        group_of = {lin: choice[u.name] for u in unit_list for lin in u.linears}
        alloc = B.Allocation(group_of, choice, size_of(choice), budget, sens)
        settings = dataclasses.replace(settings, group_sizes=tuple(sorted(group_of.items())))
    res = AWQResult({}, {}, [], [])
    blocks = awq_blocks(src, cfg, cal.ids, settings, res, progress=progress)

    def block_fp(i):
        j, tensors, salient = next(blocks)
        assert j == i, (j, i)              # the writer asks for blocks in order
        if i == cfg.num_hidden_layers - 1:
            blocks.close()                 # the last one: AWQ's progress bar closes now
        return tensors, salient
    return block_fp, res, cal, alloc


def _awq_config(settings, cal, res) -> dict:
    """The AWQ part of quantization_config: settings, calibration provenance, chosen α per layer."""
    return {
        "scale_form": "duo" if settings.duo else "x_mean^alpha", "clip": settings.clip,
        "keep_salient_percent": settings.keep_salient, "seed": settings.seed,
        "search_samples": settings.search_samples, "search_tokens": settings.search_tokens,
        "clip_all_tokens": settings.clip_all_tokens, "clip_two_sided": settings.clip_two_sided,
        "search_clip": settings.search_clip, "clip_joint_tokens": settings.clip_joint_tokens,
        "clip_sweeps": settings.clip_sweeps, "grid": settings.grid,
        **({"search_coarse": settings.search_coarse} if settings.search_coarse else {}),
        "gptq": settings.gptq, **({"gptq_damp": settings.gptq_damp} if settings.gptq else {}),
        "calibration": cal.describe(),
        "alpha": [{k: v["alpha"] for k, v in layer["groups"].items()} for layer in res.layers],
        "notes": cal.notes + res.notes,
    }


def quantized_tensors(src, cfg, method, bits, group_size, quantize_head, progress, linear_hook=None,
                      fp: dict | None = None, salient: dict | None = None, block_fp=None, embed: str = "fp16",
                      group_of: dict | None = None, int8=(), int6=(), embed_group_size: int | None = None):
    """Every tensor of the output folder: (name -> array, {linear: group size where it differs}).

    `fp` overrides source tensors by name (AWQ's transformed norms, weights and biases); `salient`
    maps a linear's prefix to the input channels it keeps in fp16. `block_fp(i)` gives both for
    block i, asked for in block order (AWQ streamed: one block's float32 weights at a time).
    `int8`: (layer, linear) pairs stored as int8 (Q8Linear at INT8_GROUP_SIZE where it divides K);
    `int6` those stored q6 (INT6_GROUP_SIZE; codes in the kernels' layout, formats/q4.py pack_q6_rows,
    which write_model_folder declares in the file). `embed` "int8" or
    "q6" with scale groups of `embed_group_size` (default `group_size`).
    """
    from ..formats.q4 import choose_group_size, pack_q6_rows, quantize_q4, quantize_q6, quantize_q8

    fp, salient = fp or {}, salient or {}
    eight, six = set(int8), set(int6)
    out: dict[str, np.ndarray] = {}
    per_layer_g = {}

    for key, (name, shape) in GLOBAL_TENSORS.items():
        if key == "embed" and embed in ("int8", "q6"):
            g8 = choose_group_size(cfg.hidden_size, embed_group_size or group_size)   # rows quantized independently
            q8s = [quantize_q8(w, g8) if embed == "int8" else quantize_q6(w, g8)
                   for w in _rows_f32(src, name, shape(cfg))]
            pack = (lambda q: q) if embed == "int8" else pack_q6_rows
            out[EMBED_PREFIX + ".qweight"] = np.concatenate([pack(q8.qweight) for q8 in q8s])
            out[EMBED_PREFIX + ".scales"] = np.concatenate([q8.scales for q8 in q8s])
        else:
            out[name] = np.concatenate(list(_rows_f32(src, name, shape(cfg), np.float16)))
    bar = _progress(cfg.num_hidden_layers, f"quantize ({method}, W{bits})", progress)
    for i in range(cfg.num_hidden_layers):
        fp_i, salient_i = block_fp(i) if block_fp is not None else (fp, salient)
        get = lambda name, shape, fp_i=fp_i: fp_i[name] if name in fp_i else src.float32(name, shape)
        for _, name, shape in block_norms(cfg, i):
            out[name] = get(name, shape).astype(np.float16)
        for _, key, prefix, shape in block_linears(cfg, i):
            if prefix + ".qweight" in fp_i:            # codes chosen by GPTQ (awq.py, gptq.py): stored as they are
                _check_stored(fp_i, prefix, shape, (i, key) in eight)
                for suffix in (".qweight", ".scales", ".zeros"):
                    if prefix + suffix in fp_i:
                        out[prefix + suffix] = fp_i[prefix + suffix]
                if cfg.attention_bias and key in ("q", "k", "v"):
                    out[prefix + ".bias"] = get(prefix + ".bias", (shape[0],))
                g = shape[1] // fp_i[prefix + ".scales"].shape[1]
                if (i, key) not in eight and g != group_size:
                    per_layer_g[prefix] = g
                continue
            w = get(prefix + ".weight", shape)
            sal = salient_i.get(prefix)
            if linear_hook is not None:
                w, sal = linear_hook(i, key, w)
            if (i, key) in eight or (i, key) in six:
                if (i, key) in six:
                    q8 = quantize_q6(w, choose_group_size(w.shape[1], INT6_GROUP_SIZE))
                    out[prefix + ".qweight"], out[prefix + ".scales"] = pack_q6_rows(q8.qweight), q8.scales
                else:
                    q8 = quantize_q8(w, choose_group_size(w.shape[1], INT8_GROUP_SIZE))
                    out[prefix + ".qweight"], out[prefix + ".scales"] = q8.qweight, q8.scales
                if cfg.attention_bias and key in ("q", "k", "v"):
                    out[prefix + ".bias"] = get(prefix + ".bias", (shape[0],))
                continue
            g = choose_group_size(w.shape[1], (group_of or {}).get(key, group_size))
            if g != group_size:
                per_layer_g[prefix] = g
            q = quantize_q4(w, g, salient_idx=sal, bits=bits)
            out[prefix + ".qweight"], out[prefix + ".scales"], out[prefix + ".zeros"] = q.qweight, q.scales, q.zeros
            if q.salient_idx is not None:
                out[prefix + ".salient_idx"], out[prefix + ".salient_w"] = q.salient_idx, q.salient_w
            if cfg.attention_bias and key in ("q", "k", "v"):
                out[prefix + ".bias"] = get(prefix + ".bias", (shape[0],))
        src.release_pages()            # this block's source pages are read: not counted in RSS again
        bar.update(1)
    bar.close()

    head_name, head_shape = HEAD
    head_src = "model.embed_tokens.weight" if cfg.tie_word_embeddings else head_name + ".weight"
    if (quantize_head and not (embed != "fp16" and cfg.tie_word_embeddings)) or not cfg.tie_word_embeddings:
        # Row chunks: rows are quantized independently, and a [V, D] float32 copy of a 128k vocabulary
        # (plus the quantizer's temporaries of its size) would be the largest allocation of the run.
        g = choose_group_size(cfg.hidden_size, group_size)
        rows = _rows_f32(src, head_src, head_shape(cfg))
        cat = lambda parts: [np.concatenate(p) for p in zip(*parts)]
        if quantize_head == "int8":
            out[head_name + ".qweight"], out[head_name + ".scales"] = cat(
                (q.qweight, q.scales) for q in map(lambda w: quantize_q8(w, g), rows))
        elif quantize_head == "int4":
            out[head_name + ".qweight"], out[head_name + ".scales"], out[head_name + ".zeros"] = cat(
                (q.qweight, q.scales, q.zeros) for q in map(lambda w: quantize_q4(w, g), rows))
        else:
            out[head_name + ".weight"] = np.concatenate([w.astype(np.float16) for w in rows])
    return out, per_layer_g


def _check_stored(fp_i, prefix, shape, is_int8) -> None:
    """Internal invariant: codes handed over by AWQ + GPTQ are in the format this linear is stored in."""
    from ..formats.q4 import Q4Linear, Q8Linear
    qw, sc = fp_i[prefix + ".qweight"], fp_i[prefix + ".scales"]
    g = shape[1] // sc.shape[1]
    if is_int8:
        Q8Linear(qw, sc, g).validate(*shape)
    else:
        Q4Linear(qw, sc, fp_i[prefix + ".zeros"], g).validate(*shape)


HEAD_ROWS_PER_CHUNK = 8192     # [8192, D] float32: 64 MB at D = 2048


def _rows_f32(src, name, shape, dtype=np.float32):
    """Tensor `name` (checked against `shape`) as `dtype` row chunks, widened chunk by chunk."""
    from ..formats.safetensors import to_float32
    from ..formats.tensors import check_shape
    arr, dt = src.raw(name)
    check_shape(name, arr.shape, shape)
    for r in range(0, arr.shape[0], HEAD_ROWS_PER_CHUNK):
        yield to_float32(arr[r:r + HEAD_ROWS_PER_CHUNK], dt).astype(dtype, copy=False)


def weights_digest(src: TensorSource) -> str:
    """sha256 over the source's safetensors files (names and bytes), in name order: provenance."""
    h = hashlib.sha256()
    for fname in sorted(src.files):
        h.update(fname.encode())
        with open(src.files[fname].path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()
