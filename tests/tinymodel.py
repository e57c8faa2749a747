"""Tiny random Llama-family model folders that the tests build themselves.

`make_model_dir(path, **overrides)` writes config.json, model.safetensors (random weights),
tokenizer.json (a byte-level BPE over the 256 byte symbols plus a few merges and ChatML special
tokens), tokenizer_config.json with a ChatML chat template, and generation_config.json.
"""
import json
from pathlib import Path

import numpy as np

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
          " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGE_WORDS = ["the", "and", "capital", "Paris", "France", "hello"]


def build_tokenizer():
    """A byte-level BPE tokenizer: ids 0..2 specials, then 256 bytes, then merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    merges = []
    for word in MERGE_WORDS:
        cur = word[0]
        for ch in word[1:]:
            merged = cur + ch
            if merged not in vocab:
                merges.append((cur, ch))
                vocab[merged] = len(vocab)
            cur = merged
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return tok


def tiny_config(**overrides):
    cfg = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=32, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=128, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, vocab_size=None, torch_dtype="float32",
    )
    cfg.update(overrides)
    return cfg


def random_weights(cfg, seed=0, scale=0.2):
    """Random float32 weights keyed by Hugging Face names for config dict `cfg`."""
    rng = np.random.default_rng(seed)
    D, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    H, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    Dh = cfg.get("head_dim") or D // H
    r = lambda *s: (rng.standard_normal(s) * scale).astype(np.float32)
    w = {"model.embed_tokens.weight": r(V, D), "model.norm.weight": 1 + r(D)}
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = r(V, D)
    bias = cfg["model_type"] == "qwen2"
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + r(D)
        w[p + "post_attention_layernorm.weight"] = 1 + r(D)
        for n, rows in (("q", H * Dh), ("k", Hkv * Dh), ("v", Hkv * Dh)):
            w[p + f"self_attn.{n}_proj.weight"] = r(rows, D)
            if bias:
                w[p + f"self_attn.{n}_proj.bias"] = r(rows)
        w[p + "self_attn.o_proj.weight"] = r(D, H * Dh)
        w[p + "mlp.gate_proj.weight"] = r(F, D)
        w[p + "mlp.up_proj.weight"] = r(F, D)
        w[p + "mlp.down_proj.weight"] = r(D, F)
    return w


def make_model_dir(path, seed=0, dtype="float32", generation_config=None, **overrides):
    """Write a complete tiny model folder; returns (path, config dict, float32 weights)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    cfg = tiny_config(**overrides)
    if cfg["vocab_size"] is None:
        cfg["vocab_size"] = tok.get_vocab_size()
    w = random_weights(cfg, seed)
    if dtype == "float16":
        w = {k: v.astype(np.float16) for k, v in w.items()}
    elif dtype == "bfloat16":
        # round-to-nearest-even into the top 16 bits, stored as raw bits; dtype set in header below
        w = {k: _to_bf16_bits(v) for k, v in w.items()}
    if dtype == "bfloat16":
        write_safetensors(path / "model.safetensors", {k: ("BF16", v) for k, v in w.items()})
    else:
        save_file(w, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    (path / "generation_config.json").write_text(json.dumps(generation_config or {"eos_token_id": 2}))
    wf = {k: _widen(v, dtype) for k, v in w.items()}
    return path, cfg, wf


def _to_bf16_bits(a):
    u = a.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _widen(v, dtype):
    if dtype == "bfloat16":
        return (v.astype(np.uint32) << 16).view(np.float32)
    return v.astype(np.float32)


def write_safetensors(file, tensors, header_extra=None):
    """A plain safetensors writer for tests: {name: (dtype tag, array)}; lets tests write BF16
    (which NumPy lacks) and hand-crafted, broken headers."""
    header, blobs, pos = dict(header_extra or {}), [], 0
    for name, (tag, arr) in tensors.items():
        b = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": tag, "shape": list(arr.shape), "data_offsets": [pos, pos + len(b)]}
        blobs.append(b)
        pos += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    Path(file).write_bytes(len(h).to_bytes(8, "little") + h + b"".join(blobs))
