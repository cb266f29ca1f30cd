"""The fuzz suite, properties half (Hypothesis): every string parser a user's input reaches either
parses or raises :class:`LmscopeError`, never another exception; where a canonical form exists,
parsing it gives back what it was made from.

Parsers: the site grammar (:func:`~lmscope.core.sites.parse_site`), the data-file readers
(:func:`~lmscope.core.jsonl.read_rows` and its helpers, the pair, example, evaluation, choice and
experiment loaders), KV specs (``k4v2,...``), layer lists (``6,9+12``), coefficient lists,
memory sizes and ``--max-memory``, node names and family formulas.
"""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmscope.circuits.nodes import Node, parse_node
from lmscope.circuits.pairs import load_pairs
from lmscope.core.errors import LmscopeError
from lmscope.core.families import config_value
from lmscope.core.jsonl import TEXT, TOKEN_IDS, Schema, either, read_rows
from lmscope.core.loading import parse_max_memory
from lmscope.core.memory import format_size, parse_size
from lmscope.core.sites import LAYER_KINDS, Site, parse_site
from lmscope.quant.configs import KVQuant, parse_kv, parse_kv_specs
from lmscope.quant.evaluation import load_choices
from lmscope.steering.commands import numbers
from lmscope.steering.directions import load_examples
from lmscope.steering.steer import load_eval, parse_layers
from lmscope.temporal.edit import load_experiments

# Modest and reproducible: the whole file runs in seconds, without a database of examples.
FUZZ = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip

# Text that looks like the inputs: the grammar's own characters mixed with anything.
GRAMMAR = st.text(alphabet=string.ascii_letters + string.digits + ".,+=_-<>[]{}: \t", max_size=30)
ANY_TEXT = st.one_of(GRAMMAR, st.text(max_size=30))


def parses_or_refuses(parse, *args):
    """``parse(*args)``, or None when it raised :class:`LmscopeError` (anything else fails)."""
    try:
        return parse(*args)
    except LmscopeError as e:
        assert "\n" not in str(e), str(e)
        return None


# -- the site grammar and node names -------------------------------------------------------------


@FUZZ
@given(st.one_of(ANY_TEXT, st.builds("blocks.{}.{}{}".format, st.integers(-2, 10**30), st.sampled_from(LAYER_KINDS),
                                     st.sampled_from(["", ".0", ".-1", ".x", ".99999999999999999999"]))))
def test_site_names_parse_or_refuse(text):
    site = parses_or_refuses(parse_site, text)
    if site is not None:
        assert parse_site(str(site)) == site  # the canonical name reads back
        assert site.layer is None or site.layer >= 0
        assert site.head is None or site.head >= 0


@FUZZ
@given(st.one_of(ANY_TEXT, st.builds("a{}.h{}{}".format, st.integers(0, 99), st.integers(0, 99),
                                     st.sampled_from(["", "<q>", "<k>", "<x>"]))))
def test_node_names_parse_or_refuse(text):
    node = parses_or_refuses(parse_node, text)
    if node is not None:
        assert isinstance(node, Node)


# -- specs: KV settings, layer lists, numbers, memory ---------------------------------------------


@FUZZ
@given(st.one_of(ANY_TEXT, st.lists(st.sampled_from(["k4v2", "k8v8", "fp", "kfpv4", "k9v1", "k0v0", " K2V2 ", ""]),
                                    max_size=4).map(",".join)))
def test_kv_specs_parse_or_refuse(text):
    specs = parses_or_refuses(parse_kv_specs, text)
    for kv in specs or []:
        assert parse_kv(kv.name.lower()) == kv  # the row name reads back as the same setting


@FUZZ
@given(st.integers(1, 8) | st.none(), st.integers(1, 8) | st.none())
def test_kv_names_round_trip(k, v):
    kv = KVQuant(k, v)
    assert parse_kv(kv.name.lower()) == kv


@FUZZ
@given(st.one_of(ANY_TEXT, st.lists(st.lists(st.integers(-3, 40), min_size=1, max_size=3).map(
    lambda g: "+".join(map(str, g))), min_size=1, max_size=4).map(",".join)), st.integers(1, 32))  # fmt: skip
