"""Mixed precision under a budget (quant/budget.py, quantize --target-bpw / --max-size): the size
prediction against the file written, the greedy choice, the budget honoured on a tiny model end to
end (whole-file bits per weight and folder bytes measured by describe), bad budgets refused."""
import json

import numpy as np
import pytest

import minilm_edge
from minilm_edge.app.cli import main
from minilm_edge.app.describe import describe
from minilm_edge.quant import budget as B
from minilm_edge.quant.quantize import quantize
from minilm_edge.runtime.config import load_config
from tinymodel import make_model_dir

# down's K = 128 has three options (128, 64, 32); the others' K = 64 two
SHAPES = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
FAST = dict(samples=4, seq_len=32, progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("budget")
    src, cfg, w = make_model_dir(base / "src", **SHAPES)
    text = "\n\n".join(f"Document {i}: the capital of France is Paris, and hello again." * 3 for i in range(10))
    (base / "c.txt").write_text(text)
    return base, src, base / "c.txt"


def bpw_bounds(src):
    """Whole-file bpw of the smallest (largest groups) and largest (g = 32) int8-embedding folders."""
    cfg = load_config(src)
    us = B.units(cfg, 128)
    from minilm_edge.formats.tensors import parameter_count
    size = lambda g: B.weight_file_bytes(cfg, {l: g(u) for u in us for l in u.linears}, 128, "int8", None)
    return (8 * size(lambda u: u.options[0]) / parameter_count(cfg), 8 * size(lambda u: 32) / parameter_count(cfg))


@pytest.mark.parametrize("embed, salient", [("fp16", 0.0), ("int8", 0.0), ("int8", 5.0)])
def test_predicted_size_bounds_the_file_written(tiny, tmp_path, embed, salient):
    """The prediction may overestimate the header a little, never underestimate; salient channels
    counted per linear (round(5% of 64) = 3 for most, of 128 = 6 for down)."""
    _, src, calib = tiny
    kw = dict(method="rtn", progress=False)
    if salient:
        kw = dict(method="awq", calib=calib, keep_salient=salient, **FAST)
    out = quantize(src, tmp_path / "q", embed=embed, **kw)
    cfg = load_config(src)
    got = (out / "model.safetensors").stat().st_size
    pred = B.weight_file_bytes(cfg, {}, 128, embed, None, salient)
    assert got <= pred <= got + 4096


def test_allocate_takes_the_best_gain_per_byte_that_fits():
    us = [B.Unit("a", ("a",), (64, 32)), B.Unit("b", ("b",), (128, 64, 32))]
    cost = {64: 10, 32: 30, 128: 0}                       # bytes above the smallest
    size_of = lambda ch: 100 + cost[ch["a"]] - 10 + cost[ch["b"]]
    sens = {"a": {64: 1.0, 32: 0.5}, "b": {128: 1.0, 64: 0.9, 32: 0.1}}
    # a: 0.5 for 20 bytes (0.025/B); b 128->64: 0.1 for 10 (0.01/B), then 64->32: 0.8 for 20 (0.04/B)
    assert B.allocate(us, sens, 100, size_of) == {"a": 64, "b": 128}
    assert B.allocate(us, sens, 120, size_of) == {"a": 32, "b": 128}
    assert B.allocate(us, sens, 150, size_of) == {"a": 32, "b": 32}
    with pytest.raises(minilm_edge.UsageError, match="raise the budget"):
        B.allocate(us, sens, 99, size_of)


def test_target_bpw_is_honoured_and_recorded(tiny, tmp_path):
    _, src, calib = tiny
    lo, hi = bpw_bounds(src)
    target = (lo + hi) / 2
    out = quantize(src, tmp_path / "q", method="awq", calib=calib, embed="int8", target_bpw=target, **FAST)
    info = describe(out, layers=True)
    assert info["file_bpw"] <= target
    mp = json.loads((out / "config.json").read_text())["quantization_config"]["mixed_precision"]
    assert set(mp["group_size"]) == {"qkv", "o", "gate_up", "down"}
    for u in B.units(load_config(src), 128):                        # every option of every unit measured
        assert set(mp["sensitivity_kl"][u.name]) == {str(g) for g in u.options}
    by_kind = {}
    for r in info["layers"]:
        by_kind.setdefault(r["name"], set()).add(r["group_size"])
    assert all(len(v) == 1 for v in by_kind.values())     # one g per kind across blocks: the decode plan stacks
    assert by_kind["q"] == by_kind["k"] == by_kind["v"] and by_kind["gate"] == by_kind["up"]
    assert any(next(iter(v)) == 32 for v in by_kind.values())    # the budget bought some smaller groups
    model = minilm_edge.load(out)
    assert model.decode_plan is not None and np.all(np.isfinite(model.forward(np.arange(3, 12))))


def test_max_size_is_honoured(tiny, tmp_path):
    _, src, calib = tiny
    base = quantize(src, tmp_path / "base", method="rtn", embed="int8", progress=False)
    folder = describe(base)["folder_bytes"]
    limit = folder + B.CONFIG_BYTES + 4096
    out = quantize(src, tmp_path / "q", method="awq", calib=calib, embed="int8", max_size=limit, **FAST)
    assert describe(out)["folder_bytes"] <= limit


@pytest.mark.parametrize("kw, message", [
    (dict(target_bpw=1.0), "raise the budget"),                       # below int4 everywhere
    (dict(max_size=10_000), "raise the budget"),
    (dict(target_bpw=-3.0), "positive"),
    (dict(max_size=-1), "positive"),
    (dict(target_bpw=6.0, max_size=10**9), "one of"),
    (dict(target_bpw=6.0, method="rtn"), "--method awq"),
])
def test_bad_budgets_are_refused_before_any_work(tiny, tmp_path, kw, message):
    _, src, calib = tiny
    kw = {"method": "awq", "calib": None if kw.get("method") == "rtn" else calib, **kw}
    with pytest.raises(minilm_edge.UsageError, match=message):
        quantize(src, tmp_path / "q", embed="int8", seq_len=32, progress=False, **kw)
    assert not (tmp_path / "q").exists()


def test_cli_refuses_a_budget_too_small_in_one_line(tiny, tmp_path, capsys):
    _, src, calib = tiny
    rc = main(["quantize", str(src), str(tmp_path / "q"), "--calib", str(calib), "--seq-len", "32",
               "--target-bpw", "2"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "raise the budget" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "q").exists()
