"""Multiple-choice recall (notebook 5 of "Temporal Heads"): batched, padded scores against
separate unpadded forwards of the plain Hugging Face model."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from lmscope.core.errors import LmscopeError
from lmscope.core.interventions import zero
from lmscope.temporal.data import bundled, load_categories, load_category
from lmscope.temporal.recall import ANSWER_PREFIX, recall, sequence_logprobs

TINY = {
    "name": "tiny presidents",
    "prompt_templates": ["In year {time}, the president of {subject} was"],
    "prompt_templates_zs": ["In year {time}, who was the president of {subject}?"],
    "samples": [
        {"subject": "France", "object": "Jacques Chirac", "time": "1999"},
        {"subject": "France", "object": "Nicolas Sarkozy", "time": "2008"},
        {"subject": "United States", "object": "George W. Bush", "time": "2004"},
    ],
    "alias_time_templates": [],
    "all_possible_objects": [
        {"subject": "France", "objects": ["Jacques Chirac", "Nicolas Sarkozy", "François Hollande"]},
        {"subject": "United States", "objects": ["Bill Clinton", "George W. Bush", "Barack Obama", "Al"]},
    ],
}


def _reference_logprob(model, ids: list[int], hooks=()) -> float:
    """Summed log p of a sequence's tokens after its first: one unpadded forward of the HF model."""
    x = torch.tensor([ids])
    with torch.no_grad(), model.hooks([], list(hooks)):
        logits = model.hf(input_ids=x).logits[0].double()
    return float(logits[:-1].log_softmax(-1).gather(-1, x[0, 1:, None]).sum())


def _reference_scores(model, prompt: str, candidates: list[str], hooks=()) -> torch.Tensor:
    """score(c) = log p(BOS + prompt + " " + c) - log p(BOS + prompt), each sequence alone."""
    tok = lambda text: model.bos_ids() + model.tokenizer(text, add_special_tokens=False)["input_ids"]
    base = _reference_logprob(model, tok(prompt), hooks)
    return torch.tensor([_reference_logprob(model, tok(f"{prompt} {c}"), hooks) - base for c in candidates])


