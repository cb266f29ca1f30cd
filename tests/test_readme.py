"""Every public name the Python examples of the README and docs/ import still imports, and the flat
module names of earlier releases still import, with a DeprecationWarning, as the subpackages' modules."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]  # tests/test_docs.py runs their blocks


def _imports() -> list[tuple[str, str]]:
    blocks = [b for page in PAGES for b in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)]
    found = []
    for block in blocks:
        for module, names in re.findall(r"^from (lmscope[\w.]*) import ([\w, ]+)", block, flags=re.MULTILINE):
            found += [(module, name.strip()) for name in names.split(",")]
    return found


def test_readme_has_examples():
    assert len(_imports()) >= 15


@pytest.mark.parametrize(("module", "name"), _imports())
def test_readme_import(module, name):
    imported = importlib.import_module(module)
    value = getattr(imported, name, None)
    if value is None:  # a submodule (``from lmscope import tasks``)
        value = importlib.import_module(f"{module}.{name}")
    assert value is not None


def test_flat_names_are_the_subpackage_modules(monkeypatch):
    import lmscope.circuits.patching
    import lmscope.quant.kv

    for flat in ("lmscope.patching", "lmscope.kv"):  # imported before: import them afresh
        monkeypatch.delitem(sys.modules, flat, raising=False)
    with pytest.warns(
        DeprecationWarning, match=r"^lmscope\.patching is deprecated; import lmscope\.circuits\.patching$"
    ):
        import lmscope.patching
    with pytest.warns(DeprecationWarning, match=r"^lmscope\.kv is deprecated; import lmscope\.quant\.kv$"):
        kv = importlib.import_module("lmscope.kv")

    assert lmscope.patching is lmscope.circuits.patching
    assert kv is lmscope.quant.kv
    assert lmscope.patching.__spec__.name == "lmscope.circuits.patching"


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("lmscope.circuits.lens", "lmscope.readout"),
        ("lmscope.circuits.lenses", "lmscope.readout"),
        ("lmscope.quant.fake", "lmscope.quant"),
        ("lmscope.quant.corpus", "lmscope.core.corpus"),
    ],
)
def test_moved_modules_warn_with_their_new_path(old, new, monkeypatch):
    """docs/circuits.md names these moved modules: they import for one release, with a warning."""
    assert old in (ROOT / "docs" / "circuits.md").read_text().replace("\n", " ")
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match=rf"^{re.escape(old)} is deprecated; import {re.escape(new)}$"):
        importlib.import_module(old)
