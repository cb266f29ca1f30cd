"""Temporal knowledge editing through head values (Park et al., ACL 2025, notebook 7).

References are independent of :mod:`lmscope.temporal.edit`'s fast path: one plain forward (or
``Model.generate``) per head with an ``lmscope.apply`` intervention on ``blocks.L.attn.v``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import lmscope
from lmscope.core.errors import LmscopeError
from lmscope.temporal import edit as E
from tests.tiny import tiny_model

# -- references ---------------------------------------------------------------------------------


def source_mean(model: lmscope.Model, source: list[int]) -> torch.Tensor:
    """[n_layers, n_kv_heads, d_head]: each layer's captured values, averaged over positions."""
    sites = [f"blocks.{layer}.attn.v" for layer in range(model.n_layers)]
    cache = model.run(torch.tensor([source]), capture=sites).cache
    return torch.stack([cache[site][0].mean(0) for site in sites])


def plain_edit(model, layer: int, head: int, mean: torch.Tensor, coeff: float, position: int, positions=None):
    kv = head // (model.n_heads // model.n_kv_heads)
    delta = coeff * mean[layer, kv]
    where = [position] if positions is None else positions
    return lmscope.apply(f"blocks.{layer}.attn.v", lambda v: v + delta, positions=where, head=kv)


def naive_first_tokens(model, source: list[int], target: list[int], position: int, coeff: float, layers=None):
    """Baseline first token and {(layer, head): first token}, one forward per head (argmax)."""
    mean = source_mean(model, source)
    ids = torch.tensor([target])
    with torch.no_grad():
        baseline = int(model.run(ids).logits[0, -1].argmax())
        first = {}
        for layer in layers if layers is not None else range(model.n_layers):
            for head in range(model.n_heads):
                iv = plain_edit(model, layer, head, mean, coeff, position)
                first[layer, head] = int(model.run(ids, interventions=[iv]).logits[0, -1].argmax())
    return baseline, first


@pytest.fixture(scope="module")
def gqa() -> lmscope.Model:
    """Tiny Llama with grouped-query attention: 3 layers, 4 query heads, 2 KV heads."""
    model = tiny_model("llama", seed=0)
    assert (model.n_heads, model.n_kv_heads) == (4, 2)
    return model


def distinct_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randperm(90, generator=g)[:n] + 3).tolist()


# -- the screen equals one forward per head -----------------------------------------------------


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("coeff", [1.0, 4.0])
def test_screen_equals_one_forward_per_head_gqa(gqa, where, coeff):
    source, target = distinct_ids(8, seed=1), distinct_ids(9, seed=2)
    end = {"first": 1, "middle": 4, "last": 9}[where]
    phrase = target[max(0, end - 2) : end]
    experiment = E.EditExperiment(tuple(source), tuple(target), tuple(phrase), (5,), coeff)
    screen = E.screen_heads(gqa, experiment)
    assert screen.position == end - 1
    baseline, first = naive_first_tokens(gqa, source, target, end - 1, coeff)
    assert screen.baseline == baseline
    for (layer, head), token in first.items():
        assert int(screen.first[layer, head]) == token, (layer, head)
        assert bool(screen.changed[layer, head]) == (token != baseline)
    # heads sharing a KV head get the same edit
    assert torch.equal(screen.first[:, 0], screen.first[:, 1]) and torch.equal(screen.first[:, 2], screen.first[:, 3])
    if coeff == 4.0 and where == "middle":
        assert 0 < int(screen.changed.sum()) < screen.changed.numel()  # the comparison means something


SMOL_LAYERS = [0, 1, 13, 14, 16, 29]  # the naive reference covers these layers (9 heads each)


@pytest.mark.parametrize("index", [10, 12])  # Russia 2009 and Beckham 2004, coefficient 6
def test_screen_equals_one_forward_per_head_smollm2(smollm2, index):
    experiment = E.default_experiments()[index]
    tok = smollm2.tokenizer
    source = tok(experiment.source, add_special_tokens=False)["input_ids"]
    target = tok(experiment.target, add_special_tokens=False)["input_ids"]
    assert tok.decode(target[:6]) == experiment.phrase  # "In", " ", and the four digits
    screen = E.screen_heads(smollm2, experiment)
    assert screen.position == 5
    baseline, first = naive_first_tokens(smollm2, source, target, 5, experiment.coeff, SMOL_LAYERS)
    assert screen.baseline == baseline
    strip = lambda t: tok.decode([t]).strip()
    for (layer, head), token in first.items():
        assert int(screen.first[layer, head]) == token, (layer, head)
        assert bool(screen.changed[layer, head]) == (strip(token) != strip(baseline))


# -- the source value and the prompt-pass-only edit -------------------------------------------


