"""Feature dashboards: one self-contained HTML page per dictionary, offline (``lmscope features show``).

A corpus pass (windows of WikiText-2 or any text, :mod:`lmscope.core.corpus`) with the dictionary
attached (:func:`lmscope.features.attach`) records every nonzero feature activation; then, per
feature shown:

- its **top-activating contexts**: the windows where it peaks highest (one context per window),
  the tokens around the peak each highlighted with a background whose intensity is the feature's
  activation there over its largest activation;
- the **histogram** of its nonzero activations and its **density** (the fraction of tokens where
  it is nonzero; the first ``skip_first`` tokens of every window, whose activations are outsized,
  are left out of every statistic);
- its **logit effects**: the tokens its decoder row raises and lowers most,
  ``logit_scale * W_U @ (g * W_dec[i])`` through the final norm's gain ``g``
  (:func:`lmscope.features.vocab.logit_effects`, SAELens's and Neuronpedia's ``fold_ln``
  convention, the same for every family).

The page (:meth:`Dashboard.html`, drawn with :class:`lmscope.reports.html.Report`, no network) has
an index of the features with a search box (client-side: a feature id, or text of its top tokens),
a card per feature, and the evaluation tables of ``lmscope features eval`` when its
``results.json`` is in the dictionary's folder (or its ``eval`` subfolder). In Jupyter a
:class:`Dashboard` shows the same page.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from lmscope.core.corpus import BUNDLED, load_corpus
from lmscope.core.errors import LmscopeError
from lmscope.core.model import Model
from lmscope.core.progress import progress_bar
from lmscope.features.dictionary import Dictionary
from lmscope.features.formats import load_dictionary
from lmscope.features.sites import attach
from lmscope.features.vocab import logit_effects, token_texts
from lmscope.reports.command import Command, RunWriter, option
from lmscope.reports.figures import Figure
from lmscope.reports.html import Report, table_html
from lmscope.reports.results import Result, Table

LOGIT_NOTE = (
    "Logit effects: logit_scale * W_U @ (g * W_dec[i]), g the final norm's gain (SAELens/Neuronpedia's "
    "fold_ln convention, for every family; a LayerNorm also centres the row); mlp.post and attn.z rows first "
    "through the down- or output projection."
)


# -- the corpus pass ------------------------------------------------------------------------------


@dataclass
class Activations:
    """Every nonzero feature activation of a corpus pass, sorted by feature: ``token`` (index into
    the flattened windows), ``feature`` and ``value``, over ``windows`` [n, length]; ``counted``:
    the tokens the statistics count (all but each window's first ``skip_first``)."""

    windows: Tensor
    token: Tensor
    feature: Tensor
    value: Tensor
    counted: int
    d_sae: int

    def of(self, i: int) -> tuple[Tensor, Tensor]:
        """Feature ``i``'s ``(token indices, values)``."""
        start, stop = torch.searchsorted(self.feature, torch.tensor([i, i + 1])).tolist()
        return self.token[start:stop], self.value[start:stop]

    def counts(self) -> Tensor:
        """Per feature, the tokens where it is nonzero [d_sae]."""
        return torch.bincount(self.feature, minlength=self.d_sae)


def activations(
    model: Model,
    dictionary: Dictionary,
    windows: Tensor,
    *,
    skip_first: int = 1,
    batch_size: int = 8,
    max_nonzero: int = 50_000_000,
) -> Activations:
    """Run ``windows`` [n, length] (token ids) with ``dictionary`` attached and keep its nonzero
    feature activations (positions ``>= skip_first`` of each window); more than ``max_nonzero``
    of them is an error (fewer tokens, or a sparser dictionary)."""
    if windows.ndim != 2 or not 0 <= skip_first < windows.shape[1]:
        raise LmscopeError(f"windows must be [n, length] with length > skip_first; got {list(windows.shape)}")
    tokens, features, values = [], [], []
    total = 0
    with attach(model, dictionary, "dash") as attachment, torch.no_grad():
        entry = attachment.entries[0]
        site = str(entry.features)
        last = max(entry.site.layer, entry.out_site.layer)
        with progress_bar("feature activations", len(windows)) as advance:
            for b, batch in enumerate(windows.split(batch_size)):
                f = model.run(batch, [site], logits=False, stop_after=last).cache[site].float().cpu()
                f[:, :skip_first] = 0
                nz = f.nonzero()
                total += len(nz)
                if total > max_nonzero:
                    raise LmscopeError(f"more than {max_nonzero} nonzero feature activations: use fewer tokens")
                tokens.append((b * batch_size + nz[:, 0]) * windows.shape[1] + nz[:, 1])
                features.append(nz[:, 2])
                values.append(f[nz[:, 0], nz[:, 1], nz[:, 2]])
                advance(len(batch))
    feature = torch.cat(features)
    order = torch.argsort(feature, stable=True)
    counted = windows.shape[0] * (windows.shape[1] - skip_first)
    return Activations(windows, torch.cat(tokens)[order], feature[order], torch.cat(values)[order], counted,
                       dictionary.d_sae)  # fmt: skip


# -- the dashboard ---------------------------------------------------------------------------------


@dataclass
class Context:
    """A stretch of a window around a feature's peak there: token texts, the feature's activation
    at each, the peak's index in ``tokens``, and where it is (window, position)."""

    tokens: list[str]
    acts: list[float]
    peak: int
    window: int
    position: int


@dataclass
class FeatureCard:
    """What the dashboard shows of one feature."""

    feature: int
    density: float
    max_act: float
    mean_act: float
    edges: list[float]
    counts: list[int]
    contexts: list[Context]
    top_logits: list[tuple[str, float]] = field(default_factory=list)
    bottom_logits: list[tuple[str, float]] = field(default_factory=list)

    @property
    def top_token(self) -> str | None:
        """The token at the peak of its top context."""
        return self.contexts[0].tokens[self.contexts[0].peak] if self.contexts else None


def _contexts(acts: Activations, texts: list[str], i: int, n: int, before: int, after: int) -> list[Context]:
    tokens, values = acts.of(i)
    length = acts.windows.shape[1]
    value_at = dict(zip(tokens.tolist(), values.tolist(), strict=True))
    picked: dict[int, int] = {}  # window -> flat index of its peak, in order of decreasing peak
    for t in tokens[values.argsort(descending=True, stable=True)].tolist():
        if t // length not in picked:
            picked[t // length] = t
            if len(picked) == n:
                break
    out = []
    for w, t in picked.items():
        p = t % length
        lo, hi = max(0, p - before), min(length, p + after + 1)
        flat = range(w * length + lo, w * length + hi)
        out.append(Context([texts[k] for k in flat], [value_at.get(k, 0.0) for k in flat], p - lo, w, p))
    return out


def _card(acts: Activations, texts: list[str], i: int, contexts: int, before: int, after: int, bins: int) -> FeatureCard:
    _, values = acts.of(i)
    if len(values) == 0:
        return FeatureCard(i, 0.0, 0.0, 0.0, [], [], [])
    top = float(values.max())
    counts = torch.histc(values, bins=bins, min=0.0, max=top)
    edges = torch.linspace(0.0, top, bins + 1)
    return FeatureCard(i, len(values) / acts.counted, top, float(values.mean()), edges.tolist(),
                       [int(c) for c in counts], _contexts(acts, texts, i, contexts, before, after))  # fmt: skip


def _shown(counts: Tensor, features: list[int] | None, count: int) -> list[int]:
    if features is not None:
        bad = [i for i in features if not 0 <= i < len(counts)]
        if bad:
            raise LmscopeError(f"feature {bad[0]} out of range (the dictionary has {len(counts)})")
        return list(dict.fromkeys(features))
    return [i for i in range(len(counts)) if counts[i] > 0][:count]


def evaluation_tables(folder: str | Path) -> list[Table]:
    """The tables of the ``lmscope features eval`` run whose ``results.json`` is in ``folder`` or
    its ``eval`` subfolder (none if there is none): per part, its numbers, and each list of rows."""
    for path in (Path(folder) / "results.json", Path(folder) / "eval" / "results.json"):
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(payload, dict) or "eval" not in str(payload.get("command", "")):
            continue
        tables = []
        for name, part in (payload.get("parts") or {}).items():
            if not isinstance(part, dict):
                continue
            scalars = [{"measure": k, "value": v} for k, v in part.items() if isinstance(v, (int, float, str, type(None)))]
            if scalars:
                tables.append(Table(f"evaluation: {name}", scalars))
            for key, rows in part.items():
                if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
                    tables.append(Table(f"evaluation: {name}, {key}", rows))
        return tables
    return []


@dataclass
class Dashboard(Result):
    """The dashboard of one dictionary over a corpus (module docstring): the density of every
    feature, a :class:`FeatureCard` per feature shown, and the evaluation tables."""

    model: str
    dictionary: str
    site: str
    corpus: str
    tokens: int
    densities: list[float]
    cards: list[FeatureCard]
    evaluation: list[Table] = field(default_factory=list)
    logit_note: str = LOGIT_NOTE

    def to_json(self) -> dict:
        return {
            "model": self.model, "dictionary": self.dictionary, "site": self.site, "corpus": self.corpus,
            "tokens": self.tokens, "dead_fraction": self.dead_fraction, "densities": self.densities,
            "cards": [asdict(card) for card in self.cards], "evaluation": [asdict(t) for t in self.evaluation],
            "logit_note": self.logit_note,
        }  # fmt: skip

    @property
    def dead_fraction(self) -> float:
        """The fraction of features that never fired on the corpus."""
        return sum(d == 0 for d in self.densities) / max(len(self.densities), 1)

    def text(self) -> str:
        return (f"{self.dictionary} at {self.site} of {self.model}: {len(self.cards)} of {len(self.densities)} "
                f"features shown over {self.tokens} tokens of {self.corpus or 'the given windows'}; "
                f"{self.dead_fraction:.1%} never fired.")  # fmt: skip

    def index_rows(self) -> list[dict]:
        """One row per feature shown: density, largest activation, top context tokens, logit effects."""
        return [{
            "feature": c.feature, "density": c.density, "max": c.max_act,
            "top contexts": " ".join(repr(t) for t in dict.fromkeys(x.tokens[x.peak] for x in c.contexts)),
            "promotes": " ".join(repr(t) for t, _ in c.top_logits[:5]),
            "suppresses": " ".join(repr(t) for t, _ in c.bottom_logits[:5]),
        } for c in self.cards]  # fmt: skip

    def tables(self) -> list[Table]:
        return [Table("features shown", self.index_rows()), *self.evaluation]

    def figures(self) -> list[Figure]:
        alive = [math.log10(d) for d in self.densities if d > 0]
        if not alive:
            return []
        lo, hi = math.floor(min(alive)), math.ceil(max(alive) + 1e-9)
        edges = [lo + k * 0.25 for k in range(int((hi - lo) / 0.25) + 1)]
        counts = [sum(a <= x < a + 0.25 for x in alive) for a in edges[:-1]]
        return [Figure("feature_density", "bars", f"{self.dictionary}: feature density", "log10 density",
                       "features", x=[f"{a:g}" for a in edges[:-1]], series={"features": counts})]  # fmt: skip

    def html(self) -> str:
        """The dashboard page: one self-contained HTML document."""
        return render(self)

    def _repr_html_(self) -> str:
        return f'<iframe style="width:100%;height:800px;border:0" srcdoc="{html.escape(self.html(), quote=True)}"></iframe>'


def dashboard(
    model: Model,
    dictionary: Dictionary,
    windows: Tensor,
    *,
    features: list[int] | None = None,
    count: int = 50,
    contexts: int = 8,
    before: int = 12,
    after: int = 4,
    logits: int = 10,
    bins: int = 30,
    skip_first: int = 1,
    batch_size: int = 8,
    corpus: str = "",
    name: str = "",
    evaluation: list[Table] | None = None,
) -> Dashboard:
    """The :class:`Dashboard` of ``dictionary`` over ``windows`` [n, length] (token ids): the
    features listed, or the first ``count`` that fire; per feature ``contexts`` contexts of
    ``before`` tokens before and ``after`` after the peak, ``logits`` top and bottom logit effects,
    a histogram of ``bins`` bins."""
    if dictionary.site is None:
        raise LmscopeError("the dictionary does not say which site it reads (give --site)")
    acts = activations(model, dictionary, windows, skip_first=skip_first, batch_size=batch_size)
    counts = acts.counts()
    shown = _shown(counts, features, count)
    texts = token_texts(model, windows)
    cards = [_card(acts, texts, i, contexts, before, after, bins) for i in shown]
    if shown:
        try:
            effects = logit_effects(model, model.site(dictionary.out_site), dictionary.W_dec[shown].detach())
        except LmscopeError:
            effects = None  # a site whose writes have no logit effect here (a folded norm's space)
        if effects is not None:
            k = min(logits, effects.shape[1])
            for card, row in zip(cards, effects.cpu(), strict=True):
                up, down = row.topk(k), (-row).topk(k)
                card.top_logits = list(zip(token_texts(model, up.indices), up.values.tolist(), strict=True))
                card.bottom_logits = list(zip(token_texts(model, down.indices), (-down.values).tolist(), strict=True))
    site = dictionary.site + (f" -> {dictionary.out_site}" if dictionary.transcoder else "")
    return Dashboard(model.name, name or repr(dictionary), site, corpus, acts.counted,
                     (counts.double() / acts.counted).tolist(), cards, list(evaluation or []))  # fmt: skip


# -- the page -------------------------------------------------------------------------------------

_CSS = """
.dash-search { font-size: 1rem; padding: .4rem .6rem; width: 24rem; max-width: 100%; border: 1px solid #d0d7de;
  border-radius: 6px; }
.card { border: 1px solid #d0d7de; border-radius: 8px; padding: .6rem 1rem 1rem; margin: 1.25rem 0; }
.card h3 { margin: .2rem 0 .4rem; font-size: 1.1rem; }
.card .stats { color: #57606a; font-size: .9rem; margin: 0 0 .5rem; }
.card .row { display: flex; flex-wrap: wrap; gap: 1.5rem; align-items: flex-start; }
.ctx { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .85rem; white-space: pre-wrap;
  overflow-wrap: anywhere; margin: .15rem 0; padding: .15rem .3rem; border-bottom: 1px dotted #eaeef2; }
.tok { border-radius: 2px; }
.tok.peak { outline: 1px solid #bc4c00; font-weight: 600; }
.ctx .val { color: #57606a; font-size: .75rem; margin-right: .5rem; }
.logits td, .logits th { padding: .1rem .5rem; font-size: .85rem; }
"""

_SEARCH_JS = """
(function () {
  var box = document.getElementById("feature-search");
  var items = Array.prototype.slice.call(document.querySelectorAll("[data-search]"));
  var total = document.querySelectorAll(".card[data-search]").length;
  function apply() {
    var q = box.value.trim().toLowerCase(), shown = 0;
    items.forEach(function (el) {
      var ok = !q || el.dataset.feature === q || el.dataset.search.indexOf(q) >= 0;
      el.style.display = ok ? "" : "none";
      if (ok && el.classList.contains("card")) { shown += 1; }
    });
    document.getElementById("feature-count").textContent = shown + " of " + total + " features";
  }
  box.addEventListener("input", apply);
  apply();
})();
"""


def _visible(text: str) -> str:
    """A token's text for display: escaped, newlines and tabs shown as symbols."""
    return html.escape(text.replace("\n", "\u21b5").replace("\t", "\u2192"))


def _search_text(card: FeatureCard) -> str:
    words = [f"feature {card.feature}"] + [c.tokens[c.peak] for c in card.contexts] + [t for t, _ in card.top_logits]
    return html.escape(" ".join(w.strip() for w in words).lower(), quote=True)


def _histogram_svg(card: FeatureCard, width: int = 320, height: int = 110) -> str:
    if not card.counts:
        return ""
    top = max(card.counts) or 1
    bar = width / len(card.counts)
    rects = "".join(
        f'<rect x="{k * bar:.1f}" y="{height - 18 - (height - 28) * c / top:.1f}" width="{max(bar - 1, 1):.1f}" '
        f'height="{(height - 28) * c / top:.1f}" fill="#d1701f"><title>{card.edges[k]:.3g}-{card.edges[k + 1]:.3g}: '
        f"{c}</title></rect>"
        for k, c in enumerate(card.counts)
    )
    axis = (f'<text x="0" y="{height - 4}" font-size="10" fill="#57606a">0</text>'
            f'<text x="{width}" y="{height - 4}" font-size="10" fill="#57606a" text-anchor="end">'
            f"{card.max_act:.3g}</text>")  # fmt: skip
    return (f'<figure><svg class="hist" width="{width}" height="{height}" role="img" aria-label="activation '
            f'histogram">{rects}{axis}</svg><figcaption>activations where nonzero ({sum(card.counts)} tokens)'
            "</figcaption></figure>")  # fmt: skip


def _logits_html(rows: list[tuple[str, float]], caption: str) -> str:
    body = "".join(f"<tr><td>{_visible(t)}</td><td class=\"num\">{v:+.3f}</td></tr>" for t, v in rows)
    return f'<table class="logits"><caption>{caption}</caption><tbody>{body}</tbody></table>'


def _context_html(context: Context, top: float) -> str:
    spans = []
    for k, (t, a) in enumerate(zip(context.tokens, context.acts, strict=True)):
        alpha = max(0.0, min(1.0, a / top)) if top > 0 else 0.0
        peak = " peak" if k == context.peak else ""
        style = f' style="background: rgba(255, 140, 0, {alpha:.3f})"' if alpha > 0 else ""
        spans.append(f'<span class="tok{peak}"{style} title="{a:.4g}">{_visible(t)}</span>')
    value = context.acts[context.peak]
    return f'<div class="ctx"><span class="val">{value:.3g}</span>{"".join(spans)}</div>'


def _card_html(card: FeatureCard) -> str:
    stats = (f"density {card.density:.3%} &middot; max {card.max_act:.4g} &middot; mean where nonzero "
             f"{card.mean_act:.4g}")  # fmt: skip
    head = (f'<div class="card" id="feature-{card.feature}" data-feature="{card.feature}" '
            f'data-search="{_search_text(card)}"><h3>Feature {card.feature}</h3><p class="stats">{stats}</p>')  # fmt: skip
    parts = [head]
    if not card.contexts:
        parts.append("<p>never fired on the corpus</p></div>")
        return "".join(parts)
    parts.append('<div class="row">')
    parts.append(_histogram_svg(card))
    if card.top_logits:
        parts.append(_logits_html(card.top_logits, "promotes"))
        parts.append(_logits_html(card.bottom_logits, "suppresses"))
    parts.append("</div>")
    parts += [_context_html(c, card.max_act) for c in card.contexts]
    parts.append("</div>")
    return "".join(parts)


def _index_html(dash: Dashboard) -> str:
    rows = dash.index_rows()
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0]) if rows else ""
    body = []
    for card, row in zip(dash.cards, rows, strict=True):
        cells = [f'<td class="num"><a href="#feature-{card.feature}">{card.feature}</a></td>',
                 f'<td class="num">{row["density"]:.3%}</td>', f'<td class="num">{row["max"]:.4g}</td>']  # fmt: skip
        cells += [f"<td>{html.escape(row[k])}</td>" for k in ("top contexts", "promotes", "suppresses")]
        body.append(f'<tr data-feature="{card.feature}" data-search="{_search_text(card)}">{"".join(cells)}</tr>')
    return (f'<div class="table-wrap"><table class="index"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')  # fmt: skip


