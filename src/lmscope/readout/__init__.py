"""Reading the residual stream out through the unembedding: what each layer, and each component
writing to the residual stream, says about the next token.

- :mod:`~lmscope.readout.logit_lenses`: the logit lens (nostalgebraist 2020), one readout
  (:func:`stream_logits`) for a batch of prompts at one position (:func:`logit_lens`,
  :class:`LogitLens`) and for one text at every position (:func:`lens`, :class:`LensResult`);
- :mod:`~lmscope.readout.tuned`: the tuned lens (Belrose et al. 2023), the same readout after a
  learned translator per stream (:class:`TunedLens`, :func:`train_tuned_lens`,
  :func:`load_tuned_lens`);
- :mod:`~lmscope.readout.attribution`: direct logit attribution (Elhage et al. 2021) of every
  head, attention bias, MLP and the embedding (:func:`direct_logit_attribution`,
  :func:`decompose`), and the tokens single components promote (:func:`component_top_tokens`);
- :mod:`~lmscope.readout.comparison`: prompt sets side by side (:func:`compare`);
- :mod:`~lmscope.readout.prompts`: answer tokens, positions, batches, token strings;
- :mod:`~lmscope.readout.norm`: the final norm, linearised (:class:`FinalNorm`).

Positions are absolute indices into each prompt's token sequence, negative from its end, as
in :mod:`lmscope.core.interventions`. The package sits beside :mod:`lmscope.circuits` and
imports only ``core`` and ``reports``.
"""

from lmscope.readout.attribution import (
    Components,
    ComponentTokens,
    LogitAttribution,
    component_top_tokens,
    decompose,
    direct_logit_attribution,
)
from lmscope.readout.comparison import AttributionComparison, LensComparison, compare
from lmscope.readout.logit_lenses import (
    LensResult,
    LogitLens,
    kl_to_final,
    layer_labels,
    lens,
    logit_lens,
    ranks_and_probs,
    resid_sites,
    stream_index,
    stream_logits,
    top_tokens,
)
from lmscope.readout.norm import FinalNorm
from lmscope.readout.prompts import answer_ids, token_strings
from lmscope.readout.tuned import Translators, TunedLens, load_tuned_lens, train_tuned_lens

__all__ = [
    "AttributionComparison",
    "ComponentTokens",
    "Components",
    "FinalNorm",
    "LensComparison",
    "LensResult",
    "LogitAttribution",
    "LogitLens",
    "Translators",
    "TunedLens",
    "answer_ids",
    "compare",
    "component_top_tokens",
    "decompose",
    "direct_logit_attribution",
    "kl_to_final",
    "layer_labels",
    "lens",
    "load_tuned_lens",
    "logit_lens",
    "ranks_and_probs",
    "resid_sites",
    "stream_index",
    "stream_logits",
    "token_strings",
    "top_tokens",
    "train_tuned_lens",
]
