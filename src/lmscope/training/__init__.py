"""Training from scratch: Outlier-Safe Pre-Training's components and recipes
(:mod:`lmscope.training.osp`), the pre-training loop with its checkpoints
(:mod:`lmscope.training.pretrain`) and the A/B of recipes (:mod:`lmscope.training.compare`)."""

from lmscope.training.compare import Comparison, QuantScheme, evaluate, run_pretraining
from lmscope.training.osp import (
    RECIPES,
    NormalizedMomentum,
    ProjectedEmbedding,
    ProjectedHead,
    Recipe,
    SingleScaleRMSNorm,
    apply_recipe_,
    assign_parameters,
    build_optimizers,
    exported,
    fold_,
    get_recipe,
)
from lmscope.training.pretrain import PretrainSettings, Trainer, TrainingRun, load_tokenizer, pretrain

__all__ = [
    "RECIPES",
    "Comparison",
    "NormalizedMomentum",
    "PretrainSettings",
    "ProjectedEmbedding",
    "ProjectedHead",
    "QuantScheme",
    "Recipe",
    "SingleScaleRMSNorm",
    "Trainer",
    "TrainingRun",
    "apply_recipe_",
    "assign_parameters",
    "build_optimizers",
    "evaluate",
    "exported",
    "fold_",
    "get_recipe",
    "load_tokenizer",
    "pretrain",
    "run_pretraining",
]