def render(dash: Dashboard) -> str:
    """The dashboard page of ``dash``: one self-contained HTML document."""
    return page(dash).render()


def page(dash: Dashboard) -> Report:
    """The dashboard of ``dash`` as a :class:`lmscope.reports.html.Report`."""
    report = Report(f"Features: {dash.dictionary}", subtitle=dash.text())
    report.html(f"<style>{_CSS}</style>")
    report.section("Index", "Type a feature id or a token to filter the index and the cards.")
    report.html('<p><input id="feature-search" class="dash-search" type="search" '
                'placeholder="feature id or token" aria-label="filter features"> '
                '<span id="feature-count"></span></p>')  # fmt: skip
    report.html(_index_html(dash))
    report.section("Features", "Top-activating contexts (background: activation / the feature's largest), "
                               f"activation histogram, density, logit effects. {dash.logit_note}")  # fmt: skip
    for card in dash.cards:
        report.html(_card_html(card))
    report.html(f"<script>{_SEARCH_JS}</script>")
    if dash.evaluation:
        report.section("Evaluation", "From the lmscope features eval run in the dictionary's folder.")
        for table in dash.evaluation:
            report.html(table_html(table.rows, caption=table.caption))
    return report


# -- the command -----------------------------------------------------------------------------------


def _feature_list(spec: str | None) -> list[int] | None:
    if spec is None:
        return None
    try:
        return [int(x) for x in spec.split(",")]
    except ValueError:
        raise LmscopeError(f"--features: expected comma-separated feature numbers, got {spec!r}") from None


