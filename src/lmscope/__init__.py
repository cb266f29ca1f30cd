"""lmscope: look inside Hugging Face causal language models and change what they do.

>>> import lmscope
>>> model = lmscope.load()                      # SmolLM2-135M, offline
>>> run = model.run("The capital of France is", capture=["blocks.10.attn.z"])
>>> run.cache["blocks.10.attn.z"].shape         # [batch, pos, n_heads, d_head]

The package is layered (enforced by import-linter, see ``.importlinter``):

- :mod:`lmscope.core`: loading, the family and hook-point tables, sites, hooks,
  interventions, the :class:`Model` and its anatomy;
- :mod:`lmscope.circuits` (where a behaviour lives) and :mod:`lmscope.quant`
  (quantisation-readiness), which import only ``core`` and ``reports``;
- :mod:`lmscope.reports`: results files, figures, HTML;
- :mod:`lmscope.scan` and :mod:`lmscope.cli` on top.

The flat module names of earlier releases (``lmscope.patching``, ``lmscope.kv``, ...) keep
working for one more release, with a :class:`DeprecationWarning` naming the new path:
:data:`_MOVED` maps each to its module in the subpackages, imported on first use.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
import warnings

# load, Model, sites, interventions: the names listed in core.__all__
from lmscope.core import *
from lmscope.core import __all__ as __all__

__version__ = "0.1.0"

# Flat names of earlier releases -> where the module lives now.
_MOVED = {
    **{name: f"lmscope.core.{name}" for name in ("errors", "loading", "families", "sites", "hooks", "model")},
    **{name: f"lmscope.core.{name}" for name in ("interventions", "cache", "progress", "jsonl")},
    **{name: f"lmscope.circuits.{name}" for name in ("metrics", "tasks", "patching", "attribution", "edges")},
    "head_roles": "lmscope.circuits.head_roles",
    "discovery": "lmscope.circuits.locate",
    "corpus": "lmscope.core.corpus",
    **{name: f"lmscope.quant.{name}" for name in ("outliers", "kv", "evaluation")},
    # the two lens modules of circuits, now the readout package (its public names)
    "circuits.lens": "lmscope.readout",
    "circuits.lenses": "lmscope.readout",
    # simulated quantisation, split into kernels, configs, apply and simulate (the package's names)
    "quant.fake": "lmscope.quant",
    "quant.corpus": "lmscope.core.corpus",  # corpora are read by every package
}


_IMPORTLIB = os.path.dirname(importlib.__file__)


def _importer_stacklevel() -> int:
    """The ``stacklevel`` (for :func:`warnings.warn` called by this function's caller) of the
    first frame outside the import machinery: the code that imported the module. (``warnings``
    itself skips importlib's bootstrap frames; ``importlib.import_module``'s frame it counts.)"""
    frame, level = sys._getframe(2), 2
    while frame is not None:
        name = frame.f_code.co_filename
        if not ("importlib" in name and "_bootstrap" in name):
            if not name.startswith(_IMPORTLIB):
                break
            level += 1
        frame = frame.f_back
    return level


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``lmscope.<old name>`` as the module it moved to (the same module object), with a
    :class:`DeprecationWarning` naming the new path."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, name = fullname.partition(".")
        if prefix != "lmscope" or name not in _MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = _MOVED[spec.name.partition(".")[2]]
        warnings.warn(f"{spec.name} is deprecated; import {new}", DeprecationWarning, stacklevel=_importer_stacklevel())
        module = importlib.import_module(new)
        spec.loader_state = module.__spec__  # the import system stamps the alias's spec on it next
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())
