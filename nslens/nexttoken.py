"""Next-token concepts (paper App. K, Tables 18-22): a concept is a class of next tokens.

A sample is raw running text (no classification prompt) cut right before an occurrence of one of the concept's
tokens; the site is read at the context's last position, and Acc/Conf ask whether the model predicts the token
that actually followed (each sample carries its own gold token: ``he`` or ``his`` for the concept he/his).
CAcc/CConf are the other concepts of the same family. The paper's four families are built in (``FAMILIES``); any
list of concepts can be given as ``"do,does,has,have"`` or ``"he/his,she/her"``.

**Extraction rule** (``find_occurrences``; the same for WikiText, the embedded model's synthetic text and a local
text file, and versioned as ``RULE``):

- *words* (pronouns, verbs): the word, any case, after a single space, not followed by a letter, digit,
  apostrophe or hyphen (``he`` but not ``hen``, ``he's`` or ``he-goat``); the target is ``" he"``, space included,
  which is how BPE and SentencePiece tokenizers spell a word inside running text.
- *terminal punctuation* ``. ? !``: right after a lower-case letter, digit or closing bracket/quote, and
  followed by whitespace and a letter or opening quote, or by the end of the text (not ``3.5``, ``U.S.``,
  ``...``). A ``.`` after a single letter (initials: ``J. Doe``) or a common abbreviation (``Mr.``, ``St.``,
  ``e.g.``, ...) is skipped; a single digit is not an initial (``won by 3. Then`` matches). Letters are Unicode
  letters (``café.`` and ``. Émile`` match; "lower-case" is ``str.islower``), digits are decimal digits, closing
  brackets/quotes are ``) ] } " ' ’ ”`` and opening quotes ``" ' “ ‘``.
- *opening delimiters* ``( [ {``: after a single space and followed by a non-space; the target is ``" ("``.
- the context is the text before the target (the space that starts a target belongs to the target), cut on
  the left to at most ``max_words`` whole words; it must have at least ``min_words`` words. Identical contexts
  are kept once.

Whether a target is one token depends on the model's tokenizer, so ``target_token_ids`` decides that when the
model is known: a sample is kept only when ``tokenize(context + target) == tokenize(context) + [gold]``, i.e.
the model reading the context sees exactly what preceded the token, and the next token is the gold one (never the
unknown token).
``write_check_sheet`` exports samples for the manual check the paper describes (a JSONL that loads back as the
dataset after rows are deleted, and a Markdown sheet with the target marked in its sentence).
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .concepts import ConceptDataset
from .errors import NsLensError
from .files import output_stem, write_text
from .mdtable import cell
from .synthetic import synthetic_corpus

__all__ = [
    "FAMILIES",
    "RULE",
    "SOURCES",
    "NextTokenConcept",
    "NextTokenSample",
    "extract_next_token",
    "find_occurrences",
    "next_token_dataset",
    "parse_concepts",
    "parse_spec",
    "samples_to_dataset",
    "source_texts",
    "target_token_ids",
    "write_check_sheet",
]

#: version of the extraction rule (recorded in every dataset's source)
RULE = "nslens-next-token-2"  # 2: Unicode letters, ” closes, a digit is no initial
#: where texts come from: WikiText-103 through ``datasets``, the embedded model's running text, or a local file
SOURCES = ("wikitext", "synthetic")
WIKITEXT = ("Salesforce/wikitext", "wikitext-103-raw-v1")
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "eg", "ie", "no", "vol", "co", "inc",
                  "ltd", "gen", "col", "lt", "sgt", "capt", "prof", "rev", "fig", "approx", "ca", "op", "cit"}


def _kind(word: str) -> str | None:
    if word.isalpha():
        return "word"
    return {".": "terminal", "?": "terminal", "!": "terminal", "(": "open", "[": "open", "{": "open"}.get(word)


@dataclass(frozen=True)
class NextTokenConcept:
    """A class of next tokens: ``he/his`` is the next token being ``he`` or ``his``."""

    name: str
    words: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.words or any(not w or w != w.strip() for w in self.words):
            raise NsLensError(f"next-token concept {self.name!r}: words must be non-empty with no spaces, got "
                             f"{list(self.words)}")
        for w in self.words:
            if _kind(w) is None:
                raise NsLensError(f"next-token concept {self.name!r}: {w!r} is neither a word (letters) nor one of "
                                 f"the punctuation . ? ! or delimiters ( [ {{")


def _concept(spec: str) -> NextTokenConcept:
    return NextTokenConcept(spec, tuple(spec.split("/")))


#: the paper's families (App. K): Table 19 (pronouns and pronoun pairs), 20 (punctuation), 21 (delimiters), 22
FAMILIES: dict[str, tuple[NextTokenConcept, ...]] = {
    "pronouns": tuple(_concept(s) for s in ("he", "she", "they")),
    "pronoun_pairs": tuple(_concept(s) for s in ("he/his", "she/her", "they/them")),
    "punctuation": tuple(_concept(s) for s in ("?", "!", ".")),
    "delimiters": tuple(_concept(s) for s in ("[", "{", "(")),
    "agreement": tuple(_concept(s) for s in ("do", "does", "go", "goes")),
}


def parse_concepts(spec: str) -> tuple[NextTokenConcept, ...]:
    """A family name (``pronouns``) or a comma-separated list of concepts, each ``word`` or ``word/word``."""
    if spec in FAMILIES:
        return FAMILIES[spec]
    if "," not in spec:
        raise NsLensError(f"unknown next-token family {spec!r}; choose one of {', '.join(FAMILIES)} or list "
                         "concepts as w1,w2/w3,...")
    if not all(s.strip() for s in spec.split(",")):  # `a,,b` dropped the empty piece without a word
        raise NsLensError(f"next-token concepts {spec!r}: an empty concept between commas")
    concepts = tuple(_concept(s.strip()) for s in spec.split(","))
    words = [w.lower() for c in concepts for w in c.words]
    dup = sorted({w for w in words if words.count(w) > 1})
    if dup:
        raise NsLensError(f"next-token concepts {spec!r}: {dup} belong to more than one concept")
    if len(concepts) < 2:
        raise NsLensError(f"next-token concepts {spec!r}: need at least 2 concepts")
    return concepts


def parse_spec(spec: str) -> tuple[str, str]:
    """``next:<family>[:<source>]`` -> (family, source); source is wikitext (default), synthetic or a text file."""
    if not spec.startswith("next:"):
        raise NsLensError(f"not a next-token dataset spec: {spec!r} (next:<family>[:<source>])")
    family, _, source = spec[len("next:"):].partition(":")
    parse_concepts(family)
    source = source or "wikitext"
    _check_source(source)
    return family, source


def _check_source(source: str) -> None:
    if source in SOURCES:
        return
    if not source.endswith((".txt", ".jsonl")):
        raise NsLensError(f"unknown next-token source {source!r}; choose {', '.join(SOURCES)} or a .txt/.jsonl file")
    if not Path(source).exists():
        raise NsLensError(f"next-token source file not found: {source}")


@dataclass
class NextTokenSample:
    """One occurrence: ``context`` is ``text[start:offset]`` and ``target`` is ``text[offset:offset+len]``."""

    context: str
    target: str
    concept: str
    text_index: int
    offset: int
    after: str = ""  # a few words that followed the target (for the manual check only)


@functools.lru_cache(maxsize=32)
def _patterns(concepts: tuple[NextTokenConcept, ...]) -> list[tuple[re.Pattern[str], str]]:
    """The rule's regular expressions, built once per concept list (extraction calls this for every text)."""
    out: list[tuple[re.Pattern[str], str]] = []
    for c in concepts:
        for w in c.words:
            kind = _kind(w)
            if kind == "word":
                p = re.compile(rf"(?<=\S) ({re.escape(w)})(?![\w'’-])", re.IGNORECASE)
            elif kind == "terminal":  # the letter classes are Unicode: checked in _terminal_ok, not here
                p = re.compile(rf"(?<=\S)({re.escape(w)})(?=\s+\S|\s*$)")
            else:
                p = re.compile(rf"(?<=\S) ({re.escape(w)})(?=\S)")
            out.append((p, c.name))
    return out


