"""The embedded default: a synthetic concept task and a tiny Llama trained on it, fully offline.

Four topic-like concepts whose texts share part of their vocabulary (pairwise shared words plus generic and
function words), so that the trained model's residual neurons respond to several concepts (polysemantic) with
concept-dependent activation ranges. The model is trained on the same few-shot prompts the pipeline uses (random
demonstrations, loss on every token and extra weight on the query's label) mixed with plain synthetic text so it
(a) classifies the query and (b) is a small language model of the synthetic text, whose held-out perplexity the
side-effect checks measure.

The running text (``synthetic_corpus``, v4) also carries the paper's next-token concepts (App. K), each predictable
from what comes before it: pronouns that agree with a gendered or plural antecedent (he/his/him, she/her,
they/their/them), sentences ending in ``.``, ``?`` (after ``did``) or ``!`` (after ``what a``), opening brackets
after their cue words (``called (``, ``cited [``, ``set {``) and verbs that agree with their subject's number
(``often go/goes``, ``still do/does``). The grammar is artificial on purpose: it only has to make each concept a
next token the model learns to predict, so that ``nslens.nexttoken`` can be tested end to end offline.

Everything is seeded; building takes well under two minutes on 2 CPU cores and is cached under ``NSLENS_HOME``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .concepts import ConceptDataset, FewShotPrompter

__all__ = [
    "EMBEDDED_VERSION",
    "SYNTHETIC_LABELS",
    "build_embedded_model",
    "embedded_model_dir",
    "synthetic_concepts",
    "synthetic_text",
]

logger = logging.getLogger(__name__)

EMBEDDED_VERSION = "v4"
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
# v4 running text: next-token concepts (paper App. K)
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


def _story_sentence(rng: random.Random) -> list[str]:
    """One sentence of the next-token grammar (see the module docstring), as tokens."""
    topic, _ = _word_pools()
    nouns = [w for ws in topic.values() for w in ws] + _GENERIC

    def noun() -> str:
        return rng.choice(nouns)

    kind = rng.choice(["male", "female", "plural"])
    ante = rng.choice(_ANTECEDENT[kind])
    subj, poss, obj = _PRONOUN[kind]
    form = rng.randrange(9)
    if form == 0:  # subject pronoun after "and"
        return ["the", ante, rng.choice(_PAST), "the", noun(), "and", subj, rng.choice(_PAST), "the", noun(), "."]
    if form == 1:  # possessive pronoun after a possessive verb
        return ["the", ante, rng.choice(_POSS_VERB), poss, noun(), "."]
    if form == 2:  # object pronoun after "to thank"
        return ["the", noun(), rng.choice(_PAST), "the", ante, "to", "thank", obj, "."]
    if form == 3:  # agreement: go / goes after "often", do / does after "still"
        plural = rng.random() < 0.5
        subject = rng.choice([["they"], ["the", rng.choice(_ANTECEDENT["plural"])]]) if plural else \
            rng.choice([[rng.choice(["he", "she"])], ["the", noun()]])
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
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
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
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + _vocabulary())}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|[A-Za-z0-9_']+|[^\sA-Za-z0-9_']"), behavior="removed",
                                            invert=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", padding_side="left")
    return tok


# --------------------------------------------------------------------------------------------- model


def embedded_model_dir() -> Path:
    """Where the embedded model is cached: ``$NSLENS_HOME/embedded-<version>`` (default ``~/.cache/nslens``)."""
    from .files import nslens_home

    return nslens_home() / f"embedded-{EMBEDDED_VERSION}"


def _training_batch(rng: random.Random, tok, batch: int, k_max: int = 1, n_plain: int = 12):
    """``batch`` few-shot prompts ending in their label, plus ``n_plain`` rows of running synthetic text after an
    end-of-text token (how lm-eval's perplexity tasks present a document)."""
    import torch

    prompts, labels = [], []
    for line in synthetic_corpus(n_plain, seed=rng.randrange(2**31)):
        prompts.append(f"{tok.eos_token} {line}")
        labels.append(-1)
    for _ in range(batch):
        demos = []
        for c in range(len(SYNTHETIC_LABELS)):
            demos += [(synthetic_text(c, rng), c) for _ in range(rng.randint(0, k_max))]
        rng.shuffle(demos)
        p = FewShotPrompter(list(SYNTHETIC_LABELS), demos)
        c = rng.randrange(len(SYNTHETIC_LABELS))
        prompts.append(p(synthetic_text(c, rng)) + " " + SYNTHETIC_LABELS[c])
        labels.append(c)
    enc = tok(prompts, return_tensors="pt", padding=True)
    ids, att = enc["input_ids"], enc["attention_mask"]
    targets = ids.clone()
    targets[att == 0] = -100
    return ids, att, targets, torch.tensor(labels)


def build_embedded_model(
    out_dir: str | Path | None = None,
    *,
    steps: int = 900,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Train the tiny Llama on the synthetic task and save it (model + tokenizer) to ``out_dir``.

    Written to a temporary directory and renamed into place, so an interrupted build leaves nothing behind.
    Processes sharing ``NSLENS_HOME`` train it once: a file lock serialises the builds, and a process that waited
    finds the finished model. Without ``progress`` the training is announced and its progress logged (WARNING),
    so every entry point says what the first minute is spent on.
    """
    out = Path(out_dir) if out_dir is not None else embedded_model_dir()
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(out.parent / f".{out.name}.lock"):
        if (out / "config.json").exists():  # built by another process while this one waited
            return out
        return _train_embedded(out, steps, seed, progress)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _train_embedded(out: Path, steps: int, seed: int, progress: Callable[[int, int], None] | None) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if progress is None:
        logger.warning("training the embedded model (once, about 80 s on 2 cores; cached in %s)", out)

        def progress(done: int, total: int) -> None:
            if done % max(1, total // 10) == 0 or done == total:
                logger.warning("training the embedded model: %d/%d steps", done, total)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = build_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    label_ids = torch.tensor(tok.convert_tokens_to_ids(SYNTHETIC_LABELS))
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, os.cpu_count() or 1))
    for step in range(steps):
        ids, att, targets, y = _training_batch(rng, tok, batch=24)
        logits = model(input_ids=ids, attention_mask=att).logits
        lm = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               targets[:, 1:].reshape(-1), ignore_index=-100)
        # the label is the last token; its prediction comes from position -2
        is_prompt = y >= 0
        cls = torch.nn.functional.cross_entropy(logits[is_prompt, -2], label_ids[y[is_prompt]])
        loss = lm + cls
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        progress(step + 1, steps)
        if step % 100 == 0:
            logger.info("embedded model step %d/%d loss %.3f (cls %.3f)", step, steps, loss.item(), cls.item())
    model.eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".embedded-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "nslens_embedded.json").write_text(json.dumps(
            {"version": EMBEDDED_VERSION, "steps": steps, "seed": seed, "labels": SYNTHETIC_LABELS}, indent=2))
        os.replace(tmp, out) if not out.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
