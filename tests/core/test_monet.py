"""Monet layers (Park et al. 2025) on a tiny remote-code Monet written from the paper's equations
(tests/monet): routing sites against a hand computation from the router's weights, the product
against the outer product, expert masking and product edits against a reference that sums every
product expert's output computed from the experts' weights; loading and the CLI."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lmscope
from lmscope.core import families, monet
from lmscope.core.errors import LmscopeError
from lmscope.core.interventions import apply, patch
from lmscope.verify import certify
from tests.helpers import run_cli
from tests.monet import FAMILY_TOML, save_tiny_monet

KINDS = ("g1", "g2", "product")
VARIANTS = {"vd": {}, "hd": {"moe_decompose": "horizontal", "moe_groups": 3}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Both decompositions saved as remote-code checkpoints, and the --families file."""
    root = tmp_path_factory.mktemp("monet")
    (root / "families.toml").write_text(FAMILY_TOML)
    paths = {name: save_tiny_monet(root / f"monet-{name}", **kw) for name, kw in VARIANTS.items()}
    return root / "families.toml", paths


@pytest.fixture
def user_families(monkeypatch):
    monkeypatch.setattr(families, "USER_FAMILIES", {})


def _load(saved, name: str) -> lmscope.Model:
    entry, paths = saved
    previous = dict(families.USER_FAMILIES)
    families.load_families(entry)
    try:
        return lmscope.load(str(paths[name]), device="cpu", trust_remote_code=True)
    finally:
        families.USER_FAMILIES.clear()
        families.USER_FAMILIES.update(previous)


@pytest.fixture(scope="module", params=list(VARIANTS))
def model(request, saved) -> lmscope.Model:
    return _load(saved, request.param)


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 48, (2, 7), generator=torch.Generator().manual_seed(seed))


# -- references from the paper's equations -----------------------------------------------------


def _hand_routing(m, layer: int, x: torch.Tensor, group: int) -> torch.Tensor:
    """g^group [batch, pos, H, E] of router ``layer`` on ``x``: logits per head, z-scores from the
    batch norm's running statistics, kept where the z-score reaches min(max, Phi^-1(1 - k/E)),
    softmax over the kept logits."""
    config, router = m.hf.config, m.layer_module(layer, "router")
    H, E, k = config.moe_heads, config.moe_experts, config.moe_topk
    weight, norm = getattr(router, f"w{group}").weight, getattr(router, f"norm{group}")
    z = (x.double() @ weight.double().T).view(*x.shape[:2], H, E)
    scores = (z - norm.running_mean.double()[:, None]) / (norm.running_var.double()[:, None] + norm.eps).sqrt()
    sigma = torch.special.ndtri(torch.tensor(1 - k / E, dtype=torch.float64))
    keep = scores >= torch.minimum(scores.amax(-1, keepdim=True), sigma)
    return torch.where(keep, z, float("-inf")).softmax(-1).float()


def _relu2(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x) ** 2


def _hand_experts(m, layer: int, x: torch.Tensor) -> torch.Tensor:
    """Every product expert's output E_ij(x), [batch, pos, E, E, d_model], from the experts' weights."""
    config, moe = m.hf.config, m.layer_module(layer, "moe")
    E, d = config.moe_experts, config.hidden_size

    def half(linear):  # act(U_i x + c_i) for every half-expert i: [batch, pos, E, width]
        u, c = linear.weight.view(E, -1, d), linear.bias.view(E, -1)
        return _relu2(torch.einsum("bpd,emd->bpem", x, u) + c)

    def down(linear):  # V [out, E * width] -> [out, E, width]
        return linear.weight.view(linear.weight.shape[0], E, -1)

    if config.moe_decompose == "horizontal":  # E_ij = V_j act(U_i x + c_i) + b_j
        a = half(moe.u)
        return torch.einsum("ojm,bpim->bpijo", down(moe.v), a) + moe.b[None, None, None]
    a1, a2 = half(moe.u1), half(moe.u2)
    top = (
        torch.einsum("oim,bpim->bpio", down(moe.v11), a1)[:, :, :, None]
        + torch.einsum("oim,bpjm->bpijo", down(moe.v12), a2)
        + moe.b1[None, None, :, None]
    )
    bottom = (
        torch.einsum("ojm,bpim->bpijo", down(moe.v21), a1)
        + torch.einsum("ojm,bpjm->bpjo", down(moe.v22), a2)[:, :, None]
        + moe.b2[None, None, None]
    )
    return torch.cat([top, bottom], dim=-1)


def _hand_output(m, layer: int, x: torch.Tensor, product: torch.Tensor) -> torch.Tensor:
    """sum_{h,i,j} product[h, i, j] E_ij(x): the layer's experts output for a product [b, p, H, E, E]."""
    with torch.no_grad():
        return torch.einsum("bphij,bpijd->bpd", product, _hand_experts(m, layer, x))


def _sites(layer: int) -> list[str]:
    return [f"blocks.{layer}.{k}" for k in ("mlp.in", "mlp.out")] + [f"blocks.{layer}.monet.{k}" for k in KINDS]


# -- sites ---------------------------------------------------------------------------------------


