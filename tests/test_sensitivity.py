"""Per-linear int8 sensitivity (quant/sensitivity.py, the `sensitivity` command): the AWQ basis fit,
the bytes an int8 linear adds (against folders actually written), the greedy choice under a budget,
the spec `quantize --int8` reads back, and the command end to end on a tiny AWQ model."""
import json

import numpy as np
import pytest

from minilm_edge.app.cli import main
from minilm_edge.formats.tensors import block_linears
from minilm_edge.quant import sensitivity as S
from minilm_edge.quant.quantize import int8_linears, quantize
from minilm_edge.runtime.config import load_config
from tinymodel import make_model_dir

SHAPES = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
FAST = dict(samples=4, seq_len=32, progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("sens")
    src, cfg, w = make_model_dir(base / "src", **SHAPES)
    text = "\n\n".join(f"Document {i}: the capital of France is Paris, and hello again." * 3 for i in range(10))
    (base / "c.txt").write_text(text)
    awq = quantize(src, base / "awq", method="awq", group_size=32, calib=[base / "c.txt"], **FAST)
    return base, src, awq


def test_the_basis_fit_recovers_row_and_column_scales():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 96)).astype(np.float32)
    r, c = rng.uniform(0.3, 3, 48).astype(np.float32), rng.uniform(0.2, 5, 96).astype(np.float32)
    exact = (r[:, None] * w) * c[None, :]
    fit, resid = S.fit_basis(w, exact)
    assert resid < 1e-4 and np.allclose(fit, exact, rtol=1e-3, atol=1e-4)
    noisy = exact + 0.05 * np.abs(exact).mean() * rng.standard_normal(exact.shape).astype(np.float32)
    fit, resid = S.fit_basis(w, noisy)
    # the fit lands on the scaled weights, not on the noise: its error is far below the noise's
    assert np.linalg.norm(fit - exact) < 0.3 * np.linalg.norm(noisy - exact)
    assert 0.02 < resid < 0.08


def test_extra_bytes_match_the_files_written(tiny):
    base, src, _ = tiny
    cfg = load_config(src)
    plain = quantize(src, base / "rtn", method="rtn", group_size=32, progress=False)
    (_, key, _, (n, k)), = [t for t in block_linears(cfg, 1) if t[1] == "down"]
    one = quantize(src, base / "rtn-down1", method="rtn", group_size=32, int8="down@1", progress=False)
    grown = (one / "model.safetensors").stat().st_size - (plain / "model.safetensors").stat().st_size
    assert abs(grown - S.int8_extra_bytes(n, k, 32)) <= 64
    six = quantize(src, base / "rtn-down1-q6", method="rtn", group_size=32, int6="down@1", progress=False)
    grown = (six / "model.safetensors").stat().st_size - (plain / "model.safetensors").stat().st_size
    assert abs(grown - S.int8_extra_bytes(n, k, 32, "q6")) <= 64
    assert S.int8_extra_bytes(n, k, 32, "q6") < S.int8_extra_bytes(n, k, 32)


def test_the_choice_takes_gain_per_byte_within_the_budget():
    lin = [dict(layer=0, linear="down", gain=0.010, extra_bytes=1000),   # 1e-5 per byte
           dict(layer=1, linear="v", gain=0.004, extra_bytes=100),       # 4e-5: first
           dict(layer=2, linear="down", gain=0.009, extra_bytes=1000),   # 9e-6
           dict(layer=3, linear="o", gain=-0.001, extra_bytes=10)]       # never: no gain
    assert S.choose_int8(lin, 1100) == [(0, "down"), (1, "v")]
    assert S.choose_int8(lin, 2100) == [(0, "down"), (1, "v"), (2, "down")]
    assert S.choose_int8(lin, 99) == []
    assert S.choose_int8(lin, 10**9) == [(0, "down"), (1, "v"), (2, "down")]


def test_gate_and_up_are_chosen_on_their_own():
    # unlike q and v, neither of gate and up takes the other along (the fused decode takes any of them)
    lin = [dict(layer=0, linear="up", gain=0.005, extra_bytes=100),
           dict(layer=0, linear="gate", gain=0.001, extra_bytes=100),
           dict(layer=1, linear="gate", gain=0.003, extra_bytes=100),
           dict(layer=1, linear="down", gain=0.002, extra_bytes=100)]
    assert S.choose_int8(lin, 250) == [(0, "up"), (1, "gate")]
    assert S.choose_int8(lin, 10**6) == [(0, "gate"), (0, "up"), (1, "down"), (1, "gate")]


def test_q_and_v_of_a_layer_take_k_with_them():
    # the fused decode stacks a block's int8 rows of q|k|v adjacent: q and v int8 without k cannot run there
    lin = [dict(layer=0, linear="v", gain=0.005, extra_bytes=100),
           dict(layer=0, linear="q", gain=0.004, extra_bytes=300),
           dict(layer=0, linear="k", gain=0.0001, extra_bytes=100)]
    assert S.choose_int8(lin, 500) == [(0, "k"), (0, "q"), (0, "v")]
    assert S.choose_int8(lin, 450) == [(0, "k"), (0, "v")]   # q + k does not fit after v; k alone then does
    assert S.choose_int8(lin, 150) == [(0, "v")]
    lin[2]["gain"] = -0.001                                      # k made worse: q never goes without it
    assert S.choose_int8(lin, 10**6) == [(0, "k"), (0, "q"), (0, "v")]


