"""Node names of the computational graph: built by head_node/mlp_node, read back by parse_node."""

from __future__ import annotations

import pytest

from lmscope.circuits.nodes import Node, head_node, head_of, is_head_node, mlp_node, node_order, parse_node
from lmscope.core.errors import LmscopeError


def test_names_round_trip():
    assert head_node(3, 2) == "a3.h2" and head_node(3, 2, "k") == "a3.h2<k>" and mlp_node(11) == "m11"
    assert parse_node("a3.h2") == Node("head", 3, 2)
    assert parse_node("a3.h2<k>") == Node("head", 3, 2, "k")
    assert parse_node("m11") == Node("mlp", 11)
    assert parse_node("input") == Node("input") and parse_node("logits") == Node("logits")
    assert head_of("a10.h7<q>") == (10, 7) and is_head_node("a0.h0") and not is_head_node("m0")


@pytest.mark.parametrize("bad", ["a3", "a3.h", "h2", "m", "a3.h2<x>", "x3", ""])
def test_bad_names_refused(bad):
    with pytest.raises(LmscopeError):
        parse_node(bad)
    with pytest.raises(LmscopeError):
        head_of("m3")


def test_order_follows_the_forward_pass():
    names = ["logits", "m1", "a1.h10", "a1.h2", "m0", "a0.h1", "input"]
    assert sorted(names, key=node_order) == ["input", "a0.h1", "m0", "a1.h2", "a1.h10", "m1", "logits"]
