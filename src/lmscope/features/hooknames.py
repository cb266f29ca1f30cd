"""Other libraries' names for the places a dictionary reads and writes, as lmscope sites.

TransformerLens hook names (SAELens, circuit-tracer)::

    blocks.L.hook_resid_pre / hook_resid_mid / hook_resid_post   blocks.L.resid_pre / resid_mid / resid_post
    blocks.L.hook_attn_out / hook_mlp_out                         blocks.L.attn.out / mlp.out
    blocks.L.attn.hook_z                                          blocks.L.attn.z (heads flattened)
    blocks.L.mlp.hook_post                                        blocks.L.mlp.post
    blocks.L.ln2.hook_normalized, blocks.L.mlp.hook_in            blocks.L.mlp.in
    blocks.L.hook_mlp_in                                          blocks.L.resid_mid (ln2's input)
    blocks.L.mlp.hook_out                                         blocks.L.mlp.out
    hook_embed / ln_final.hook_normalized                         embed / final_norm

TransformerLens folds each norm's gain into the weights that read it when it loads a model with
``fold_ln`` (its default; SAELens records other choices in ``model_from_pretrained_kwargs``), so its
``ln2.hook_normalized`` is lmscope's ``mlp.in`` with the norm's gain divided out (and bias
subtracted): :func:`tl_site` says so (``folded``), and the site provider undoes it.

Hugging Face module paths (sparsify's hook points, relative to the base model; SAELens's
``hf_hook_name``) name a module whose *output* is read (its input too, for a transcoder):
``[model.]layers.L`` (or ``h.L``, ``gpt_neox.layers.L``, ...) -> resid_pre -> resid_post,
``...L.mlp`` -> mlp.in -> mlp.out, ``...L.mlp.down_proj`` (or ``c_proj``, ``fc2``,
``dense_4h_to_h``) -> mlp.post -> mlp.out, ``...L.self_attn`` / ``attn`` / ``attention`` -> attn.out,
``embed_tokens`` / ``wte`` / ``embed_in`` -> embed.
"""

from __future__ import annotations

import re

from lmscope.core.errors import LmscopeError

# TransformerLens hook (after "blocks.L.") -> lmscope site kind
_TL_LAYER = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_mid": "resid_mid",
    "hook_resid_post": "resid_post",
    "hook_attn_out": "attn.out",
    "hook_mlp_out": "mlp.out",
    "hook_mlp_in": "resid_mid",
    "attn.hook_z": "attn.z",
    "mlp.hook_post": "mlp.post",
    "mlp.hook_in": "mlp.in",
    "mlp.hook_out": "mlp.out",
    "ln2.hook_normalized": "mlp.in",
}
_TL_GLOBAL = {"hook_embed": "embed", "ln_final.hook_normalized": "final_norm"}
_TL_FOLDED = ("ln2.hook_normalized", "ln_final.hook_normalized")
# lmscope site kind -> TransformerLens hook (for writing SAELens's format)
_TL_OF_KIND = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn.out": "hook_attn_out",
    "mlp.out": "hook_mlp_out",
    "attn.z": "attn.hook_z",
    "mlp.post": "mlp.hook_post",
    "mlp.in": "ln2.hook_normalized",
}

_HF_LAYER = re.compile(r"^(?:.*\.)?(?:layers|h|blocks|layer)\.(\d+)((?:\.[A-Za-z_][A-Za-z0-9_]*)*)$")
_HF_MLP = ("mlp", "feed_forward", "ffn")
_HF_DOWN = ("down_proj", "c_proj", "fc2", "dense_4h_to_h", "w2")
_HF_ATTN = ("self_attn", "attn", "attention", "self_attention")
_HF_EMBED = ("embed_tokens", "wte", "embed_in", "word_embeddings")


def tl_site(hook: str) -> tuple[str, bool]:
    """The lmscope site of TransformerLens hook ``hook`` (``blocks.L.<hook>`` or a global hook)
    and whether TransformerLens's ``fold_ln`` would have folded a norm's gain into it; a one-line
    error for a hook with no lmscope site."""
    if hook in _TL_GLOBAL:
        return _TL_GLOBAL[hook], hook in _TL_FOLDED
    m = re.match(r"^blocks\.(\d+)\.(.+)$", hook)
    if m is None or m.group(2) not in _TL_LAYER:
        raise LmscopeError(f"no lmscope site for TransformerLens hook '{hook}' (known: {', '.join(_TL_LAYER)})")
    return f"blocks.{m.group(1)}.{_TL_LAYER[m.group(2)]}", m.group(2) in _TL_FOLDED


def hf_sites(path: str) -> tuple[str | None, str]:
    """(input site, output site) of the Hugging Face module at ``path``: what a transcoder at that
    module reads and what the module outputs (the input is None where no site is the module's
    input, e.g. attention's); a one-line error for a module with no lmscope site."""
    leaf = path.rsplit(".", 1)[-1]
    if leaf in _HF_EMBED:
        return None, "embed"
    m = _HF_LAYER.match(path)
    if m is not None:
        layer, rest = m.group(1), m.group(2).lstrip(".")
        parts = rest.split(".") if rest else []
        if not parts:
            return f"blocks.{layer}.resid_pre", f"blocks.{layer}.resid_post"
        if len(parts) == 1 and parts[0] in _HF_MLP:
            return f"blocks.{layer}.mlp.in", f"blocks.{layer}.mlp.out"
        if len(parts) == 2 and parts[0] in _HF_MLP and parts[1] in _HF_DOWN:
            return f"blocks.{layer}.mlp.post", f"blocks.{layer}.mlp.out"
        if len(parts) == 1 and parts[0] in _HF_ATTN:
            return None, f"blocks.{layer}.attn.out"
    raise LmscopeError(
        f"no lmscope site for module '{path}' (expected a decoder layer, its MLP, down-projection or attention)"
    )


def tl_hook(site: str) -> str | None:
    """The TransformerLens hook name of lmscope site ``site`` (None where TransformerLens has none)."""
    if site == "embed":
        return "hook_embed"
    m = re.match(r"^blocks\.(\d+)\.(.+)$", site)
    if m is None or m.group(2) not in _TL_OF_KIND:
        return None
    return f"blocks.{m.group(1)}.{_TL_OF_KIND[m.group(2)]}"


def hf_module(site: str, layers: str = "model.layers", mlp: str = "mlp", attn: str = "self_attn") -> str | None:
    """The Hugging Face module whose output is lmscope site ``site`` (``layers``, ``mlp``,
    ``attn``: the model's paths, Llama's by default); None where no module outputs it."""
    m = re.match(r"^blocks\.(\d+)\.(.+)$", site)
    if m is None:
        return None
    layer, kind = int(m.group(1)), m.group(2)
    if kind == "resid_post":
        return f"{layers}.{layer}"
    if kind == "resid_pre" and layer > 0:
        return f"{layers}.{layer - 1}"
    if kind == "mlp.out":
        return f"{layers}.{layer}.{mlp}"
    if kind == "attn.out":
        return f"{layers}.{layer}.{attn}"
    return None


def site_layer(site: str | None) -> int | None:
    """The layer of a layered site name (None for a global site or None)."""
    m = re.match(r"^blocks\.(\d+)\.", site or "")
    return int(m.group(1)) if m else None