def test_layer_lists_parse_or_refuse(text, n_layers):
    groups = parses_or_refuses(parse_layers, text, n_layers)
    if groups is not None:
        assert all(0 <= layer < n_layers for g in groups for layer in g)
        assert parse_layers(",".join("+".join(map(str, g)) for g in groups), n_layers) == groups


@FUZZ
@given(st.one_of(ANY_TEXT, st.lists(st.floats(allow_nan=False), min_size=1, max_size=4).map(
    lambda xs: ",".join(map(repr, xs)))), st.sampled_from([float, int]))  # fmt: skip
def test_number_lists_parse_or_refuse(text, kind):
    values = parses_or_refuses(numbers, text, "coeffs", kind)
    if values is not None:
        assert numbers(",".join(map(repr, values)), "coeffs", kind) == values


@FUZZ
@given(st.one_of(ANY_TEXT, st.builds("{}{}".format, st.floats(0, 1e30) | st.integers(0, 10**400),
                                     st.sampled_from(["", "B", "KB", "mb", "GiB", "TB", "XB"]))))
def test_sizes_parse_or_refuse(text):
    size = parses_or_refuses(parse_size, text)
    if size is not None:
        assert isinstance(size, int) and size >= 0
        assert parses_or_refuses(parse_size, format_size(size).replace(" ", "")) is not None


@FUZZ
@given(st.one_of(ANY_TEXT, st.lists(st.builds("{}={}".format, st.sampled_from(["cpu", "0", "1", "disk", "gpu", ""]),
                                              st.sampled_from(["300MB", "2GiB", "abc", "", "1e999"])),
                                    max_size=3).map(",".join)))  # fmt: skip
def test_max_memory_parses_or_refuses(text):
    spec = parses_or_refuses(parse_max_memory, text)
    for size in (spec or {}).values():
        assert parse_size(size) >= 0  # every size it accepts is one


@FUZZ
@given(ANY_TEXT)
def test_family_formulas_evaluate_or_refuse(formula):
    class Config:
        num_hidden_layers = 4
        hidden_size = 64

    value = parses_or_refuses(config_value, Config(), formula)
    assert value is None or isinstance(value, int | float)


# -- the data-file readers -----------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
ROW_KEYS = ["clean", "corrupt", "answer", "wrong_answer", "text", "label", "positive", "negative", "prompt",
            "target", "opposite", "context", "choices", "source_prompt", "target_prompt", "subject_phrase",
            "trigger_word", "coeff"]  # fmt: skip
ROWS = st.dictionaries(st.sampled_from(ROW_KEYS), JSON_VALUES | st.text(min_size=1, max_size=8), max_size=6)
LOADERS = [load_pairs, load_examples, load_eval, load_choices, load_experiments]


def _line(value) -> str:
    return json.dumps(value, allow_nan=True)


FILES = st.one_of(
    st.binary(max_size=200),
    st.lists(ROWS.map(_line) | JSON_VALUES.map(_line) | st.text(max_size=20), max_size=4).map("\n".join).map(str.encode),
)


@FUZZ
@given(FILES)
@pytest.mark.parametrize("load", LOADERS, ids=lambda f: f.__name__)
def test_data_files_load_or_refuse(tmp_path, load, content):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    parses_or_refuses(load, path)


SCHEMA = Schema({"a": either(TEXT, TOKEN_IDS)}, {"b": TEXT})


@FUZZ
@given(st.lists(st.fixed_dictionaries({"a": st.text(min_size=1) | st.lists(st.integers(0, 10**6), min_size=1)},
                                      optional={"b": st.text(min_size=1)}), min_size=1, max_size=5),
       st.sampled_from(["\n", "\r\n"]), st.booleans())  # fmt: skip
def test_rows_round_trip(tmp_path, rows, newline, ascii_only):
    """Rows written as JSON lines (any newline, escaped or raw Unicode, U+2028 included) read back."""
    path = tmp_path / "rows.jsonl"
    path.write_text(newline.join(json.dumps(r, ensure_ascii=ascii_only) for r in rows) + newline, encoding="utf-8",
                    newline="")  # fmt: skip
    assert [row.values for row in read_rows(path, SCHEMA)] == rows
