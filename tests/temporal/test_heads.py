"""Temporal-head selection against hand-worked node sets (the paper's ``2.circuit_analysis``)."""

from __future__ import annotations

import pytest

from lmscope.core.errors import LmscopeError
from lmscope.temporal.heads import NodeSet, major_nodes, temporal_heads


def _set(name: str, group: str, *nodes: str) -> NodeSet:
    return NodeSet(name, group, frozenset(["input", "logits", *nodes]))


def test_major_is_ceil_of_ratio_times_n():
    sets = [frozenset({"a", "b"}), frozenset({"a", "b"}), frozenset({"a"}), frozenset({"a", "c"})]
    # n = 4: ceil(0.9 * 4) = 4 circuits needed, ceil(0.5 * 4) = 2, ceil(0.7 * 4) = 3
    assert major_nodes(sets, 0.9) == {"a"}
    assert major_nodes(sets, 0.5) == {"a", "b"}
    assert major_nodes(sets, 0.7) == {"a"}
    assert major_nodes([frozenset({"x"})] * 10, 0.9) == {"x"}
    nine = [frozenset({"x"})] * 9 + [frozenset()]
    assert major_nodes(nine, 0.9) == {"x"}  # 9 of 10 = ceil(9.0)
    assert major_nodes(nine[1:], 0.9) == set()  # 8 of 9 < ceil(8.1) = 9


def test_selection_by_hand():
    """Two years (two circuits each) and two invariant circuits; worked out by hand:

    - in every circuit: input, logits, m0            -> common (A.1)
    - a1.h0: in a 2001 circuit and an invariant one  -> found in both (A.2), never temporal
    - a2.h1: in both 2000 circuits                    -> temporal (major in 2000)
    - a2.h2: in one 2000 and one 2001 circuit         -> major in neither year (1 of 2 < ceil(1.8) = 2)
    - a3.h0: in both 2001 circuits                    -> temporal
    - a4.h4: in both invariant circuits               -> invariant only
    - m3:    in both 2001 circuits                    -> a temporal node, not a head
    """
    sets = [
        _set("x 2000", "2000", "m0", "a2.h1", "a2.h2"),
        _set("y 2000", "2000", "m0", "a2.h1"),
        _set("x 2001", "2001", "m0", "a3.h0", "a1.h0", "m3", "a2.h2"),
        _set("y 2001", "2001", "m0", "a3.h0", "m3"),
        _set("inv a", "invariant", "m0", "a4.h4", "a1.h0"),
        _set("inv b", "invariant", "m0", "a4.h4"),
    ]
    result = temporal_heads(sets, 0.9, n_layers=5, n_heads=5)
    assert result.common == ["input", "m0", "logits"]
    assert result.found_in_both == ["a1.h0"]
    assert result.temporal_nodes == ["a2.h1", "a3.h0", "m3"]
    assert result.heads == [(2, 1), (3, 0)]
    assert result.invariant_nodes == ["a4.h4"] and result.invariant_heads == [(4, 4)]
    assert result.counts == {"a2.h1": 2, "a3.h0": 2, "m3": 2}
    assert result.groups == {"2000": 2, "2001": 2, "invariant": 2}
    # at ratio 0.5, a2.h2 (1 of 2 in each year) becomes temporal too
    assert (2, 2) in temporal_heads(sets, 0.5).heads
    # a head major in a year and in the invariant circuits is not temporal
    both = [*sets[:2], _set("inv c", "invariant", "m0", "a2.h1")]
    assert (2, 1) not in temporal_heads(both, 0.9).heads


def test_heatmap_and_json():
    sets = [_set("x 2000", "2000", "a1.h1"), _set("inv", "invariant", "a0.h0")]
    result = temporal_heads(sets, 0.9, n_layers=2, n_heads=2)
    (figure,) = result.figures()
    assert figure.z == [[0.0, 0.0], [0.0, 1.0]]  # rows heads, columns layers
    assert result.to_json()["temporal_nodes"] == ["a1.h1"]
    assert "a1.h1" in result.text()


def test_ratio_out_of_range():
    with pytest.raises(LmscopeError, match="ratio"):
        temporal_heads([], 1.5)
