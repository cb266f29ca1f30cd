"""A synthetic world of time-dependent and time-invariant facts, and a tiny model trained on it.

Ground truth for the Temporal Heads workflow (Park et al., ACL 2025): what a real model knows
about "In 2004, the president of Argentina was" is unknown, so here the facts are made up and a
small transformer learns them inside the test suite, where its mechanism can be checked.

The world (token ids, no tokenizer; :data:`WORLD` names every id)
-----------------------------------------------------------------
* ``N_SUBJECTS`` countries ("Xland", ...) and ``N_YEARS`` years ("2000", ...).
* Each country has ``TERMS`` leaders of its own, each in office for ``N_YEARS // TERMS``
  consecutive years, in a random order per country. The leader depends on (country, year); a
  reader who knows the country but not the year can do no better than name one of its leaders,
  which is right in exactly ``1 / TERMS`` of the years: that is **chance**,
  :data:`TEMPORAL_CHANCE`.
* ``N_FRUITS`` fruits, each with one of ``N_COLOURS`` colours: a fact with no year in it.

Both templates have :data:`PROMPT_LEN` tokens, BOS at position 0, the subject at
:data:`SUBJECT_POS` and the same final token ("was")::

    temporal   [BOS] In year <year> , the leader of <country> was     -> <leader>
    invariant  [BOS] As everyone knows , the colour of <fruit> was    -> <colour>
    position     0    1   2     3    4  5    6    7     8       9

so clean/corrupted prompts that differ in one token (the year at :data:`YEAR_POS`, or the fruit)
have equal lengths. The shared final token (rather than "colour of banana is") means the heads
that bring the subject to the final position can serve both relations, so what is specific to
temporal facts is the reading of the year.

The model
---------
A 2-layer Llama trained on every fact (see :func:`train_temporal_model` for the settings and
why each is there). Its attention is concentrated by design: one attention layer
(:data:`ATTN_LAYER`), sharp attention, and token kinds sharing an embedding direction. The result,
checked in ``test_synthetic.py`` from the attention pattern and by ablation (never by an lmscope
circuit algorithm, which this model exists to test): one or two heads read the year from the
final position, and zeroing them removes the year, not the country, from the answer. With
:data:`SEED`, layer 1's heads 1 and 2 attend to the year (mean attention 1.00 each; zeroing both
gives temporal recall 0.25 = chance, colour recall 1.0; zeroing one alone leaves 0.78-0.94), and
heads 0 and 3 to the country or fruit. Layer 0's heads attend uniformly (~0.1) and output nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import transformers as T

import lmscope
from lmscope.circuits.pairs import TokenPair
from tests.helpers import one_thread, word_tokenizer

N_SUBJECTS = 8
N_YEARS = 8
TERMS = 4  # leaders per country; each in office N_YEARS // TERMS consecutive years
N_FRUITS = 8
N_COLOURS = 4
TEMPORAL_CHANCE = 1 / TERMS  # recall of a reader that knows the country but not the year

PAD, BOS, EOS = 0, 1, 2
_WORDS = ["In", "year", ",", "the", "leader", "of", "was", "As", "everyone", "knows", "colour"]
PROMPT_LEN = 10
YEAR_POS = 3  # the year token, in a temporal prompt
SUBJECT_POS = 8  # the country (temporal) or fruit (invariant) token
FINAL_POS = PROMPT_LEN - 1
ATTN_LAYER = 1  # the only layer whose attention is trained; layer 0's attention is switched off
SEED = 2  # seeds 0-3 all give a model that passes test_synthetic.py; 2 has the clearest split


@dataclass(frozen=True)
class Fact:
    """A prompt (``PROMPT_LEN`` token ids, BOS first), its answer token id, and which subject
    (country or fruit index) and year index (``None`` for an invariant fact) it is about."""

    ids: tuple[int, ...]
    answer: int
    subject: int
    year: int | None = None


class World:
    """Token ids of every word, and the fact tables (random, from ``seed``)."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        names = ["<pad>", "<bos>", "<eos>", *_WORDS]
        self.word = {w: i for i, w in enumerate(names)}

        def add(labels: list[str]) -> list[int]:
            start = len(names)
            names.extend(labels)
            return list(range(start, len(names)))

        self.years = add([str(2000 + i) for i in range(N_YEARS)])
        self.subjects = add([f"{c}land" for c in "XYZWVUTS"[:N_SUBJECTS]])
        self.leaders = add([f"leader{s}_{k}" for s in range(N_SUBJECTS) for k in range(TERMS)])
        self.fruits = add([f"fruit{f}" for f in range(N_FRUITS)])
        self.colours = add([f"colour{c}" for c in range(N_COLOURS)])
        self.names = names
        term = N_YEARS // TERMS
        #: ``leader_of[s][y]``: the leader of country ``s`` in year ``y`` (indices; a token id)
        self.leader_of: list[list[int]] = []
        for s in range(N_SUBJECTS):
            own = self.leaders_of(s)
            order = torch.randperm(TERMS, generator=g).tolist()
            self.leader_of.append([own[order[y // term]] for y in range(N_YEARS)])
        # every colour used at least once (so invariant pairs exist), the rest at random
        extra = torch.randint(N_COLOURS, (N_FRUITS - N_COLOURS,), generator=g).tolist()
        colours = [self.colours[c] for c in [*range(N_COLOURS), *extra]]
        #: ``colour_of[f]``: the colour (token id) of fruit ``f``
        self.colour_of = [colours[i] for i in torch.randperm(N_FRUITS, generator=g).tolist()]

    @property
    def vocab_size(self) -> int:
        return len(self.names)

    def leaders_of(self, subject: int) -> list[int]:
        """Token ids of country ``subject``'s ``TERMS`` leaders."""
        return self.leaders[subject * TERMS : (subject + 1) * TERMS]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.names[int(i)] for i in ids)

    def temporal_ids(self, subject: int, year: int) -> tuple[int, ...]:
        """``[BOS] In year <year> , the leader of <country> was``."""
        w = self.word
        return (BOS, w["In"], w["year"], self.years[year], w[","], w["the"], w["leader"], w["of"],
                self.subjects[subject], w["was"])  # fmt: skip

    def invariant_ids(self, fruit: int) -> tuple[int, ...]:
        """``[BOS] As everyone knows , the colour of <fruit> was``."""
        w = self.word
        return (BOS, w["As"], w["everyone"], w["knows"], w[","], w["the"], w["colour"], w["of"],
                self.fruits[fruit], w["was"])  # fmt: skip

    def temporal_facts(self) -> list[Fact]:
        """All ``N_SUBJECTS * N_YEARS`` leader facts, country-major."""
        return [
            Fact(self.temporal_ids(s, y), self.leader_of[s][y], s, y) for s in range(N_SUBJECTS) for y in range(N_YEARS)
        ]

    def invariant_facts(self) -> list[Fact]:
        """All ``N_FRUITS`` colour facts."""
        return [Fact(self.invariant_ids(f), self.colour_of[f], f) for f in range(N_FRUITS)]

    def temporal_pairs(self, n: int | None = None) -> list[TokenPair]:
        """Clean year T vs corrupted year T' of the same country, only the year token
        (:data:`YEAR_POS`) differing: answer the leader in T, wrong the (different) leader in T'.

        One pair per (country, T), T' the next year (cyclically) with another leader; ordered so
        that any first ``n`` pairs spread over countries and years (the first ``N_SUBJECTS`` pairs
        have one country each, all in different years).
        """
        out = []
        for i in range(N_SUBJECTS * N_YEARS):
            s, y = i % N_SUBJECTS, (i // N_SUBJECTS + i) % N_YEARS
            y2 = next(
                (y + k) % N_YEARS
                for k in range(1, N_YEARS)
                if self.leader_of[s][(y + k) % N_YEARS] != self.leader_of[s][y]
            )
            out.append(
                _pair(self.temporal_ids(s, y), self.temporal_ids(s, y2), self.leader_of[s][y], self.leader_of[s][y2])
            )
        return out[:n]

    def invariant_pairs(self, n: int | None = None) -> list[TokenPair]:
        """Clean fruit vs corrupted fruit of another colour, only the fruit token
        (:data:`SUBJECT_POS`) differing: one pair per fruit, the corrupted fruit the next one
        (cyclically) with a different colour."""
        out = []
        for f in range(N_FRUITS):
            f2 = next(
                (f + k) % N_FRUITS
                for k in range(1, N_FRUITS)
                if self.colour_of[(f + k) % N_FRUITS] != self.colour_of[f]
            )
            out.append(_pair(self.invariant_ids(f), self.invariant_ids(f2), self.colour_of[f], self.colour_of[f2]))
        return out[:n]

    # -- the world as a tokenizer and data files in the paper's format ---------------------

    TEMPORAL_TEMPLATE = "In year {time}, the leader of {subject} was"
    INVARIANT_TEMPLATE = "As everyone knows, the colour of {subject} was"

    def tokenizer(self) -> T.PreTrainedTokenizerFast:
        """A word-level tokenizer whose ids are this world's (``"In year 2003, the leader of
        Xland was"`` -> :meth:`temporal_ids` without BOS), adding no special tokens itself."""
        return word_tokenizer(self.names)

    def write_data(self, directory) -> tuple[str, str]:
        """The facts as the paper's files: ``Temporal/leaders.json`` (every (country, year),
        candidates: the country's leaders) and ``Invariant/colours.json``; returns both paths."""
        import json
        from pathlib import Path

        root = Path(directory)
        (root / "Temporal").mkdir(parents=True, exist_ok=True)
        (root / "Invariant").mkdir(parents=True, exist_ok=True)
        name = lambda i: self.names[i]
        temporal = {
            "name": "synthetic leaders",
            "prompt_templates": [self.TEMPORAL_TEMPLATE],
            "prompt_templates_zs": [self.TEMPORAL_TEMPLATE],
            "samples": [
                {"subject": name(self.subjects[f.subject]), "object": name(f.answer), "time": name(self.years[f.year])}
                for f in self.temporal_facts()
            ],
            "all_possible_objects": [
                {"subject": name(self.subjects[s]), "objects": [name(i) for i in self.leaders_of(s)]}
                for s in range(N_SUBJECTS)
            ],
        }
        invariant = {
            "name": "synthetic colours",
            "prompt_templates": [self.INVARIANT_TEMPLATE],
            "prompt_templates_zs": [self.INVARIANT_TEMPLATE],
            "samples": [
                {"subject": name(self.fruits[f.subject]), "object": name(f.answer)} for f in self.invariant_facts()
            ],
        }
        paths = root / "Temporal" / "leaders.json", root / "Invariant" / "colours.json"
        for path, data in zip(paths, (temporal, invariant), strict=True):
            path.write_text(json.dumps(data, indent=1))
        return str(paths[0]), str(paths[1])


def save_model(model: lmscope.Model, directory) -> str:
    """Save the trained model with :meth:`World.tokenizer` as a Hugging Face directory that
    ``lmscope.load`` (and the CLI) reads."""
    model.hf.save_pretrained(directory)
    WORLD.tokenizer().save_pretrained(directory)
    return str(directory)


def _pair(clean: tuple[int, ...], corrupt: tuple[int, ...], answer: int, wrong: int) -> TokenPair:
    ones = torch.ones(len(clean), dtype=torch.long)
    return TokenPair(
        torch.tensor(clean), torch.tensor(corrupt), torch.tensor([answer]), torch.tensor([wrong]), ones, ones.clone()
    )


WORLD = World()


def facts_ids(facts: Sequence[Fact]) -> torch.Tensor:
    """The prompts of ``facts`` as one batch ``[len(facts), PROMPT_LEN]``."""
    return torch.tensor([f.ids for f in facts])


def predictions(model: lmscope.Model, facts: Sequence[Fact], interventions: Sequence = ()) -> torch.Tensor:
    """The top-1 token id (over the whole vocabulary) at the final position, per fact."""
    with torch.no_grad():
        return model.run(facts_ids(facts), interventions=interventions).logits[:, -1].argmax(-1)


def recall(model: lmscope.Model, facts: Sequence[Fact], interventions: Sequence = ()) -> float:
    """Fraction of ``facts`` whose answer is the top-1 prediction."""
    answers = torch.tensor([f.answer for f in facts])
    return float((predictions(model, facts, interventions) == answers).float().mean())


def temporal_recall(model: lmscope.Model, interventions: Sequence = ()) -> float:
    """:func:`recall` over every leader fact; :data:`TEMPORAL_CHANCE` without the year."""
    return recall(model, WORLD.temporal_facts(), interventions)


def invariant_recall(model: lmscope.Model, interventions: Sequence = ()) -> float:
    """:func:`recall` over every colour fact."""
    return recall(model, WORLD.invariant_facts(), interventions)


def year_attention(model: lmscope.Model) -> torch.Tensor:
    """``[n_layers, n_heads]``: each head's attention from the final position to the year token,
    averaged over every temporal prompt (a plain capture of ``blocks.L.attn.pattern``)."""
    sites = [f"blocks.{layer}.attn.pattern" for layer in range(model.n_layers)]
    with torch.no_grad():
        cache = model.run(facts_ids(WORLD.temporal_facts()), capture=sites).cache
    return torch.stack([cache[s][:, :, FINAL_POS, YEAR_POS].mean(0) for s in sites])


def year_heads(model: lmscope.Model, threshold: float = 0.3) -> list[tuple[int, int]]:
    """``(layer, head)`` of every head whose :func:`year_attention` is at least ``threshold``,
    most attentive first."""
    att = year_attention(model)
    heads = [(int(layer), int(head)) for layer, head in (att >= threshold).nonzero()]
    return sorted(heads, key=lambda lh: -float(att[lh]))


def zero_heads(heads: Sequence[tuple[int, int]]) -> list:
    """Zero-ablation interventions (``blocks.L.attn.z``, every position) for ``heads``."""
    return [lmscope.zero(f"blocks.{layer}.attn.z", head=head) for layer, head in heads]


def train_temporal_model(
    steps: int = 350,
    warmup: int = 100,
    sharpness: float = 0.1,
    kind_scale: float = 5.0,
    heads: int = 4,
    d_model: int = 64,
    d_mlp: int = 256,
    lr: float = 3e-3,
    seed: int = SEED,
) -> lmscope.Model:
    """Train a randomly initialised 2-layer Llama on every fact of :data:`WORLD`.

    Full batch (64 leader facts and 8 colour facts), Adam, cross-entropy on the answer token at the
    final position only, the two kinds weighing equally. Three choices make the mechanism
    concentrated enough to be ground truth; without each, the year was spread over many heads:

    * **One attention layer.** Layer 0's attention is switched off (``o_proj`` zero and frozen,
      as ``tests/tiny.py`` switches off MLPs), layer 0's MLP and all of layer 1 train. With two
      attention layers the model copies the year into the country token in layer 0 and reads
      the country in layer 1, so no head at the final position attends to the year.
    * **Sharp attention** (``sharpness``): the loss adds ``sharpness`` times the mean entropy of
      the layer-1 heads' attention from the final position, off for the first ``warmup`` steps
      (while the facts are learned) and ramped in linearly over the next ``warmup``; switched on
      from step 0 the heads can lock onto constant tokens before reading the year, and it is
      never learned. Without it the 72 memorised facts are served by near-uniform attention
      (every head ~0.1-0.2 on the year), so zeroing even 3 of 4 heads leaves most recall. Trained
      LMs' heads attend to few tokens; this imitates that.
    * **Token kinds** (``kind_scale``): one random vector per kind (years; subjects: countries and
      fruits; objects: leaders and colours) is added to the initial embeddings of its tokens,
      ``kind_scale`` times a token's own scale, as a trained LM's years look alike. Without it a
      head's key for a year depends on which year it is, and sharp heads read the year in some
      prompts and the country in others. Countries and fruits share a kind (both are the
      subject), so the subject heads read either; with separate kinds (or different final
      tokens) a year head fell back to reading the fruit in colour prompts, and zeroing it broke
      colours.

    Deterministic for a given ``seed`` (it trains on one thread); about 10-20 s on 2 CPU cores.
    """
    torch.manual_seed(seed)
    config = T.LlamaConfig(
        vocab_size=WORLD.vocab_size,
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        attn_implementation="eager",  # training reads the attention probabilities
    )
    hf = T.LlamaForCausalLM(config)
    with torch.no_grad():
        emb = hf.model.embed_tokens.weight
        scale = kind_scale * emb.std()
        for kind in (WORLD.years, WORLD.subjects + WORLD.fruits, WORLD.leaders + WORLD.colours):
            emb[kind] += scale * torch.randn(d_model)
        off = hf.model.layers[1 - ATTN_LAYER].self_attn
        torch.nn.init.zeros_(off.o_proj.weight)
        for p in off.parameters():
            p.requires_grad_(False)

    temporal, invariant = WORLD.temporal_facts(), WORLD.invariant_facts()
    ids = facts_ids(temporal + invariant)
    answers = torch.tensor([f.answer for f in temporal + invariant])
    weight = torch.tensor([0.5 / len(temporal)] * len(temporal) + [0.5 / len(invariant)] * len(invariant))
    opt = torch.optim.Adam([p for p in hf.parameters() if p.requires_grad], lr=lr)
    hf.train()
    with one_thread():
        for step in range(steps):
            out = hf(input_ids=ids, use_cache=False, output_attentions=True)
            loss = (torch.nn.functional.cross_entropy(out.logits[:, -1], answers, reduction="none") * weight).sum()
            att = out.attentions[ATTN_LAYER][:, :, -1]  # [batch, heads, key]
            entropy = -(att * (att + 1e-9).log()).sum(-1).mean()
            loss = loss + sharpness * min(max(step / warmup - 1, 0.0), 1.0) * entropy
            opt.zero_grad()
            loss.backward()
            opt.step()
    hf.eval()
    return lmscope.Model(hf, tokenizer=None, source="synthetic temporal world", name="tiny-temporal")


@functools.cache
def trained_model() -> lmscope.Model:
    """:func:`train_temporal_model` with its defaults, trained once per process."""
    return train_temporal_model()
