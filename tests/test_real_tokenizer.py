"""The tokenizer.json imported from the real SmolLM2-135M-Instruct GGUF reproduces llama.cpp's ids.

Oracle: shared/data/smollm2-tokens-llamacpp.json, 20 strings x (control tokens parsed or not), ids
from `llama-tokenize --ids --no-bos` on the same GGUF. Fixtures `real_model_dir` and
`shared_data` (tests/conftest.py) skip with a reason when the model or the data cannot be had.
"""
import json

import pytest
from tokenizers import Tokenizer

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def cases(shared_data):
    return json.loads((shared_data / "smollm2-tokens-llamacpp.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizer(real_model_dir):
    return Tokenizer.from_file(str(real_model_dir / "tokenizer.json"))


def test_oracle_has_40_cases(cases):
    assert len(cases) == 40


@pytest.mark.parametrize("index", range(40))
def test_ids_match_llamacpp(tokenizer, cases, index):
    case = cases[index]
    # llama.cpp's parse_special=false: control tokens in the text are plain text.
    tokenizer.encode_special_tokens = not case["parse_special"]
    ids = tokenizer.encode(case["text"], add_special_tokens=False).ids
    assert ids == case["ids"], f"{case['text']!r} (parse_special={case['parse_special']})"
    assert tokenizer.decode(ids, skip_special_tokens=False) == case["text"]
