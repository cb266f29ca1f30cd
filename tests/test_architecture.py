"""The architecture's rules that import-linter cannot see: only core registers PyTorch hooks and
reads a module's call arguments (the hooking primitive's job)."""

from __future__ import annotations

import re
from pathlib import Path

import lmscope

PACKAGE = Path(lmscope.__file__).parent


def _outside_core(pattern: str) -> list[str]:
    """Modules outside ``core/`` whose source matches ``pattern``."""
    regex = re.compile(pattern)
    return [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.parent.name != "core" and regex.search(path.read_text())
    ]


def test_hooks_are_registered_only_in_core():
    assert _outside_core(r"register_forward(_pre)?_hook") == []


def test_hidden_states_argument_is_read_only_in_core():
    assert _outside_core(r"kwargs\[\"hidden_states\"\]") == []