def test_routing_sites_match_the_paper_per_layer_of_experts(model):
    m, groups = model, model.hf.config.moe_groups
    c = m.run(_ids(), capture=[s for layer in range(m.n_layers) for s in _sites(layer)]).cache
    for layer in range(m.n_layers):
        owner = layer - layer % groups  # the group's first layer holds the router
        assert monet.owner(m, layer) == owner
        x = c[f"blocks.{owner}.mlp.in"]
        for group in (1, 2):
            got = c[f"blocks.{layer}.monet.g{group}"]
            torch.testing.assert_close(got, _hand_routing(m, owner, x, group), rtol=1e-5, atol=1e-6)
            kept = (got > 0).sum(-1)
            assert bool((kept >= 1).all()) and bool((kept < m.hf.config.moe_experts).all())
        g1, g2, product = (c[f"blocks.{layer}.monet.{k}"] for k in KINDS)
        assert torch.equal(product, torch.einsum("bphi,bphj->bphij", g1, g2))
        assert product.shape == (2, 7, 2, 8, 8)
        # the block's output is the sum of every product expert's output, weighted by the product
        hand = _hand_output(m, layer, c[f"blocks.{layer}.mlp.in"], product)
        torch.testing.assert_close(c[f"blocks.{layer}.mlp.out"], hand, rtol=1e-4, atol=1e-4)


def test_site_table_and_errors(model, tiny_models):
    shapes = dict(model.site_shapes(batch=1, pos=3))
    assert shapes["blocks.3.monet.g2"] == (1, 3, 2, 8) and shapes["blocks.3.monet.product"] == (1, 3, 2, 8, 8)
    assert "blocks.0.mlp.post" not in shapes  # Monet has no single neuron activation
    with pytest.raises(LmscopeError, match="has no heads"):
        model.site("blocks.0.monet.g1.1")
    with pytest.raises(LmscopeError, match="unknown site"):
        model.site("blocks.0.monet.g3")
    with pytest.raises(LmscopeError, match="no Monet experts block"):
        tiny_models["llama"].site("blocks.0.monet.product")


# -- masking and editing ---------------------------------------------------------------------------


def _most_used(product: torch.Tensor, count: int) -> list[tuple[int, int]]:
    used = product.ne(0).sum((0, 1, 2)).flatten().topk(count).indices
    return [divmod(int(e), product.shape[-1]) for e in used]


def test_masking_equals_the_sum_over_the_other_experts(model):
    m, layer, ids = model, 1, _ids()
    clean = m.run(ids, capture=_sites(layer))
    product = clean.cache[f"blocks.{layer}.monet.product"]
    masked_pairs = _most_used(product, 3)
    i, j = masked_pairs[2]
    experts = [*masked_pairs[:2], i * 8 + j]  # pairs and a flat index
    run = m.run(ids, capture=_sites(layer), interventions=[monet.mask(layer, experts)])
    kept = product.clone()
    for a, b in masked_pairs:
        kept[..., a, b] = 0
    assert torch.equal(run.cache[f"blocks.{layer}.monet.product"], kept)
    hand = _hand_output(m, layer, clean.cache[f"blocks.{layer}.mlp.in"], kept)
    torch.testing.assert_close(run.cache[f"blocks.{layer}.mlp.out"], hand, rtol=1e-4, atol=1e-4)
    assert (run.cache[f"blocks.{layer}.mlp.out"] - clean.cache[f"blocks.{layer}.mlp.out"]).abs().max() > 1e-2
    # downstream: the logits of a forward whose layer output is the hand computation
    reference = m.run(ids, interventions=[patch(f"blocks.{layer}.mlp.out", hand)]).logits
    torch.testing.assert_close(run.logits, reference, rtol=1e-4, atol=1e-4)


