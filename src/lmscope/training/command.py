"""``lmscope pretrain``: train recipes side by side (settings and run)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from lmscope.core.loading import resolve_device
from lmscope.reports.command import Command, RunWriter, option
from lmscope.training.compare import Comparison, run_pretraining
from lmscope.training.osp import RECIPES, get_recipe
from lmscope.training.pretrain import PretrainSettings


def recipe_list(spec: str) -> list[str]:
    """``"adam,muon,osp"``: comma-separated known recipe names (a one-line error otherwise)."""
    names = [name.strip() for name in spec.split(",")]
    for name in names:
        get_recipe(name)
    return names


@dataclass(frozen=True)
class PretrainCommand(PretrainSettings):
    """``lmscope pretrain``: the training settings, which recipes, and the device."""

    recipe: str = option("osp", "adam, muon, muon-all, osp (Muon + SSNorm + EmbProj), osp-ssnorm or osp-embproj",
                         choices=RECIPES)  # fmt: skip
    compare: str | None = option(None, "recipes to train side by side with the same data and seed, e.g. adam,muon,osp",
                                 parse=recipe_list)  # fmt: skip
    device: str = option("auto", "cpu, cuda, cuda:N or auto (CUDA when available)", parse=resolve_device)

    @property
    def recipes(self) -> list[str]:
        return [self.recipe] if self.compare is None else recipe_list(self.compare)

    def training(self) -> PretrainSettings:
        """The training settings alone."""
        return PretrainSettings(**{f.name: getattr(self, f.name) for f in fields(PretrainSettings)})


def run_pretrain(model: None, settings: PretrainCommand, out: RunWriter) -> Comparison:
    """Pre-train a small Llama from scratch with Adam, Muon or Outlier-Safe Pre-Training (Park et al.
    2025); --compare trains several recipes: kurtosis over training, massive activations, perplexity
    in full precision and 4-bit (W4A4KV4) with and without rotation."""
    return run_pretraining(settings.recipes, settings.training(), out, device=settings.device)


PRETRAIN = Command("pretrain", PretrainCommand, run_pretrain, model=False)
