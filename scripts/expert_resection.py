"""Expert resection on the tiny MoE trained on two synthetic domains (tests/experts/synthetic.py):
the table in README.md's "Which experts do what?". Run from the repository root:
``python scripts/expert_resection.py``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.experts import synthetic

from lmscope.experts import expert_stats, resection


def main() -> None:
    model = synthetic.trained_model()
    corpora = [synthetic.corpus("a"), synthetic.corpus("b")]
    stats = expert_stats(model, corpora, window=64)
    result = resection(model, corpora, stats, 2, draws=3, window=64)
    print("| removed | loss a | loss b |\n|---|---|---|")
    print(f"| none | {result.baseline['a']:.3f} | {result.baseline['b']:.3f} |")
    for row in result.rows:
        what = (
            f"2 experts most specialised to {row['target']}" if row["kind"] == "specialised" else "2 random (mean of 3)"
        )
        cells = [f"{row['loss'][d]:.3f} ({result.delta(row, d):+.2f})" for d in ("a", "b")]
        print(f"| {what} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
