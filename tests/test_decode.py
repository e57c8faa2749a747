"""The one-call decode step (decode.py) against the Python path, on int4 tiny models."""
import numpy as np
import pytest

import minilm_edge
from minilm_edge.quantize import quantize
from tinymodel import make_model_dir

QUANTIZABLE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)


def salient_hook(layer, name, w):
    """Salient channels as AWQ picks them: per input (layer, K), so q|k|v and gate|up share them;
    different counts per layer exercise the stack's padding."""
    k = w.shape[1]
    m = 1 + (layer * 3 + k) % 5
    return w, np.sort(np.random.default_rng([layer, k]).choice(k, m, replace=False)).astype(np.int32)


@pytest.mark.parametrize("variant", [{}, dict(model_type="qwen2"), dict(num_key_value_heads=4)])
@pytest.mark.parametrize("hook", [None, salient_hook])
def test_one_call_decode_matches_prefill(tmp_path, variant, hook):
    src, cfg, _ = make_model_dir(tmp_path / "src", **{**QUANTIZABLE, **variant})
    model = minilm_edge.load(quantize(src, tmp_path / "q", method="rtn", group_size=64, progress=False, linear_hook=hook,
                                      quantize_head="int8"))
    assert model._plan is not None
    ids = np.random.default_rng(3).integers(0, cfg["vocab_size"], 30)
    full = model.forward(ids)                               # prefill path: per-layer Python calls
    cache = model.new_cache(40)
    steps = [model.forward(ids[:1], cache)] + [model.forward([t], cache) for t in ids[1:]]
    np.testing.assert_allclose(np.concatenate(steps), full, atol=1e-4)


def test_plan_only_for_all_int4_models(tmp_path):
    src, _, _ = make_model_dir(tmp_path / "src", **QUANTIZABLE)
    assert minilm_edge.load(src)._plan is None
