"""``lmscope pretrain``: train recipes side by side (settings and run)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from lmscope.reports.command import Command, RunWriter, option
from lmscope.training.compare import Comparison, run_pretraining
from lmscope.training.osp import get_recipe
from lmscope.training.pretrain import PretrainSettings


@dataclass(frozen=True)
class PretrainCommand(PretrainSettings):
    """``lmscope pretrain``: the training settings, which recipes, and the device."""

    recipe: str = option("osp", "adam, muon, muon-all, osp (Muon + SSNorm + EmbProj), osp-ssnorm or osp-embproj")
    compare: str | None = option(None, "recipes to train side by side with the same data and seed, e.g. adam,muon,osp")
    device: str = option("auto", "cpu, cuda, cuda:N or auto (CUDA when available)")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in self.recipes:
            get_recipe(name)  # an unknown recipe fails before anything loads

    @property
    def recipes(self) -> list[str]:
        if self.compare is None:
            return [self.recipe]
        return [r.strip() for r in self.compare.split(",") if r.strip()]

    def training(self) -> PretrainSettings:
        """The training settings alone."""
        return PretrainSettings(**{f.name: getattr(self, f.name) for f in fields(PretrainSettings)})


def run_pretrain(model: None, settings: PretrainCommand, out: RunWriter) -> Comparison:
    """Pre-train a small Llama from scratch with Adam, Muon or Outlier-Safe Pre-Training (Park et al.
    2025); --compare trains several recipes: kurtosis over training, massive activations, perplexity
    in full precision and 4-bit (W4A4KV4) with and without rotation."""
    return run_pretraining(settings.recipes, settings.training(), out, device=settings.device)


PRETRAIN = Command("pretrain", PretrainCommand, run_pretrain, model=False)