def test_source_values_are_the_mean_of_captured_values(gqa):
    source = distinct_ids(7, seed=3)
    values = E.source_values(gqa, tuple(source))
    assert values.shape == (gqa.n_layers, gqa.n_kv_heads, gqa.d_head)
    assert torch.allclose(values, source_mean(gqa, source), atol=1e-6)
    # by hand: the value projection of the normed residual stream entering the layer
    layer = 1
    resid = gqa.run(torch.tensor([source]), capture=[f"blocks.{layer}.resid_pre"]).cache[f"blocks.{layer}.resid_pre"]
    block = gqa.hf.model.layers[layer]
    with torch.no_grad():
        v = block.self_attn.v_proj(block.input_layernorm(resid))[0].view(len(source), gqa.n_kv_heads, gqa.d_head)
    assert torch.allclose(values[layer], v.mean(0), atol=1e-5)


def test_value_edit_holds_in_the_prompt_pass_only(gqa):
    """During generation the edited value stays the prompt's at the position; the values of
    generated tokens are those a plain forward of the whole sequence (edited at the position)
    computes, with nothing added."""
    source, target, position, layer, head = distinct_ids(8, 4), distinct_ids(9, 5), 3, 0, 2
    mean = E.source_values(gqa, tuple(source))
    site = f"blocks.{layer}.attn.v"
    edit = E.value_edit(gqa, layer, head, mean[layer, 1], 4.0, position)
    out = gqa.generate(torch.tensor([target]), [edit], capture=[site], max_new_tokens=6, min_new_tokens=6)
    generated = out.cache[site]  # every position the last step attended to (not the last token)
    full = out.ids[:, :-1]
    edited = gqa.run(full, capture=[site], interventions=[edit]).cache[site]
    plain = gqa.run(full, capture=[site]).cache[site]
    assert generated.shape == edited.shape == (1, len(target) + 5, gqa.n_kv_heads, gqa.d_head)
    assert torch.allclose(generated, edited, atol=1e-5)
    assert torch.allclose(edited[0, position, 1] - plain[0, position, 1], 4.0 * mean[layer, 1], atol=1e-5)
    assert torch.allclose(edited[0, len(target) :, 0], plain[0, len(target) :, 0], atol=1e-5)  # other KV head


# -- the sweep equals the naive loop ------------------------------------------------------------


def naive_sweep(model, experiment: E.EditExperiment, sample: bool, seed: int, new_tokens: int):
    """The notebook's loop: first token per head (argmax, or one sampled token after seeding),
    then one generation per candidate; returns the candidates and each one's generated ids."""
    source, target = list(experiment.source), list(experiment.target)
    position = E.phrase_position(model, experiment.target, experiment.phrase)
    mean = source_mean(model, source)
    ids = torch.tensor([target])
    kw = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0} if sample else {}

    def generate(interventions, n):
        if sample:
            torch.manual_seed(seed)
        return model.generate(ids, interventions, max_new_tokens=n, **kw).ids[0].tolist()

    baseline = generate([], 1)[-1]
    texts = {}
    for layer in range(model.n_layers):
        for head in range(model.n_heads):
            iv = plain_edit(model, layer, head, mean, experiment.coeff, position)
            if generate([iv], 1)[-1] != baseline:
                texts[layer, head] = generate([iv], new_tokens)
    return texts


@pytest.mark.parametrize("sample, coeff", [(False, 4.0), (True, 6.0)])
def test_sweep_equals_naive_loop_gqa(gqa, sample, coeff):
    source, target = distinct_ids(8, seed=7), distinct_ids(10, seed=107)
    base = E.EditExperiment(tuple(source), tuple(target), tuple(target[2:4]), (0,), coeff)
    texts = naive_sweep(gqa, base, sample, seed=42, new_tokens=8)
    assert texts, "no candidates: the comparison would mean little"
    # a trigger (not in the prompt) that some candidates generate and others do not
    counts: dict[int, int] = {}
    for ids in texts.values():
        for t in set(ids[len(target) :]) - set(target):
            counts[t] = counts.get(t, 0) + 1
    trigger = min(counts, key=lambda t: abs(counts[t] - len(texts) / 2))
    experiment = E.EditExperiment(base.source, base.target, base.phrase, (trigger,), base.coeff)
    result = E.temporal_edit(gqa, [experiment], sample=sample, seed=42, max_new_tokens=8)
    (outcome,) = result.outcomes
    assert set(outcome.candidates) == set(texts)
    naive_successes = {h for h, ids in texts.items() if trigger in ids}
    assert 0 < len(naive_successes) < len(texts)
    assert set(outcome.successes) == naive_successes
    for (layer, head), ids in texts.items():
        assert outcome.texts[f"a{layer}.h{head}"] == " ".join(map(str, ids[len(target) :]))
    assert result.successes.sum() == len(naive_successes)


