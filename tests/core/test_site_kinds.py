"""Open site kinds: a kind registered at run time, outside core, is captured and intervened on
through ``model.run`` like a built-in one.

The kind here, ``blocks.{L}.proj``, is a fixed projection of the residual stream leaving layer L:
``resid_post @ P`` [batch, pos, k] with P [d_model, k] of orthonormal columns; its suffix selects
one component (``blocks.1.proj.0``: [batch, pos]). An edit of the projection maps back into the
residual stream as ``x + (new - x @ P) @ P.T``. Captures are checked against a plain Hugging Face
forward (``output_hidden_states``), edits against the same edit made by a forward hook of the
test's own on the decoder layer.
"""

from __future__ import annotations

import pytest
import torch

import lmscope
from lmscope.core import add, zero
from lmscope.core.hooks import Hook
from lmscope.core.sites import (
    Site,
    SiteKind,
    SiteProvider,
    parse_site,
    register_site_kind,
    site_providers,
    unregister_site_kind,
)
from tests.tiny import random_ids, tiny_model

K = 3


def _projection(d_model: int, k: int = K) -> torch.Tensor:
    """P [d_model, k] with orthonormal columns (a fixed random subspace)."""
    g = torch.Generator().manual_seed(7)
    return torch.linalg.qr(torch.randn(d_model, k, generator=g)).Q


def _proj_provider(P: torch.Tensor, name: str = "test-proj", kind: str = "proj") -> SiteProvider:
    k = P.shape[1]

    def has(model, kind: str, layer: int | None = None) -> bool:
        return layer is not None

    def check(model, site: Site) -> None:
        if site.head is not None and not 0 <= site.head < k:
            raise lmscope.LmscopeError(f"site '{site}': component {site.head} out of range ({k} components)")

    def shape(model, site: Site, batch: int, pos: int) -> tuple[int, ...]:
        return (batch, pos, k)

    def hooks(session, layer: int | None, keys: set[str]) -> list[Hook]:
        def fn(x: torch.Tensor) -> torch.Tensor | None:  # resid_post [batch, pos, d_model]
            y = x @ P  # [batch, pos, k]
            new = session.sites.process(kind, layer, y, session.offset)
            return None if new is y else x + (new - y) @ P.T

        return [Hook("resid_post", layer, fn)]

    return SiteProvider(
        name,
        (SiteKind(kind, suffix="head", head_axis=2),),
        has=has,
        shape=shape,
        hooks=hooks,
        check=check,
    )


@pytest.fixture(scope="module")
def llama() -> lmscope.Model:
    return tiny_model("llama")


@pytest.fixture
def P(llama):
    """The projection, its provider registered for the test and removed after it."""
    P = _projection(llama.d_model)
    register_site_kind(_proj_provider(P))
    try:
        yield P
    finally:
        unregister_site_kind("test-proj")
    assert "test-proj" not in [p.name for p in site_providers()]


def _hf_resid_post(model, ids, layer):
    """resid_post of ``layer`` from a plain Hugging Face forward (not the last layer: HF's last
    hidden state is after the final norm)."""
    with torch.no_grad():
        return model.hf(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1]


def test_kind_parses_validates_and_lists(llama, P):
    assert parse_site("blocks.1.proj") == Site("proj", 1)
    assert parse_site("blocks.1.proj.2") == Site("proj", 1, 2) == parse_site("blocks.1.proj", head=2)
    site = llama.site("blocks.1.proj.2")
    assert (site.head_axis, site.pos_axis, site.key) == (2, 1, "proj")
    assert llama.has_site("proj", 0) and not llama.has_site("proj")
    for bad, message in [
        ("blocks.3.proj", "layer 3 out of range"),
        ("blocks.1.proj.3", "component 3 out of range"),
        ("proj", "unknown site 'proj'"),
    ]:
        with pytest.raises(lmscope.LmscopeError, match=message) as info:
            llama.site(bad)
        assert "\n" not in str(info.value)
    shapes = llama.site_shapes(2, 5)
    assert shapes[-llama.n_layers :] == [(f"blocks.{i}.proj", (2, 5, K)) for i in range(llama.n_layers)]
    assert [s for s in shapes[: -llama.n_layers] if "proj" in s[0]] == []  # built-in sites come first


