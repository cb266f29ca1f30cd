"""Feature dashboards, on a tiny word-level model with a planted dictionary whose feature i fires
(with activation i + 1) exactly on token t_i: top contexts, densities and histograms against hand
counts over the corpus, logit effects against the unembedding by hand, the page self-contained,
its search box in Chromium."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers as T

import lmscope
from lmscope.features import Dictionary, save_dictionary
from lmscope.features.show import dashboard, evaluation_tables, render
from tests.browser import artifacts_dir, open_report
from tests.helpers import read_results, run_cli, word_tokenizer

WORDS = ["<pad>", "<bos>", "<eos>", *[f"w{i}" for i in range(21)]]
FIRES = [5, 9, 3, 12, 20, 7, 15, 2]  # t_i; token 2 (<eos>) never occurs in the corpus: feature 7 is dead
SITE = "blocks.0.resid_pre"


@pytest.fixture(scope="module")
def model() -> lmscope.Model:
    torch.manual_seed(0)
    config = T.LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    hf = T.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        hf.model.norm.weight.copy_(1 + 0.5 * torch.randn(32))  # a final norm gain that matters
    return lmscope.Model(hf, tokenizer=word_tokenizer(WORDS), source="planted features", name="tiny-words")


@pytest.fixture(scope="module")
def planted(model) -> Dictionary:
    """Feature i reads the dual basis vector of token t_i's embedding (24 independent embeddings in
    32 dimensions): its pre-activation is i + 1 on t_i and 0 on every other token."""
    E = model.hf.model.embed_tokens.weight.detach()
    dual = torch.linalg.pinv(E)  # [32, 24], E @ dual = I
    d = Dictionary(32, len(FIRES), "jumprelu", apply_b_dec_to_input=False, site=SITE)
    with torch.no_grad():
        for i, t in enumerate(FIRES):
            d.W_enc[:, i] = dual[:, t] * (i + 1)
        d.threshold.fill_(0.5)
        d.W_dec.copy_(torch.randn(len(FIRES), 32, generator=torch.Generator().manual_seed(1)))
    return d


def _windows(n=24, length=16, seed=0):
    return torch.randint(3, len(WORDS), (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def dash(model, planted):
    return dashboard(model, planted, _windows(), contexts=5, before=3, after=2, logits=6, bins=10, name="planted")


def test_feature_i_fires_on_t_i_only(dash):
    windows = _windows()
    counted = windows[:, 1:]  # the first token of every window is left out
    assert [c.feature for c in dash.cards] == [0, 1, 2, 3, 4, 5, 6]  # feature 7 never fires
    for card in dash.cards:
        t = FIRES[card.feature]
        hand = int((counted == t).sum())
        assert card.density == hand / counted.numel()
        assert dash.densities[card.feature] == card.density
        assert sum(card.counts) == hand  # the histogram counts every firing
        assert card.max_act == pytest.approx(card.feature + 1, rel=1e-4)
        assert card.top_token == WORDS[t]
        assert {c.tokens[c.peak] for c in card.contexts} == {WORDS[t]}
        windows_with_t = int((counted == t).any(1).sum())
        assert len(card.contexts) == min(5, windows_with_t)  # one context per window
        for c in card.contexts:
            w = windows[c.window]
            assert c.tokens == words_of(w[max(0, c.position - 3) : c.position + 3])
            start = c.position - c.peak  # the context's first position in its window; position 0 is left out
            fires = [x == WORDS[t] and start + k >= 1 for k, x in enumerate(c.tokens)]
            assert c.acts == [pytest.approx(card.feature + 1, rel=1e-4) if f else 0.0 for f in fires]
    assert dash.densities[7] == 0 and dash.dead_fraction == 1 / 8


def words_of(ids):
    """The words of token ids."""
    return [WORDS[int(i)] for i in ids]


def test_logit_effects_are_the_unembedding_of_the_decoder_row_through_the_final_norm(model, planted, dash):
    W_U, g = model.hf.lm_head.weight.detach(), model.hf.model.norm.weight.detach()
    for card in dash.cards:
        hand = W_U @ (g * planted.W_dec[card.feature].detach())
        top, bottom = hand.topk(6), (-hand).topk(6)
        assert [t for t, _ in card.top_logits] == words_of(top.indices)
        assert [v for _, v in card.top_logits] == pytest.approx(top.values.tolist(), rel=1e-5, abs=1e-6)
        assert [t for t, _ in card.bottom_logits] == words_of(bottom.indices)
        assert [v for _, v in card.bottom_logits] == pytest.approx((-bottom.values).tolist(), rel=1e-5, abs=1e-6)


def _card_html(page: str, feature: int) -> str:
    start = page.index(f'id="feature-{feature}"')
    end = page.find('<div class="card"', start)
    return page[start : end if end > 0 else len(page)]


def test_the_page_shows_each_top_token_and_is_self_contained(dash):
    page = render(dash)
    for card in dash.cards:
        block = _card_html(page, card.feature)
        peak = re.search(r'<span class="tok peak"[^>]*>([^<]*)</span>', block).group(1)
        assert peak == WORDS[FIRES[card.feature]]
        assert f"density {card.density:.3%}" in block
    assert not re.search(r"https?://", page)
    assert all(target.startswith("#") for target in re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page))
    assert 'id="feature-search"' in page and "<script src" not in page
    assert html_in_iframe(dash)


def html_in_iframe(dash) -> bool:
    shown = dash._repr_html_()
    return shown.startswith("<iframe") and "srcdoc=" in shown and "feature-search" in shown


def test_the_evaluation_table_comes_from_an_eval_results_json(tmp_path):
    payload = {"command": "features eval", "parts": {"metrics": {"l0": 32.0, "fvu": 0.21, "rows": [{"k": 1}]}}}
    (tmp_path / "results.json").write_text(json.dumps(payload))
    tables = evaluation_tables(tmp_path)
    assert [t.caption for t in tables] == ["evaluation: metrics", "evaluation: metrics, rows"]
    assert {"measure": "fvu", "value": 0.21} in tables[0].rows
    (tmp_path / "results.json").write_text(json.dumps({"command": "steer", "parts": {}}))
    assert evaluation_tables(tmp_path) == []


def test_show_command_writes_the_dashboard(capsys, model, planted, tmp_path):
    model.hf.save_pretrained(tmp_path / "model")
    model.tokenizer.save_pretrained(tmp_path / "model")
    save_dictionary(planted, tmp_path / "sae")
    (tmp_path / "sae" / "eval").mkdir()
    (tmp_path / "sae" / "eval" / "results.json").write_text(
        json.dumps({"command": "features eval", "parts": {"metrics": {"fvu": 0.125}}})
    )
    words = " ".join(words_of(_windows(40, 16, seed=3).flatten()))
    (tmp_path / "corpus.txt").write_text(words)
    code, _, err = run_cli(
        capsys, "features", "show", str(tmp_path / "model"), "--dict", str(tmp_path / "sae"), "--corpus",
        str(tmp_path / "corpus.txt"), "--tokens", "400", "--window", "16", "--features", "4,0,7", "--out",
        str(tmp_path / "out"),
    )  # fmt: skip
    assert code == 0, err
    part = read_results(tmp_path / "out")["parts"]["dashboard"]
    assert [c["feature"] for c in part["cards"]] == [4, 0, 7]
    assert part["cards"][2]["contexts"] == []  # feature 7 asked for, never fired
    page = (tmp_path / "out" / "dashboard.html").read_text()
    assert "never fired on the corpus" in _card_html(page, 7)
    assert "Evaluation" in page and "0.125" in page


@pytest.mark.browser
def test_the_search_box_filters_the_features_in_chromium(dash, tmp_path):
    path = tmp_path / "dashboard.html"
    path.write_text(render(dash))
    with open_report(path) as (page, errors):
        visible = "() => Array.from(document.querySelectorAll('.card')).filter(c => c.offsetParent !== null).length"
        assert page.evaluate(visible) == 7
        assert page.inner_text("#feature-count") == "7 of 7 features"
        page.fill("#feature-search", "zzz")
        assert page.evaluate(visible) == 0
        page.fill("#feature-search", "feature 4")
        assert page.evaluate(visible) == 1 and page.is_visible("#feature-4")
        page.fill("#feature-search", "")
        assert page.evaluate(visible) == 7
        page.screenshot(path=str(artifacts_dir() / "feature_dashboard.png"), full_page=True)
        assert errors == []
