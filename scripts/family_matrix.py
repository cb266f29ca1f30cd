"""Regenerate the family matrix of docs/models.md: ``lmscope verify`` on a tiny model of every family."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("LMSCOPE_QUIET", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.families import MATRIX_END, MATRIX_START, render_matrix, table_families, tiny_family_model

from lmscope.verify import certify


def main() -> None:
    certificates = {name: certify(tiny_family_model(name)) for name in table_families()}
    page = ROOT / "docs" / "models.md"
    text = page.read_text()
    start, end = text.index(MATRIX_START), text.index(MATRIX_END) + len(MATRIX_END)
    page.write_text(text[:start] + render_matrix(certificates) + text[end:])
    print(f"{sum(c.passed for c in certificates.values())} of {len(certificates)} families pass")


if __name__ == "__main__":
    main()
