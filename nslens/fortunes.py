"""Real concept data offline: the categories of Debian's ``fortunes`` package as concepts.

Debian's ``fortunes`` (BSD licence; ``apt-get install fortunes``) installs about 40 files under
``/usr/share/games/fortunes``, one per category (computers, politics, science, sports, ...), each a list of
human-written quotations, jokes and aphorisms separated by lines holding only ``%``. A category is a concept:
``fortunes:computers,politics,science,sports`` is a four-concept dataset whose texts are that category's items.

**Which categories.** Any file of the directory that has a ``strfile`` index beside it (``<name>.dat``) is a
category; ``.dat``/``.u8`` companions and sub-folders are not, so the offensive collection ``off/`` (package
``fortunes-off``) is never read. ``fortunes`` alone means ``DEFAULT_CATEGORIES`` (computers, food, love, kids,
sports, medicine: the categories of the SmolLM2-135M protocol, ``nslens.protocols``); a list names at least two categories, in the order given (that
order fixes the label indices). Label words default to the category name, or ``LABEL_WORDS`` where the name is
not a word (men-women -> women, kids -> children, ...).

**How an item becomes a text** (``clean_fortune``, versioned as ``CLEANING``):

1. overstriking is resolved as a terminal prints it (``_\\bX`` and ``X\\bX`` -> ``X``, ``____\\b\\b\\b\\bonly``
   -> ``only``);
2. the attribution is dropped: the last line that starts (after any indentation) with ``--`` and everything
   after it, provided every line after it is indented (a multi-line attribution); a ``--`` line followed by
   unindented text is dialogue and stays;
3. tabs, line breaks and runs of spaces become single spaces;
4. items whose letters are under 60 % of their non-space characters (ASCII art, tables, code) are dropped, and
   so are items outside ``min_words``..``max_words`` words (default 5..80: shorter ones are too terse to carry a
   topic, longer ones would be cut inside the few-shot prompt anyway).

**Deduplication.** Items are compared by a key of their lower-cased letters and digits only: within a category
a repeated item is kept once; an item found in two categories is dropped from both (its label is ambiguous).

**Held-out text.** One item in ten (chosen by a hash of the key, so the split is the same for every category
list and every run) never enters concept data: ``heldout_texts`` returns those items, from every category, as
real English text for token perplexity (the offline stand-in for the paper's Wikipedia perplexity:
``nslens.realtext.fortunes_ppl_task_dir``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .concepts import ConceptDataset
from .errors import NsLensError

__all__ = [
    "CLEANING",
    "DEFAULT_CATEGORIES",
    "FORTUNES_DIR",
    "LABEL_WORDS",
    "check_fortunes_spec",
    "clean_fortune",
    "fortune_categories",
    "fortunes_dataset",
    "fortunes_dir",
    "heldout_texts",
    "parse_fortunes_spec",
    "read_items",
]

#: where Debian installs the data (override with $NSLENS_FORTUNES_DIR, e.g. for another distribution's layout)
FORTUNES_DIR = Path("/usr/share/games/fortunes")
#: version of the cleaning, deduplication and hold-out rules (recorded in every dataset's source)
CLEANING = "nslens-fortunes-1"
#: ``fortunes`` with no list: topics whose texts carry their topic in common words (the categories of
#: ``nslens.protocols.PROTOCOLS['smollm2-135m']``, all above chance on that model with the calibrated readout)
DEFAULT_CATEGORIES = ("computers", "food", "love", "kids", "sports", "medicine")
#: the word the model answers with, where the file name is not a good one-token English word
LABEL_WORDS: dict[str, str] = {"men-women": "women", "songs-poems": "poetry", "startrek": "Star Trek",
                               "linuxcookie": "Linux", "knghtbrd": "quotes", "ascii-art": "art",
                               "translate-me": "translation", "kids": "children", "pets": "animals"}
#: one item in ``HOLDOUT`` is held out of concept data as perplexity text
HOLDOUT = 10


def fortunes_dir() -> Path:
    """The data directory, or a one-line error saying how to install it."""
    root = Path(os.environ.get("NSLENS_FORTUNES_DIR") or FORTUNES_DIR)
    if not root.is_dir() or not any(root.glob("*.dat")):
        raise NsLensError(f"the fortunes data is not installed (no {root}); install it with "
                         "`apt-get install fortunes` (Debian/Ubuntu) or set NSLENS_FORTUNES_DIR")
    return root


def fortune_categories(root: Path | None = None) -> list[str]:
    """Every category of the data directory: files with a ``strfile`` index beside them (``off/`` is a folder and
    never listed)."""
    root = root or fortunes_dir()
    return sorted(p.stem for p in root.glob("*.dat") if (root / p.stem).is_file())


def parse_fortunes_spec(spec: str, root: Path | None = None) -> tuple[str, ...]:
    """``fortunes`` -> ``DEFAULT_CATEGORIES``; ``fortunes:a,b,...`` -> those categories (checked, in order)."""
    if spec != "fortunes" and not spec.startswith("fortunes:"):
        raise NsLensError(f"not a fortunes dataset spec: {spec!r} (fortunes or fortunes:<category>,<category>,...)")
    listed = spec.partition(":")[2]
    cats = tuple(c.strip() for c in listed.split(",") if c.strip()) if listed else DEFAULT_CATEGORIES
    valid = fortune_categories(root)
    unknown = [c for c in cats if c not in valid]
    if unknown:
        raise NsLensError(f"unknown fortunes categories {unknown}; choose from {', '.join(valid)}")
    dup = sorted({c for c in cats if cats.count(c) > 1})
    if dup:
        raise NsLensError(f"fortunes categories listed twice: {dup}")
    if len(cats) < 2:
        raise NsLensError(f"fortunes dataset {spec!r}: need at least 2 categories, e.g. "
                         f"fortunes:{','.join(DEFAULT_CATEGORIES)}")
    return cats


def check_fortunes_spec(spec: str) -> None:
    """Fail early (before any model loads) on a spec ``fortunes_dataset`` could not load."""
    parse_fortunes_spec(spec)


# --------------------------------------------------------------------------------------------- cleaning

_ATTRIBUTION = re.compile(r"^\s*--\s*\S")


def _overstrike(text: str) -> str:
    out: list[str] = []
    for ch in text:
        if ch == "\b":
            if out:
                out.pop()
        else:
            out.append(ch)
    return "".join(out)


def clean_fortune(raw: str, *, min_words: int = 5, max_words: int = 80) -> str | None:
    """One item as a single line of text under the module's rules, or None when it is dropped."""
    lines = _overstrike(raw).splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if _ATTRIBUTION.match(lines[i]):
            if all(not ln.strip() or ln[:1].isspace() for ln in lines[i + 1:]):
                lines = lines[:i]
            break
    text = " ".join(" ".join(lines).split())
    chars = [c for c in text if not c.isspace()]
    if not chars or sum(c.isalpha() for c in chars) < 0.6 * len(chars):
        return None
    if not min_words <= len(text.split()) <= max_words:
        return None
    return text


