"""The synthetic temporal-facts model, trained once per test session (see synthetic.py)."""

from __future__ import annotations

import pytest

import lmscope
from tests.temporal.synthetic import trained_model


@pytest.fixture(scope="session")
def temporal_model() -> lmscope.Model:
    """A 2-layer Llama that recalls every fact of ``synthetic.WORLD`` (trained in ~15 s)."""
    return trained_model()