def test_the_spec_reads_back_as_the_same_linears():
    chosen = [(0, "down"), (1, "down"), (2, "down"), (5, "down"), (3, "v"), (0, "q")]
    spec = S.int8_spec(chosen)
    assert spec == "q@0,v@3,down@0-2+5"
    assert sorted(int8_linears(spec, 8)) == sorted(chosen)
    assert S.int8_spec([]) == ""


def test_the_command_measures_every_int4_linear_and_prints_a_spec_that_fits(tiny, capsys):
    base, src, awq = tiny
    cfg = load_config(awq)
    size = sum(f.stat().st_size for f in awq.iterdir() if f.is_file())
    rc = main(["sensitivity", str(awq), "--data", str(base / "c.txt"), "--samples", "2", "--seq-len", "32",
               "--max-size", str(size + 30000), "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    got = {(t["layer"], t["linear"]) for t in res["linears"]}
    assert got == {(i, k) for i in range(cfg.num_hidden_layers) for k in S.KINDS}
    assert res["base_kl"] > 0 and all(np.isfinite(t["gain"]) for t in res["linears"])
    # the AWQ basis (input columns scaled, v and up rows too) is found: residual = int4 noise only
    assert max(t["fit_residual"] for t in res["linears"]) < 0.2
    chosen = int8_linears(res["int8"], cfg.num_hidden_layers)
    assert res["added_bytes"] == sum(t["extra_bytes"] for t in res["linears"] if (t["layer"], t["linear"]) in chosen)
    assert 0 < res["added_bytes"] <= res["budget_bytes"]
    # the spec quantize takes: the folder it writes stays within the size asked
    out = quantize(src, base / "mixed", method="awq", group_size=32, calib=[base / "c.txt"], int8=res["int8"], **FAST)
    assert sum(f.stat().st_size for f in out.iterdir() if f.is_file()) <= size + 30000


def test_q6_gains_are_measured_in_6_bits_and_give_an_int6_spec_that_fits(tiny, capsys):
    base, src, awq = tiny
    cfg = load_config(awq)
    size = sum(f.stat().st_size for f in awq.iterdir() if f.is_file())
    argv = ["sensitivity", str(awq), "--data", str(base / "c.txt"), "--samples", "2", "--seq-len", "32",
            "--linears", "v,down", "--max-size", str(size + 20000), "--json"]
    assert main(argv + ["--format", "q6"]) == 0
    six = json.loads(capsys.readouterr().out)
    assert main(argv) == 0
    eight = json.loads(capsys.readouterr().out)
    assert six["format"] == "q6" and "int8" not in six and eight["format"] == "int8"
    by8 = {(t["layer"], t["linear"]): t for t in eight["linears"]}
    assert len(six["linears"]) == len(eight["linears"]) == 2 * cfg.num_hidden_layers
    for t in six["linears"]:
        t8 = by8[t["layer"], t["linear"]]
        # the same linears on the same tokens, rounded in 6 bits: fewer bytes, another gain (a gain is
        # not always below int8's: rounding errors of single linears do not order that way)
        assert t["extra_bytes"] < t8["extra_bytes"] and t["gain"] != t8["gain"]
    assert sum(t["gain"] for t in six["linears"]) > 0
    chosen = int8_linears(six["int6"], cfg.num_hidden_layers, "--int6")
    assert chosen and six["added_bytes"] <= six["budget_bytes"]
    out = quantize(src, base / "mixed6", method="awq", group_size=32, calib=[base / "c.txt"], int6=six["int6"],
                   **FAST)
    assert sum(f.stat().st_size for f in out.iterdir() if f.is_file()) <= size + 20000


def test_the_command_refuses_a_budget_below_the_folder(tiny, capsys):
    base, src, awq = tiny
    rc = main(["sensitivity", str(awq), "--data", str(base / "c.txt"), "--max-size", "1000"])
    assert rc == 2
    assert "below the folder" in capsys.readouterr().err


@pytest.mark.parametrize("spec, fused", [("q@0,k@0-1,o@1,down@0", True), ("q@0,v@0", False),
                                         ("gate@0,up@1,v@1", True), ("gate@0-1,up@0,k@1,v@1", True)])
def test_what_the_fused_decode_takes(tiny, spec, fused):
    # the rule choose_int8 keeps: q|k|v int8 rows adjacent in a block, else no one-call decode plan;
    # gate and up int8 in any combination run there (no rule needed)
    import minilm_edge
    base, src, _ = tiny
    name = "plan-" + spec.replace(",", "_").replace("@", "-")
    out = quantize(src, base / name, method="rtn", group_size=32, int8=spec, progress=False)
    m = minilm_edge.load(out)
    assert (m._plan is not None) == fused
    if fused:
        assert m._plan.has_int8


def test_the_store_default_spec_keeps_the_fused_decode():
    from minilm_edge.app.store import PREPARED_MODELS
    q = PREPARED_MODELS["smollm2-135m-instruct-awq"].quantize
    chosen = set(int8_linears(q["int8"], 30)) | set(int8_linears(q["int6"], 30, "--int6"))    # q6 rows: int8 rows
    assert chosen
    for i in range(30):
        qkv = "".join(k[0] for k in ("q", "k", "v") if (i, k) in chosen)
        assert qkv in ("", "q", "k", "v", "qk", "kv", "qkv"), (i, qkv)