def _key(text: str) -> str:
    return "".join(c for c in text.lower() if c.isalnum())


def _held_out(key: str) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % HOLDOUT == 0


def _raw_items(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    return [item for item in re.split(r"^%\s*$", text, flags=re.MULTILINE) if item.strip()]


@functools.lru_cache(maxsize=4)
def _all_items(root: str, min_words: int, max_words: int) -> dict[str, tuple[tuple[str, str], ...]]:
    """Per category, its clean unique (key, text) pairs in file order (all categories: cross-category duplicates
    can only be found by reading every file)."""
    base = Path(root)
    per: dict[str, dict[str, str]] = {}
    for cat in fortune_categories(base):
        items: dict[str, str] = {}
        for raw in _raw_items(base / cat):
            text = clean_fortune(raw, min_words=min_words, max_words=max_words)
            if text is not None:
                items.setdefault(_key(text), text)
        per[cat] = items
    seen: dict[str, int] = {}
    for items in per.values():
        for k in items:
            seen[k] = seen.get(k, 0) + 1
    return {cat: tuple((k, t) for k, t in items.items() if seen[k] == 1) for cat, items in per.items()}


def read_items(category: str, *, heldout: bool = False, min_words: int = 5, max_words: int = 80,
               root: Path | None = None) -> list[str]:
    """The clean, unique items of ``category``: the concept data (default) or its held-out tenth."""
    root = root or fortunes_dir()
    items = _all_items(str(root), min_words, max_words)
    if category not in items:
        raise NsLensError(f"unknown fortunes category {category!r}; choose from {', '.join(items)}")
    return [t for k, t in items[category] if _held_out(k) == heldout]


def fortunes_dataset(spec: str = "fortunes", *, label_words: Sequence[str] | None = None, min_words: int = 5,
                     max_words: int = 80) -> ConceptDataset:
    """The concept dataset of ``fortunes[:a,b,...]``: every clean, unique, non-held-out item of each category."""
    root = fortunes_dir()
    cats = parse_fortunes_spec(spec, root)
    texts: list[str] = []
    labels: list[int] = []
    for c, cat in enumerate(cats):
        items = read_items(cat, min_words=min_words, max_words=max_words, root=root)
        texts += items
        labels += [c] * len(items)
    words = list(label_words) if label_words else [LABEL_WORDS.get(c, c) for c in cats]
    return ConceptDataset(texts=texts, labels=np.asarray(labels), label_names=list(cats),
                          name="fortunes:" + ",".join(cats), label_words=words,
                          source={"path": str(root), "categories": list(cats), "cleaning": CLEANING,
                                  "min_words": min_words, "max_words": max_words, "held_out": f"1/{HOLDOUT}"})


def heldout_texts(categories: Sequence[str] | None = None, *, min_words: int = 5, max_words: int = 80,
                  root: Path | None = None) -> list[str]:
    """The held-out items (never in any ``fortunes`` concept dataset) of ``categories`` (default: all), in
    category then file order."""
    root = root or fortunes_dir()
    cats = list(categories) if categories is not None else fortune_categories(root)
    return [t for cat in cats for t in read_items(cat, heldout=True, min_words=min_words, max_words=max_words,
                                                  root=root)]
