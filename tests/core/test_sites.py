"""The site grammar."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmscope.core.errors import LmscopeError
from lmscope.core.sites import HEAD_KINDS, LAYER_KINDS, MOE_KINDS, MONET_KINDS, Site, all_sites, parse_site


def test_parse_examples():
    assert parse_site("embed") == Site("embed")
    assert parse_site("blocks.5.attn.z.3") == Site("attn.z", 5, 3)
    assert parse_site("blocks.5.attn.z", head=3) == Site("attn.z", 5, 3)
    assert parse_site("blocks.12.mlp.post") == Site("mlp.post", 12)
    assert parse_site("blocks.0.attn.pattern.2").head_axis == 1
    assert parse_site("blocks.3.monet.g1") == Site("monet.g1", 3)
    assert parse_site("blocks.3.monet.product").head_axis is None


@given(st.integers(0, 500), st.sampled_from([k for k in LAYER_KINDS if k != "moe.expert"]), st.integers(0, 63))
def test_names_round_trip(layer, kind, head):
    site = Site(kind, layer, head if kind in HEAD_KINDS else None)
    assert parse_site(str(site)) == site


@pytest.mark.parametrize(
    "text",
    [
        "blocks.x.resid_pre",
        "blocks.1.resid",
        "blocks.1.mlp.out.2",
        "embed.1",
        "block.1.resid_pre",
        "",
        "logits.0",
        "blocks.1.monet.g1.0",
        "blocks.1.monet.g",
    ],
)
def test_bad_names(text):
    with pytest.raises(LmscopeError):
        parse_site(text)


def test_head_given_twice_must_agree():
    with pytest.raises(LmscopeError, match="names head 3"):
        parse_site("blocks.1.attn.z.3", head=2)


def test_all_sites_count():
    names = all_sites(2)
    per_layer = [k for k in LAYER_KINDS if k not in MOE_KINDS + MONET_KINDS]
    assert len(names) == 3 + 2 * len(per_layer) and len(set(names)) == len(names)
