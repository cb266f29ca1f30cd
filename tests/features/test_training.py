"""Training dictionaries: every architecture recovers the atoms of synthetic data made from a known
sparse dictionary; a resumed run ends with the weights of an uninterrupted one bit for bit;
activations cached as shards train exactly as streamed ones; the fused top-k encoder and sparse
decoder have the gradients of the plain products; the folds of a training-time input scale and of
the decoder norms leave what a dictionary computes unchanged; a top-k SAE on SmolLM2's
blocks.12.resid_post reaches FVU < 0.3 on held-out text."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmscope.core.errors import LmscopeError
from lmscope.features import Dictionary
from lmscope.features.evaluation import evaluate
from lmscope.features.harvest import HarvestSource, ShardSource, TensorSource, batches, cached
from lmscope.features.training import (
    TrainSettings,
    _Gathered,
    fold_decoder_norms_,
    fold_scales_,
    lr_factor,
    sparse_decode,
    train,
)
from tests.helpers import one_thread
from tests.tiny import tiny_model


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def synthetic(n: int = 16384, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """64 unit atoms in 32 dimensions (always the same); each sample the sum of 3 of them (chosen
    uniformly) with magnitudes uniform in [0.5, 1.5], drawn from ``seed``: (atoms [64, 32], samples [n, 32])."""
    atoms = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(100 + seed)
    chosen = torch.rand(n, 64, generator=g).argsort(dim=1)[:, :3]
    codes = torch.zeros(n, 64).scatter(1, chosen, torch.rand(n, 3, generator=g) + 0.5)
    return atoms, codes @ atoms


def recovery(atoms: torch.Tensor, W_dec: torch.Tensor) -> float:
    """Mean over atoms of the best cosine similarity with a decoder row."""
    rows = W_dec / W_dec.norm(dim=1, keepdim=True)
    return float((atoms @ rows.T).max(dim=1).values.mean())


SYNTHETIC = {
    "site": ("x",),
    "k": 3,
    "width": "128",
    "batch_size": 256,
    "tokens": 4 * 16384,
    "lr": 1e-2,
    "lr_decay": 128,
}
ARCHS = [
    ("topk", {}),
    ("batchtopk", {}),
    ("standard", {"l1_coefficient": 1.0}),
    ("jumprelu", {}),
    ("gated", {"l1_coefficient": 1.0}),
    ("topk", {"recipe": "sparsify", "lr_decay": 0}),
]


@pytest.mark.parametrize(("arch", "extra"), ARCHS, ids=[f"{a}-{e.get('recipe', 'saelens')}" for a, e in ARCHS])
def test_every_architecture_recovers_the_atoms(arch, extra):
    atoms, x = synthetic()
    run = train(TensorSource({"x": x}), TrainSettings(arch=arch, **{**SYNTHETIC, **extra}))
    d = run.dictionaries["x"]
    assert recovery(atoms, d.W_dec) > 0.95
    # the saved form reconstructs held-out samples (the training scale folded back in)
    _, held_out = synthetic(2048, seed=1)
    err = (d(held_out) - held_out).pow(2).sum() / (held_out - held_out.mean(0)).pow(2).sum()
    assert err < 0.2
    if arch == "batchtopk":  # read as a JumpReLU with the running threshold: about k active per sample
        assert d.inference_arch == "jumprelu" and (d.threshold == d.threshold[0]).all()
        assert 2 < (d.encode(held_out) > 0).sum(-1).float().mean() < 4.5
    if arch in ("topk", "batchtopk") and extra.get("recipe") != "sparsify":
        torch.testing.assert_close(d.W_dec.norm(dim=1), torch.ones(d.d_sae))  # norms folded into the encoder


def test_resume_is_bit_identical(tmp_path):
    _, x = synthetic(4096)
    settings = TrainSettings(
        arch="topk", **{**SYNTHETIC, "tokens": 40 * 256, "checkpoint_every": 5, "dead_tokens": 512}
    )
    straight = train(TensorSource({"x": x}, block_tokens=1000), settings, tmp_path / "straight").dictionaries["x"]

    class Stop(Exception):
        pass

    def stop_at(step):
        if step == 20:
            raise Stop

    with pytest.raises(Stop):
        train(TensorSource({"x": x}, block_tokens=1000), settings, tmp_path / "cut", on_step=stop_at)
    steps = []
    resumed = train(TensorSource({"x": x}, block_tokens=1000), settings, tmp_path / "cut", on_step=steps.append)
    assert steps == list(range(21, 41))  # went on from the checkpoint of step 20
    assert resumed.logs["x"][-1]["dead"] > 0  # the dead-latent counters (and AuxK) took part
    resumed = resumed.dictionaries["x"]
    for name, p in straight.state_dict().items():
        assert torch.equal(p, resumed.state_dict()[name]), name
    with pytest.raises(LmscopeError, match="other settings"):
        train(TensorSource({"x": x}), dataclasses.replace(settings, lr=2e-2), tmp_path / "cut")


def test_batches_span_blocks_and_restart_from_a_position():
    x = torch.arange(50.0)[:, None]
    source = TensorSource({"x": x}, block_tokens=7)  # blocks of 7, 7, ..., 1
    stream = batches(source, 4, seed=3)
    first = [next(stream) for _ in range(30)]  # 120 tokens: two epochs and a part
    epoch = torch.cat([b["x"] for b, _ in first[:13]]).flatten()[:50]
    assert sorted(epoch.tolist()) == list(range(50))  # every token once per epoch
    for i in (0, 5, 11, 12, 17):
        again = batches(source, 4, seed=3, position=first[i][1])
        for j in range(i + 1, i + 6):
            got, position = next(again)
            assert torch.equal(got["x"], first[j][0]["x"]) and position == first[j][1]


def test_fused_encoder_and_sparse_decoder_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, dtype=torch.float64, generator=g)
    W = torch.randn(5, 11, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, generator=g, requires_grad=True)
    W_dec = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b_dec = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    indices = torch.randn(7, 11, generator=g).topk(3, dim=1).indices

    def fused(W, b, W_dec, b_dec):
        shifted = (x - b_dec).detach()
        at = _Gathered.apply(shifted, W, b, b_dec, indices, (shifted @ W + b).gather(1, indices).detach())
        return sparse_decode(indices, torch.relu(at), W_dec)

    def plain(W, b, W_dec, b_dec):
        pre = (x - b_dec) @ W + b
        f = torch.zeros_like(pre).scatter(1, indices, torch.relu(pre.gather(1, indices)))
        return f @ W_dec

    upstream = torch.randn(7, 5, dtype=torch.float64, generator=g)
    params = (W, b, W_dec, b_dec)
    grads = [torch.autograd.grad((fn(*params) * upstream).sum(), params) for fn in (fused, plain)]
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want)
    torch.autograd.gradcheck(fused, params)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "gated", "standard"])
def test_folds_keep_what_the_dictionary_computes(arch):
    d = Dictionary(
        6,
        10,
        arch,
        k=3 if arch in ("topk", "batchtopk") else None,
        rescale_by_decoder_norm=arch in ("topk", "batchtopk"),
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if hasattr(d, "threshold"):
            d.threshold.copy_(torch.rand(10, generator=g) * 0.3)
    x = torch.randn(20, 6, generator=g) * 3
    c = 0.7
    want_f, want_y = d.encode(x * c), d(x * c) / c  # trained on scaled inputs, read unscaled
    fold_scales_(d, c, c)
    fold_decoder_norms_(d)
    torch.testing.assert_close(d(x), want_y)
    torch.testing.assert_close(d.W_dec.norm(dim=1), torch.ones(10))
    active = want_f > 0
    assert torch.equal(d.encode(x) > 0, active)


def test_learning_rate_schedules():
    saelens = TrainSettings(lr_warmup=4, lr_decay=5)
    assert [lr_factor(saelens, s, 20) for s in (0, 3, 4, 14, 15, 19)] == [0.25, 1.0, 1.0, 1.0, 1.0, 1 - 4 / 5]
    sparsify = TrainSettings(recipe="sparsify", lr_warmup=4)
    assert [lr_factor(sparsify, s, 20) for s in (0, 2, 4, 12)] == [0.0, 0.5, 1.0, 0.5]


def test_settings_refuse_bad_input():
    for bad in ({"arch": "nope"}, {"recipe": "sparsify", "arch": "standard"}, {"width": "wide"}, {"site": ("a", "a")},
                {"out_site": ("a", "b")}, {"skip": True}, {"arch": "topk", "k": 2.5}, {"batch_size": 0}):  # fmt: skip
        with pytest.raises(LmscopeError):
            TrainSettings(**bad)
    assert TrainSettings(width="8x").features(64) == 512 and TrainSettings(width="300").features(64) == 300


# -- harvested activations ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _windows(model, n=24, pos=12, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.d_vocab, (n, pos), generator=g)


def test_harvest_matches_plain_forward_and_shards_train_as_streamed(llama, tmp_path):
    sites = ["blocks.0.mlp.in", "blocks.0.mlp.out", "blocks.1.resid_post"]
    windows = _windows(llama)
    source = HarvestSource(
        llama, sites, windows, block_windows=5, batch_size=3, skip_first=1, outlier=0, dtype=torch.bfloat16
    )
    # the capture against Hugging Face's hidden states
    with torch.no_grad():
        hidden = llama.hf(input_ids=windows[5:10], output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(source.block(1)["blocks.1.resid_post"], hidden[:, 1:].flatten(0, 1).bfloat16())
    assert source.sizes() == [55] * 4 + [44]
    key = {"test": 1}
    shards = cached(source, tmp_path / "cache", torch.bfloat16, key)
    assert isinstance(shards, ShardSource) and shards.sizes() == source.sizes()

    def refuse(j):
        raise AssertionError("harvested again")

    source.block = refuse
    again = cached(source, tmp_path / "cache", torch.bfloat16, key)  # reused, not harvested
    settings = TrainSettings(site=("blocks.0.mlp.in", "blocks.1.resid_post"), out_site=("blocks.0.mlp.out", "blocks.1.resid_post"),
                             arch="topk", k=4, width="2x", batch_size=64, tokens=640, lr=1e-3)  # fmt: skip
    streamed = train(
        HarvestSource(llama, sites, windows, block_windows=5, batch_size=3, outlier=0, dtype=torch.bfloat16), settings
    )
    from_shards = train(again, settings)
    for name in settings.site:
        for key_, p in streamed.dictionaries[name].state_dict().items():
            assert torch.equal(p, from_shards.dictionaries[name].state_dict()[key_]), (name, key_)


def test_transcoder_with_skip_trains_saves_and_splices(llama, tmp_path):
    from lmscope.features import load_dictionary, save_dictionary

    sites = ["blocks.0.mlp.in", "blocks.0.mlp.out"]
    source = HarvestSource(llama, sites, _windows(llama, n=40), block_windows=40, outlier=0)
    settings = TrainSettings(site=("blocks.0.mlp.in",), out_site=("blocks.0.mlp.out",), arch="standard", skip=True,
                             width="2x", batch_size=128, tokens=60 * 128, lr=3e-3, l1_coefficient=0.1)  # fmt: skip
    run = train(source, settings)
    log = run.logs["blocks.0.mlp.in"]
    assert log[-1]["fvu"] < 0.5 * log[0]["fvu"]
    d = run.dictionaries["blocks.0.mlp.in"]
    assert d.transcoder and d.skip and d.site == "blocks.0.mlp.in" and d.out_site == "blocks.0.mlp.out"
    block = source.block(0)
    x, y = block["blocks.0.mlp.in"], block["blocks.0.mlp.out"]
    assert float((d(x) - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()) < 0.5  # unscaled activations
    loaded = load_dictionary(save_dictionary(d, tmp_path / "tc"))
    torch.testing.assert_close(loaded(x), d(x))
    held_out = _windows(llama, n=4, seed=9)
    metrics = evaluate(llama, loaded, held_out, outlier=0).dictionaries[0].metrics  # spliced at mlp.out
    block = HarvestSource(llama, sites, held_out, outlier=0).block(0)
    x, y = block["blocks.0.mlp.in"], block["blocks.0.mlp.out"]
    assert metrics["fvu"] == pytest.approx(float((d(x) - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()), rel=1e-4)
    assert 0 <= metrics["kl"] < metrics["kl_zero_ablated"]


def test_batchtopk_saved_as_jumprelu(tmp_path):
    from lmscope.features import load_dictionary, save_dictionary

    _, x = synthetic(4096)
    d = train(
        TensorSource({"x": x}), TrainSettings(arch="batchtopk", **{**SYNTHETIC, "tokens": 20 * 256})
    ).dictionaries["x"]
    folder = save_dictionary(d, tmp_path / "btk")
    loaded = load_dictionary(folder)
    assert loaded.arch == "jumprelu" and torch.equal(loaded.threshold, d.threshold) and float(d.threshold[0]) > 0
    torch.testing.assert_close(loaded(x[:100]), d(x[:100]))


def test_outliers_left_out_of_the_harvest(llama):
    windows = _windows(llama, n=4)
    full = HarvestSource(llama, ["blocks.1.resid_post"], windows, block_windows=4, outlier=0).block(0)[
        "blocks.1.resid_post"
    ]
    norms = full.norm(dim=1)
    ratio = float(norms.max() / norms.median())
    kept = HarvestSource(llama, ["blocks.1.resid_post"], windows, block_windows=4, outlier=ratio * 0.999).block(0)
    assert torch.equal(kept["blocks.1.resid_post"], full[norms <= ratio * 0.999 * norms.median()])
    assert kept["blocks.1.resid_post"].shape[0] == full.shape[0] - 1


# -- SmolLM2 ---------------------------------------------------------------------------------------


def test_smollm2_topk_sae_reaches_fvu_below_0_3(smollm2):
    """16k tokens of the validation split, three epochs (sparsify's recipe, k = 32, 1152 latents);
    scored on 2k tokens of the test split."""
    from lmscope.features.commands import TrainCommand, activations, evaluation_windows

    command = TrainCommand(
        tokens=16384, seq_len=64, harvest_batch=32, width="2x", recipe="sparsify", batch_size=256, lr=3e-3
    )
    source = activations(smollm2, command)
    x = torch.cat([source.block(j)["blocks.12.resid_post"] for j in range(len(source.sizes()))])
    settings = dataclasses.replace(command.training(), tokens=3 * x.shape[0])
    run = train(TensorSource({"blocks.12.resid_post": x}), settings)
    windows, _ = evaluation_windows(smollm2, "wikitext2", 2048, 64)
    metrics = evaluate(smollm2, run.dictionaries, windows, downstream=False).dictionaries[0].metrics
    assert metrics["fvu"] < 0.3, metrics
    assert metrics["l0"] == pytest.approx(32, abs=0.5)
