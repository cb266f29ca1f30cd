"""Round trip: dictionaries lmscope writes in SAELens's format load in SAELens's ``SAE.load_from_disk``
and encode and decode as lmscope does. Two steps, two environments::

    PYTHONPATH=src .venv/bin/python scripts/saelens_roundtrip.py write /tmp/roundtrip   # lmscope's
    /tmp/refenv/bin/python scripts/saelens_roundtrip.py check /tmp/roundtrip            # sae-lens 6

``write`` saves one random dictionary per architecture lmscope writes (with inputs and lmscope's
features and reconstructions); ``check`` loads each folder with SAELens and prints the largest
absolute difference of its encodings and reconstructions from lmscope's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

D_IN, D_SAE = 16, 32

# name -> (Dictionary keyword arguments, site)
CASES = {
    "standard": ({"arch": "standard"}, "blocks.3.resid_post"),
    "standard_nobdec": ({"arch": "standard", "apply_b_dec_to_input": False}, "blocks.3.mlp.out"),
    "standard_layernorm": ({"arch": "standard", "normalize": "layer_norm"}, "blocks.2.resid_pre"),
    "standard_normrescale": ({"arch": "standard", "normalize": "constant_norm_rescale"}, "blocks.2.resid_mid"),
    "topk": ({"arch": "topk", "k": 4}, "blocks.3.resid_post"),
    "topk_rescaled": ({"arch": "topk", "k": 4, "rescale_by_decoder_norm": True}, "blocks.3.resid_post"),
    "jumprelu": ({"arch": "jumprelu"}, "blocks.1.mlp.post"),
    "batchtopk": ({"arch": "batchtopk", "k": 4}, "blocks.1.resid_post"),
    "gated": ({"arch": "gated"}, "blocks.0.attn.out"),
    "hook_z": ({"arch": "standard"}, "blocks.0.attn.z"),
    "transcoder": ({"arch": "standard", "transcoder": True}, "blocks.1.mlp.in"),
    "skip_transcoder": ({"arch": "standard", "transcoder": True, "skip": True}, "blocks.1.mlp.in"),
    "jumprelu_transcoder": ({"arch": "jumprelu", "transcoder": True, "d_out": 24}, "blocks.1.mlp.in"),
}


def write(root: Path) -> None:
    from lmscope.features import Dictionary, save_dictionary

    for seed, (name, (kwargs, site)) in enumerate(CASES.items()):
        out_site = site.replace("mlp.in", "mlp.out") if kwargs.get("transcoder") else None
        d = Dictionary(D_IN, D_SAE, site=site, out_site=out_site, **kwargs)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, p in d.named_parameters():
                p.copy_(
                    torch.rand(p.shape, generator=g) * 0.4
                    if pname == "threshold"
                    else torch.randn(p.shape, generator=g) * 0.3
                )
        folder = save_dictionary(d, root / name)
        x = torch.randn(12, D_IN, generator=g)
        with torch.no_grad():
            f = d.encode(x)
            tensors = {"x": x, "features": f, "reconstruction": d.decode(f, x)}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "lmscope.safetensors"))
    print(f"wrote {len(CASES)} dictionaries under {root}")


def check(root: Path) -> None:
    import sae_lens
    from sae_lens import SAE

    print(f"sae-lens {sae_lens.__version__}, torch {torch.__version__}")
    worst = 0.0
    for name in CASES:
        folder = root / name
        sae = SAE.load_from_disk(folder)
        ref = load_file(str(folder / "lmscope.safetensors"))
        x = ref["x"]
        if sae.cfg.reshape_activations == "hook_z":  # SAELens reads hook_z as [..., n_heads, d_head]
            x = x.view(*x.shape[:-1], 4, -1)
        with torch.no_grad():
            f = sae.encode(x)
            out = sae(x).flatten(-2) if sae.cfg.reshape_activations == "hook_z" else sae(x)
        df = (f - ref["features"]).abs().max().item()
        dx = (out - ref["reconstruction"]).abs().max().item()
        worst = max(worst, df, dx)
        cfg = json.loads((folder / "cfg.json").read_text())
        print(
            f"{name:22s} {cfg['architecture']:24s} {cfg['metadata']['hook_name']:30s} "
            f"features max|diff| {df:.2e}  reconstruction max|diff| {dx:.2e}  (active {int((f != 0).sum())}/{f.numel()})"
        )
    print(f"largest difference over all: {worst:.2e}")


if __name__ == "__main__":
    mode, root = sys.argv[1], Path(sys.argv[2])
    write(root) if mode == "write" else check(root)