#: what may stand right before terminal punctuation besides a lower-case letter or a digit
_CLOSERS = frozenset(")]}\"'’”")
#: what may start the next sentence besides a letter
_OPENERS = frozenset("\"'“‘")


def _terminal_ok(text: str, start: int, end: int) -> bool:
    """The terminal-punctuation rule around ``text[start:end]`` (the regex found a mark after a non-space and
    before whitespace or the end): a lower-case letter, decimal digit or closer before it, a letter or opener
    after the whitespace, and no initial or abbreviation before a ``.``."""
    prev = text[start - 1]
    if not (prev.islower() or prev.isdecimal() or prev in _CLOSERS):
        return False
    rest = text[end:].lstrip()
    if rest and not (rest[0].isalpha() or rest[0] in _OPENERS):
        return False
    if text[start:end] == ".":
        word = re.search(r"([^\W_]+)$", text[:start])
        if word is not None:
            w = word.group(1)
            if (len(w) == 1 and w.isalpha()) or w.lower() in _ABBREVIATIONS:
                return False
    return True


def find_occurrences(text: str, concepts: Sequence[NextTokenConcept], *, min_words: int = 5,
                     max_words: int = 64, text_index: int = 0) -> list[NextTokenSample]:
    """Every occurrence of the concepts' tokens in ``text`` under the extraction rule (module docstring)."""
    if min_words < 1 or max_words < min_words:
        raise NsLensError(f"need 1 <= min_words <= max_words, got {min_words} and {max_words}")
    out = []
    for pattern, name in _patterns(tuple(concepts)):
        for m in pattern.finditer(text):
            offset = m.start()  # words and delimiters: the space before the token; punctuation: the token
            target = text[offset:m.end()]
            if _kind(target) == "terminal" and not _terminal_ok(text, offset, m.end()):
                continue
            words = list(re.finditer(r"\S+", text[:offset]))
            if len(words) < min_words:
                continue
            start = words[-max_words].start() if len(words) > max_words else words[0].start()
            after = " ".join(text[m.end():].split()[:5])
            out.append(NextTokenSample(text[start:offset], target, name, text_index, offset, after))
    out.sort(key=lambda s: s.offset)
    return out