@dataclass(frozen=True)
class ShowSettings:
    """``lmscope features show``: a dictionary's feature dashboard over a corpus."""

    dict: Path = option(help="the dictionary's folder (SAELens, sparsify, dictionary_learning, circuit-tracer)",  # noqa: RUF009
                        flag="--dict")  # fmt: skip
    site: str | None = option(None, "the site it reads, where its folder does not say")
    features: str | None = option(None, "features to show, e.g. 3,17,40 (default: the first --count that fire)")
    count: int = option(50, "features shown by default")
    contexts: int = option(8, "top-activating contexts per feature")
    tokens: int = option(16384, "corpus tokens")
    window: int = option(64, "tokens per corpus window")
    corpus: str = option("wikitext2", "text or JSONL file, or the bundled 'wikitext2' (test split)")
    skip_first: int = option(1, "tokens at the start of every window left out (the first token's outsized activations)")
    logits: int = option(10, "top and bottom logit effects per feature")
    bins: int = option(30, "histogram bins")

    def __post_init__(self) -> None:
        _feature_list(self.features)
        if not Path(self.dict).is_dir():
            raise LmscopeError(f"--dict {self.dict}: no such folder")
        for value, name in ((self.count, "count"), (self.contexts, "contexts"), (self.tokens, "tokens"),
                            (self.logits, "logits"), (self.bins, "bins")):  # fmt: skip
            if value < 1:
                raise LmscopeError(f"--{name} must be at least 1")
        if not 0 <= self.skip_first < self.window:
            raise LmscopeError("--skip-first must be in [0, --window)")
        if self.corpus not in BUNDLED and not Path(self.corpus).is_file():
            raise LmscopeError(f"--corpus {self.corpus}: no such file (or the bundled 'wikitext2')")


