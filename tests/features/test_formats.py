"""Reading other libraries' dictionaries: golden files written by the reference packages themselves
(scripts/golden_dictionaries.py, run with SAELens 6, sparsify, dictionary_learning and
circuit-tracer installed), each with inputs and the package's own encodings and reconstructions;
lmscope reads each folder and must match them to 1e-6 (absolute, plus 1e-6 relative: float32
sums in another order differ by a few ulps of values near 5)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmscope.core.errors import LmscopeError
from lmscope.features import CrossLayerTranscoder, Dictionary, load_dictionaries, load_dictionary, save_dictionary
from lmscope.features.activations import batch_topk

DATA = Path(__file__).resolve().parent.parent / "data" / "dictionaries"
SINGLE = sorted(
    p.name
    for p in DATA.iterdir()
    if p.name not in ("sparsify_multi", "circuit_tracer_transcoders", "circuit_tracer_clt")
)

# the site each golden dictionary reads (and writes), mapped from its own hook names
SITES = {
    "saelens_standard": ("blocks.1.resid_post", "blocks.1.resid_post", False),
    "saelens_standard_nobdec": ("blocks.0.mlp.out", "blocks.0.mlp.out", False),
    "saelens_standard_layernorm": ("blocks.1.resid_pre", "blocks.1.resid_pre", False),
    "saelens_jumprelu": ("blocks.2.mlp.post", "blocks.2.mlp.post", False),
    "saelens_gated": ("blocks.0.attn.out", "blocks.0.attn.out", False),
    # ln2.hook_normalized with fold_ln=False is mlp.in as it is; with TransformerLens's default fold_ln, gain divided out
    "saelens_transcoder": ("blocks.1.mlp.in", "blocks.1.mlp.out", False),
    "saelens_skip_transcoder": ("blocks.1.mlp.in", "blocks.1.mlp.out", True),
    "saelens_jumprelu_transcoder": ("blocks.0.resid_mid", "blocks.0.mlp.out", False),
    "saelens_legacy_topk": ("blocks.2.resid_pre", "blocks.2.resid_pre", False),
    "sparsify_topk": ("blocks.1.resid_post", "blocks.1.resid_post", False),
    "sparsify_transcoder_skip": ("blocks.1.mlp.in", "blocks.1.mlp.out", False),
    "dictionary_learning_gated": ("blocks.1.resid_post", "blocks.1.resid_post", False),
    "circuit_tracer_gemmascope": ("blocks.0.mlp.in", "blocks.0.mlp.out", False),
}


def _golden(case: str) -> tuple[Tensor, dict[str, Tensor]]:  # noqa: F821
    return load_file(str(DATA / case / "inputs.safetensors"))["x"], load_file(str(DATA / case / "expected.safetensors"))


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_golden_files_are_small():
    assert sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file()) < 1_000_000


@pytest.mark.parametrize("case", SINGLE)
def test_reads_the_reference_encodings_and_reconstructions(case):
    x, want = _golden(case)
    d = load_dictionary(DATA / case / "dictionary")
    assert isinstance(d, Dictionary)
    with torch.no_grad():
        f = d.encode(x)
        _close(f, want["features"])
        _close(d.decode(f, x), want["reconstruction"])
        _close(d(x), want["reconstruction"])
    assert f.count_nonzero() > 0 and (f == 0).any()  # the case exercises the sparsity
    if case in SITES:
        assert (d.site, d.out_site, d.norm_folded) == SITES[case]


def test_batch_topk_trains_as_batch_topk_and_reads_as_jumprelu():
    x, want = _golden("saelens_batchtopk")
    d = load_dictionary(DATA / "saelens_batchtopk" / "dictionary")
    assert d.arch == "jumprelu" and torch.allclose(d.threshold, torch.full((32,), 0.35))
    with torch.no_grad():
        _close(batch_topk(d.pre_acts(x), 4), want["batch_topk_features"])
    assert (want["batch_topk_features"] != 0).sum() == 4 * x.shape[0]


def test_dictionary_learning_batch_topk_keeps_k():
    d = load_dictionary(DATA / "dictionary_learning_batchtopk" / "dictionary")
    assert (d.arch, d.inference_arch, d.k) == ("batchtopk", "jumprelu", 4)
    assert d.site == "blocks.1.resid_post"


def test_sparsify_parent_folder_loads_one_per_hook_point():
    x, want = _golden("sparsify_multi")
    found = load_dictionaries(DATA / "sparsify_multi" / "dictionary")
    assert list(found) == ["layers.0", "layers.1"]
    for layer, d in enumerate(found.values()):
        assert d.site == f"blocks.{layer}.resid_post" and d.k == 3
        with torch.no_grad():
            _close(d.encode(x[layer]), want["features"][layer])
            _close(d(x[layer]), want["reconstruction"][layer])
    with pytest.raises(LmscopeError, match="holds 2 dictionaries .* use load_dictionaries"):
        load_dictionary(DATA / "sparsify_multi" / "dictionary")


def test_circuit_tracer_transcoder_set():
    x, want = _golden("circuit_tracer_transcoders")
    found = load_dictionaries(DATA / "circuit_tracer_transcoders" / "dictionary")
    assert list(found) == ["layer_0", "layer_1"]
    assert [d.arch for d in found.values()] == ["standard", "jumprelu"]
    assert [d.skip for d in found.values()] == [True, False]
    for layer, d in enumerate(found.values()):
        assert (d.site, d.out_site) == (f"blocks.{layer}.mlp.in", f"blocks.{layer}.mlp.out")
        with torch.no_grad():
            f = d.encode(x[layer])
            _close(f, want["features"][layer])
            _close(d.decode(f, x[layer]), want["reconstruction"][layer])


def test_circuit_tracer_cross_layer_transcoder():
    x, want = _golden("circuit_tracer_clt")
    clt = load_dictionary(DATA / "circuit_tracer_clt" / "dictionary")
    assert isinstance(clt, CrossLayerTranscoder)
    assert (clt.n_layers, clt.d_in, clt.d_sae, clt.jump, clt.site, clt.out_site) == (
        3,
        16,
        32,
        True,
        "resid_mid",
        "mlp.out",
    )
    with torch.no_grad():
        f = clt.encode(x)
        _close(f, want["features"])
        _close(clt.decode(f), want["reconstruction"])
        # by hand: layer 2's output reads every layer's features through its own slice of their decoders
        hand = sum(f[i] @ clt.W_dec[i][:, 2 - i] for i in range(3)) + clt.b_dec[2]
        _close(clt.decode_layer(f, 2), hand)


def test_orientation_is_read_from_the_shapes(tmp_path):
    """The same SAELens dictionary with its matrices stored the other way round reads the same."""
    x, want = _golden("saelens_topk")
    folder = tmp_path / "flipped"
    shutil.copytree(DATA / "saelens_topk" / "dictionary", folder)
    weights = load_file(str(folder / "sae_weights.safetensors"))
    weights = {k: v.T.contiguous() if v.ndim == 2 else v for k, v in weights.items()}
    save_file(weights, str(folder / "sae_weights.safetensors"))
    with torch.no_grad():
        _close(load_dictionary(folder).encode(x), want["features"])


@pytest.mark.parametrize(
    "case,file,damage",
    [
        ("saelens_standard", "sae_weights.safetensors", "remove"),
        ("saelens_standard", "sae_weights.safetensors", "garble"),
        ("saelens_standard", "cfg.json", "garble"),
        ("sparsify_topk", "layers.1/sae.safetensors", "garble"),
        ("dictionary_learning_topk", "ae.pt", "garble"),
        ("dictionary_learning_topk", "ae.pt", "remove"),
        ("circuit_tracer_transcoders", "layer_1.safetensors", "garble"),
        ("circuit_tracer_clt", "W_dec_1.safetensors", "remove"),
        ("circuit_tracer_clt", "config.yaml", "garble"),
    ],
)
def test_a_missing_or_corrupt_file_is_a_one_line_error_naming_it(tmp_path, case, file, damage):
    folder = tmp_path / case
    shutil.copytree(DATA / case / "dictionary", folder)
    target = folder / file
    if damage == "remove":
        target.unlink()
    else:
        target.write_bytes(b"\x00{not: [valid\n" * 3)
    with pytest.raises(LmscopeError) as info:
        load_dictionaries(folder)
    message = str(info.value)
    assert "\n" not in message and target.name in message


def test_not_a_dictionary_folder(tmp_path):
    for path, message in [(tmp_path / "absent", "no such file"), (tmp_path, "no dictionary here")]:
        with pytest.raises(LmscopeError, match=message):
            load_dictionary(path)


@pytest.mark.parametrize(
    "case", ["saelens_gated", "saelens_jumprelu_transcoder", "saelens_topk_rescaled", "sparsify_groupmax"]
)
def test_what_lmscope_writes_reads_back_the_same(tmp_path, case):
    x, want = _golden(case)
    d = load_dictionary(DATA / case / "dictionary")
    fmt = "sparsify" if case.startswith("sparsify") else "saelens"
    again = load_dictionary(save_dictionary(d, tmp_path / "saved", format=fmt))
    assert (again.arch, again.site, again.out_site, again.k) == (d.arch, d.site, d.out_site, d.k)
    with torch.no_grad():
        _close(again.encode(x), want["features"])
        _close(again.decode(again.encode(x), x), want["reconstruction"])


def test_sparsify_writes_a_rescaled_topk_with_its_norms_folded(tmp_path):
    x, want = _golden("saelens_topk_rescaled")
    d = load_dictionary(DATA / "saelens_topk_rescaled" / "dictionary")
    again = load_dictionary(save_dictionary(d, tmp_path / "layers.1", format="sparsify"))
    assert not again.rescale_by_decoder_norm and torch.allclose(again.W_dec.norm(dim=-1), torch.ones(32))
    with torch.no_grad():
        torch.testing.assert_close(again.encode(x), want["features"], rtol=0, atol=1e-5)
        torch.testing.assert_close(again(x), want["reconstruction"], rtol=0, atol=1e-5)


def test_saelens_metadata_written(tmp_path):
    d = load_dictionary(DATA / "saelens_transcoder" / "dictionary")
    cfg = json.loads((save_dictionary(d, tmp_path / "tc") / "cfg.json").read_text())
    meta = cfg["metadata"]
    assert cfg["architecture"] == "transcoder" and cfg["d_out"] == 16 and not cfg["apply_b_dec_to_input"]
    assert int(meta["sae_lens_version"].split(".")[0]) >= 6
    assert (meta["hook_name"], meta["hook_name_out"]) == ("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out")
    assert (meta["lmscope_site"], meta["lmscope_out_site"]) == ("blocks.1.mlp.in", "blocks.1.mlp.out")
    assert meta["model_from_pretrained_kwargs"] == {"fold_ln": False}  # lmscope's mlp.in keeps the norm's gain
    assert meta["hf_hook_name_out"] == "model.layers.1.mlp"
    with pytest.raises(LmscopeError, match="sparsify reads top-k"):
        save_dictionary(d, tmp_path / "x", format="sparsify")
    with pytest.raises(LmscopeError, match="unknown dictionary format"):
        save_dictionary(d, tmp_path / "x", format="npz")
