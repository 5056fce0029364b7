"""The embedded default's data: a synthetic concept task, running text and a word-level tokenizer, fully offline
(the tiny Llama trained on them is built by ``nslens.embedded``).

Four topic-like concepts whose texts share part of their vocabulary (pairwise shared words plus generic and
function words), so that the trained model's residual neurons respond to several concepts (polysemantic) with
concept-dependent activation ranges. The model is trained on the same few-shot prompts the pipeline uses (random
demonstrations, loss on every token and extra weight on the query's label) mixed with plain synthetic text so it
(a) classifies the query and (b) is a small language model of the synthetic text, whose held-out perplexity the
side-effect checks measure.

The running text (``synthetic_corpus``, v5) also carries the paper's next-token concepts (App. K), each predictable
from what comes before it: pronouns that agree with a gendered or plural antecedent (he/his/him, she/her,
they/their/them), sentences ending in ``.``, ``?`` (after ``did``) or ``!`` (after ``what a``), opening brackets
after their cue words (``called (``, ``cited [``, ``set {``) and verbs that agree with their subject's number
(``often go/goes``, ``still do/does``). The grammar is artificial on purpose: it only has to make each concept a
next token the model learns to predict, so that ``nslens.nexttoken`` can be tested end to end offline.

Everything is seeded.
"""

from __future__ import annotations

import random
import re

import numpy as np
from tokenizers import Regex, Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel

from .concepts import ConceptDataset
from .errors import NsLensError

__all__ = [
    "EMBEDDED_VERSION",
    "SYNTHETIC_LABELS",
    "synthetic_concepts",
    "synthetic_text",
]


EMBEDDED_VERSION = "v5"  # v5: every pronoun target is cued; trained under pinned numerics and checked (nslens.embedded)
SYNTHETIC_LABELS = ["sports", "science", "business", "politics"]

_TOPIC = {
    "sports": "game team player coach match season goal score league champion stadium race win tournament ball "
    "pitch striker medal trophy referee",
    "science": "atom cell gene planet telescope experiment theory molecule physics chemistry lab data orbit species "
    "fossil protein quantum neuron laser microbe",
    "business": "market stock company profit shares bank investor revenue trade merger price deal startup economy "
    "sales firm earnings budget loan contract",
    "politics": "election vote senate party minister law government policy campaign president parliament debate "
    "bill court treaty reform governor candidate diplomat cabinet",
}
# words shared by two concepts: the source of polysemantic neurons
_SHARED = {
    ("sports", "business"): "sponsor salary transfer brand",
    ("science", "business"): "technology patent research funding",
    ("politics", "business"): "regulation tariff sanction subsidy",
    ("sports", "politics"): "olympics boycott nation rival",
    ("science", "politics"): "vaccine space agency climate",
    ("sports", "science"): "fitness injury speed record",
}
_GENERIC = "people year week month day report news plan group city country world leader program story " \
    "official result source update issue".split()
# a small grammar gives the text word order that matters: DET (ADJ) NOUN VERB DET (ADJ) NOUN [PREP DET NOUN]
_DET = "the a its their this".split()
_ADJ = "new big first last major local".split()
_VERB = "wins beats leads backs blocks raises cuts signs plans reports meets joins".split()
_PREP = "in on at for after over with by from".split()
_FUNCTION = _DET + _ADJ + _VERB + _PREP
# running text: next-token concepts (paper App. K)
_ANTECEDENT = {
    "male": "king father man boy brother prince".split(),
    "female": "queen mother woman girl sister princess".split(),
    "plural": "fans kids voters workers scientists crowds".split(),
}
#: subject, possessive and object pronoun of each antecedent kind
_PRONOUN = {"male": ("he", "his", "him"), "female": ("she", "her", "her"), "plural": ("they", "their", "them")}
_PAST = "met thanked helped called saw joined".split()
_POSS_VERB = "loved lost sold".split()
_BASE = "win beat lead back block raise sign plan meet join".split()
_STORY = (list({w: None for ws in _ANTECEDENT.values() for w in ws}) + list({w: None for ps in _PRONOUN.values()
          for w in ps}) + _PAST + _POSS_VERB + _BASE
          + "and to thank often still go goes do does did what used set cited".split())


def _word_pools() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    topic = {k: v.split() for k, v in _TOPIC.items()}
    shared: dict[str, list[str]] = {k: [] for k in _TOPIC}
    for (a, b), words in _SHARED.items():
        shared[a] += words.split()
        shared[b] += words.split()
    return topic, shared


def synthetic_text(label: int | None, rng: random.Random) -> str:
    """One synthetic sentence for concept ``label`` (or a topic-free sentence when ``label`` is None).

    The grammar fixes where determiners, adjectives, verbs and prepositions go; nouns carry the topic: mostly the
    concept's own words, some words it shares with another concept, a few stray words from other topics.
    """
    topic, shared = _word_pools()
    name = SYNTHETIC_LABELS[label] if label is not None else None

    def noun() -> str:
        r = rng.random()
        if name is None:
            return rng.choice(_GENERIC) if r < 0.6 else rng.choice(topic[rng.choice(SYNTHETIC_LABELS)])
        if r < 0.60:
            return rng.choice(topic[name])
        if r < 0.85:
            return rng.choice(shared[name])
        if r < 0.90:
            return rng.choice(topic[rng.choice([k for k in SYNTHETIC_LABELS if k != name])])
        return rng.choice(_GENERIC)

    def phrase() -> list[str]:
        adj = [rng.choice(_ADJ)] if rng.random() < 0.4 else []
        return [rng.choice(_DET), *adj, noun()]

    words = [*phrase(), rng.choice(_VERB), *phrase()]
    if rng.random() < 0.6:
        words += [rng.choice(_PREP), *phrase()]
    return " ".join(words)


