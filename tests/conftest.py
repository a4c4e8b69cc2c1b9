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


@pytest.fixture(scope="session")
def real_lm():
    """The embedded Qwen2.5-Coder-0.5B-Instruct in float32 (exact comparisons)."""
    from steerlab.model import load_model

    return load_model("default", dtype="float32")