def run_show(model: Model, settings: ShowSettings, out: RunWriter) -> Dashboard:
    """Feature dashboards: per feature its top-activating contexts (tokens highlighted by activation), activation
    histogram, density and logit effects, a searchable index and the evaluation tables, in one self-contained
    HTML page (dashboard.html)."""
    d = load_dictionary(settings.dict)
    if not isinstance(d, Dictionary):
        raise LmscopeError(f"--dict {settings.dict}: a cross-layer transcoder; show one layer's dictionary")
    if settings.site is not None:
        d.site = settings.site
        d.out_site = d.out_site if d.transcoder else settings.site

    def compute() -> Dashboard:
        corpus = load_corpus(model, settings.corpus, max_tokens=settings.tokens)
        windows = corpus.windows(settings.window)
        return dashboard(model, d, windows, features=_feature_list(settings.features), count=settings.count,
                         contexts=settings.contexts, logits=settings.logits, bins=settings.bins,
                         skip_first=settings.skip_first, corpus=corpus.name, name=Path(settings.dict).name,
                         evaluation=evaluation_tables(settings.dict))  # fmt: skip

    result = out.part("dashboard", "Feature dashboard", "Top contexts, histograms, densities and logit effects.",
                      compute)  # fmt: skip
    page(result).write(out.file("dashboard.html"))
    return result


SHOW = Command("features show", ShowSettings, run_show)
