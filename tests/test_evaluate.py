"""Perplexity and model comparison (runtime/evaluate.py, docs/DESIGN.md §7): equal to a hand computation from
`model.forward` on each window, windows and counts as documented, KL 0 against itself, and the
`eval` command's output and one-line errors."""
import json

import numpy as np
import pytest

import minilm_edge
from minilm_edge.app.cli import main
from minilm_edge.runtime import evaluate
from tinymodel import make_model_dir

TEXT = ("The capital of France is Paris, and the capital of Italy is Rome. " * 6
        + "hello world\n\n = Heading = \n")
NLL_RTOL = 1e-6       # lm_head on a few rows vs on the whole window: BLAS may block the sum differently


def hand_nll(model, ids, ctx):
    """Σ -log p over the protocol's windows, from model.forward and a float64 log-softmax by hand."""
    total, n = 0.0, 0
    for s in range(0, len(ids), ctx):
        w = ids[s:s + ctx]
        if len(w) < 2:
            continue
        logits = model.forward(w).astype(np.float64)                       # [T, V]
        m = logits.max(axis=1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(axis=1, keepdims=True))
        total -= sum(logp[t, w[t + 1]] for t in range(len(w) - 1))
        n += len(w) - 1
    return total, n


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval")
    a, _, _ = make_model_dir(base / "a", seed=0)
    b, _, _ = make_model_dir(base / "b", seed=1)
    return minilm_edge.load(a), minilm_edge.load(b), a, b


@pytest.mark.parametrize("ctx", [16, 37, 128])
def test_perplexity_equals_hand_computation(models, ctx):
    model = models[0]
    ids = np.array(model.tokenizer.encode(TEXT))
    total, n = hand_nll(model, ids, ctx)
    res = evaluate.perplexity(model, TEXT, ctx=ctx, progress=False)
    assert res["tokens_scored"] == n and res["tokens"] == len(ids) and res["ctx"] == ctx
    np.testing.assert_allclose(res["nll"], total / n, rtol=NLL_RTOL)
    np.testing.assert_allclose(res["ppl"], np.exp(total / n), rtol=NLL_RTOL)


def test_token_chunks_do_not_change_the_result(models, monkeypatch):
    model = models[0]
    whole = evaluate.perplexity(model, TEXT, ctx=64, progress=False)
    monkeypatch.setattr(evaluate, "TOKEN_CHUNK", 5)        # 63 positions per window -> 13 chunks
    chunked = evaluate.perplexity(model, TEXT, ctx=64, progress=False)
    np.testing.assert_allclose(chunked["nll"], whole["nll"], rtol=NLL_RTOL)
    assert chunked["tokens_scored"] == whole["tokens_scored"]


def test_an_fp16_head_is_widened_once_and_gives_the_same_logits(tmp_path, monkeypatch):
    # int4 models keep the tied embedding in fp16; scoring widens it to float32 once instead of per
    # chunk, with the same float32 tiles, so the logits (and so the perplexity) are the same bits
    from minilm_edge.kernels import dense_f32 as kernels_dense
    from minilm_edge.runtime.linear import DenseF16
    monkeypatch.setattr(kernels_dense, "TILE_ROWS", 24)           # several tiles, the last one partial
    from minilm_edge.quant.quantize import quantize
    src, _, _ = make_model_dir(tmp_path / "src", hidden_size=64, intermediate_size=96,
                               num_attention_heads=4, num_key_value_heads=2)
    model = minilm_edge.load(quantize(src, tmp_path / "q4", group_size=32, progress=False))
    assert isinstance(model.weights.lm_head, DenseF16)
    head = evaluate.scoring_head(model)
    assert head is not model.weights.lm_head and model.weights.lm_head.shape[0] % 24 != 0
    for rows in (7, 1):                                  # one row: the matvec kernel, as the head's call
        x = np.random.default_rng(rows).standard_normal((rows, 64)).astype(np.float32)
        assert np.array_equal(head(x), model.weights.lm_head(x))
    ids = np.array(model.tokenizer.encode(TEXT))
    total, n = hand_nll(model, ids, 32)
    np.testing.assert_allclose(evaluate.perplexity(model, TEXT, ctx=32, progress=False)["nll"], total / n,
                               rtol=NLL_RTOL)


def test_windows_and_partial_window():
    assert evaluate.windows(10, 4) == [(0, 4), (4, 8), (8, 10)]      # last window of 2: 1 token scored
    assert evaluate.windows(9, 4) == [(0, 4), (4, 8)]                # last window of 1: nothing to score
    assert evaluate.windows(8, 4) == [(0, 4), (4, 8)]
    assert evaluate.windows(3, 512) == [(0, 3)]


@pytest.mark.parametrize("max_tokens, windows, scored, last", [
    (32, 4, 28, 8),       # 4 full windows of 8: 7 scored each
    (33, 4, 28, 8),       # + a single token: dropped
    (34, 5, 29, 2),       # + a window of 2: 1 more token scored
    (2, 1, 1, 2),
])
def test_counts(models, max_tokens, windows, scored, last):
    res = evaluate.perplexity(models[0], TEXT, ctx=8, max_tokens=max_tokens, progress=False)
    got = (res["windows"], res["tokens_scored"], res["last_window"], res["tokens"])
    assert got == (windows, scored, last, max_tokens)


