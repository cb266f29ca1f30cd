"""ActivationCache: captured activations keyed by site name."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmscope.core.errors import LmscopeError
from lmscope.core.files import atomic


class ActivationCache(dict):
    """A ``dict`` of site name -> tensor, with safetensors save/load.

    Keys are site names (``blocks.3.attn.z``; ``blocks.3.attn.z.5`` for a single head).
    """

    def save(self, path: str | Path) -> Path:
        """Write every tensor to one ``.safetensors`` file (on CPU, contiguous)."""
        path = Path(path)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.items()}
        with atomic(path) as tmp:
            save_file(tensors, str(tmp))
        return path

    @classmethod
    def load(cls, path: str | Path) -> ActivationCache:
        """Read a cache written by :meth:`save`."""
        try:
            return cls(load_file(str(path)))
        except (OSError, Exception) as e:  # safetensors raises its own error types
            raise LmscopeError(f"cannot read activation cache {path}: {e}") from e

    def to(self, device: str | torch.device) -> ActivationCache:
        return ActivationCache({k: v.to(device) for k, v in self.items()})
