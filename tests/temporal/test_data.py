"""Temporal Heads data: loading (bundled and user files, malformed rows reported) and the
clean/corrupted pairs of notebook 1, counted by hand on tiny files."""

from __future__ import annotations

import json

import pytest
import torch

from lmscope.circuits.attribution import attribute
from lmscope.circuits.pairs import TokenPair
from lmscope.core.errors import LmscopeError
from lmscope.temporal.data import (
    InvariantCategory,
    TemporalCategory,
    bundled,
    invariant_pairs,
    load_categories,
    load_category,
    pairs_by_year,
    temporal_pairs,
)

ALIAS = {  # 2001 and 2003 say the year in sentences of one token length, 2002 in a longer one
    "2001": "In the first year, {} was led by",
    "2002": "In the year after the first big storm, {} was led by",
    "2003": "In the third year, {} was led by",
}


def _temporal(**overrides) -> dict:
    """Two subjects x three years. Acme: Alice, Bob, Bob; Globex: Carol, Dave, Erin."""
    data = {
        "name": "tiny leaders",
        "prompt_templates": ["In year {time}, the leader of {subject} was"],
        "prompt_templates_zs": ["In year {time}, who led {subject}?"],
        "samples": [
            {"subject": "Acme", "object": "Alice", "time": "2001"},
            {"subject": "Acme", "object": "Bob", "time": "2002"},
            {"subject": "Acme", "object": "Bob", "time": "2003"},
            {"subject": "Globex", "object": "Carol", "time": "2001"},
            {"subject": "Globex", "object": "Dave", "time": "2002"},
            {"subject": "Globex", "object": "Erin", "time": "2003"},
        ],
        "alias_time_templates": [{"year": y, "template": t} for y, t in ALIAS.items()],
        "all_possible_objects": [
            {"subject": "Acme", "objects": ["Alice", "Bob"], "year_range": "2001-2003"},
            {"subject": "Globex", "objects": ["Carol", "Dave", "Erin"], "year_range": "2001-2003"},
        ],
    }
    return {**data, **overrides}


def _write(tmp_path, name: str, data) -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def _ids(model, text: str) -> list[int]:
    return model.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_bundled_data_loads_with_only_the_phil_condit_rows_reported():
    categories, problems = load_categories()
    kinds = [c.kind for c in categories]
    assert kinds == ["temporal"] * 7 + ["invariant"] * 4
    assert [(p.row, "Phil Condit" in p.message) for p in problems] == [(r, True) for r in (22, 23, 24, 25)]
    assert all(p.file.endswith("3.time_ceo.json") for p in problems)
    ceo, found = bundled("ceo")
    assert isinstance(ceo, TemporalCategory) and len(found) == 4
    assert "Phil Condit" not in {s.object for s in ceo.samples} and len(ceo.samples) == 55 - 4
    roman, _ = bundled("roman")
    assert isinstance(roman, InvariantCategory) and roman.candidates()[:3] == ("C", "CC", "CCC")
    assert load_categories(kind="invariant")[0] == categories[7:]


def test_malformed_rows_are_reported_with_file_and_row_and_skipped(tmp_path):
    data = _temporal()
    data["samples"] = data["samples"] + [
        {"subject": "Acme", "object": "Al Ice", "time": "2004"},  # 6: not among Acme's candidates
        {"subject": "Initech", "object": "Bill", "time": "2001"},  # 7: no candidate list
        {"subject": "Acme", "object": "Bob"},  # 8: no time
        "Acme",  # 9: not an object
    ]
    data["prompt_templates"] = ["In {year}, {subject} was led by", *data["prompt_templates"]]  # 0: unknown field
    data["alias_time_templates"] = data["alias_time_templates"] + [{"year": "2004", "template": "{} and {}"}]
    data["all_possible_objects"] = data["all_possible_objects"] + [{"subject": "Hooli", "objects": []}]
    path = _write(tmp_path, "leaders.json", data)
    category, problems = load_category(path)
    where = [(p.file, p.row, p.message.split(":")[0]) for p in problems]
    assert where == [
        (path, 0, "prompt_templates[0]"),
        (path, 3, "alias_time_templates[3]"),
        (path, 2, "all_possible_objects[2]"),
        (path, 6, "samples[6]"),
        (path, 7, "samples[7]"),
        (path, 8, "samples[8]"),
        (path, 9, "samples[9]"),
    ]
    assert "{year}" in problems[0].message and "'Al Ice'" in problems[3].message
    assert str(problems[3]).startswith(f"{path}: samples[6]")
    assert category.prompt_templates == ("In year {time}, the leader of {subject} was",)
    assert len(category.samples) == 6 and len(category.alias_time_templates) == 3
    assert [o.subject for o in category.all_possible_objects] == ["Acme", "Globex"]


def test_files_of_another_shape_are_one_line_errors_or_problems(tmp_path):
    bad_json = _write(tmp_path, "a.json", "{not json")
    a_list = _write(tmp_path, "b.json", [1, 2])
    no_samples = _write(tmp_path, "c.json", {"name": "x", "prompt_templates": ["{subject} is"]})
    good = _write(tmp_path, "d.json", _temporal())
    for path, words in ((bad_json, "malformed JSON"), (a_list, "neither"), (no_samples, "missing samples")):
        with pytest.raises(LmscopeError, match=words) as error:
            load_category(path)
        assert "\n" not in str(error.value) and path in str(error.value)
    categories, problems = load_categories(tmp_path)  # a directory: every *.json, bad files skipped
    assert [c.file for c in categories] == [good]
    assert [(p.file, p.row) for p in problems] == [(bad_json, None), (a_list, None), (no_samples, None)]
    with pytest.raises(LmscopeError, match="no such file"):
        load_categories(tmp_path / "missing.json")


