"""Write the golden dictionaries of tests/data/dictionaries with the reference packages themselves.

Not an lmscope dependency: run it in a scratch environment that has the reference packages (SAELens
pins TransformerLens < 4, which lmscope's own environment cannot hold)::

    python3 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch==2.13.0          # the CPU build first
    /tmp/refenv/bin/pip install sae-lens eai-sparsify dictionary-learning
    /tmp/refenv/bin/pip install --no-deps circuit-tracer   # its transcoder loaders need no more
    /tmp/refenv/bin/python scripts/golden_dictionaries.py

Each case ``tests/data/dictionaries/<package>_<arch>/`` holds ``dictionary/`` (the package's own
folder format, written by the package where it has a writer), ``inputs.safetensors`` (``x``) and
``expected.safetensors`` (``features`` and ``reconstruction`` computed by the package after
reading ``dictionary/`` back with its own loader; some cases add more). Weights are random, small
(d_in 16, d_sae 32) and seeded.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "dictionaries"
D_IN, D_SAE, TOKENS = 16, 32, 12


def rand(g: torch.Generator, *shape: int, scale: float = 0.3) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


def case(name: str) -> Path:
    folder = OUT / name
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "dictionary").mkdir(parents=True)
    return folder


def write(folder: Path, x: torch.Tensor, **expected: torch.Tensor) -> None:
    save_file({"x": x.contiguous()}, str(folder / "inputs.safetensors"))
    save_file({k: v.detach().float().contiguous() for k, v in expected.items()}, str(folder / "expected.safetensors"))
    print(f"{folder.name}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in expected.items()))


def inputs(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1000 + seed))


# -- SAELens -------------------------------------------------------------------------------------


def saelens_cases() -> None:
    from sae_lens import SAE
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
    from sae_lens.saes.transcoder import (
        JumpReLUTranscoder,
        JumpReLUTranscoderConfig,
        SkipTranscoder,
        SkipTranscoderConfig,
        Transcoder,
        TranscoderConfig,
    )

    def meta(hook: str, **extra) -> SAEMetadata:
        return SAEMetadata(model_name="tiny", hook_name=hook, **extra)

    def fill(sae, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in sae.named_parameters():
                if name == "threshold":
                    p.copy_(torch.rand(p.shape, generator=g) * 0.4)
                else:
                    p.copy_(rand(g, *p.shape))

    resid = "blocks.1.hook_resid_post"
    cases = [
        ("standard", StandardSAE, StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta(resid))),
        ("standard_nobdec", StandardSAE, StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False, metadata=meta("blocks.0.hook_mlp_out"))),
        ("standard_normrescale", StandardSAE, StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, normalize_activations="constant_norm_rescale", metadata=meta(resid))),
        ("standard_layernorm", StandardSAE, StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, normalize_activations="layer_norm", metadata=meta("blocks.1.hook_resid_pre"))),
        ("topk", TopKSAE, TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, metadata=meta(resid))),
        ("topk_rescaled", TopKSAE, TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, rescale_acts_by_decoder_norm=True, metadata=meta(resid))),
        ("jumprelu", JumpReLUSAE, JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta("blocks.2.mlp.hook_post"))),
        ("gated", GatedSAE, GatedSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=meta("blocks.0.hook_attn_out"))),
        ("transcoder", Transcoder, TranscoderConfig(d_in=D_IN, d_sae=D_SAE, d_out=D_IN, apply_b_dec_to_input=False, metadata=meta("blocks.1.ln2.hook_normalized", hook_name_out="blocks.1.hook_mlp_out", model_from_pretrained_kwargs={"fold_ln": False}))),
        ("skip_transcoder", SkipTranscoder, SkipTranscoderConfig(d_in=D_IN, d_sae=D_SAE, d_out=D_IN, apply_b_dec_to_input=False, metadata=meta("blocks.1.ln2.hook_normalized", hook_name_out="blocks.1.hook_mlp_out"))),
        ("jumprelu_transcoder", JumpReLUTranscoder, JumpReLUTranscoderConfig(d_in=D_IN, d_sae=D_SAE, d_out=24, apply_b_dec_to_input=False, metadata=meta("blocks.0.hook_resid_mid", hook_name_out="blocks.0.hook_mlp_out"))),
    ]  # fmt: skip
    for seed, (name, cls, cfg) in enumerate(cases):
        folder = case(f"saelens_{name}")
        sae = cls(cfg)
        fill(sae, seed)
        sae.save_model(folder / "dictionary")
        loaded = SAE.load_from_disk(folder / "dictionary")
        x = inputs(seed, TOKENS, D_IN)
        with torch.no_grad():
            f = loaded.encode(x)
            out = loaded(x) if isinstance(loaded, Transcoder) else loaded.decode(f)
        write(folder, x, features=f, reconstruction=out)

    # batch top-k: trained with the batch top-k, saved as JumpReLU with its learned threshold
    folder = case("saelens_batchtopk")
    cfg = BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, metadata=meta(resid))
    sae = BatchTopKTrainingSAE(cfg)
    fill(sae, 50)
    x = inputs(50, TOKENS, D_IN)
    with torch.no_grad():
        batch_features, _ = sae.encode_with_hidden_pre(x)
        sae.topk_threshold = torch.tensor(0.35, dtype=torch.double)
    sae.save_inference_model(folder / "dictionary")
    loaded = SAE.load_from_disk(folder / "dictionary")
    assert loaded.cfg.architecture() == "jumprelu"
    with torch.no_grad():
        f = loaded.encode(x)
        write(folder, x, features=f, reconstruction=loaded.decode(f), batch_topk_features=batch_features)

    # a SAELens 5 folder (top-level hook_name, activation_fn_str topk), read by SAELens 6's loader
    folder = case("saelens_legacy_topk")
    g = torch.Generator().manual_seed(60)
    weights = {
        "W_enc": rand(g, D_IN, D_SAE),
        "b_enc": rand(g, D_SAE),
        "W_dec": rand(g, D_SAE, D_IN),
        "b_dec": rand(g, D_IN),
    }
    save_file(weights, str(folder / "dictionary" / "sae_weights.safetensors"))
    legacy = {
        "architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
        "model_name": "tiny", "hook_name": "blocks.2.hook_resid_pre", "hook_layer": 2, "hook_head_index": None,
        "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 5}, "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False, "normalize_activations": "none", "sae_lens_training_version": "5.5.0",
    }  # fmt: skip
    (folder / "dictionary" / "cfg.json").write_text(json.dumps(legacy))
    loaded = SAE.load_from_disk(folder / "dictionary")
    x = inputs(60, TOKENS, D_IN)
    with torch.no_grad():
        f = loaded.encode(x)
        write(folder, x, features=f, reconstruction=loaded.decode(f))


# -- sparsify ------------------------------------------------------------------------------------


def sparsify_cases() -> None:
    from sparsify import SparseCoder, SparseCoderConfig

    def make(cfg, seed: int, d_in: int = D_IN):
        sae = SparseCoder(d_in, cfg)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(rand(g, *p.shape))
        return sae

    def expected(sae, x):
        with torch.no_grad():
            out = sae(x)
            f = torch.zeros(*x.shape[:-1], sae.num_latents).scatter(-1, out.latent_indices, out.latent_acts)
        return f, out.sae_out

    for seed, (name, cfg, hook) in enumerate(
        [
            ("topk", SparseCoderConfig(k=4, num_latents=D_SAE), "layers.1"),
            ("groupmax", SparseCoderConfig(k=4, num_latents=D_SAE, activation="groupmax"), "layers.0"),
            (
                "transcoder_skip",
                SparseCoderConfig(k=6, num_latents=D_SAE, transcode=True, skip_connection=True),
                "layers.1.mlp",
            ),
        ],
        start=70,
    ):
        folder = case(f"sparsify_{name}")
        make(cfg, seed).save_to_disk(folder / "dictionary" / hook)
        loaded = SparseCoder.load_from_disk(folder / "dictionary" / hook)
        x = inputs(seed, TOKENS, D_IN)
        f, out = expected(loaded, x)
        write(folder, x, features=f, reconstruction=out)

    # one folder per hook point: a parent of two (what sparsify's trainer writes)
    folder = case("sparsify_multi")
    xs, fs, outs = [], [], []
    for layer in range(2):
        make(SparseCoderConfig(k=3, num_latents=D_SAE), 80 + layer).save_to_disk(
            folder / "dictionary" / f"layers.{layer}"
        )
    for layer, (hook, loaded) in enumerate(SparseCoder.load_many(str(folder / "dictionary"), local=True).items()):
        assert hook == f"layers.{layer}"
        x = inputs(80 + layer, TOKENS, D_IN)
        f, out = expected(loaded, x)
        xs.append(x), fs.append(f), outs.append(out)
    write(folder, torch.stack(xs), features=torch.stack(fs), reconstruction=torch.stack(outs))


# -- dictionary_learning -------------------------------------------------------------------------


def dictionary_learning_cases() -> None:
    from dictionary_learning.dictionary import AutoEncoder, GatedAutoEncoder, JumpReluAutoEncoder
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
    from dictionary_learning.trainers.top_k import AutoEncoderTopK
    from dictionary_learning.utils import load_dictionary

    cases = [
        ("autoencoder", AutoEncoder(D_IN, D_SAE), {}),
        ("gated", GatedAutoEncoder(D_IN, D_SAE), {}),
        ("jumprelu", JumpReluAutoEncoder(D_IN, D_SAE), {}),
        ("topk", AutoEncoderTopK(D_IN, D_SAE, 4), {"k": 4}),
        ("batchtopk", BatchTopKSAE(D_IN, D_SAE, 4), {"k": 4}),
    ]
    for seed, (name, ae, extra) in enumerate(cases, start=90):
        folder = case(f"dictionary_learning_{name}")
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, p in ae.named_parameters():
                p.copy_(torch.rand(p.shape, generator=g) * 0.4 if pname == "threshold" else rand(g, *p.shape))
            if name == "batchtopk":
                ae.threshold.fill_(0.3)
        trainer = {"dict_class": type(ae).__name__, "activation_dim": D_IN, "dict_size": D_SAE, "layer": 1,
                   "lm_name": "tiny", "submodule_name": "resid_post_layer_1", **extra}  # fmt: skip
        (folder / "dictionary" / "config.json").write_text(json.dumps({"trainer": trainer}, indent=2))
        torch.save(ae.state_dict(), folder / "dictionary" / "ae.pt")
        loaded, _ = load_dictionary(str(folder / "dictionary"), device="cpu")
        x = inputs(seed, TOKENS, D_IN)
        with torch.no_grad():
            f = loaded.encode(x)
            write(folder, x, features=f, reconstruction=loaded.decode(f))


# -- circuit-tracer ------------------------------------------------------------------------------


def circuit_tracer_cases() -> None:
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

    cpu = torch.device("cpu")
    # a transcoder set: layer 0 ReLU with a skip matrix, layer 1 JumpReLU (as circuit-tracer writes them)
    folder = case("circuit_tracer_transcoders")
    g = torch.Generator().manual_seed(110)
    layers = [
        {"W_enc": rand(g, D_SAE, D_IN), "W_dec": rand(g, D_SAE, D_IN), "b_enc": rand(g, D_SAE), "b_dec": rand(g, D_IN), "W_skip": rand(g, D_IN, D_IN)},
        {"W_enc": rand(g, D_SAE, D_IN), "W_dec": rand(g, D_SAE, D_IN), "b_enc": rand(g, D_SAE), "b_dec": rand(g, D_IN), "activation_function.threshold": torch.rand(D_SAE, generator=g) * 0.4},
    ]  # fmt: skip
    for layer, weights in enumerate(layers):
        save_file(weights, str(folder / "dictionary" / f"layer_{layer}.safetensors"))
    config = {
        "model_kind": "transcoder_set",
        "model_name": "tiny",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out",
    }
    (folder / "dictionary" / "config.yaml").write_text(yaml.safe_dump(config))
    paths = [str(folder / "dictionary" / f"layer_{layer}.safetensors") for layer in range(2)]
    hooks = config["feature_input_hook"], config["feature_output_hook"]
    tset = load_transcoder_set(
        dict(enumerate(paths)), "tiny", *hooks, device=cpu, lazy_encoder=False, lazy_decoder=False
    )
    x = inputs(110, 2, TOKENS, D_IN)
    with torch.no_grad():
        f = tset.encode(x)
        write(folder, x, features=f, reconstruction=tset.decode(f, x))

    # a Gemma Scope transcoder (.npz, W_enc [d_model, d_sae]) listed in config.yaml
    folder = case("circuit_tracer_gemmascope")
    g = torch.Generator().manual_seed(120)
    params = {"W_enc": rand(g, D_IN, D_SAE), "W_dec": rand(g, D_SAE, D_IN), "b_enc": rand(g, D_SAE), "b_dec": rand(g, D_IN), "threshold": torch.rand(D_SAE, generator=g) * 0.4}  # fmt: skip
    np.savez(folder / "dictionary" / "params.npz", **{k: v.numpy() for k, v in params.items()})
    config = {"model_kind": "transcoder_set", "model_name": "tiny", "feature_input_hook": "ln2.hook_normalized", "feature_output_hook": "hook_mlp_out", "transcoders": ["params.npz"]}  # fmt: skip
    (folder / "dictionary" / "config.yaml").write_text(yaml.safe_dump(config))
    tset = load_transcoder_set(
        {0: str(folder / "dictionary" / "params.npz")}, "tiny", config["feature_input_hook"], config["feature_output_hook"],
        device=cpu, special_load_fn="gemma-scope", lazy_encoder=False, lazy_decoder=False,
    )  # fmt: skip
    x = inputs(120, 1, TOKENS, D_IN)
    with torch.no_grad():
        f = tset.encode(x)
        write(folder, x, features=f, reconstruction=tset.decode(f, None))

    # a cross-layer transcoder over 3 layers, JumpReLU
    folder = case("circuit_tracer_clt")
    g = torch.Generator().manual_seed(130)
    n = 3
    for layer in range(n):
        enc = {f"W_enc_{layer}": rand(g, D_SAE, D_IN), f"b_enc_{layer}": rand(g, D_SAE), f"b_dec_{layer}": rand(g, D_IN), f"threshold_{layer}": torch.rand(D_SAE, generator=g) * 0.4}  # fmt: skip
        save_file(enc, str(folder / "dictionary" / f"W_enc_{layer}.safetensors"))
        save_file(
            {f"W_dec_{layer}": rand(g, D_SAE, n - layer, D_IN)},
            str(folder / "dictionary" / f"W_dec_{layer}.safetensors"),
        )
    config = {
        "model_kind": "cross_layer_transcoder",
        "model_name": "tiny",
        "feature_input_hook": "hook_resid_mid",
        "feature_output_hook": "hook_mlp_out",
    }
    (folder / "dictionary" / "config.yaml").write_text(yaml.safe_dump(config))
    clt = load_clt(str(folder / "dictionary"), device=cpu, dtype=torch.float32, lazy_decoder=False)
    x = inputs(130, n, TOKENS, D_IN)
    with torch.no_grad():
        f = clt.encode(x)
        write(folder, x, features=f, reconstruction=clt.decode(f))


if __name__ == "__main__":
    torch.manual_seed(0)
    chosen = sys.argv[1:] or ["saelens", "sparsify", "dictionary_learning", "circuit_tracer"]
    for name in chosen:
        globals()[f"{name}_cases"]()
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"{OUT}: {total / 1024:.0f} KiB")
