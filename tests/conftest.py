"""Shared fixtures: tiny in-memory models for unit tests, the real embedded model
for tests marked ``real`` (loaded once per session)."""

from __future__ import annotations

import pytest

from tests.tiny import tiny_model


@pytest.fixture
def tiny_qwen():
    return tiny_model("qwen2")


@pytest.fixture
def tiny_llama3():
    return tiny_model("llama", template="llama3")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the real tier, saying why, on a machine whose disk cannot cache the model."""
    from steerlab.model.embedded import cache_shortfall

    shortfall = cache_shortfall()
    if shortfall is None:
        return
    skip = pytest.mark.skip(reason=f"the real tier needs the embedded model cached: {shortfall}")
    for item in items:
        if "real" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def real_lm():
    """The embedded Qwen2.5-Coder-0.5B-Instruct in float32 (exact comparisons)."""
    from steerlab.model.loading import load_model

    return load_model("default", dtype="float32")
