"""Shared fixtures: SmolLM2 and the tiny models load once per session."""

from __future__ import annotations

import os

os.environ.setdefault("LMSCOPE_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

import lmscope
from tests.tiny import CONFIGS, tiny_model

FAMILY_NAMES = sorted(CONFIGS)


@pytest.fixture(scope="session")
def smollm2() -> lmscope.Model:
    return lmscope.load("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, lmscope.Model]:
    return {name: tiny_model(name) for name in FAMILY_NAMES}


@pytest.fixture(params=FAMILY_NAMES + ["smollm2"])
def any_model(request, tiny_models, smollm2) -> lmscope.Model:
    """Every tiny family model, and SmolLM2."""
    return smollm2 if request.param == "smollm2" else tiny_models[request.param]
