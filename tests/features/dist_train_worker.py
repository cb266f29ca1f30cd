"""Run by tests/features/test_distributed_training.py under ``torchrun``: harvest a tiny Llama's
activations (each rank a share of every block's forward batches), train a top-k SAE on them and
evaluate it (batches split over ranks); rank 0 saves the weights and the numbers.

Usage: ``torchrun --nproc-per-node N tests/features/dist_train_worker.py OUT.pt``
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lmscope.core import distributed
from lmscope.features.evaluation import evaluate
from lmscope.features.harvest import HarvestSource
from lmscope.features.training import TrainSettings, train
from tests.tiny import tiny_model


def main() -> None:
    out = Path(sys.argv[1])
    distributed.init("cpu")
    model = tiny_model("llama")
    windows = torch.randint(3, model.d_vocab, (30, 12), generator=torch.Generator().manual_seed(2))
    source = HarvestSource(model, ["blocks.1.resid_post"], windows, block_windows=10, batch_size=3)
    settings = TrainSettings(site=("blocks.1.resid_post",), k=4, width="2x", batch_size=64, lr=1e-3, dead_tokens=128)
    run = train(source, settings)
    d = run.dictionaries["blocks.1.resid_post"]
    metrics = evaluate(model, d, windows[:7], batch_size=2).dictionaries[0].metrics
    if distributed.is_main():
        torch.save({"world_size": distributed.world_size(), "weights": d.state_dict(), "metrics": metrics,
                    "steps": run.logs["blocks.1.resid_post"][-1]["step"]}, out)  # fmt: skip
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