def extract_next_token(texts: Iterable[str], concepts: Sequence[NextTokenConcept], *, n_per_concept: int = 500,
                       seed: int = 0, min_words: int = 5, max_words: int = 64, pool: int = 4,
                       progress: Any = None) -> list[NextTokenSample]:
    """Samples of every concept from ``texts`` (streamed): occurrences are collected until each concept has
    ``pool * n_per_concept`` (or the texts end), then ``n_per_concept`` are drawn per concept (seeded).
    Identical contexts are kept once. Concepts with fewer occurrences keep all they have."""
    if n_per_concept < 1:
        raise NsLensError(f"n_per_concept must be >= 1, got {n_per_concept}")
    found: dict[str, list[NextTokenSample]] = {c.name: [] for c in concepts}
    seen: set[str] = set()
    want = pool * n_per_concept
    for i, text in enumerate(texts):
        for s in find_occurrences(text, concepts, min_words=min_words, max_words=max_words, text_index=i):
            if s.context not in seen and len(found[s.concept]) < want:
                seen.add(s.context)
                found[s.concept].append(s)
        if progress is not None and i % 1000 == 0:
            progress("extract", min(len(v) for v in found.values()), want)
        if all(len(v) >= want for v in found.values()):
            break
    rng = np.random.default_rng(seed)
    out: list[NextTokenSample] = []
    for c in concepts:
        cand = found[c.name]
        take = sorted(rng.choice(len(cand), size=min(n_per_concept, len(cand)), replace=False).tolist())
        out += [cand[j] for j in take]
    return out


def samples_to_dataset(samples: Sequence[NextTokenSample], concepts: Sequence[NextTokenConcept], *,
                       name: str, source: dict[str, Any] | None = None) -> ConceptDataset:
    """A ``ConceptDataset`` whose texts are the contexts and whose ``targets`` are the tokens that follow."""
    names = [c.name for c in concepts]
    missing = [n for n in names if not any(s.concept == n for s in samples)]
    if missing:
        raise NsLensError(f"next-token dataset {name!r}: no occurrences of {missing} in the source text")
    return ConceptDataset(
        texts=[s.context for s in samples],
        labels=np.asarray([names.index(s.concept) for s in samples]),
        label_names=names,
        name=name,
        targets=[s.target for s in samples],
        source={"rule": RULE, **(source or {})},
    )


def source_texts(source: str, *, seed: int = 0) -> Iterable[str]:
    """The running text to extract from: WikiText-103 (train split, detokenized with lm-eval's WikiText
    detokenizer, headings and empty lines dropped), the embedded model's synthetic text (held out from its
    training by seed), or a local ``.txt`` (one text per line) / ``.jsonl`` (a ``text`` field) file."""
    _check_source(source)
    if source == "synthetic":
        return synthetic_corpus(20000, seed=31337 + seed)
    if source == "wikitext":
        return _wikitext_lines()
    return _file_texts(Path(source))