def test_padded_batches_equal_separate_unpadded_forwards(smollm2):
    texts = [
        "The capital of France is Paris",
        "Hi",
        "In year 1999, the president of South Korea was Kim Dae-jung",
        "A b",
    ]
    seqs = [smollm2.bos_ids() + smollm2.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    got = sequence_logprobs(smollm2, seqs, batch_size=3)  # lengths mixed within a batch
    want = torch.tensor([_reference_logprob(smollm2, s) for s in seqs], dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-5)


def test_recall_matches_separate_forwards_per_candidate(smollm2, tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    category, problems = load_category(path)
    assert problems == []
    result = recall(smollm2, [category], templates="prompt_templates", batch_size=5)
    (got,) = result.categories
    assert (got.name, got.kind, got.n) == ("tiny presidents", "temporal", 3)
    for sample, row in zip(category.samples, got.predictions, strict=True):
        prompt = f"In year {sample.time}, the president of {sample.subject} was"
        names = list(category.candidates(sample.subject))
        scores = _reference_scores(smollm2, prompt, names)
        assert row["predicted"] == names[int(scores.argmax())]
        assert abs(row["p_gold"] - float(scores.softmax(0)[names.index(sample.object)])) < 1e-4
    accuracy = sum(r["predicted"] == r["object"] for r in got.predictions) / 3
    assert (
        got.accuracy == accuracy and abs(got.gold_probability - sum(r["p_gold"] for r in got.predictions) / 3) < 1e-12
    )
    assert abs(got.chance - (1 / 3 + 1 / 3 + 1 / 4) / 3) < 1e-12
    assert not result.chat


def test_question_templates_go_through_the_chat_template(smollm2, tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    category, _ = load_category(path)
    result = recall(smollm2, [category], templates="prompt_templates_zs")
    assert result.chat
    sample, row = category.samples[2], result.categories[0].predictions[2]
    user = {"role": "user", "content": "In year 2004, who was the president of United States?"}
    render = smollm2.tokenizer.apply_chat_template
    ids = lambda text: smollm2.tokenizer(text, add_special_tokens=False)["input_ids"]
    prompt = ids(render([user], tokenize=False, add_generation_prompt=True))
    assert prompt[:1] == smollm2.bos_ids()  # the template starts with SmolLM2's BOS (<|im_start|>)
    base = _reference_logprob(smollm2, prompt)
    names = category.candidates(sample.subject)
    scores = torch.tensor(
        [
            _reference_logprob(
                smollm2, ids(render([user, {"role": "assistant", "content": ANSWER_PREFIX + c}], tokenize=False))
            )
            - base
            for c in names
        ]
    )
    assert abs(row["p_gold"] - float(scores.softmax(0)[names.index(sample.object)])) < 1e-4
    plain = recall(smollm2, [category], templates="prompt_templates_zs", chat=False)
    assert not plain.chat and plain.categories[0].predictions[2]["p_gold"] != row["p_gold"]


def test_interventions_apply_to_every_forward(smollm2, tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({**TINY, "samples": TINY["samples"][:1]}))
    category, _ = load_category(path)
    ablate = [zero("blocks.3.attn.z", head=h) for h in range(smollm2.n_heads)]
    result = recall(smollm2, [category], templates="prompt_templates", interventions=ablate)
    names = list(category.candidates("France"))
    scores = _reference_scores(smollm2, "In year 1999, the president of France was", names, hooks=ablate)
    assert abs(result.categories[0].predictions[0]["p_gold"] - float(scores.softmax(0)[0])) < 1e-4
    clean = recall(smollm2, [category], templates="prompt_templates")
    assert abs(clean.categories[0].predictions[0]["p_gold"] - result.categories[0].predictions[0]["p_gold"]) > 1e-4


def test_result_is_typed_and_serialisable(smollm2):
    roman, _ = bundled("roman")
    roman = type(roman)(roman.name, roman.prompt_templates, roman.prompt_templates_zs, roman.samples[:4])
    result = recall(smollm2, [roman], templates="prompt_templates")
    payload = json.loads(json.dumps(result.to_json()))
    assert payload["categories"][0]["n"] == 4 and payload["templates"] == "prompt_templates"
    assert payload["categories"][0]["chance"] == pytest.approx(1 / 4)  # every object of the (cut) category
    assert result.tables()[0].rows[0]["category"] == "roman_numerals"
    assert "accuracy" in result.text() and result.figures()[0].kind == "bars"
    with pytest.raises(LmscopeError, match="templates must be"):
        recall(smollm2, [roman], templates="prompt_templates_general")
    with pytest.raises(LmscopeError, match="no template"):
        recall(smollm2, [roman], templates="prompt_templates", template=3)


@pytest.mark.slow
def test_smollm2_recall_of_temporal_facts_is_near_chance(smollm2):
    """SmolLM2-135M knows few of these time-specific facts (presidents and CEOs, the paper's
    examples): its top-1 accuracy stays far from perfect and its mean gold probability within a
    loose band around chance."""
    categories = [c for c in load_categories(kind="temporal")[0] if "leadership" in c.name]
    assert len(categories) == 2
    categories = [dataclasses.replace(c, samples=c.samples[::2]) for c in categories]  # every other fact
    result = recall(smollm2, categories, templates="prompt_templates")
    for c in result.categories:
        assert c.n > 0 and 0 <= c.accuracy <= 1 and math.isfinite(c.gold_probability)
    mean = lambda key: sum(getattr(c, key) for c in result.categories) / len(result.categories)
    assert mean("accuracy") < 0.5
    assert mean("gold_probability") < 3 * mean("chance") + 0.1
