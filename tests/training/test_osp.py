"""OSP's components against independent references: single-scale RMSNorm, the embedding
projection and its merge, Muon's step (Newton-Schulz by hand), the normalised momentum of
"Muon everywhere", and which optimizer trains which parameter."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from lmscope.core.errors import LmscopeError
from lmscope.training import (
    RECIPES,
    ProjectedEmbedding,
    ProjectedHead,
    SingleScaleRMSNorm,
    apply_recipe_,
    assign_parameters,
    build_optimizers,
    exported,
    get_recipe,
)
from lmscope.training.pretrain import llama_config

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def tiny_llama(settings, tokenizer, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(settings, tokenizer)).eval()


def ids(vocab: int, batch: int = 2, pos: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, pos), generator=torch.Generator().manual_seed(5))


def logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


# -- SSNorm --------------------------------------------------------------------------------


def test_single_scale_norm_equals_rmsnorm_with_constant_vector():
    x = torch.randn(3, 5, 16) * 4 + 1
    norm = SingleScaleRMSNorm(LlamaRMSNorm(16, eps=1e-5))
    with torch.no_grad():
        norm.weight.fill_(1.7)
    assert norm.weight.ndim == 0 and [p.numel() for p in norm.parameters()] == [1]
    constant = LlamaRMSNorm(16, eps=1e-5)
    with torch.no_grad():
        constant.weight.fill_(1.7)
    assert torch.equal(norm(x), constant(x))
    by_hand = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * 1.7
    torch.testing.assert_close(norm(x), by_hand)
    plain = norm.plain()
    assert type(plain) is LlamaRMSNorm and torch.equal(plain.weight, torch.full((16,), 1.7))
    assert torch.equal(plain(x), norm(x))


def test_ssnorm_covers_every_norm_and_exports_plain_vectors(tiny_settings, tokenizer):
    model = apply_recipe_(tiny_llama(tiny_settings, tokenizer), get_recipe("osp-ssnorm"))
    norms = [m for m in model.modules() if isinstance(m, SingleScaleRMSNorm)]
    assert len(norms) == 2 * tiny_settings.n_layers + 1  # two per layer and the final norm
    assert isinstance(model.model.norm, SingleScaleRMSNorm)
    with torch.no_grad():
        for i, norm in enumerate(norms):
            norm.weight.fill_(0.5 + 0.1 * i)
    plain = exported(model)
    assert not any(isinstance(m, SingleScaleRMSNorm) for m in plain.modules())
    for i, name in enumerate(n for n, m in plain.named_modules() if isinstance(m, LlamaRMSNorm)):
        weight = plain.get_submodule(name).weight
        assert weight.shape == (tiny_settings.d_model,) and torch.all(weight == weight[0])
    x = ids(len(tokenizer))
    assert torch.equal(logits(plain, x), logits(model, x))


# -- EmbProj -------------------------------------------------------------------------------


def test_embedding_projection_merges_logit_for_logit(tiny_settings, tokenizer, tmp_path):
    model = apply_recipe_(tiny_llama(tiny_settings, tokenizer), get_recipe("osp-embproj"))
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb, ProjectedEmbedding) and isinstance(head, ProjectedHead)
    eye = torch.eye(tiny_settings.d_model)
    torch.testing.assert_close(emb.proj.weight @ emb.proj.weight.T, eye, atol=1e-5, rtol=0)  # orthogonal init
    torch.testing.assert_close(head.proj.weight @ head.proj.weight.T, eye, atol=1e-5, rtol=0)
    with torch.no_grad():  # any square matrices merge, not only orthogonal ones
        emb.proj.weight.add_(0.3 * torch.randn_like(emb.proj.weight))
        head.proj.weight.add_(0.3 * torch.randn_like(head.proj.weight))
    x = ids(len(tokenizer))
    live = logits(model, x)
    # the projections by hand: embedding rows times P1^T, final norm output times P2^T
    hidden = model.model(inputs_embeds=emb.embedding(x) @ emb.proj.weight.T).last_hidden_state
    torch.testing.assert_close(live, (hidden @ head.proj.weight.T) @ head.head.weight.T, atol=1e-5, rtol=1e-5)
    plain = exported(model)
    assert isinstance(model.get_input_embeddings(), ProjectedEmbedding)  # the live model is unchanged
    assert type(plain.get_input_embeddings()) is torch.nn.Embedding and type(plain.lm_head) is torch.nn.Linear
    torch.testing.assert_close(logits(plain, x), live, atol=1e-5, rtol=1e-5)
    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded) is LlamaForCausalLM
    assert set(reloaded.state_dict()) == set(tiny_llama(tiny_settings, tokenizer).state_dict())
    assert torch.equal(logits(reloaded.eval(), x), logits(plain, x))


def test_embedding_projection_needs_untied_embeddings(tiny_settings, tokenizer):
    torch.manual_seed(0)
    config = llama_config(tiny_settings, tokenizer)
    config.tie_word_embeddings = True
    with pytest.raises(LmscopeError, match="untied"):
        apply_recipe_(LlamaForCausalLM(config), get_recipe("osp"))


# -- optimizers ----------------------------------------------------------------------------


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """OSP's ``_newtonschulz5`` in float64: X = G / |G|_F on the wide orientation, then
    ``X <- a X + (b A + c A A) X`` with ``A = X X^T``."""
    a, b, c = NS_COEFFICIENTS
    x = g.double() / g.double().norm()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight",
                                  "model.layers.1.mlp.down_proj.weight"])  # fmt: skip
def test_muon_step_matches_newton_schulz_reference(tiny_settings, tokenizer, name):
    model = tiny_llama(tiny_settings, tokenizer)
    optimizers = build_optimizers(model, "muon", lr=0.02, weight_decay=0.1)
    params = dict(model.named_parameters())
    w0 = params[name].detach().clone()
    g = torch.randn(w0.shape, generator=torch.Generator().manual_seed(1))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    params[name].grad = g.clone()
    optimizers.step()
    # first step: momentum B = g, Nesterov update g + 0.95 B; 0.2 sqrt(max(rows, cols)) * lr
    update = 0.02 * 0.2 * math.sqrt(max(w0.shape)) * newton_schulz(g + 0.95 * g)
    expected = w0.double() * (1 - 0.02 * 0.1) - update
    got = params[name].detach().double()
    step, ref_step = got - w0.double() * (1 - 0.02 * 0.1), -update
    # bfloat16 Newton-Schulz (torch's and OSP's) against float64: a few % of the largest entry
    assert (got - expected).abs().max() < 0.05 * update.abs().max()
    assert torch.nn.functional.cosine_similarity(step.flatten(), ref_step.flatten(), 0) > 0.999
    assert abs(step.norm() / ref_step.norm() - 1) < 0.01


def test_normalized_momentum_is_osp_vector_update(tiny_settings, tokenizer):
    model = apply_recipe_(tiny_llama(tiny_settings, tokenizer), get_recipe("muon-all"))
    optimizers = build_optimizers(model, "muon-all", lr=0.05, weight_decay=0.1)
    norm = model.model.norm.weight
    w0 = norm.detach().clone()
    g1, g2 = torch.randn(2, *w0.shape, generator=torch.Generator().manual_seed(2))
    steps = []
    for g in (g1, g2):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        norm.grad = g.clone()
        optimizers.step()
        steps.append(norm.detach().clone())
    scale = 0.05 * 0.2 * math.sqrt(w0.numel())  # no weight decay on vectors
    b1 = g1
    u1 = g1 + 0.95 * b1
    w1 = w0 - scale * u1 / u1.norm()
    b2 = g2 + 0.95 * b1
    u2 = g2 + 0.95 * b2
    w2 = w1 - scale * u2 / u2.norm()
    torch.testing.assert_close(steps[0], w1)
    torch.testing.assert_close(steps[1], w2)


def _kinds(model, groups: dict[str, list[str]]) -> dict[str, set[str]]:
    """Each group's parameter kinds: emb, head, proj (EmbProj), norm, matrix (hidden)."""

    def kind(name: str) -> str:
        if "norm" in name:
            return "norm"
        if name.endswith(("embed_tokens.weight", "embed_tokens.embedding.weight")):
            return "emb"
        if name.endswith(("lm_head.weight", "lm_head.head.weight")):
            return "head"
        return "proj" if ".proj." in name else "matrix"

    return {group: {kind(n) for n in names} for group, names in groups.items() if names}


