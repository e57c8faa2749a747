"""formats/gguf.py on a tiny Gemma 3 GGUF written here the way llama.cpp's converter does: norms stored
as w + 1, q/k rows in HF order, a SentencePiece vocabulary with scores and byte tokens.

The imported folder must hold the HF weights back, run like reference/gemma.py, and tokenize like
SentencePiece BPE (highest-scoring adjacent pair first, bytes for unknown characters), checked
against a plain re-implementation of that rule below.
"""
import json

import gguf
import numpy as np
import pytest
from gguf import TokenType
from safetensors.numpy import load_file
from tokenizers import Tokenizer

import minilm_edge
from minilm_edge.errors import UnsupportedModelError
from minilm_edge.formats.gguf import import_gguf
from reference import gemma as ref

D, F, H, HKV, DH, L, WINDOW = 32, 64, 4, 1, 16, 6, 3
CONTROL = ["<pad>", "<eos>", "<bos>", "<unk>"]
USER_DEFINED = ["\n\n"]
BYTES = [f"<0x{b:02X}>" for b in range(256)]
PIECES = ["▁", "a", "b", "c", "h", "e", "l", "o", "ab", "bc", "abc", "he", "ll", "hell", "hello", "▁hello",
          "▁a", "▁ab"]
TOKENS = CONTROL + USER_DEFINED + BYTES + PIECES
TYPES = [TokenType.CONTROL] * 4 + [TokenType.USER_DEFINED] + [TokenType.BYTE] * 256 + [TokenType.NORMAL] * len(PIECES)
SCORES = [-1000.0] * (5 + 256) + [-float(i) for i in range(len(PIECES))]
V = len(TOKENS)

GGUF_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
              "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
              "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def hf_weights(seed=0):
    rng = np.random.default_rng(seed)
    r = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)
    w = {"model.embed_tokens.weight": r(V, D), "model.norm.weight": r(D)}
    for i in range(L):
        p = f"model.layers.{i}."
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm"):
            w[p + n + ".weight"] = r(D)
        w |= {p + "self_attn.q_norm.weight": r(DH), p + "self_attn.k_norm.weight": r(DH),
              p + "self_attn.q_proj.weight": r(H * DH, D), p + "self_attn.k_proj.weight": r(HKV * DH, D),
              p + "self_attn.v_proj.weight": r(HKV * DH, D), p + "self_attn.o_proj.weight": r(D, H * DH),
              p + "mlp.gate_proj.weight": r(F, D), p + "mlp.up_proj.weight": r(F, D),
              p + "mlp.down_proj.weight": r(D, F)}
    return w


def gguf_name(hf):
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{GGUF_LAYER[rest.removesuffix('.weight')]}.weight"


def write_gemma_gguf(path, extra=None):
    weights = hf_weights()
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(L)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(HKV)
    w.add_key_length(DH)
    w.add_value_length(DH)
    w.add_context_length(64)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1_000_000.0)
    w.add_sliding_window(WINDOW)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS)
    w.add_token_scores(SCORES)
    w.add_token_types([int(t) for t in TYPES])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    if extra is not None:
        extra(w)
    for hf, arr in weights.items():
        # llama.cpp's converter adds 1 to every Gemma norm weight; q/k rows stay in HF order.
        w.add_tensor(gguf_name(hf), arr + np.float32(1.0) if hf.endswith("norm.weight") else arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gemma_gguf")
    weights = write_gemma_gguf(tmp / "g.gguf")
    return import_gguf(tmp / "g.gguf", tmp / "model", dtype="float32", progress=False), weights


def test_weights_come_back_as_hugging_face_stores_them(imported):
    folder, weights = imported
    got = load_file(str(folder / "model.safetensors"))
    assert set(got) == set(weights)
    for name, arr in weights.items():
        np.testing.assert_allclose(got[name], arr, atol=1e-6, err_msg=name)   # w + 1 - 1: float32 rounding


def test_config_is_gemma3_with_the_llamacpp_layout(imported):
    cfg = json.loads((imported[0] / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and cfg["sliding_window"] == WINDOW
    assert cfg["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    assert (cfg["rope_theta"], cfg["rope_local_base_freq"], cfg["query_pre_attn_scalar"]) == (1e6, 1e4, DH)


def test_imported_model_runs_like_the_reference(imported):
    folder, weights = imported
    cfg = json.loads((folder / "config.json").read_text())
    ids = [2, 270, 271, 278, 275, 261, 277, 262, 263]
    np.testing.assert_allclose(minilm_edge.load(folder).forward(ids), ref.forward(weights, cfg, ids),
                               atol=2e-4, rtol=0)


def spm_encode(text):
    """SentencePiece BPE as llama.cpp runs it: symbols are characters (unknown ones become their
    UTF-8 byte tokens); join the adjacent pair whose join has the highest score, leftmost first."""
    score = {t: s for t, s, ty in zip(TOKENS, SCORES, TYPES) if ty == TokenType.NORMAL}
    syms = list(text.replace(" ", "▁"))
    while True:
        best = max(((score[a + b], -i) for i, (a, b) in enumerate(zip(syms, syms[1:])) if a + b in score),
                   default=None)
        if best is None:
            break
        i = -best[1]
        syms[i:i + 2] = [syms[i] + syms[i + 1]]
    ids = []
    for s in syms:
        ids += [TOKENS.index(s)] if s in score else [TOKENS.index(f"<0x{b:02X}>") for b in s.encode()]
    return ids


@pytest.mark.parametrize("text", ["abc", "hello", " hello abc", "ab ab", "bca", "héllo", "a\n\nb", "", "  a"])
def test_tokenizer_follows_sentencepiece(imported, text):
    tok = Tokenizer.from_file(str(imported[0] / "tokenizer.json"))
    pieces = text.split("\n\n")
    expected = spm_encode(pieces[0])
    for p in pieces[1:]:                           # user-defined tokens are split out first
        expected += [TOKENS.index("\n\n")] + spm_encode(p)
    assert tok.encode(text, add_special_tokens=False).ids == expected
    assert tok.encode(text).ids == [2] + expected               # add_bos_token
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=True) == text


def test_softcapping_gguf_is_refused(tmp_path):
    write_gemma_gguf(tmp_path / "g.gguf", extra=lambda w: w.add_float32("gemma3.final_logit_softcapping", 30.0))
    with pytest.raises(UnsupportedModelError, match="soft-capping"):
        import_gguf(tmp_path / "g.gguf", tmp_path / "model", progress=False)