def _join(tokens: list[str]) -> str:
    """Words and punctuation as written: no space before ``. , ? ! ) ] }``, none after ``( [ {``."""
    text = " ".join(tokens)
    text = re.sub(r" ([.,?!)\]}])", r"\1", text)
    return re.sub(r"([(\[{]) ", r"\1", text)


_FORMS = (0, 0, 1, 1, 2, 2, 3, 4, 5, 6, 7, 8)


def _story_sentence(rng: random.Random) -> list[str]:
    """One sentence of the next-token grammar (see the module docstring), as tokens."""
    topic, _ = _word_pools()
    nouns = [w for ws in topic.values() for w in ws] + _GENERIC

    def noun() -> str:
        return rng.choice(nouns)

    kind = rng.choice(["male", "female", "plural"])
    ante = rng.choice(_ANTECEDENT[kind])
    subj, poss, obj = _PRONOUN[kind]
    # v5: the three pronoun forms twice as often as the others, so every pronoun target is seen often enough
    form = rng.choice(_FORMS)
    if form == 0:  # subject pronoun after "and"
        return ["the", ante, rng.choice(_PAST), "the", noun(), "and", subj, rng.choice(_PAST), "the", noun(), "."]
    if form == 1:  # possessive pronoun after a possessive verb
        return ["the", ante, rng.choice(_POSS_VERB), poss, noun(), "."]
    if form == 2:  # object pronoun after "to thank"
        return ["the", noun(), rng.choice(_PAST), "the", ante, "to", "thank", obj, "."]
    if form == 3:  # agreement: go / goes after "often", do / does after "still"
        # v5: the subject is a noun phrase, never a pronoun (v4 drew he/she/they here with no cue, so a fifth
        # of the pronoun targets could not be predicted from their context)
        plural = rng.random() < 0.5
        subject = ["the", rng.choice(_ANTECEDENT["plural"])] if plural else ["the", noun()]
        if rng.random() < 0.5:
            return [*subject, "often", "go" if plural else "goes", "to", "the", noun(), "."]
        return [*subject, "still", "do" if plural else "does", "the", noun(), "."]
    if form == 4:  # question
        return ["did", "the", noun(), rng.choice(_BASE), "the", noun(), "?"]
    if form == 5:  # exclamation
        return ["what", "a", rng.choice(_ADJ), noun(), "!"]
    if form == 6:
        return ["the", noun(), rng.choice(_VERB), "the", noun(), "called", "(", rng.choice(_ADJ), noun(), ")", "."]
    if form == 7:
        return ["the", noun(), rng.choice(_VERB), "the", noun(), ",", "cited", "[", noun(), "]", "."]
    return ["the", noun(), "used", "the", "set", "{", noun(), ",", noun(), "}", "."]


def synthetic_concepts(n_per_class: int = 400, seed: int = 1) -> ConceptDataset:
    """The synthetic concept dataset (balanced, shuffled, deterministic in ``seed``)."""
    if n_per_class < 1:
        raise NsLensError(f"n_per_class must be >= 1, got {n_per_class}")
    rng = random.Random(seed)
    labels = [c for c in range(len(SYNTHETIC_LABELS)) for _ in range(n_per_class)]
    rng.shuffle(labels)
    texts = [synthetic_text(c, rng) for c in labels]
    return ConceptDataset(texts, np.asarray(labels), list(SYNTHETIC_LABELS), name="synthetic",
                          source={"generator": f"nslens.synthetic {EMBEDDED_VERSION}", "seed": seed})


def synthetic_corpus(n_lines: int, seed: int) -> list[str]:
    """Running text: topic sentences (mixed topics and topic-free) ending in a full stop, and sentences of the
    next-token grammar; 2-5 sentences a line. Used for training, perplexity, general means and next-token
    concepts."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_lines):
        tokens: list[str] = []
        for _ in range(rng.randint(2, 5)):
            if rng.random() < 0.5:
                tokens += [*synthetic_text(rng.choice([None, 0, 1, 2, 3]), rng).split(), "."]
            else:
                tokens += _story_sentence(rng)
        out.append(_join(tokens))
    return out


# --------------------------------------------------------------------------------------------- tokenizer


def _vocabulary() -> list[str]:
    topic, shared = _word_pools()
    words: list[str] = []
    for pool in (*topic.values(), *shared.values(), _GENERIC, _FUNCTION, SYNTHETIC_LABELS):
        words += pool
    prompt_words = "Classify the text into one of these categories Text Label".split()
    words += prompt_words + _STORY + list(".,:;!?'\"-()[]{}/") + ["\n"]
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    return list(seen)


def build_tokenizer():  # -> PreTrainedTokenizerFast
    """A word-level tokenizer over the synthetic vocabulary (newline and punctuation are tokens)."""
    from transformers import PreTrainedTokenizerFast  # heavy: only building a tokenizer needs it

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + _vocabulary())}
    tk = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|[A-Za-z0-9_']+|[^\sA-Za-z0-9_']"), behavior="removed",
                                            invert=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", padding_side="left")
    return tok