def test_compare_self_is_zero_and_other_is_positive(models):
    a, b = models[0], models[1]
    same = evaluate.compare(a, a, TEXT, ctx=32, progress=False)
    assert same["kl_mean"] == 0.0 and same["ppl_diff"] == 0.0 and same["top1_agreement"] == 1.0
    diff = evaluate.compare(a, b, TEXT, ctx=32, progress=False)
    assert diff["kl_mean"] > 0.01
    pa = evaluate.perplexity(a, TEXT, ctx=32, progress=False)
    pb = evaluate.perplexity(b, TEXT, ctx=32, progress=False)
    assert diff["tokens_scored"] == pa["tokens_scored"]
    np.testing.assert_allclose([diff["ppl"], diff["baseline_ppl"]], [pa["ppl"], pb["ppl"]], rtol=NLL_RTOL)


def test_kl_equals_hand_computation(models):
    a, b = models[0], models[1]
    ids = np.array(a.tokenizer.encode(TEXT))[:20]
    def log_softmax(m):
        z = m.forward(ids).astype(np.float64)[:-1]                        # [19, V]: the scored positions
        z -= z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    pb, pa = log_softmax(b), log_softmax(a)
    kl = (np.exp(pb) * (pb - pa)).sum(axis=1).mean()                    # KL(baseline b || model a)
    res = evaluate.compare(a, b, TEXT, ctx=20, max_tokens=20, progress=False)
    np.testing.assert_allclose(res["kl_mean"], kl, rtol=1e-5)


def test_library_errors(models, tmp_path):
    a = models[0]
    with pytest.raises(minilm_edge.UsageError, match="at least 2"):
        evaluate.perplexity(a, TEXT, ctx=1, progress=False)
    with pytest.raises(minilm_edge.UsageError, match="maximum context of 128"):
        evaluate.perplexity(a, TEXT, ctx=129, progress=False)
    with pytest.raises(minilm_edge.UsageError, match="empty"):
        evaluate.perplexity(a, "", progress=False, ctx=8)
    with pytest.raises(minilm_edge.UsageError, match="at least 2 are needed"):
        evaluate.perplexity(a, "a", progress=False, ctx=8)
    big, _, _ = make_model_dir(tmp_path / "big", vocab_size=300)
    with pytest.raises(minilm_edge.UsageError, match="different vocabularies"):
        evaluate.compare(a, minilm_edge.load(big), TEXT, ctx=8, progress=False)


def test_read_text_keeps_the_file_as_is(tmp_path):
    f = tmp_path / "crlf.txt"
    f.write_bytes(" = A = \r\n\r\nline two\r\n".encode())
    assert evaluate.read_text(f) == " = A = \r\n\r\nline two\r\n"       # no newline translation


# ---- CLI


def test_cli_eval_text_and_json(models, tmp_path, capsys):
    path = models[2]
    data = tmp_path / "d.txt"
    data.write_text(TEXT)
    assert main(["eval", str(path), "--data", str(data), "--ctx", "32"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("perplexity") and "scored in" in out
    assert main(["eval", str(path), "--data", str(data), "--ctx", "32", "--json", "--baseline", str(models[3])]) == 0
    res = json.loads(capsys.readouterr().out)
    expected = evaluate.compare(models[0], models[1], TEXT, ctx=32, progress=False)
    assert res["tokens_scored"] == expected["tokens_scored"] and res["kl_mean"] == pytest.approx(expected["kl_mean"])
    assert len(res["data_sha256"]) == 64


def test_cli_eval_help_has_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    assert e.value.code == 0 and "examples:" in capsys.readouterr().out


def test_cli_eval_errors_are_one_line(models, tmp_path, capsys):
    path = str(models[2])
    data, empty, binary = tmp_path / "d.txt", tmp_path / "e.txt", tmp_path / "b.bin"
    data.write_text(TEXT)
    empty.write_text("  \n")
    binary.write_bytes(b"\xff\xfe\x00abc")
    cases = [
        (["eval", path, "--data", str(tmp_path / "missing.txt")], 2, "data file not found"),
        (["eval", path, "--data", str(empty)], 2, "is empty"),
        (["eval", path, "--data", str(binary)], 2, "not UTF-8"),
        (["eval", path, "--data", str(data), "--ctx", "1"], 2, "--ctx must be at least 2"),
        (["eval", path, "--data", str(data), "--ctx", "4096"], 2, "exceeds the maximum context"),
        (["eval", path, "--data", str(data), "--max-tokens", "1"], 2, "--max-tokens must be at least 2"),
        (["eval", path], 2, "--data"),
        (["eval", str(tmp_path / "nomodel"), "--data", str(data)], 1, "nomodel"),
    ]
    for argv, code, msg in cases:
        assert main(argv) == code, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("minilm-edge: error:") and msg in err[-1], (argv, err)
        assert not any("Traceback" in line for line in err)
