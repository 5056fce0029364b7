"""Concept datasets and few-shot classification prompts: the types every loader returns and every run uses.

A *concept* is a class label of a text-classification dataset (the paper's setting: AG News topics, DBPedia-14
entity types, emotions, sentiment). Decoder models classify through a few-shot prompt whose next token is the
label word; the activation recorded for a sample is the residual stream at that prompt's last token.

A *next-token* dataset (``targets`` set, ``nslens.nexttoken``, paper App. K) has no prompt: each text is raw
context and its target is the token that followed it, so every sample has its own gold token.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import NsLensError, check_number

__all__ = ["ConceptDataset", "FewShotPrompter", "check_test_size", "concept_labels"]


def check_test_size(test_size: Any) -> float:
    """The test share of a split: a number strictly between 0 and 1 (a run config's and ``split``'s)."""
    if not 0.0 < check_number("test_size", test_size) < 1.0:
        raise NsLensError(f"test_size must be in (0, 1), got {test_size}")
    return float(test_size)


def concept_labels(labels: Any, n_concepts: int) -> np.ndarray:
    """``labels`` as int64 concept indices in [0, n_concepts), or the one-line error: a float label was silently
    truncated (every 0.5 became concept 0) and one past the concepts failed deep inside the statistics."""
    arr = np.asarray(labels)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_)
                             or (np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)))):
        raise NsLensError(f"labels must be a flat list of integer concept indices, got {arr.dtype} of shape "
                          f"{arr.shape}")
    out = arr.astype(np.int64)
    bad = out[(out < 0) | (out >= n_concepts)]
    if len(bad):
        raise NsLensError(f"label {int(bad[0])} is not a concept index: {n_concepts} concepts take 0 to "
                          f"{n_concepts - 1}")
    return out


@dataclass
class ConceptDataset:
    """Texts with integer concept labels.

    ``labels[i]`` indexes ``label_names``; ``label_words`` are the words the model is asked to answer with
    (defaults to the names; override when a name tokenizes badly, e.g. ``Sci/Tech`` -> ``Science``).
    ``targets[i]``, for next-token concepts, is the text that followed ``texts[i]`` (its first token is the
    sample's gold token).
    """

    texts: list[str]
    labels: np.ndarray
    label_names: list[str]
    name: str = "custom"
    label_words: list[str] | None = None
    source: dict[str, Any] = field(default_factory=dict)
    targets: list[str] | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.texts) != len(self.labels):
            raise NsLensError(f"dataset {self.name!r}: {len(self.texts)} texts but {len(self.labels)} labels")
        if self.targets is not None and len(self.targets) != len(self.texts):
            raise NsLensError(f"dataset {self.name!r}: {len(self.texts)} texts but {len(self.targets)} targets")
        if len(self.label_names) < 2:
            raise NsLensError(f"dataset {self.name!r}: need at least 2 concepts, got {self.label_names}")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.label_names)):
            raise NsLensError(
                f"dataset {self.name!r}: labels must lie in [0, {len(self.label_names) - 1}], "
                f"got [{self.labels.min()}, {self.labels.max()}]"
            )
        if self.label_words is None:
            self.label_words = list(self.label_names)
        if len(self.label_words) != len(self.label_names):
            raise NsLensError(
                f"dataset {self.name!r}: {len(self.label_words)} label words for {len(self.label_names)} labels"
            )

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def next_token(self) -> bool:
        """Raw contexts with per-sample target tokens (no prompt) rather than texts to classify."""
        return self.targets is not None

    @property
    def n_concepts(self) -> int:
        return len(self.label_names)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.n_concepts)

    def subset(self, index: Sequence[int] | np.ndarray) -> ConceptDataset:
        index = np.asarray(index, dtype=np.int64)
        return ConceptDataset(
            texts=[self.texts[i] for i in index],
            labels=self.labels[index],
            label_names=list(self.label_names),
            name=self.name,
            label_words=list(self.label_words or self.label_names),
            source=dict(self.source),
            targets=None if self.targets is None else [self.targets[i] for i in index],
        )

    def balanced(self, n_per_class: int, seed: int = 0) -> ConceptDataset:
        """At most ``n_per_class`` samples of every concept, drawn without replacement (seeded)."""
        if n_per_class < 1:
            raise NsLensError(f"n_per_class must be >= 1, got {n_per_class}")
        rng = np.random.default_rng(seed)
        keep: list[int] = []
        for c in range(self.n_concepts):
            idx = np.flatnonzero(self.labels == c)
            if len(idx) > n_per_class:
                idx = rng.choice(idx, size=n_per_class, replace=False)
            keep.extend(sorted(idx.tolist()))
        return self.subset(sorted(keep))

    def split(self, test_size: float = 0.2, seed: int = 0) -> tuple[ConceptDataset, ConceptDataset]:
        """Seeded stratified train/test split (scikit-learn)."""
        from sklearn.model_selection import train_test_split  # heavy (about 1 s): only the split needs it

        check_test_size(test_size)
        check_number("seed", seed, 0, integer=True)
        n, c = len(self), len(np.unique(self.labels))
        n_test = math.ceil(test_size * n)  # scikit-learn's count; each side needs a sample of every concept
        if min(n_test, n - n_test) < c:
            raise NsLensError(f"a test_size of {test_size:g} splits {n} samples into {n - n_test} train and {n_test} "
                              f"test, fewer than the {c} concepts; raise n_per_class or move test_size toward 0.5")
        idx = np.arange(len(self))
        tr, te = train_test_split(idx, test_size=test_size, random_state=seed, stratify=self.labels)
        return self.subset(np.sort(tr)), self.subset(np.sort(te))

    def check_concepts(self, min_samples: int = 2) -> None:
        """Every concept needs ``min_samples`` samples to have a standard deviation."""
        counts = self.class_counts()
        bad = [f"{self.label_names[c]} ({int(n)})" for c, n in enumerate(counts) if n < min_samples]
        if bad:
            raise NsLensError(
                f"dataset {self.name!r}: concepts with fewer than {min_samples} samples: {', '.join(bad)}"
            )


# --------------------------------------------------------------------------------------------- loaders



@dataclass
class FewShotPrompter:
    """The paper's few-shot classification prompt for decoder models.

    An instruction listing the label words, ``k`` demonstrations per class (shuffled, fixed for a run), then the
    query; the model's prediction is its next token after ``Label:``. Long texts are cut to ``max_words`` words
    so prompts stay short on datasets such as IMDB and DBPedia.
    """

    label_words: list[str]
    demos: list[tuple[str, int]] = field(default_factory=list)
    max_words: int = 64
    instruction: str = "Classify the text into one of these categories: {labels}."

    @classmethod
    def from_dataset(cls, ds: ConceptDataset, k: int = 1, seed: int = 0, max_words: int = 64) -> FewShotPrompter:
        """Draw ``k`` demonstrations per concept from ``ds`` (seeded)."""
        if k < 0:
            raise NsLensError(f"k (demonstrations per class) must be >= 0, got {k}")
        rng = random.Random(seed)
        demos: list[tuple[str, int]] = []
        for c in range(ds.n_concepts):
            idx = np.flatnonzero(ds.labels == c).tolist()
            if len(idx) < k:
                raise NsLensError(f"concept {ds.label_names[c]!r} has {len(idx)} samples, fewer than k={k} demos")
            demos.extend((ds.texts[i], c) for i in rng.sample(idx, k))
        rng.shuffle(demos)
        return cls(label_words=list(ds.label_words or ds.label_names), demos=demos, max_words=max_words)

    def _cut(self, text: str) -> str:
        words = text.split()
        return " ".join(words[: self.max_words])

    def prefix(self) -> str:
        parts = [self.instruction.format(labels=", ".join(self.label_words)), ""]
        for text, label in self.demos:
            parts += [f"Text: {self._cut(text)}", f"Label: {self.label_words[label]}", ""]
        return "\n".join(parts)

    def __call__(self, text: str) -> str:
        return f"{self.prefix()}\nText: {self._cut(text)}\nLabel:"

    def prompts(self, texts: Sequence[str]) -> list[str]:
        prefix = self.prefix()
        return [f"{prefix}\nText: {self._cut(t)}\nLabel:" for t in texts]