def test_generated_tokens_follow_from_the_edit_at_the_position_only(gqa):
    """Teacher forcing the generated continuation, with the edit at the position alone,
    reproduces every generated token; with the edit at every later position too, it does not."""
    source, target = distinct_ids(8, seed=20), distinct_ids(10, seed=120)
    experiment = E.EditExperiment(tuple(source), tuple(target), tuple(target[2:4]), (0,), 4.0)
    result = E.temporal_edit(gqa, [experiment], max_new_tokens=8)
    (outcome,) = result.outcomes
    assert outcome.candidates
    mean = source_mean(gqa, source)
    differs = False
    for layer, head in outcome.candidates:
        new = [int(t) for t in outcome.texts[f"a{layer}.h{head}"].split()]
        full = torch.tensor([target + new])
        only = plain_edit(gqa, layer, head, mean, 4.0, 3)
        every = plain_edit(gqa, layer, head, mean, 4.0, 3, positions=list(range(3, full.shape[1])))
        predicted = gqa.run(full, interventions=[only]).logits[0, len(target) - 1 : -1].argmax(-1)
        assert predicted.tolist() == new[: len(predicted)]
        wrong = gqa.run(full, interventions=[every]).logits[0, len(target) - 1 : -1].argmax(-1)
        differs |= wrong.tolist() != new[: len(wrong)]
    assert differs, "editing later positions too would have gone unnoticed"


# -- experiments: the paper's set and JSONL files -------------------------------------------------


def test_default_experiments_are_the_notebooks_15(smollm2):
    experiments = E.default_experiments()
    assert len(experiments) == 15
    assert [e.coeff for e in experiments] == [1.0] * 5 + [3.0] * 5 + [6.0] * 5
    assert [e.trigger for e in experiments[:5]] == ["Medvedev", "Medvedev", "Madrid", "Galaxy", "Chelsea"]
    for e, again in zip(experiments[:5], experiments[5:10]):
        assert (e.source, e.target, e.phrase, e.trigger) == (again.source, again.target, again.phrase, again.trigger)
    assert experiments[0] == E.EditExperiment(
        "In 2009, the name of president of South Korea was",
        "In 2009, the name of president of Russia was",
        "In 2009",
        "Medvedev",
        1.0,
    )
    assert all(E.phrase_position(smollm2, e.target, e.phrase) == 5 for e in experiments)
    assert all(E.experiment_from_dict(e.to_json()) == e for e in experiments)


def test_phrase_not_in_the_target_is_skipped(gqa):
    target = distinct_ids(9, seed=10)
    missing = E.EditExperiment(tuple(distinct_ids(5, 11)), tuple(target), (target[3], target[1]), (4,), 1.0)
    assert E.phrase_position(gqa, missing.target, missing.phrase) == -1
    assert E.screen_heads(gqa, missing).position == -1
    result = E.temporal_edit(gqa, [missing])
    assert result.outcomes[0].position == -1 and not result.outcomes[0].candidates
    assert "1 skipped" in result.text()


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"source_prompt": "a", "target_prompt": "b", "subject_phrase": "b", "trigger_word": "c"}', "{oops"],
         ":2: malformed JSON"),
        (['{"source_prompt": "a", "target_prompt": "b", "subject_phrase": "b"}'], ":1: missing field 'trigger_word'"),
        (['{"source_prompt": "a", "target_prompt": "b", "subject_phrase": "b", "trigger_word": "c", "coef": 3}'],
         ":1: unknown field 'coef'"),
        (['{"source_prompt": "a", "target_prompt": "b", "subject_phrase": "b", "trigger_word": "c", "coeff": "3"}'],
         ":1: field 'coeff' must be a finite number"),
        (['{"source_prompt": 5, "target_prompt": "b", "subject_phrase": "b", "trigger_word": "c"}'],
         ":1: field 'source_prompt' must be a non-empty string or a non-empty list of token ids"),
        (["", "[1, 2]"], ":2: expected a JSON object"),
        ([""], ": no experiments"),
    ],
)  # fmt: skip
def test_jsonl_errors_name_file_and_line(tmp_path, lines, message):
    path = tmp_path / "edits.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LmscopeError) as info:
        E.load_experiments(path)
    text = str(info.value)
    assert text.startswith(str(path)) and message in text and "\n" not in text


