"""The architecture's rules that import-linter cannot see: only core registers PyTorch hooks."""

from __future__ import annotations

import re
from pathlib import Path

import lmscope

PACKAGE = Path(lmscope.__file__).parent


def test_hooks_are_registered_only_in_core():
    registering = re.compile(r"register_forward(_pre)?_hook")
    outside = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.parent.name != "core" and registering.search(path.read_text())
    ]
    assert outside == []


def test_hidden_states_argument_is_read_only_in_core():
    """Reading a module's first input (``args[0]`` or ``hidden_states``) is the primitive's job."""
    pattern = re.compile(r"kwargs\[\"hidden_states\"\]")
    outside = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.parent.name != "core" and pattern.search(path.read_text())
    ]
    assert outside == []
