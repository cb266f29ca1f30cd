"""Reading other libraries' dictionaries, and writing SAELens's and sparsify's formats.

:func:`load_dictionary` / :func:`load_dictionaries` detect a folder's format:

- **SAELens** (``cfg.json`` + ``sae_weights.safetensors``): 6.x configs (architecture fields at
  the top, the hook names in ``metadata``) and older ones (``hook_name`` / ``hook_point`` at the top,
  ``activation_fn_str`` + ``activation_fn_kwargs.k`` for top-k, a ``scaling_factor`` tensor, which is
  folded into the decoder); architectures standard, topk, jumprelu, gated, transcoder,
  skip_transcoder, jumprelu_transcoder, jumprelu_skip_transcoder; ``apply_b_dec_to_input``;
  ``normalize_activations`` (``constant_norm_rescale`` and ``layer_norm`` are applied at run time;
  ``expected_average_only_in`` and ``covariance_whitening`` are, as SAELens's ``load_from_disk``
  reads them, identities);
- **sparsify** (``cfg.json`` + ``sae.safetensors``; the folder's name is the hook point, a module
  path of the base model): top-k or group-max, ``transcode``, ``skip_connection``;
- **dictionary_learning** (``ae.pt`` + ``config.json``, ``trainer.dict_class``): AutoEncoder (its
  decoder columns normalised to unit norm, the norms folded into the encoder, as its
  ``from_pretrained`` does), AutoEncoderNew, GatedAutoEncoder, JumpReluAutoEncoder, AutoEncoderTopK,
  BatchTopKSAE and MatryoshkaBatchTopKSAE (read with their threshold, as their ``encode`` default);
- **circuit-tracer** (``config.yaml``): a transcoder set (``layer_<L>.safetensors`` or the files the
  config lists, safetensors or Gemma Scope ``.npz``) or a cross-layer transcoder
  (``W_enc_<L>.safetensors`` + ``W_dec_<L>.safetensors``).

A parent folder holding one such folder per hook point (sparsify's layout) loads as several.
Matrix orientation is decided from the shapes (the bias lengths give d_sae and d_out), the format's
convention only breaking ties where a matrix is square. A missing or unreadable file is a one-line
:class:`LmscopeError` naming it.

:func:`save_dictionary` writes SAELens's format (``sae_lens_version`` >= 6 in the metadata, so
SAELens reads it as current; ``hook_name`` and ``hf_hook_name``; lmscope's site as
``lmscope_site``) or sparsify's.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from lmscope.core.errors import LmscopeError
from lmscope.features.dictionary import CrossLayerTranscoder, Dictionary
from lmscope.features.hooknames import hf_module, hf_sites, tl_hook, tl_site

SAELENS_VERSION = "6.0.0"  # the SAELens config layout lmscope writes (6.x: hook names in metadata)
FORMATS = ("saelens", "sparsify")

# -- reading files ------------------------------------------------------------------------------


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _require(path: Path) -> Path:
    if not path.is_file():
        raise LmscopeError(f"{path}: no such file")
    return path


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(_require(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LmscopeError(f"cannot read {path}: {_one_line(e)}") from e
    if not isinstance(value, dict):
        raise LmscopeError(f"cannot read {path}: expected a JSON object")
    return value


def _read_yaml(path: Path) -> dict:
    try:
        value = yaml.safe_load(_require(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise LmscopeError(f"cannot read {path}: {_one_line(e)}") from e
    if not isinstance(value, dict):
        raise LmscopeError(f"cannot read {path}: expected a YAML mapping")
    return value


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        with safe_open(str(_require(path)), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (OSError, SafetensorError) as e:
        raise LmscopeError(f"cannot read {path}: {_one_line(e)}") from e


def _read_torch(path: Path) -> dict[str, Tensor]:
    try:
        value = torch.load(str(_require(path)), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a corrupt or foreign file
        raise LmscopeError(f"cannot read {path}: {_one_line(e)}") from e
    if isinstance(value, dict) and isinstance(value.get("ae"), dict):  # a training backup
        value = value["ae"]
    if not isinstance(value, dict):
        raise LmscopeError(f"cannot read {path}: expected a state dict")
    return value


def _read_npz(path: Path) -> dict[str, Tensor]:
    try:
        with np.load(str(_require(path)), allow_pickle=False) as data:
            return {k: torch.from_numpy(np.array(data[k])) for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise LmscopeError(f"cannot read {path}: {_one_line(e)}") from e


def _tensor(weights: dict[str, Tensor], *names: str, source: Path) -> Tensor:
    for name in names:
        if name in weights:
            return weights[name].float()
    raise LmscopeError(f"{source}: no tensor {' or '.join(names)} (has {', '.join(weights) or 'none'})")


def _oriented(w: Tensor, rows: int, cols: int, transposed_by_default: bool, what: str, source: Path) -> Tensor:
    """``w`` as [rows, cols], transposing it if its shape says so (square: the format's
    convention, ``transposed_by_default``)."""
    shape = tuple(w.shape)
    if shape == (rows, cols) and (rows != cols or not transposed_by_default):
        return w
    if shape == (cols, rows):
        return w.T
    raise LmscopeError(f"{source}: {what} has shape {list(shape)}, expected {rows} x {cols} either way round")


def _assign(d: Dictionary | CrossLayerTranscoder, **tensors: Tensor) -> None:
    with torch.no_grad():
        for name, value in tensors.items():
            getattr(d, name).copy_(value.to(d.dtype))


# -- SAELens -------------------------------------------------------------------------------------

_SAELENS_ARCHS = {
    # architecture -> (lmscope arch, transcoder, skip)
    "standard": ("standard", False, False),
    "topk": ("topk", False, False),
    "jumprelu": ("jumprelu", False, False),
    "gated": ("gated", False, False),
    "transcoder": ("standard", True, False),
    "skip_transcoder": ("standard", True, True),
    "jumprelu_transcoder": ("jumprelu", True, False),
    "jumprelu_skip_transcoder": ("jumprelu", True, True),
}
_IDENTITY_NORMS = ("none", "expected_average_only_in", "covariance_whitening")


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def _saelens_current(cfg: dict) -> dict:
    """A SAELens config in the 6.x layout (an older one converted as SAELens converts it)."""
    meta = cfg.get("metadata") or {}
    version = cfg.get("sae_lens_version") or meta.get("sae_lens_version")
    if version and _version_tuple(str(version)) >= (6,):
        return cfg
    old = {
        ({"hook_point": "hook_name", "hook_point_head_index": "hook_head_index"}).get(k, k): v for k, v in cfg.items()
    }
    activation = old.get("activation_fn_str", old.get("activation_fn", "relu"))
    arch = old.get("architecture", "standard")
    k = (old.get("activation_fn_kwargs") or {}).get("k")
    if activation == "topk" and k is not None:
        arch = "topk"
    elif activation not in ("relu", None) and arch == "standard":
        raise LmscopeError(f"SAELens activation '{activation}' is not supported (relu, topk)")
    norm = old.get("normalize_activations")
    norm = "expected_average_only_in" if norm is True else "none" if norm in (False, None) else norm
    keys = (
        "model_name",
        "hook_name",
        "hook_head_index",
        "hook_name_out",
        "hf_hook_name",
        "model_from_pretrained_kwargs",
    )
    return {
        **{k2: old[k2] for k2 in ("d_in", "d_sae", "d_out", "dtype") if k2 in old},
        "architecture": arch,
        "k": k,
        "apply_b_dec_to_input": old.get("apply_b_dec_to_input", True),
        "normalize_activations": norm,
        "metadata": {key: old[key] for key in keys if key in old},
    }


def _mapped(fn, name: str):
    """``fn(name)``, or None where ``name`` has no lmscope site (the user names one when attaching)."""
    try:
        return fn(name)
    except LmscopeError:
        return None


def _saelens_sites(meta: dict, transcoder: bool) -> tuple[str | None, str | None, bool]:
    """(site, out site, norm folded) from SAELens metadata: lmscope's own, or mapped from
    ``hook_name`` / ``hook_name_out`` (or ``hf_hook_name``)."""
    site, folded = meta.get("lmscope_site"), bool(meta.get("lmscope_norm_folded", False))
    if site is None and meta.get("hook_name"):
        site, folded = _mapped(tl_site, meta["hook_name"]) or (None, False)
        folded = folded and (meta.get("model_from_pretrained_kwargs") or {}).get("fold_ln", True) is not False
    elif site is None and meta.get("hf_hook_name"):
        sites = _mapped(hf_sites, meta["hf_hook_name"])
        site = sites and (sites[0] if transcoder else sites[1])
    out = meta.get("lmscope_out_site")
    if out is None and transcoder and meta.get("hook_name_out"):
        out = (_mapped(tl_site, meta["hook_name_out"]) or (None,))[0]
    return site, out if transcoder else site, folded


def read_saelens(folder: Path) -> Dictionary:
    """A SAELens folder (``cfg.json`` + ``sae_weights.safetensors``)."""
    cfg = _saelens_current(_read_json(folder / "cfg.json"))
    weights_path = folder / "sae_weights.safetensors"
    weights = _read_safetensors(weights_path)
    arch_name = cfg.get("architecture", "standard")
    if arch_name not in _SAELENS_ARCHS:
        raise LmscopeError(
            f"{folder}: SAELens architecture '{arch_name}' is not supported ({', '.join(_SAELENS_ARCHS)})"
        )
    arch, transcoder, skip = _SAELENS_ARCHS[arch_name]
    meta = dict(cfg.get("metadata") or {})
    if meta.get("hook_head_index") is not None:
        raise LmscopeError(f"{folder}: single-head dictionaries (hook_head_index) are not supported")
    norm = cfg.get("normalize_activations") or "none"
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    d_out = int(cfg.get("d_out") or d_in) if transcoder else d_in
    site, out_site, folded = _saelens_sites(meta, transcoder)
    d = Dictionary(
        d_in,
        d_sae,
        arch,
        d_out=d_out,
        k=cfg.get("k"),
        transcoder=transcoder,
        skip=skip,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", not transcoder)) and not transcoder,
        rescale_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm", False)),
        normalize="none" if norm in _IDENTITY_NORMS else norm,
        site=site,
        out_site=out_site,
        norm_folded=folded,
        info={"format": "saelens", "path": str(folder), **meta},
    )
    W_dec = _oriented(_tensor(weights, "W_dec", source=weights_path), d_sae, d_out, False, "W_dec", weights_path)
    scale = weights.get("scaling_factor", weights.get("finetuning_scaling_factor"))
    if scale is not None:  # SAELens < 6 multiplied the features by it before decoding
        W_dec = W_dec * scale.float()[:, None]
    tensors = {
        "W_enc": _oriented(_tensor(weights, "W_enc", source=weights_path), d_in, d_sae, False, "W_enc", weights_path),
        "W_dec": W_dec,
        "b_dec": _tensor(weights, "b_dec", source=weights_path),
    }
    names = ("b_gate", "r_mag", "b_mag") if arch == "gated" else ("b_enc",)
    tensors.update({name: _tensor(weights, name, source=weights_path) for name in names})
    if arch == "jumprelu":
        tensors["threshold"] = _tensor(weights, "threshold", source=weights_path)
    if skip:
        tensors["W_skip"] = _oriented(
            _tensor(weights, "W_skip", source=weights_path), d_out, d_in, False, "W_skip", weights_path
        )
    _assign(d, **tensors)
    return d


# -- sparsify ------------------------------------------------------------------------------------


def read_sparsify(folder: Path) -> Dictionary:
    """A sparsify folder (``cfg.json`` + ``sae.safetensors``), named after its hook point."""
    cfg = _read_json(folder / "cfg.json")
    weights_path = folder / "sae.safetensors"
    weights = _read_safetensors(weights_path)
    b_enc = _tensor(weights, "encoder.bias", "b_enc", source=weights_path)
    d_sae = b_enc.shape[0]
    d_in = int(cfg.get("d_in") or _tensor(weights, "b_dec", source=weights_path).shape[0])
    transcode, skip = bool(cfg.get("transcode", False)), bool(cfg.get("skip_connection", False))
    activation = cfg.get("activation", "topk")
    if activation not in ("topk", "groupmax"):
        raise LmscopeError(f"{folder}: sparsify activation '{activation}' is not supported (topk, groupmax)")
    site, out_site = cfg.get("lmscope_site"), cfg.get("lmscope_out_site")
    if site is None:
        try:
            site_in, site_out = hf_sites(folder.name)
        except LmscopeError:
            site_in = site_out = None
        site, out_site = (site_in, site_out) if transcode else (site_out, site_out)
    d = Dictionary(
        d_in,
        d_sae,
        activation,
        k=int(cfg.get("k", 32)),
        transcoder=transcode,
        skip=skip,
        apply_b_dec_to_input=not transcode,
        site=site,
        out_site=out_site,
        info={"format": "sparsify", "path": str(folder), "hook_name": folder.name},
    )
    W_enc = _tensor(weights, "encoder.weight", "W_enc", source=weights_path)
    tensors = {
        "W_enc": _oriented(W_enc, d_in, d_sae, True, "encoder.weight", weights_path),
        "b_enc": b_enc,
        "W_dec": _oriented(_tensor(weights, "W_dec", source=weights_path), d_sae, d_in, False, "W_dec", weights_path),
        "b_dec": _tensor(weights, "b_dec", source=weights_path),
    }
    if skip:
        tensors["W_skip"] = _tensor(weights, "W_skip", source=weights_path)
    _assign(d, **tensors)
    return d


# -- dictionary_learning -------------------------------------------------------------------------


def _dl_site(trainer: dict) -> str | None:
    name, layer = trainer.get("submodule_name") or "", trainer.get("layer")
    m = re.match(r"^(resid_post|resid_pre|resid_mid|mlp_out|attn_out|mlp_in)_layer_?(\d+)$", name)
    if m:
        return f"blocks.{m.group(2)}.{m.group(1).replace('_out', '.out').replace('_in', '.in')}"
    if not name and layer is not None:  # dictionary_learning's default submodule: the layer's output
        return f"blocks.{int(layer)}.resid_post"
    return None


def read_dictionary_learning(folder: Path) -> Dictionary:
    """A dictionary_learning folder (``ae.pt`` + ``config.json``)."""
    config = _read_json(folder / "config.json")
    trainer = config.get("trainer") or {}
    cls = trainer.get("dict_class")
    path = folder / "ae.pt"
    w = _read_torch(path)
    src = path

    def t(*names: str) -> Tensor:
        return _tensor(w, *names, source=src)

    if cls in ("AutoEncoder", "AutoEncoderNew", "AutoEncoderTopK", "BatchTopKSAE", "GatedAutoEncoder"):
        d_sae = t("encoder.weight").shape[0] if cls == "GatedAutoEncoder" else t("encoder.bias").shape[0]
        d_in = t("decoder.weight").shape[0] if t("decoder.weight").shape[1] == d_sae else t("decoder.weight").shape[1]
        W_enc = _oriented(t("encoder.weight"), d_in, d_sae, True, "encoder.weight", src)
        W_dec = _oriented(t("decoder.weight"), d_sae, d_in, True, "decoder.weight", src)
    elif cls in ("JumpReluAutoEncoder", "MatryoshkaBatchTopKSAE"):
        d_sae, d_in = t("b_enc").shape[0], t("b_dec").shape[0]
        W_enc = _oriented(t("W_enc"), d_in, d_sae, False, "W_enc", src)
        W_dec = _oriented(t("W_dec"), d_sae, d_in, False, "W_dec", src)
    else:
        raise LmscopeError(f"{folder / 'config.json'}: dictionary_learning class '{cls}' is not supported")
    arch = {"GatedAutoEncoder": "gated", "JumpReluAutoEncoder": "jumprelu", "AutoEncoderTopK": "topk"}.get(cls)
    arch = arch or ("batchtopk" if cls in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE") else "standard")
    k = trainer.get("k", int(w["k"]) if "k" in w else None)
    d = Dictionary(
        d_in,
        d_sae,
        arch,
        k=k if arch in ("topk", "batchtopk") else None,
        apply_b_dec_to_input=cls not in ("AutoEncoderNew", "JumpReluAutoEncoder"),
        site=_dl_site(trainer),
        info={"format": "dictionary_learning", "path": str(folder), "dict_class": cls, **trainer},
    )
    tensors = {"W_enc": W_enc, "W_dec": W_dec}
    if cls == "GatedAutoEncoder":
        tensors.update(b_dec=t("decoder_bias"), b_gate=t("gate_bias"), r_mag=t("r_mag"), b_mag=t("mag_bias"))
    elif cls in ("AutoEncoder", "AutoEncoderNew"):
        tensors.update(b_enc=t("encoder.bias"), b_dec=t("bias") if cls == "AutoEncoder" else t("decoder.bias"))
    else:
        tensors.update(b_enc=t("encoder.bias", "b_enc"), b_dec=t("b_dec"))
    if arch in ("jumprelu", "batchtopk"):
        tensors["threshold"] = t("threshold").expand(d_sae)
    if cls == "AutoEncoder":  # from_pretrained(normalize_decoder=True): unit decoder columns, norms into the encoder
        norms = W_dec.norm(dim=1)
        if not torch.allclose(norms, torch.ones_like(norms)):
            tensors.update(W_dec=W_dec / norms[:, None], W_enc=W_enc * norms, b_enc=tensors["b_enc"] * norms)
    _assign(d, **tensors)
    return d


# -- circuit-tracer ------------------------------------------------------------------------------


def _ct_hook(hook: str | None, layer: int) -> str | None:
    """The lmscope site of circuit-tracer hook ``hook`` (a TransformerLens hook without its
    ``blocks.L.``; circuit-tracer runs TransformerLens with ``fold_ln=False``, so nothing is folded)."""
    site = _mapped(tl_site, f"blocks.{layer}.{hook}") if hook else None
    return site[0] if site else None


def _ct_files(folder: Path, config: dict) -> list[Path]:
    """The transcoder files of a circuit-tracer transcoder set, layer by layer."""
    listed = config.get("transcoders")
    if listed:
        paths = []
        for entry in sorted(listed, key=lambda e: e["layer"]) if isinstance(listed[0], dict) else listed:
            path = entry["filepath"] if isinstance(entry, dict) else entry
            if str(path).startswith("hf://"):
                raise LmscopeError(
                    f"{folder / 'config.yaml'}: {path} is on the Hugging Face hub; download it and list the local file"
                )
            paths.append(folder / path)
        return paths
    files = sorted(folder.glob("layer_*.safetensors"), key=lambda p: int(re.findall(r"\d+", p.stem)[-1]))
    if not files:
        raise LmscopeError(f"{folder}: no layer_<L>.safetensors files and no transcoders listed in config.yaml")
    return files


def _ct_transcoder(path: Path, layer: int, config: dict) -> Dictionary:
    weights = _read_npz(path) if path.suffix == ".npz" else _read_safetensors(path)
    d_sae = _tensor(weights, "b_enc", source=path).shape[0]
    d_out = _tensor(weights, "b_dec", source=path).shape[0]
    W_enc = _tensor(weights, "W_enc", source=path)
    d_in = W_enc.shape[1] if W_enc.shape[0] == d_sae and W_enc.shape[1] != d_sae else W_enc.shape[0]
    threshold = weights.get("activation_function.threshold", weights.get("threshold"))
    activation = config.get("activation")
    if activation == "topk":
        arch = "topk"
    elif activation == "relu" or threshold is None:
        arch = "standard"
    else:
        arch = "jumprelu"
    k = config.get("k", int(weights["k"]) if "k" in weights else None)
    skip = "W_skip" in weights
    hooks = config.get("feature_input_hook"), config.get("feature_output_hook")
    d = Dictionary(
        d_in,
        d_sae,
        arch,
        d_out=d_out,
        k=k if arch == "topk" else None,
        transcoder=True,
        skip=skip,
        site=_ct_hook(hooks[0], layer),
        out_site=_ct_hook(hooks[1], layer),
        info={"format": "circuit-tracer", "path": str(path), "model_name": config.get("model_name"), "layer": layer},
    )
    tensors = {
        "W_enc": _oriented(W_enc, d_in, d_sae, path.suffix != ".npz", "W_enc", path),
        "b_enc": _tensor(weights, "b_enc", source=path),
        "W_dec": _oriented(_tensor(weights, "W_dec", source=path), d_sae, d_out, False, "W_dec", path),
        "b_dec": _tensor(weights, "b_dec", source=path),
    }
    if arch == "jumprelu":
        tensors["threshold"] = threshold.float().reshape(-1).expand(d_sae)
    if skip:
        tensors["W_skip"] = _oriented(weights["W_skip"].float(), d_out, d_in, False, "W_skip", path)
    _assign(d, **tensors)
    return d


def _ct_clt(folder: Path, config: dict) -> CrossLayerTranscoder:
    n = len(list(folder.glob("W_enc_*.safetensors")))
    enc = [_read_safetensors(folder / f"W_enc_{layer}.safetensors") for layer in range(n)]
    first = folder / "W_enc_0.safetensors"
    d_sae, d_out = _tensor(enc[0], "b_enc_0", source=first).shape[0], _tensor(enc[0], "b_dec_0", source=first).shape[0]
    W0 = _tensor(enc[0], "W_enc_0", source=first)
    d_in = W0.shape[1] if W0.shape[0] == d_sae else W0.shape[0]
    jump = "threshold_0" in enc[0]
    hooks = config.get("feature_input_hook", "hook_resid_mid"), config.get("feature_output_hook", "hook_mlp_out")
    kinds = [site.split(".", 2)[2] if site else None for site in (_ct_hook(h, 0) for h in hooks)]
    clt = CrossLayerTranscoder(
        n, d_in, d_sae, d_out=d_out, jump=jump, site=kinds[0], out_site=kinds[1],
        info={"format": "circuit-tracer", "path": str(folder), "model_name": config.get("model_name")},
    )  # fmt: skip
    with torch.no_grad():
        for layer, weights in enumerate(enc):
            src = folder / f"W_enc_{layer}.safetensors"
            clt.W_enc[layer].copy_(
                _oriented(_tensor(weights, f"W_enc_{layer}", source=src), d_in, d_sae, True, "W_enc", src)
            )
            clt.b_enc[layer].copy_(_tensor(weights, f"b_enc_{layer}", source=src))
            clt.b_dec[layer].copy_(_tensor(weights, f"b_dec_{layer}", source=src))
            if jump:
                clt.threshold[layer].copy_(_tensor(weights, f"threshold_{layer}", source=src).reshape(-1))
            dec_path = folder / f"W_dec_{layer}.safetensors"
            W_dec = _tensor(_read_safetensors(dec_path), f"W_dec_{layer}", source=dec_path)
            if tuple(W_dec.shape) != (d_sae, n - layer, d_out):
                raise LmscopeError(
                    f"{dec_path}: W_dec_{layer} has shape {list(W_dec.shape)}, expected {[d_sae, n - layer, d_out]}"
                )
            clt.W_dec[layer].copy_(W_dec)
    return clt


def read_circuit_tracer(folder: Path) -> dict[str, Dictionary] | CrossLayerTranscoder:
    """A circuit-tracer folder (``config.yaml``): its per-layer transcoders by file stem, or its
    cross-layer transcoder."""
    config = _read_yaml(folder / "config.yaml")
    kind = config.get("model_kind") or (
        "cross_layer_transcoder" if (folder / "W_enc_0.safetensors").is_file() else "transcoder_set"
    )
    if kind == "cross_layer_transcoder":
        return _ct_clt(folder, config)
    if kind != "transcoder_set":
        raise LmscopeError(f"{folder / 'config.yaml'}: unknown model_kind '{kind}'")
    return {path.stem: _ct_transcoder(path, layer, config) for layer, path in enumerate(_ct_files(folder, config))}


# -- detection -----------------------------------------------------------------------------------


def _format_of(folder: Path) -> str | None:
    """The format of the dictionary folder ``folder`` (None: not one)."""
    if (folder / "sae.safetensors").exists():
        return "sparsify"
    if (folder / "sae_weights.safetensors").exists():
        return "saelens"
    if (folder / "cfg.json").exists():  # weights missing: tell the formats apart by their config
        return "saelens" if "d_sae" in _read_json(folder / "cfg.json") else "sparsify"
    if (folder / "ae.pt").exists():
        return "dictionary_learning"
    if (folder / "config.yaml").exists():
        return "circuit-tracer"
    return None


_READERS = {"saelens": read_saelens, "sparsify": read_sparsify, "dictionary_learning": read_dictionary_learning}


def load_dictionaries(path: str | Path) -> dict[str, Dictionary]:
    """Every dictionary under ``path``: a folder of any supported format (one entry, keyed by the
    folder's name; a circuit-tracer transcoder set, one per layer), or a parent folder holding one
    such folder per hook point (keyed by sub-folder name, in natural order)."""
    folder = Path(path)
    if not folder.exists():
        raise LmscopeError(f"{folder}: no such file or directory")
    if not folder.is_dir():
        raise LmscopeError(f"{folder}: expected a folder (cfg.json + weights, ae.pt + config.json or config.yaml)")
    fmt = _format_of(folder)
    if fmt == "circuit-tracer":
        found = read_circuit_tracer(folder)
        if isinstance(found, CrossLayerTranscoder):
            raise LmscopeError(f"{folder} holds a cross-layer transcoder: read it with load_dictionary")
        return found
    if fmt is not None:
        return {folder.name: _READERS[fmt](folder)}
    subs = sorted((p for p in folder.iterdir() if p.is_dir() and _format_of(p)), key=lambda p: _natural(p.name))
    if not subs:
        raise LmscopeError(
            f"{folder}: no dictionary here (cfg.json + sae_weights.safetensors or sae.safetensors, ae.pt + config.json, config.yaml)"
        )
    found: dict[str, Dictionary] = {}
    for sub in subs:
        inner = load_dictionaries(sub)
        found.update({sub.name if len(inner) == 1 else f"{sub.name}/{n}": d for n, d in inner.items()})
    return found


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def load_dictionary(path: str | Path) -> Dictionary | CrossLayerTranscoder:
    """The dictionary in folder ``path`` (SAELens, sparsify, dictionary_learning or circuit-tracer,
    detected from its files), or its cross-layer transcoder; a folder holding several is an
    error naming :func:`load_dictionaries`."""
    folder = Path(path)
    if folder.is_dir() and _format_of(folder) == "circuit-tracer":
        found = read_circuit_tracer(folder)
        if isinstance(found, CrossLayerTranscoder):
            return found
    else:
        found = load_dictionaries(folder)
    if len(found) != 1:
        raise LmscopeError(f"{folder} holds {len(found)} dictionaries ({', '.join(found)}): use load_dictionaries")
    return next(iter(found.values()))


# -- writing -------------------------------------------------------------------------------------


def _hf_paths(model) -> dict[str, str]:
    if model is None:
        return {}
    fam = model.family
    return {"layers": fam.layers, "mlp": fam.mlp or "mlp", "attn": fam.attn}


def _saelens_cfg(d: Dictionary, model) -> dict[str, Any]:
    if d.arch == "groupmax":
        raise LmscopeError("SAELens has no group-max architecture: save it in sparsify's format")
    if d.skip and not d.transcoder:
        raise LmscopeError("SAELens has no skip connection for autoencoders: save it in sparsify's format")
    if d.transcoder and d.arch not in ("standard", "jumprelu", "batchtopk"):
        raise LmscopeError(f"SAELens has no {d.arch} transcoder (standard or jumprelu)")
    arch = d.inference_arch
    if d.transcoder:
        arch = ("jumprelu_" if arch == "jumprelu" else "") + ("skip_transcoder" if d.skip else "transcoder")
    paths = _hf_paths(model)
    meta: dict[str, Any] = {
        "sae_lens_version": SAELENS_VERSION,
        "sae_lens_training_version": SAELENS_VERSION,
        "model_name": d.info.get("model_name") or (model.name if model is not None else None),
        "hook_name": tl_hook(d.site) if d.site else d.info.get("hook_name"),
        "hf_hook_name": (hf_module(d.site, **paths) if d.site else None) or d.info.get("hf_hook_name"),
        "lmscope_site": d.site,
        "lmscope_norm_folded": d.norm_folded,
    }
    if d.site and d.site.endswith(".mlp.in") and not d.norm_folded:
        meta["model_from_pretrained_kwargs"] = {"fold_ln": False}  # lmscope's mlp.in keeps the norm's gain
    if d.transcoder:
        meta["hook_name_out"] = tl_hook(d.out_site) if d.out_site else d.info.get("hook_name_out")
        meta["hf_hook_name_out"] = hf_module(d.out_site, **paths) if d.out_site else None
        meta["lmscope_out_site"] = d.out_site
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": d.d_in,
        "d_sae": d.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": d.apply_b_dec_to_input,
        "normalize_activations": d.normalize,
        "reshape_activations": "hook_z" if d.site and d.site.endswith(".attn.z") else "none",
        "metadata": meta,
    }
    if arch == "topk":
        cfg.update(k=int(d.k), rescale_acts_by_decoder_norm=d.rescale_by_decoder_norm)
    if d.transcoder:
        cfg["d_out"] = d.d_out
    return cfg


def _weights(d: Dictionary, names: list[str]) -> dict[str, Tensor]:
    return {n: getattr(d, n).detach().float().contiguous().cpu() for n in names}


def _write_saelens(d: Dictionary, folder: Path, model) -> None:
    cfg = _saelens_cfg(d, model)
    names = ["W_enc", "W_dec", "b_dec"] + (["b_gate", "r_mag", "b_mag"] if d.arch == "gated" else ["b_enc"])
    names += ["threshold"] if d.arch in ("jumprelu", "batchtopk") else []
    names += ["W_skip"] if d.skip else []
    save_file(_weights(d, names), str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2))


def _write_sparsify(d: Dictionary, folder: Path) -> None:
    if d.arch not in ("topk", "groupmax"):
        raise LmscopeError(
            f"sparsify reads top-k and group-max dictionaries, not {d.arch}: save it in SAELens's format"
        )
    if d.normalize != "none" or d.d_out != d.d_in:
        raise LmscopeError(
            "sparsify has no input normalisation and maps to the input's width: save it in SAELens's format"
        )
    with torch.no_grad():
        W_enc, b_enc, W_dec = d.W_enc.float(), d.b_enc.float(), d.W_dec.float()
        if d.rescale_by_decoder_norm:  # fold the norms: the same features and reconstruction
            norms = W_dec.norm(dim=-1)
            W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
        if d.apply_b_dec_to_input == d.transcoder:  # sparsify subtracts b_dec iff it autoencodes
            shift = d.b_dec.float() @ W_enc
            b_enc = b_enc + shift if d.transcoder else b_enc - shift
    tensors = {"encoder.weight": W_enc.T, "encoder.bias": b_enc, "W_dec": W_dec, "b_dec": d.b_dec.float()}
    if d.skip:
        tensors["W_skip"] = d.W_skip.float()
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / "sae.safetensors"))
    cfg = {
        "activation": d.arch,
        "expansion_factor": max(1, d.d_sae // d.d_in),
        "normalize_decoder": True,
        "num_latents": d.d_sae,
        "k": int(d.k),
        "multi_topk": False,
        "skip_connection": d.skip,
        "transcode": d.transcoder,
        "d_in": d.d_in,
        "lmscope_site": d.site,
        "lmscope_out_site": d.out_site,
    }
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2))


def save_dictionary(d: Dictionary, folder: str | Path, format: str = "saelens", model=None) -> Path:
    """Write ``d`` to ``folder`` in SAELens's format (``cfg.json`` + ``sae_weights.safetensors``,
    read by SAELens's ``SAE.load_from_disk``) or sparsify's (``cfg.json`` + ``sae.safetensors``;
    top-k and group-max only). ``model`` (an lmscope Model) gives the Hugging Face module paths
    written as ``hf_hook_name`` (Llama's layout otherwise). Returns the folder."""
    if format not in FORMATS:
        raise LmscopeError(f"unknown dictionary format '{format}' (known: {', '.join(FORMATS)})")
    if not isinstance(d, Dictionary):
        raise LmscopeError(f"save_dictionary writes a Dictionary, not {type(d).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if format == "saelens":
        _write_saelens(d, folder, model)
    else:
        _write_sparsify(d, folder)
    return folder
