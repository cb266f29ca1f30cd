"""Run by tests/core/test_distributed.py under ``torchrun``: every analysis that splits its work
over ranks, on a tiny Llama, with its results saved by rank 0 (``torch.save``) for the test to
compare with the same script run as one process.

Usage: ``torchrun --nproc-per-node N tests/core/dist_worker.py OUT.pt [fail]``; with ``fail``,
item 3 of a four-item map raises on whichever rank computes it, and each rank saves the error
it saw to ``OUT.pt.rank<R>``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lmscope.circuits.attribution import attribute
from lmscope.circuits.edges import edge_attribution
from lmscope.circuits.faithfulness import faithfulness
from lmscope.circuits.graph import select
from lmscope.circuits.pairs import TokenPair
from lmscope.circuits.patching import activation_patching
from lmscope.core import distributed
from lmscope.core.errors import LmscopeError
from lmscope.core.corpus import Corpus
from lmscope.quant.evaluation import perplexity
from lmscope.quant.kv import kv_stats
from lmscope.quant.outliers import activation_stats
from lmscope.temporal.edit import EditExperiment, temporal_edit
from tests.helpers import token_pair
from tests.tiny import tiny_model


def pairs(model, n: int = 5) -> list[TokenPair]:
    return [token_pair(model, pos=7, differ=(2, 5), seed=seed) for seed in range(n)]


def analyses(model) -> dict:
    g = torch.Generator().manual_seed(5)
    corpus = Corpus("random", torch.randint(3, model.d_vocab, (16 * 20,), generator=g))
    stats = activation_stats(model, corpus, window=16, batch_size=3)
    token_pairs = pairs(model)
    edges = edge_attribution(model, token_pairs, steps=3)
    experiments = [
        EditExperiment(target=[5, 9, 11, 4, 7], phrase=[11], source=[8, 8, 3, 12], trigger=[20], coeff=4.0),
        EditExperiment(target=[6, 10, 12, 4], phrase=[12], source=[9, 3, 13], trigger=[21, 22], coeff=4.0),
    ]
    edit = temporal_edit(model, experiments, max_new_tokens=4, max_batch=4)
    return {
        "stats": {name: vars(s) for name, s in stats.sites.items()},
        "n_tokens": stats.n_tokens,
        "kv": kv_stats(model, corpus, window=16, batch_size=3).gram,
        "perplexity": perplexity(model, corpus, window=16, batch_size=3)["nll"],
        "patching": activation_patching(model, token_pairs).scores,
        "attribution": attribute(model, token_pairs, "attribution").scores,
        "eap-ig nodes": attribute(model, token_pairs, "eap-ig", steps=3).scores,
        "edges": edges.scores,
        "faithfulness": faithfulness(model, token_pairs, select(edges, top=20)).to_json(),
        "edit": {"successes": edit.successes, "candidates": edit.candidates},
    }


def fail(out: Path) -> None:
    def fn(i: int) -> int:
        if i == 3:
            raise ValueError("item 3 is broken")
        return i

    try:
        list(distributed.ordered_map(range(4), fn))
        seen = "no error"
    except LmscopeError as e:
        seen = f"{type(e).__name__}: {e} | report={distributed.is_main()}"
    Path(f"{out}.rank{distributed.rank()}").write_text(seen)


def main() -> None:
    out = Path(sys.argv[1])
    distributed.init("cpu")
    if sys.argv[2:] == ["fail"]:
        fail(out)
    else:
        results = analyses(tiny_model("llama"))
        results["world_size"] = distributed.world_size()
        if distributed.is_main():
            torch.save(results, out)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
