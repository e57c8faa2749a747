"""The real Gemma-3-270M (base) against its oracle: shared/data/gemma3-270m-reference-logits.json,
computed by PyTorch + transformers (Gemma3ForCausalLM, float32) on the weights dequantized from the
same Q4_K_M GGUF that `pull gemma-3-270m` imports in float32. Logits should agree to float32
rounding (the oracle keeps 4 decimals): we allow 1e-3, as the issue asks; measured ~7e-5.
"""
import json

import numpy as np
import pytest

from minilm_edge.runtime.generation import Generation, SamplingSettings

pytestmark = pytest.mark.real_model

LOGIT_ATOL = 1e-3


@pytest.fixture(scope="module")
def cases(shared_data):
    return json.loads((shared_data / "gemma3-270m-reference-logits.json").read_text(encoding="utf-8"))["cases"]


def test_the_model_is_the_oracles(gemma_model):
    c = gemma_model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.vocab_size) == ("gemma3_text", 18, 640, 262144)
    assert c.sliding_window == 512 and [i for i, s in enumerate(c.sliding_layers) if not s] == [5, 11, 17]
    assert (c.rope_theta, c.rope_local_theta) == (1e6, 1e4)


@pytest.mark.parametrize("case", [0, 1])
def test_prompt_ids_match_oracle(gemma_model, cases, case):
    assert gemma_model.tokenizer.encode(cases[case]["text"]) == cases[case]["input_ids"]


@pytest.mark.parametrize("case", [0, 1])
def test_logits_match_pytorch(gemma_model, cases, case):
    c = cases[case]
    logits = gemma_model.forward(c["input_ids"])
    worst = 0.0
    for pos, top in enumerate(c["top10_per_position"]):
        worst = max(worst, float(np.abs(logits[pos, top["ids"]] - np.array(top["logits"])).max()))
        assert int(np.argmax(logits[pos])) == top["ids"][0], f"top-1 differs at position {pos}"
    assert worst <= LOGIT_ATOL, f"max |logit diff| {worst:.2e} over the top-10 ids"


@pytest.mark.parametrize("case", [0, 1])
def test_greedy_continuation_matches_pytorch(gemma_model, cases, case):
    c = cases[case]
    gen = Generation(gemma_model, gemma_model.new_cache(128), c["input_ids"], SamplingSettings(max_new_tokens=32))
    text = "".join(gen)
    expected = c["greedy_32"]
    eos = [i for i, t in enumerate(expected) if t in gemma_model.eos_ids()]
    assert gen.token_ids == expected[:eos[0] if eos else None]
    assert text == c["greedy_32_text"]


def test_reference_forward_agrees_on_the_real_model(gemma_model_dir, gemma_model, cases):
    """reference/gemma.py, fed by the safetensors library (not our reader), agrees too."""
    from safetensors.numpy import load_file

    from reference import gemma as ref
    weights = load_file(str(gemma_model_dir / "model.safetensors"))
    cfg = json.loads((gemma_model_dir / "config.json").read_text())
    ids = cases[1]["input_ids"]
    np.testing.assert_allclose(ref.forward(weights, cfg, ids), gemma_model.forward(ids), atol=LOGIT_ATOL)


def test_cli_generate_on_gemma(gemma_model_dir, capsys):
    """`python -m minilm_edge generate <gemma> --prompt "The capital of France is"` continues greedily."""
    from minilm_edge.app.cli import main
    assert main(["generate", str(gemma_model_dir), "--prompt", "The capital of France is",
                 "--max-new-tokens", "8", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith(" the capital of the country of France")
