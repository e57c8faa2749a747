#!/usr/bin/env python3
"""Random-weight model folders with the exact shapes of real models (issue 14, item 1).

Speed and memory depend on a model's shapes, not on its numbers, so a folder with the shapes of
Llama-3.2-1B and random weights measures what the real one would cost, without downloading it.
Written:

  OUT/config.json               the real model's Hugging Face config values (hidden, FFN, layers,
                                heads, kv heads, head_dim, rope_theta and rope_scaling, vocab,
                                tie_word_embeddings, Qwen2's q/k/v biases); bos/eos are the
                                SmolLM2 tokenizer's ids, since that tokenizer is the one copied
  OUT/model*.safetensors        random weights, float16 (or bfloat16), in shards of --shard-gb,
                                written tensor by tensor (one tensor's rows at a time in memory)
  OUT/tokenizer.json, ...       copied from --tokenizer (default: SmolLM2-135M-Instruct in the store)
  --gguf FILE                   the same weights as an F16 GGUF for llama.cpp (its Q4_0 quantizer,
                                `llama-quantize FILE OUT.gguf Q4_0`, takes F16)

Vocabulary: the embedding keeps the real model's row count (128256 for Llama 3.2, 151936 for
Qwen2.5): that is a quarter of Llama-3.2-1B's weights and the cost of its lm_head. The tokenizer
only knows its own ids (49152 for SmolLM2); the GGUF pads its token list with unused tokens to the
embedding's rows, as llama.cpp requires. Sampled ids beyond the tokenizer decode to nothing.

Weights: linears and embedding normal(0, 0.02) (the models' initializer_range), norms 1 + normal(0,
0.02), q/k/v biases normal(0, 0.02); every tensor drawn from its own seeded generator, so a tensor
does not depend on the others or on the sharding.

GGUF: q/k rows are permuted for llama.cpp's RoPE (the inverse of formats/gguf.unpermute_rope_rows,
as llama.cpp's convert_hf_to_gguf.py does), so both engines compute the same model; Llama 3.2's
rope scaling becomes llama.cpp's `rope_freqs.weight` (1 / the per-frequency factor of
runtime/model.rope_inv_freq). Qwen2 is written with llama.cpp's "qwen2" architecture (no
permutation: llama.cpp runs its RoPE in the rotate-half order). `import-gguf` reads back the plain
Llama ones (no rope_freqs, no qwen2), which is what tests/test_shapes.py checks.

examples:
  python tools/make_shape_model.py --shape llama-3.2-1b --out ../shapes-data/llama-3.2-1b \\
      --gguf ../shapes-data/llama-3.2-1b-f16.gguf
  python tools/make_shape_model.py --shape qwen2.5-1.5b --out ../shapes-data/qwen2.5-1.5b
  python tools/make_shape_model.py --shape llama-3.2-3b --out ../shapes-data/llama-3.2-3b --shard-gb 4
  python -m minilm_edge quantize ../shapes-data/llama-3.2-1b ../shapes-data/llama-3.2-1b-rtn --method rtn
  python -m minilm_edge bench ../shapes-data/llama-3.2-1b-rtn --threads 2

The `gguf` package (a dependency of minilm_edge already: import-gguf reads GGUF with it) writes the GGUF.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minilm_edge.errors import MiniLMError, UsageError  # noqa: E402

_LLAMA32_ROPE = {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                 "original_max_position_embeddings": 8192, "rope_type": "llama3"}
# The shape-defining values of each model's config.json on the Hugging Face Hub, verbatim.
SHAPES = {
    "llama-3.2-1b": dict(  # meta-llama/Llama-3.2-1B
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        rms_norm_eps=1e-05, rope_theta=500000.0, rope_scaling=_LLAMA32_ROPE, max_position_embeddings=131072,
        vocab_size=128256, tie_word_embeddings=True, attention_bias=False, mlp_bias=False, hidden_act="silu"),
    "llama-3.2-3b": dict(  # meta-llama/Llama-3.2-3B
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=3072, intermediate_size=8192,
        num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
        rms_norm_eps=1e-05, rope_theta=500000.0, rope_scaling=_LLAMA32_ROPE, max_position_embeddings=131072,
        vocab_size=128256, tie_word_embeddings=True, attention_bias=False, mlp_bias=False, hidden_act="silu"),
    "qwen2.5-1.5b": dict(  # Qwen/Qwen2.5-1.5B (q/k/v carry a bias: model_type qwen2)
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=1536, intermediate_size=8960,
        num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
        rms_norm_eps=1e-06, rope_theta=1000000.0, max_position_embeddings=131072, sliding_window=131072,
        use_sliding_window=False, max_window_layers=28,
        vocab_size=151936, tie_word_embeddings=True, hidden_act="silu"),
    "smollm2-135m": dict(  # HuggingFaceTB/SmolLM2-135M-Instruct
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        rms_norm_eps=1e-05, rope_theta=100000.0, max_position_embeddings=8192,
        vocab_size=49152, tie_word_embeddings=True, hidden_act="silu"),
}
STD = 0.02                     # initializer_range of all four models
ROWS_PER_CHUNK = 4096          # rows drawn at a time: [4096, K] float32 is ≤ 140 MB for K ≤ 8960
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
TOKENIZER_MODEL = "smollm2-135m-instruct"   # default --tokenizer: this model's folder in the store


def default_tokenizer_dir() -> Path:
    """The store's smollm2-135m-instruct (its `latest` version; `pull smollm2-135m-instruct` puts it
    there), or the folder of a store from before versions."""
    from minilm_edge.app.store import tagged_path
    from minilm_edge.formats.home import default_home
    return tagged_path(TOKENIZER_MODEL) or default_home() / "models" / TOKENIZER_MODEL


# ---------------------------------------------------------------------------------------------
# The tensors: (HF name, shape, kind), in the order Hugging Face checkpoints list them
# ---------------------------------------------------------------------------------------------
def tensor_specs(cfg: dict) -> list[tuple[str, tuple, str]]:
    D, F, V, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    H, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    Dh = cfg.get("head_dim") or D // H
    biased = cfg["model_type"] == "qwen2" or cfg.get("attention_bias", False)
    specs = [("model.embed_tokens.weight", (V, D), "weight")]
    for i in range(L):
        p = f"model.layers.{i}."
        specs.append((p + "input_layernorm.weight", (D,), "norm"))
        for name, shape in (("q_proj", (H * Dh, D)), ("k_proj", (Hkv * Dh, D)), ("v_proj", (Hkv * Dh, D))):
            specs.append((p + f"self_attn.{name}.weight", shape, "weight"))
            if biased:
                specs.append((p + f"self_attn.{name}.bias", shape[:1], "bias"))
        specs += [(p + "self_attn.o_proj.weight", (D, H * Dh), "weight"),
                  (p + "post_attention_layernorm.weight", (D,), "norm"),
                  (p + "mlp.gate_proj.weight", (F, D), "weight"),
                  (p + "mlp.up_proj.weight", (F, D), "weight"),
                  (p + "mlp.down_proj.weight", (D, F), "weight")]
    specs.append(("model.norm.weight", (D,), "norm"))
    if not cfg["tie_word_embeddings"]:
        specs.append(("lm_head.weight", (V, D), "weight"))
    return specs


def random_rows(name: str, shape: tuple, kind: str, seed: int):
    """The tensor `name` as float32 row chunks [r, K] (a 1-D tensor: one [1, n] chunk), drawn from a
    generator seeded by (seed, name)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    rows, k = (1, shape[0]) if len(shape) == 1 else shape
    for r in range(0, rows, ROWS_PER_CHUNK):
        chunk = rng.standard_normal((min(ROWS_PER_CHUNK, rows - r), k), dtype=np.float32)
        chunk *= STD
        if kind == "norm":
            chunk += 1.0
        yield chunk