def test_jsonl_file_loads(tmp_path):
    path = tmp_path / "edits.jsonl"
    rows = [
        {
            "source_prompt": "In 2001, X",
            "target_prompt": "In 2001, Y",
            "subject_phrase": "In 2001",
            "trigger_word": "Z",
        },
        {"source_prompt": [5, 6], "target_prompt": [7, 8, 9], "subject_phrase": [8], "trigger_word": [4], "coeff": 3},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    first, second = E.load_experiments(path)
    assert first.coeff == 1.0 and first.trigger == "Z"
    assert second == E.EditExperiment((5, 6), (7, 8, 9), (8,), (4,), 3.0)


# -- the result -----------------------------------------------------------------------------------


def test_result_is_typed_with_a_heatmap(gqa):
    source, target = distinct_ids(8, seed=7), distinct_ids(10, seed=107)
    experiments = [
        E.EditExperiment(tuple(source), tuple(target), tuple(target[2:4]), (target[0],), c) for c in (1.0, 4.0)
    ]
    result = E.temporal_edit(gqa, experiments, max_new_tokens=6)
    assert isinstance(result, lmscope.reports.results.Result)
    assert result.successes.shape == result.candidates.shape == (gqa.n_layers, gqa.n_heads)
    # the trigger is in the prompt: every candidate succeeds (the notebook checks the whole text)
    assert torch.equal(result.successes, result.candidates)
    assert int(result.candidates.sum()) == sum(len(o.candidates) for o in result.outcomes) > 0
    data = json.loads(json.dumps(result.to_json()))
    assert data["successes"] == result.successes.tolist() and len(data["experiments"]) == 2
    assert data["experiments"][1]["coeff"] == 4.0 and data["experiments"][1]["subject_phrase"] == target[2:4]
    (figure,) = result.figures()
    assert figure.kind == "heatmap" and len(figure.z) == gqa.n_heads and len(figure.z[0]) == gqa.n_layers
    heads, per_experiment = result.tables()
    assert heads.rows[0]["successes"] == int(result.successes.max())
    assert len(per_experiment.rows) == 2
    assert "<img" in result._repr_html_()


# -- ground truth: a model trained on synthetic year-dependent facts -----------------------------


def test_injecting_a_source_year_through_the_year_heads_flips_the_answer():
    """In the synthetic world (tests/temporal/synthetic.py) the leader depends on (country,
    year). Injecting the values of a prompt about the same country in another year, at the
    target's year token, moves the answer toward that year's leader through the heads that read
    the year from the final position, and through no other head; the sweep's successes (the
    first token is that leader) are those heads'."""
    from tests.temporal import synthetic as S

    model, world = S.trained_model(), S.WORLD
    facts = torch.tensor([f.ids for f in world.temporal_facts()])
    sites = [f"blocks.{layer}.attn.pattern" for layer in range(model.n_layers)]
    cache = model.run(facts, capture=sites).cache
    to_year = torch.stack([cache[s][:, :, -1, S.YEAR_POS].mean(0) for s in sites])  # [layer, head]
    year_heads = {tuple(h) for h in (to_year > 0.5).nonzero().tolist()}
    assert year_heads, "no head reads the year: the model did not learn the task"

    rng = torch.Generator().manual_seed(0)
    cases = []  # (country, source year, target year)
    while len(cases) < 24:
        s, y1, y2 = (int(i) for i in torch.randint(0, S.N_YEARS, (3,), generator=rng))
        if world.leader_of[s % S.N_SUBJECTS][y1] != world.leader_of[s % S.N_SUBJECTS][y2]:
            cases.append((s % S.N_SUBJECTS, y1, y2))
    coeff = 6.0
    shift = torch.zeros(model.n_layers, model.n_heads)  # mean change of logit[source's] - logit[target's]
    for s, y1, y2 in cases:
        mean = source_mean(model, list(world.temporal_ids(s, y1)))
        ids = torch.tensor([world.temporal_ids(s, y2)])
        new, old = world.leader_of[s][y1], world.leader_of[s][y2]
        base = model.run(ids).logits[0, -1]
        for layer in range(model.n_layers):
            for head in range(model.n_heads):
                iv = plain_edit(model, layer, head, mean, coeff, S.YEAR_POS)
                logits = model.run(ids, interventions=[iv]).logits[0, -1]
                shift[layer, head] += float((logits[new] - logits[old]) - (base[new] - base[old])) / len(cases)
    others = [shift[h].abs() for h in np.ndindex(*shift.shape) if h not in year_heads]
    assert min(float(shift[h]) for h in year_heads) > 1.0
    assert max(others) < 0.01

    experiments = [
        E.EditExperiment(world.temporal_ids(s, y1), world.temporal_ids(s, y2), (world.years[y2],),
                         (world.leader_of[s][y1],), coeff)
        for s, y1, y2 in cases
    ]  # fmt: skip
    result = E.temporal_edit(model, experiments, max_new_tokens=1)
    assert all(o.position == S.YEAR_POS for o in result.outcomes)
    succeeded = {tuple(h) for h in (result.successes > 0).nonzero().tolist()}
    assert succeeded and succeeded <= year_heads