@pytest.mark.parametrize(
    "recipe, expected",
    [
        ("adam", {"adamw": {"emb", "head", "norm", "matrix"}}),
        ("muon", {"muon": {"matrix"}, "adamw": {"emb", "head", "norm"}}),
        ("muon-all", {"muon": {"emb", "head", "matrix"}, "normalized": {"norm"}}),
        ("osp", {"muon": {"matrix", "proj"}, "adamw": {"emb", "head", "norm"}}),
        ("osp-ssnorm", {"muon": {"matrix"}, "adamw": {"emb", "head", "norm"}}),
        ("osp-embproj", {"muon": {"matrix", "proj"}, "adamw": {"emb", "head", "norm"}}),
    ],
)
def test_recipe_assigns_parameters(tiny_settings, tokenizer, recipe, expected):
    spec = get_recipe(recipe)
    model = apply_recipe_(tiny_llama(tiny_settings, tokenizer), spec)
    groups = assign_parameters(model, spec.optimizer)
    assert _kinds(model, groups) == expected
    assert sorted(n for names in groups.values() for n in names) == sorted(n for n, _ in model.named_parameters())
    if spec.ssnorm:  # one scalar per norm, trained by AdamW
        assert all(model.get_parameter(n).ndim == 0 for n in groups["adamw"] if "norm" in n)
    optimizers = build_optimizers(model, spec.optimizer, lr=1e-3)
    built = {name: sum(len(g["params"]) for g in opt.param_groups) for name, opt in optimizers.optimizers.items()}
    assert built == {name: len(names) for name, names in groups.items() if names}
    if "adamw" in optimizers.optimizers:  # weight decay on matrices only
        for group in optimizers.optimizers["adamw"].param_groups:
            assert all((p.ndim >= 2) == (group["weight_decay"] > 0) for p in group["params"])


def test_unknown_recipe_names_the_known_ones():
    with pytest.raises(LmscopeError, match="unknown recipe 'lion'.*adam, muon, muon-all, osp"):
        get_recipe("lion")
    assert set(RECIPES) == {"adam", "muon", "muon-all", "osp", "osp-ssnorm", "osp-embproj"}