def _file_texts(path: Path) -> list[str]:
    """The non-empty lines of a ``.txt``, or the ``text`` fields of a ``.jsonl``; bad lines are one-line errors."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise NsLensError(f"next-token source {path} is not UTF-8 text (byte {e.start})") from e
    if path.suffix == ".txt":
        return [line for line in lines if line.strip()]
    texts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise NsLensError(f"next-token source {path}, line {number}: not JSON ({e.msg})") from e
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise NsLensError(f"next-token source {path}, line {number}: no 'text' string")
        texts.append(row["text"])
    return texts


def _wikitext_lines() -> Iterable[str]:
    import datasets
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    try:
        ds = datasets.load_dataset(*WIKITEXT, split="train", streaming=True)
        first = iter(ds)
        row = next(first)
    except Exception as e:  # the hub's errors are many and deep: one line that names the source
        raise NsLensError(f"could not load WikiText ({'/'.join(WIKITEXT)}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); use next:<family>:<file.txt> for a local "
                         "text") from e

    def lines() -> Iterable[str]:
        for r in itertools.chain([row], first):
            raw = r["text"]  # e.g. " The game 's story . \n": detokenized as lm-eval does, with its spacing
            if raw.strip() and not raw.strip().startswith("="):
                yield wikitext_detokenizer({"page": raw}).strip()
    return lines()


def next_token_dataset(spec: str, *, n_per_concept: int = 500, seed: int = 0, min_words: int = 5,
                       max_words: int = 64, progress: Any = None) -> ConceptDataset:
    """The dataset for ``next:<family>[:<source>]`` (see ``parse_spec``)."""
    family, source = parse_spec(spec)
    concepts = parse_concepts(family)
    samples = extract_next_token(source_texts(source, seed=seed), concepts, n_per_concept=n_per_concept,
                                 seed=seed, min_words=min_words, max_words=max_words, progress=progress)
    return samples_to_dataset(samples, concepts, name=f"next:{family}",
                              source={"text_source": source if source != "wikitext" else "/".join(WIKITEXT),
                                      "family": family, "min_words": min_words, "max_words": max_words})


def target_token_ids(tokenizer: Any, contexts: Sequence[str], targets: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per sample, the gold next token and whether the sample is usable with this tokenizer.

    Usable means ``tokenize(context + target) == tokenize(context) + [gold]`` (special tokens included, as the
    model reads a prompt): the context's tokens are exactly those that preceded the target, and the target is
    one token, and not the tokenizer's unknown token. Returns ``(gold ids, usable mask)``; the gold id is -1 where
    unusable."""
    if len(contexts) != len(targets):
        raise NsLensError(f"{len(contexts)} contexts but {len(targets)} targets")
    a = tokenizer(list(contexts))["input_ids"]
    b = tokenizer([c + t for c, t in zip(contexts, targets)])["input_ids"]
    gold = np.full(len(contexts), -1, dtype=np.int64)
    unk = getattr(tokenizer, "unk_token_id", None)
    for i, (x, y) in enumerate(zip(a, b)):
        if len(y) == len(x) + 1 and list(y[:-1]) == list(x) and y[-1] != unk:
            gold[i] = int(y[-1])
    return gold, gold >= 0


def write_check_sheet(samples: Sequence[NextTokenSample], stem: str | Path, *, context_words: int = 12) -> list[Path]:
    """The manual check of App. K: ``<stem>.jsonl`` (text, label, target, provenance; delete bad rows and load it
    back as the dataset) and ``<stem>.md`` (per concept, the context's end with the target marked, and what
    followed)."""
    stem = output_stem(stem)
    rows = [{"text": s.context, "label": s.concept, "target": s.target, **{k: v for k, v in asdict(s).items()
             if k in ("text_index", "offset", "after")}} for s in samples]
    jsonl = Path(f"{stem}.jsonl")
    write_text(jsonl, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    lines = [f"# Next-token samples to check ({len(samples)})", "",
             "Each row: the last words of the context, the target in brackets, then what followed. Delete the rows "
             f"of `{jsonl.name}` that are wrong and use that file as the dataset.", ""]
    for concept in dict.fromkeys(s.concept for s in samples):
        lines += [f"## {concept}", "", "| # | text | offset | sample |", "|---|---|---|---|"]
        for i, s in enumerate(samples):
            if s.concept == concept:
                tail = " ".join(s.context.split()[-context_words:])
                sample = cell(f"…{tail}⟦{s.target}⟧ {s.after}")
                lines.append(f"| {i + 1} | {s.text_index} | {s.offset} | {sample} |")
        lines.append("")
    md = Path(f"{stem}.md")
    write_text(md, "\n".join(lines))
    return [jsonl, md]