def test_temporal_pairs_match_a_hand_count(smollm2, tmp_path):
    category, problems = load_category(_write(tmp_path, "leaders.json", _temporal()))
    assert problems == []
    # Target 2001: Acme 2001 (Alice) x {2002 Bob, 2003 Bob}, Globex 2001 (Carol) x {2002 Dave, 2003 Erin}: 4.
    # Target 2002: Acme 2002 (Bob) x {2001 Alice} (2003 is Bob too), Globex 2002 x {2001, 2003}: 3.
    # Target 2003: Acme 2003 (Bob) x {2001 Alice}, Globex 2003 x {2001, 2002}: 3.
    by_year = pairs_by_year(smollm2, category)
    assert {y: (len(s), s.dropped) for y, s in by_year.years.items()} == {
        "2001": (4, 0),
        "2002": (3, 0),
        "2003": (3, 0),
    }
    pairs = by_year.years["2001"]
    assert [(t.corrupt[8:12], t.answer, t.wrong) for t in pairs.texts] == [
        ("2002", "Alice", "Bob"),
        ("2003", "Alice", "Bob"),
        ("2002", "Carol", "Dave"),
        ("2003", "Carol", "Erin"),
    ]
    first, text = pairs.pairs[0], pairs.texts[0]
    assert text.clean == "In year 2001, the leader of Acme was"
    assert text.corrupt == text.clean.replace("2001", "2002")  # only the year changes
    assert isinstance(first, TokenPair)
    assert first.clean.tolist() == smollm2.bos_ids() + _ids(smollm2, text.clean)  # BOS, as the paper's code
    assert first.corrupt.tolist() == smollm2.bos_ids() + _ids(smollm2, text.corrupt)
    assert first.answer.tolist() == _ids(smollm2, " Alice")[:1] and first.wrong.tolist() == _ids(smollm2, " Bob")[:1]
    assert bool(first.clean_mask.all()) and bool(first.corrupt_mask.all())
    plain = temporal_pairs(smollm2, category, 2001, bos=False)
    assert plain.pairs[0].clean.tolist() == _ids(smollm2, text.clean)
    # They feed the pair protocol directly.
    result = attribute(smollm2, pairs.pairs[:1], "attribution", "head")
    assert bool(torch.isfinite(result.scores).all())


def test_alias_pairs_drop_and_count_unequal_lengths(smollm2, tmp_path):
    category, _ = load_category(_write(tmp_path, "leaders.json", _temporal()))
    length = {y: len(_ids(smollm2, t.format("Acme"))) for y, t in ALIAS.items()}
    assert length["2001"] == length["2003"] != length["2002"]  # the premise of the count
    assert len(_ids(smollm2, ALIAS["2001"].format("Globex"))) == len(_ids(smollm2, ALIAS["2003"].format("Globex")))
    # Target 2001: the 4 pairs above; those against 2002 (one per subject) differ in length.
    alias = temporal_pairs(smollm2, category, "2001", alias=True)
    assert (len(alias), alias.dropped) == (2, 2)
    assert [t.corrupt for t in alias.texts] == [ALIAS["2003"].format("Acme"), ALIAS["2003"].format("Globex")]
    assert alias.texts[0].clean == "In the first year, Acme was led by"


def test_invariant_pairs_match_a_hand_count(smollm2, tmp_path):
    data = {
        "name": "tiny kinds",
        "prompt_templates": ["A {subject} is a kind of"],
        "prompt_templates_zs": ["What is a {subject}?"],
        "properties": {},
        "samples": [
            {"subject": "cat", "object": "animal"},
            {"subject": "dog", "object": "animal"},
            {"subject": "rose", "object": "flower"},
            {"subject": "hippopotamus", "object": "animal"},
        ],
    }
    category, problems = load_category(_write(tmp_path, "kinds.json", data))
    assert problems == [] and category.candidates("cat") == ("animal", "flower")
    prompt = lambda s: len(_ids(smollm2, f"A {s} is a kind of"))
    assert prompt("cat") == prompt("dog") == prompt("rose") != prompt("hippopotamus")
    # Other object: cat-rose, dog-rose, rose-cat, rose-dog, rose-hippopotamus, hippopotamus-rose (6);
    # the two with hippopotamus differ in length.
    pairs = invariant_pairs(smollm2, category)
    assert (len(pairs), pairs.dropped) == (4, 2)
    assert [(t.clean.split()[1], t.corrupt.split()[1]) for t in pairs.texts] == [
        ("cat", "rose"),
        ("dog", "rose"),
        ("rose", "cat"),
        ("rose", "dog"),
    ]
    assert pairs.pairs[2].answer.tolist() == _ids(smollm2, " flower")[:1]
    assert pairs.pairs[2].wrong.tolist() == _ids(smollm2, " animal")[:1]
    both = pairs_by_year(smollm2, load_category(_write(tmp_path, "t.json", _temporal()))[0], [category], ["2002"])
    assert list(both.years) == ["2002"] and len(both.invariant["tiny kinds"]) == 4


def test_bad_template_index_and_missing_tokenizer(smollm2, tiny_models, tmp_path):
    category, _ = load_category(_write(tmp_path, "leaders.json", _temporal()))
    with pytest.raises(LmscopeError, match="no prompt template 1"):
        temporal_pairs(smollm2, category, 2001, template=1)
    with pytest.raises(LmscopeError, match="no tokenizer"):
        temporal_pairs(tiny_models["llama"], category, 2001)