def _bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even."""
    u = a.view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


# ---------------------------------------------------------------------------------------------
# safetensors, streamed
# ---------------------------------------------------------------------------------------------
def write_safetensors_shards(out: Path, specs, dtype: str, seed: int, shard_bytes: int, say) -> list[str]:
    """Write the tensors into shards of at most `shard_bytes` (one tensor per shard if larger);
    the model.safetensors.index.json when there is more than one. Returns the file names."""
    tag, itemsize = {"float16": ("F16", 2), "bfloat16": ("BF16", 2)}[dtype]
    shards, cur, size = [], [], 0
    for spec in specs:
        n = int(np.prod(spec[1])) * itemsize
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(spec)
        size += n
    shards.append(cur)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    t0, done, total = time.monotonic(), 0, sum(int(np.prod(s[1])) for s in specs)
    for fname, shard in zip(names, shards):
        header, pos = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, _ in shard:
            n = int(np.prod(shape)) * itemsize
            header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [pos, pos + n]}
            pos += n
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        with open(out / fname, "wb") as f:
            f.write(len(h).to_bytes(8, "little") + h)
            for name, shape, kind in shard:
                for chunk in random_rows(name, shape, kind, seed):
                    f.write((chunk.astype(np.float16) if tag == "F16" else _bf16_bits(chunk)).tobytes())
                done += int(np.prod(shape))
                el = time.monotonic() - t0
                say(f"\rweights {done / total:6.1%}  {el:5.0f} s, ETA {el / done * (total - done):4.0f} s ")
    say("\n")
    if len(names) > 1:
        weight_map = {name: fname for fname, shard in zip(names, shards) for name, _, _ in shard}
        total_size = sum(int(np.prod(s[1])) * itemsize for s in specs)
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2))
    return names


# ---------------------------------------------------------------------------------------------
# GGUF: the same tensors read back from the folder
# ---------------------------------------------------------------------------------------------
def permute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF q/k rows -> llama.cpp's order (convert_hf_to_gguf.py's permute), the inverse of
    formats/gguf.unpermute_rope_rows: each head's halves interleaved, [a0.., b0..] -> [a0, b0, a1, b1, ..].
        gguf = hf.reshape(n_head, 2, Dh/2, K).swapaxes(1, 2).reshape(N, K)"""
    n, k = w.shape
    return w.reshape(n_head, 2, n // n_head // 2, k).swapaxes(1, 2).reshape(n, k)


def gguf_tensor_table(cfg: dict, arch: str) -> list[tuple[str, str, str | None]]:
    """(GGUF name, HF name, permutation "q"/"k"/None) for every tensor, from formats/gguf's table."""
    from minilm_edge.formats.gguf import TENSOR_TABLE
    specs = {name for name, _, _ in tensor_specs(cfg)}
    rows = []
    for gname, (hf, _, perm) in TENSOR_TABLE.items():
        layers = range(cfg["num_hidden_layers"]) if "{i}" in gname else (None,)
        for i in layers:
            g, h = gname.format(i=i), hf.format(i=i)
            if h in specs:
                rows.append((g, h, perm if arch == "llama" else None))
                if h.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")) and h[:-6] + "bias" in specs:
                    rows.append((g[:-6] + "bias", h[:-6] + "bias", None))
    return rows


def gguf_vocab(tok_dir: Path, n_vocab: int):
    """(tokens, token types, merges, pre-split name) of tokenizer.json, padded to n_vocab tokens."""
    from gguf import TokenType
    t = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = dict(t["model"]["vocab"])
    special = {a["content"] for a in t.get("added_tokens", []) if a.get("special")}
    for a in t.get("added_tokens", []):
        vocab[a["content"]] = a["id"]
    if len(vocab) > n_vocab or sorted(vocab.values()) != list(range(len(vocab))):
        raise UsageError(f"{tok_dir}/tokenizer.json: ids must be 0..n-1 with n ≤ vocab_size {n_vocab}")
    tokens = [None] * len(vocab)
    for s, i in vocab.items():
        tokens[i] = s
    types = [TokenType.CONTROL if s in special else TokenType.NORMAL for s in tokens]
    pad = n_vocab - len(tokens)
    tokens += [f"<|unused_{i}|>" for i in range(pad)]
    types += [TokenType.UNUSED] * pad
    merges = [m if isinstance(m, str) else " ".join(m) for m in t["model"]["merges"]]
    pre = t.get("pre_tokenizer") or {}
    digits = pre.get("type") == "Sequence" and any(p.get("type") == "Digits" for p in pre["pretokenizers"])
    return tokens, types, merges, "smollm" if digits else "gpt-2"


def write_gguf(folder: Path, path: Path, say) -> None:
    """The folder's weights as an F16 GGUF (norms, biases and rope_freqs F32), streamed tensor by tensor."""
    import gguf

    from minilm_edge.formats.tensors import TensorSource
    from minilm_edge.runtime.config import load_config
    from minilm_edge.runtime.model import rope_inv_freq

    cfg_d = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    cfg = load_config(folder)
    arch = "qwen2" if cfg.model_type == "qwen2" else "llama"
    src = TensorSource(folder)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(folder.name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    tokens, types, merges, pre = gguf_vocab(folder, cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if cfg.bos_token_id is not None:
        w.add_bos_token_id(cfg.bos_token_id)
    if cfg.eos_token_ids:
        w.add_eos_token_id(cfg.eos_token_ids[0])
    w.add_add_bos_token(False)
    tc = folder / "tokenizer_config.json"
    template = json.loads(tc.read_text(encoding="utf-8")).get("chat_template") if tc.is_file() else None
    if template:
        w.add_chat_template(template)

    def load(hf, perm):
        arr, dt = src.raw(hf)
        a = arr if dt == "F16" else (arr.astype(np.uint32) << 16).view(np.float32).astype(np.float16)
        if a.ndim == 1:
            return a.astype(np.float32)                      # llama.cpp keeps norms and biases F32
        if perm is not None:
            return permute_rope_rows(a, cfg.num_attention_heads if perm == "q" else cfg.num_key_value_heads)
        return a

    table = gguf_tensor_table(cfg_d, arch)
    extra = []
    if cfg.rope_scaling is not None:        # llama.cpp's llama3 RoPE: base frequencies / these factors
        base = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
        extra.append(("rope_freqs.weight", (base / rope_inv_freq(cfg)).astype(np.float32)))
    for gname, hf, _ in table:
        arr, dt = src.raw(hf)
        isz = 4 if arr.ndim == 1 else 2
        w.add_tensor_info(gname, arr.shape, np.dtype(np.float32 if arr.ndim == 1 else np.float16),
                          arr.size * isz)
    for gname, a in extra:
        w.add_tensor_info(gname, a.shape, a.dtype, a.nbytes)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    t0 = time.monotonic()
    for n, (_, hf, perm) in enumerate(table):
        w.write_tensor_data(np.ascontiguousarray(load(hf, perm)))
        el = time.monotonic() - t0
        say(f"\rgguf {n + 1}/{len(table)} tensors  {el:5.0f} s, ETA {el / (n + 1) * (len(table) - n - 1):4.0f} s ")
    for _, a in extra:
        w.write_tensor_data(a)
    w.close()
    say("\n")


# ---------------------------------------------------------------------------------------------
# The folder
# ---------------------------------------------------------------------------------------------
def make_shape_model(cfg: dict, out: Path, *, tokenizer_dir: Path, gguf_path: Path | None = None,
                     dtype: str = "float16", seed: int = 0, shard_bytes: int = 2 << 30, say=lambda s: None) -> Path:
    """Write the random-weight folder `out` for config dict `cfg` (and the GGUF, if asked). The
    folder is written under a temporary name and renamed at the end: no half-written output."""
    out = Path(out)
    if out.exists():
        raise UsageError(f"{out} already exists; choose a new output folder")
    missing = [f for f in ("tokenizer.json",) if not (Path(tokenizer_dir) / f).is_file()]
    if missing:
        raise UsageError(f"no tokenizer.json in {tokenizer_dir} (give --tokenizer DIR, e.g. a folder from `pull`)")
    if gguf_path is not None and Path(gguf_path).exists():
        raise UsageError(f"{gguf_path} already exists")
    tok = json.loads((Path(tokenizer_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    n_tok = len(tok["model"]["vocab"]) + sum(a["content"] not in tok["model"]["vocab"]
                                             for a in tok.get("added_tokens", []))
    if n_tok > cfg["vocab_size"]:
        raise UsageError(f"the tokenizer has {n_tok} tokens, more than the shape's {cfg['vocab_size']} embedding rows")
    need = sum(int(np.prod(s[1])) for s in tensor_specs(cfg)) * 2 * (2 if gguf_path else 1)
    free = shutil.disk_usage(out.parent if out.parent.exists() else Path.cwd()).free
    if need > free:
        raise UsageError(f"needs {need / 1e9:.1f} GB of disk, {free / 1e9:.1f} GB free")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.writing-{os.getpid()}"
    try:
        tmp.mkdir()
        for f in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / f).is_file():
                shutil.copyfile(Path(tokenizer_dir) / f, tmp / f)
        tok_cfg = json.loads((tmp / "tokenizer_config.json").read_text()) if (tmp / "tokenizer_config.json").is_file() \
            else {}
        config = dict(cfg, torch_dtype=dtype, initializer_range=STD, **_token_ids(tok, tok_cfg))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        write_safetensors_shards(tmp, tensor_specs(cfg), dtype, seed, shard_bytes, say)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if gguf_path is not None:
        part = Path(str(gguf_path) + ".part")
        try:
            write_gguf(out, part, say)
            os.rename(part, gguf_path)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
    return out


def _token_ids(tok: dict, tok_cfg: dict) -> dict:
    """bos/eos ids of the copied tokenizer (its bos_token/eos_token strings), for config.json."""
    ids = {a["content"]: a["id"] for a in tok.get("added_tokens", [])}
    ids.update(tok["model"]["vocab"])
    out = {}
    for key in ("bos", "eos"):
        s = tok_cfg.get(f"{key}_token")
        s = s.get("content") if isinstance(s, dict) else s
        if s in ids:
            out[f"{key}_token_id"] = ids[s]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__[__doc__.index("examples:"):],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", required=True, choices=sorted(SHAPES), help="which model's shapes")
    ap.add_argument("--out", required=True, type=Path, help="new model folder to write")
    ap.add_argument("--gguf", type=Path, help="also write the same weights as an F16 GGUF file")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16", help="safetensors dtype")
    ap.add_argument("--shard-gb", type=float, default=2.0, help="largest safetensors shard in GiB (default 2)")
    ap.add_argument("--tokenizer", type=Path,
                    help=f"folder whose tokenizer files are copied (default: {TOKENIZER_MODEL} in the store)")
    a = ap.parse_args(argv)
    if a.tokenizer is None:
        a.tokenizer = default_tokenizer_dir()
    if a.shard_gb <= 0:
        ap.error("--shard-gb must be positive")
    # SIGTERM (a killed job) unwinds like Ctrl-C, so the temporary folder is removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.monotonic()
    try:
        out = make_shape_model(SHAPES[a.shape], a.out, tokenizer_dir=a.tokenizer, gguf_path=a.gguf, dtype=a.dtype,
                               seed=a.seed, shard_bytes=int(a.shard_gb * (1 << 30)),
                               say=lambda s: print(s, end="", file=sys.stderr, flush=True))
    except MiniLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; nothing was left behind", file=sys.stderr)
        return 130
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1e9:.2f} GB) in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