def test_capture_is_the_projection_of_the_residual_stream(llama, P):
    ids = random_ids(llama, batch=2, pos=7)
    run = llama.run(ids, capture=["blocks.0.proj", "blocks.1.proj.2", "blocks.1.resid_post"])
    for layer in (0, 1):
        expected = _hf_resid_post(llama, ids, layer) @ P
        got = run.cache[f"blocks.{layer}.proj"] if layer == 0 else run.cache["blocks.1.proj.2"]
        want = expected if layer == 0 else expected[..., 2]
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the new kind and a built-in one at the same layer: both read the unedited residual stream
    torch.testing.assert_close(run.cache["blocks.1.resid_post"], _hf_resid_post(llama, ids, 1), rtol=0, atol=0)


def _hf_with_layer_edit(model, ids, edits: dict[int, callable]):
    """Logits of a plain Hugging Face forward whose decoder layers' outputs go through ``edits``
    (a forward hook of the test's own, not lmscope's)."""

    def make(fn):
        def hook(module, args, out):
            if isinstance(out, tuple):
                return (fn(out[0]), *out[1:])
            return fn(out)

        return hook

    layers = model.module(model.family.layers)
    handles = [layers[layer].register_forward_hook(make(fn)) for layer, fn in edits.items()]
    try:
        with torch.no_grad():
            return model.hf(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()


def test_interventions_map_back_into_the_residual_stream(llama, P):
    ids = random_ids(llama, batch=2, pos=7)
    steer = torch.tensor([2.0, -1.0, 0.5])
    run = llama.run(
        ids,
        capture=["blocks.1.proj", "blocks.0.proj"],
        interventions=[zero("blocks.1.proj.0"), add("blocks.0.proj", steer)],
    )
    p0 = P[:, :1]  # [d_model, 1]
    hand = _hf_with_layer_edit(
        llama,
        ids,
        {0: lambda x: x + steer @ P.T, 1: lambda x: x - (x @ p0) @ p0.T},
    )
    torch.testing.assert_close(run.logits, hand, rtol=1e-4, atol=1e-4)
    assert run.cache["blocks.1.proj"][..., 0].abs().max() == 0  # captured after the edit
    plain = llama.run(ids).logits
    assert not torch.allclose(run.logits, plain, atol=1e-3)
    # no edits: the forward is bitwise the model's own
    assert torch.equal(llama.run(ids, capture=["blocks.1.proj"]).logits, plain)


def test_gradient_reaches_the_new_kind(llama, P):
    ids = random_ids(llama, batch=1, pos=5)
    run = llama.run(ids, capture=["blocks.1.proj"], interventions=[add("blocks.1.proj", torch.zeros(K))], grad=True)
    run.logits[0, -1].logsumexp(-1).backward()
    grad = run.cache["blocks.1.proj"].grad
    assert grad is not None and grad.shape == (1, 5, K) and grad.abs().sum() > 0


def test_unregistered_and_clashing_kinds_are_one_line_errors(llama):
    P = _projection(llama.d_model)
    register_site_kind(_proj_provider(P, name="test-proj-2", kind="proj2"))
    try:
        assert llama.site("blocks.0.proj2") == Site("proj2", 0)
        with pytest.raises(lmscope.LmscopeError, match="already registered"):
            register_site_kind(_proj_provider(P, name="test-proj-2", kind="proj2"))
        with pytest.raises(lmscope.LmscopeError, match="'resid_post' is already provided by 'dense'"):
            register_site_kind(_proj_provider(P, name="test-proj-3", kind="resid_post"))
    finally:
        unregister_site_kind("test-proj-2")
    for text in ("blocks.0.proj2", "blocks.0.proj"):
        with pytest.raises(lmscope.LmscopeError, match="unknown site") as info:
            llama.run(random_ids(llama), capture=[text])
        assert "\n" not in str(info.value)
    with pytest.raises(lmscope.LmscopeError, match="no site provider 'test-proj-2'"):
        unregister_site_kind("test-proj-2")
    assert [p.name for p in site_providers()] == ["dense", "moe", "monet"]