def test_masking_at_positions_and_masking_nothing(model):
    m, layer, ids = model, 2, _ids(1)
    plain = m.hf(input_ids=ids).logits.detach()
    product = m.run(ids, capture=[f"blocks.{layer}.monet.product"]).cache[f"blocks.{layer}.monet.product"]
    unused = [e for e in range(64) if not bool(product[..., e // 8, e % 8].ne(0).any())]
    for experts in ([], unused):
        assert torch.equal(m.run(ids, interventions=[monet.mask(layer, experts)]).logits, plain)
    pair = _most_used(product, 1)[0]
    sites = [f"blocks.{layer}.mlp.out"]
    clean = m.run(ids, capture=sites).cache[sites[0]]
    at = m.run(ids, capture=sites, interventions=[monet.mask(layer, [pair], positions=[4])]).cache[sites[0]]
    assert torch.equal(at[:, :4], clean[:, :4]) and torch.equal(at[:, 5:], clean[:, 5:])


def test_general_product_edit(model):
    m, layer, ids = model, 3, _ids(2)
    clean = m.run(ids, capture=_sites(layer)).cache
    new = torch.rand(clean[f"blocks.{layer}.monet.product"].shape, generator=torch.Generator().manual_seed(5))
    run = m.run(ids, capture=_sites(layer), interventions=[apply(f"blocks.{layer}.monet.product", lambda p: new)])
    hand = _hand_output(m, layer, clean[f"blocks.{layer}.mlp.in"], new)
    torch.testing.assert_close(run.cache[f"blocks.{layer}.mlp.out"], hand, rtol=1e-4, atol=1e-4)


def test_routing_edit_changes_only_that_layer(model):
    m, ids = model, _ids(3)
    follower = next(layer for layer in range(m.n_layers) if monet.owner(m, layer) != layer)
    owner = monet.owner(m, follower)
    clean = m.run(ids, capture=_sites(owner) + _sites(follower)).cache
    one_hot = torch.zeros_like(clean[f"blocks.{follower}.monet.g1"])
    one_hot[..., 5] = 1.0  # every head of every token on half-expert 5 of the first group
    edit = patch(f"blocks.{follower}.monet.g1", one_hot)
    run = m.run(ids, capture=_sites(owner) + _sites(follower), interventions=[edit]).cache
    for kind in ("monet.g1", "mlp.out"):
        assert torch.equal(run[f"blocks.{owner}.{kind}"], clean[f"blocks.{owner}.{kind}"])
    assert torch.equal(run[f"blocks.{follower}.monet.g1"], one_hot)
    product = torch.einsum("bphi,bphj->bphij", one_hot, clean[f"blocks.{follower}.monet.g2"])
    assert torch.equal(run[f"blocks.{follower}.monet.product"], product)
    hand = _hand_output(m, follower, run[f"blocks.{follower}.mlp.in"], product)
    torch.testing.assert_close(run[f"blocks.{follower}.mlp.out"], hand, rtol=1e-4, atol=1e-4)


def test_gradients_per_layer_of_a_shared_routing(model):
    m, ids = model, _ids(4)
    follower = next(layer for layer in range(m.n_layers) if monet.owner(m, layer) != layer)
    owner = monet.owner(m, follower)
    names = [f"blocks.{layer}.monet.g1" for layer in (owner, follower)]
    run = m.run(ids, capture=names, grad=True)
    run.logits[:, -1].logsumexp(-1).sum().backward()
    grads = [run.cache[name].grad for name in names]
    assert all(g is not None for g in grads) and not torch.equal(grads[0], grads[1])
    assert torch.equal(run.cache[names[0]].detach(), run.cache[names[1]].detach())


def test_generation_with_a_mask(model):
    m, layer = model, 1
    prompt = _ids(5)[:1, :4]
    plain = m.generate(prompt, max_new_tokens=3, capture=[f"blocks.{layer}.monet.g1"])
    assert plain.cache[f"blocks.{layer}.monet.g1"].shape[1] == plain.ids.shape[1] - 1
    masked = m.generate(prompt, [monet.mask(layer, [])], max_new_tokens=3)
    assert torch.equal(masked.ids, plain.ids)


def test_hooks_removed_after_an_exception(model):
    m, layer, ids = model, 1, _ids()
    plain = m.hf(input_ids=ids).logits.detach()
    experts = m.layer_module(layer, "moe")

    def boom(p):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        m.run(ids, capture=[f"blocks.{layer}.monet.g1"], interventions=[apply(f"blocks.{layer}.monet.product", boom)])
    with pytest.raises(LmscopeError, match="out of range"):
        m.run(ids, interventions=[monet.mask(layer, [(8, 0)])])
    assert not experts._forward_hooks and not experts._forward_pre_hooks
    assert torch.equal(m.hf(input_ids=ids).logits, plain)


def test_certificate(model):
    cert = certify(model)
    status = {c.name: c.status for c in cert.checks}
    assert cert.passed, [c for c in cert.checks if c.status == "fail"]
    assert status["moe_routing"] == status["moe_resection"] == "n/a"
    assert sum(s == "pass" for s in status.values()) >= 12


# -- loading and the CLI ---------------------------------------------------------------------------


def test_loading_needs_trust_remote_code(saved, user_families):
    entry, paths = saved
    families.load_families(entry)
    with pytest.raises(LmscopeError, match="pass --trust-remote-code"):
        lmscope.load(str(paths["vd"]), device="cpu")


def test_cli(saved, user_families, capsys):
    entry, paths = saved
    path = str(paths["vd"])
    code, _, err = run_cli(capsys, "--families", str(entry), "run", path, "w3 w4 w5")
    assert code == 2 and "pass --trust-remote-code" in err and err.strip().count("\n") == 0
    options = ["--families", str(entry), "--trust-remote-code"]
    code, out, _ = run_cli(capsys, *options, "run", path, "w3 w4 w5", "-c", "blocks.1.monet.product")
    assert code == 0 and "blocks.1.monet.product" in out and "[1, 3, 2, 8, 8]" in out
    code, out, _ = run_cli(capsys, *options, "sites", path, "--layer", "2", "--pos", "4")
    assert code == 0 and "blocks.2.monet.g1" in out and "[1, 4, 2, 8]" in out and "blocks.3." not in out
    code, _, err = run_cli(capsys, *options, "run", path, "w3", "-c", "blocks.9.monet.g1")
    assert code == 2 and "layer 9 out of range" in err
