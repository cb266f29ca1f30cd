"""The documentation cannot rot: every ```python block of README.md and docs/**/*.md runs (each
page's blocks in order, in one namespace per page), the two
tutorial notebooks execute with nbclient and are committed without outputs, and the site builds
with ``mkdocs build --strict``.

A block that must not run here (several machines, a GPU, a model far larger than this machine)
is preceded by the line ``<!-- no-run: reason -->``; the reason is required. Blocks run with the
working directory a fresh temporary folder in which ``examples/`` is the repository's."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
NO_RUN = re.compile(r"<!-- no-run: (?P<reason>[^>]+?) -->\s*$")
FENCE = re.compile(r"^(?P<fence>`{3,})(?P<lang>[\w-]*)\s*$")
SECONDS_PER_PAGE = 600  # a guard against study-sized examples (a page takes 5-40 s on 2 idle cores)


def code_blocks(page: Path) -> list[tuple[int, str, str | None]]:
    """``(line, source, no-run reason or None)`` of every ```python block of ``page``."""
    lines, blocks, i = page.read_text(encoding="utf-8").splitlines(), [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        start, lang = i, fence["lang"]
        i += 1
        while i < len(lines) and lines[i].strip() != fence["fence"]:  # a ```` fence may hold ``` lines
            i += 1
        if lang == "python":
            marker = NO_RUN.match(lines[start - 1]) if start else None
            blocks.append((start + 1, "\n".join(lines[start + 1 : i]) + "\n", marker and marker["reason"]))
        i += 1
    return blocks


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


RUNNABLE = [page for page in PAGES if any(reason is None for _, _, reason in code_blocks(page))]


def test_pages_have_python_blocks():
    assert len(RUNNABLE) >= 8
    assert sum(len(code_blocks(page)) for page in PAGES) >= 20


def test_no_run_blocks_are_few_and_say_why():
    skipped = [(page, line, reason) for page in PAGES for line, _, reason in code_blocks(page) if reason]
    assert all(len(reason.split()) >= 3 for _, _, reason in skipped), skipped
    assert len(skipped) <= 4, skipped


def _shared_load(monkeypatch, smollm2) -> None:
    """``lmscope.load()`` of a page (SmolLM2, the default) returns the session's SmolLM2: loading
    it once for every page and test (the pages only read the model, or change it in context
    managers that undo the change)."""
    import lmscope

    load = lmscope.load

    def shared(spec: str = "smollm2-135m", **kwargs):
        return smollm2 if spec == "smollm2-135m" and not kwargs else load(spec, **kwargs)

    monkeypatch.setattr(lmscope, "load", shared)


@pytest.mark.parametrize("page", RUNNABLE, ids=_name)
def test_page_runs(page, tmp_path, monkeypatch, smollm2):
    """The page's blocks, in order, in one namespace (later blocks use earlier names)."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    _shared_load(monkeypatch, smollm2)
    module = types.ModuleType(f"docs_{page.stem.replace('-', '_')}")  # a module, so results defined on a page pickle
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    start = time.perf_counter()
    for line, source, reason in code_blocks(page):
        if reason:
            compile(source, f"{_name(page)}:{line}", "exec", dont_inherit=True)  # still valid Python
            continue
        exec(compile(source, f"{_name(page)}:{line}", "exec", dont_inherit=True), namespace)  # noqa: S102 (the docs run, on purpose)
    assert time.perf_counter() - start < SECONDS_PER_PAGE, "keep the docs' examples cheap"


def test_links_between_pages_resolve():
    """Relative links of README.md point at files that exist (mkdocs --strict checks docs/)."""
    for target in re.findall(r"\]\((?!https?://|#)([^)#\s]+)", (ROOT / "README.md").read_text(encoding="utf-8")):
        assert (ROOT / target).exists(), target


def test_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    assert re.findall(r"^```sh\n(.*?)\n```", text, flags=re.MULTILINE | re.DOTALL)[:2] == ["make scan", "make test"]
    tour = next(block for _, block, _ in code_blocks(ROOT / "README.md"))
    assert len(tour.splitlines()) <= 20


# ---------------------------------------------------------------------------------------- notebooks


def test_notebooks_are_committed_without_outputs():
    import nbformat

    assert {nb.name for nb in NOTEBOOKS} >= {"circuit_study.ipynb", "quantisation_study.ipynb"}
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: strip outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
    """Each notebook runs top to bottom without an error, in a kernel of this interpreter."""
    import nbformat
    from ipykernel.kernelspec import install
    from nbclient import NotebookClient

    install(kernel_name="lmscope-docs", prefix=str(tmp_path / "jupyter"))  # this interpreter, whatever else is installed
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter" / "share" / "jupyter"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("LMSCOPE_QUIET", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="lmscope-docs", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors


# ---------------------------------------------------------------------------------------- the site


def test_mkdocs_build_strict(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    if mkdocs is None:
        pytest.fail("mkdocs is not installed: pip install -e '.[dev]'")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [mkdocs, "build", "--strict", "--quiet", "-d", str(tmp_path / "site")],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "index.html").exists()
