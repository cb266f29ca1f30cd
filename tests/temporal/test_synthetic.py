"""Ground truth for the Temporal Heads workflow, on a model trained here (synthetic.py).

What later tests may rely on, each checked against something independent of lmscope's circuit
algorithms (plain forwards, attention-pattern captures and zero-ablation only):

* the world is what it claims: clean/corrupted prompts differ in one token, and a reader that
  knows the country but not the year is right in exactly ``TEMPORAL_CHANCE`` of the facts;
* the model recalls both kinds of fact, and each pair's clean and corrupted prompts prefer their
  own answer;
* some head attends from the final position to the year;
* zeroing the heads that attend to the year (found from the pattern) brings temporal recall down
  to chance while the model still names a leader *of the right country* and still knows every
  colour: those heads carry the year and nothing the other facts need.
"""

from __future__ import annotations

from collections import Counter

import torch

from tests.temporal import synthetic as syn
from tests.temporal.synthetic import WORLD


def test_chance_is_what_a_year_blind_reader_gets():
    facts = WORLD.temporal_facts()
    best = 0
    for s in range(syn.N_SUBJECTS):
        leaders = [f.answer for f in facts if f.subject == s]
        assert set(leaders) == set(WORLD.leaders_of(s)) and len(set(leaders)) == syn.TERMS
        best += Counter(leaders).most_common(1)[0][1]  # always naming the longest-serving leader
    assert best / len(facts) == syn.TEMPORAL_CHANCE
    # no leader serves two countries, so "a leader of the right country" is well defined
    assert len(set(WORLD.leaders)) == syn.N_SUBJECTS * syn.TERMS


def test_pairs_differ_in_one_token():
    for pairs, where in ((WORLD.temporal_pairs(), syn.YEAR_POS), (WORLD.invariant_pairs(), syn.SUBJECT_POS)):
        assert len(pairs) > 0
        for p in pairs:
            assert p.clean.shape == p.corrupt.shape == (syn.PROMPT_LEN,)
            assert p.clean[0] == p.corrupt[0] == syn.BOS
            assert (p.clean != p.corrupt).nonzero().flatten().tolist() == [where]
            assert p.answer.shape == p.wrong.shape == (1,) and p.answer != p.wrong
            assert p.clean_mask.all() and p.corrupt_mask.all()
    assert len(WORLD.temporal_pairs()) == syn.N_SUBJECTS * syn.N_YEARS
    first = WORLD.temporal_pairs(syn.N_SUBJECTS)  # one per country, in different years
    assert len({int(p.clean[syn.SUBJECT_POS]) for p in first}) == len({int(p.clean[syn.YEAR_POS]) for p in first}) == 8


def test_training_is_deterministic():
    a, b = (syn.train_temporal_model(steps=3).hf.state_dict() for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_model_recalls_both_kinds(temporal_model):
    assert syn.temporal_recall(temporal_model) >= 0.95
    assert syn.invariant_recall(temporal_model) >= 0.95


def test_each_prompt_of_a_pair_prefers_its_own_answer(temporal_model):
    for pairs in (WORLD.temporal_pairs(), WORLD.invariant_pairs()):
        clean = torch.stack([p.clean for p in pairs])
        corrupt = torch.stack([p.corrupt for p in pairs])
        answer = torch.stack([p.answer for p in pairs])
        wrong = torch.stack([p.wrong for p in pairs])
        for ids, mine, other in ((clean, answer, wrong), (corrupt, wrong, answer)):
            logits = temporal_model.run(ids).logits[:, -1]
            assert (logits.gather(1, mine) > logits.gather(1, other)).all()


def test_a_head_attends_from_the_final_position_to_the_year(temporal_model):
    layer = syn.ATTN_LAYER
    ids = syn.facts_ids(WORLD.temporal_facts())
    pattern = temporal_model.run(ids, capture=[f"blocks.{layer}.attn.pattern"]).cache[f"blocks.{layer}.attn.pattern"]
    to_year = pattern[:, :, -1, syn.YEAR_POS].mean(0)  # [heads]
    assert float(to_year.max()) >= 0.3
    assert torch.allclose(syn.year_attention(temporal_model)[layer], to_year)


def test_zeroing_the_year_heads_removes_the_year_and_nothing_else(temporal_model):
    heads = syn.year_heads(temporal_model)
    # concentrated: some but not all heads of the attention layer read the year
    assert 0 < len(heads) < temporal_model.n_heads
    ablate = syn.zero_heads(heads)
    # the year is gone: no better than always naming one leader of the country
    assert syn.temporal_recall(temporal_model, ablate) <= 1.5 * syn.TEMPORAL_CHANCE
    # ... but the country is not: the answer is still one of its leaders
    facts = WORLD.temporal_facts()
    named = syn.predictions(temporal_model, facts, ablate).tolist()
    own = sum(leader in WORLD.leaders_of(f.subject) for leader, f in zip(named, facts, strict=True))
    assert own / len(facts) >= 0.9
    # ... and time-invariant facts do not need these heads
    assert syn.invariant_recall(temporal_model, ablate) >= 0.9
