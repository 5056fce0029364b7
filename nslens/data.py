"""Concept datasets and few-shot classification prompts.

A *concept* is a class label of a text-classification dataset (the paper's setting: AG News topics, DBPedia-14
entity types, emotions, sentiment). Decoder models classify through a few-shot prompt whose next token is the
label word; the activation recorded for a sample is the residual stream at that prompt's last token.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "HF_DATASETS",
    "WIKIPEDIA_DATA_FILES",
    "ConceptDataset",
    "FewShotPrompter",
    "HFDatasetSpec",
    "label_token_ids",
    "load_dataset",
    "load_hf_dataset",
    "load_local_dataset",
    "check_dataset_spec",
    "cut_to_tokens",
    "wikipedia_articles",
]

logger = logging.getLogger(__name__)


@dataclass
class ConceptDataset:
    """Texts with integer concept labels.

    ``labels[i]`` indexes ``label_names``; ``label_words`` are the words the model is asked to answer with
    (defaults to the names; override when a name tokenizes badly, e.g. ``Sci/Tech`` -> ``Science``).
    """

    texts: list[str]
    labels: np.ndarray
    label_names: list[str]
    name: str = "custom"
    label_words: list[str] | None = None
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.texts) != len(self.labels):
            raise ValueError(f"dataset {self.name!r}: {len(self.texts)} texts but {len(self.labels)} labels")
        if len(self.label_names) < 2:
            raise ValueError(f"dataset {self.name!r}: need at least 2 concepts, got {self.label_names}")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.label_names)):
            raise ValueError(
                f"dataset {self.name!r}: labels must lie in [0, {len(self.label_names) - 1}], "
                f"got [{self.labels.min()}, {self.labels.max()}]"
            )
        if self.label_words is None:
            self.label_words = list(self.label_names)
        if len(self.label_words) != len(self.label_names):
            raise ValueError(
                f"dataset {self.name!r}: {len(self.label_words)} label words for {len(self.label_names)} labels"
            )

    def __len__(self) -> int:
        return len(self.texts)

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
        )

    def balanced(self, n_per_class: int, seed: int = 0) -> ConceptDataset:
        """At most ``n_per_class`` samples of every concept, drawn without replacement (seeded)."""
        if n_per_class < 1:
            raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
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
        from sklearn.model_selection import train_test_split

        if not 0.0 < test_size < 1.0:
            raise ValueError(f"test_size must be in (0, 1), got {test_size}")
        idx = np.arange(len(self))
        tr, te = train_test_split(idx, test_size=test_size, random_state=seed, stratify=self.labels)
        return self.subset(np.sort(tr)), self.subset(np.sort(te))

    def check_concepts(self, min_samples: int = 2) -> None:
        """Every concept needs ``min_samples`` samples to have a standard deviation."""
        counts = self.class_counts()
        bad = [f"{self.label_names[c]} ({int(n)})" for c, n in enumerate(counts) if n < min_samples]
        if bad:
            raise ValueError(
                f"dataset {self.name!r}: concepts with fewer than {min_samples} samples: {', '.join(bad)}"
            )


# --------------------------------------------------------------------------------------------- loaders


@dataclass(frozen=True)
class HFDatasetSpec:
    """Where a paper dataset lives on the Hugging Face Hub and which columns hold text and label."""

    hub_id: str
    text_column: str
    label_column: str = "label"
    train_split: str = "train"
    test_split: str = "test"
    label_words: tuple[str, ...] | None = None
    config: str | None = None


HF_DATASETS: dict[str, HFDatasetSpec] = {
    "ag_news": HFDatasetSpec(
        "fancyzhx/ag_news", "text", label_words=("World", "Sports", "Business", "Science")
    ),
    "dbpedia_14": HFDatasetSpec("fancyzhx/dbpedia_14", "content"),
    "emotion": HFDatasetSpec("dair-ai/emotion", "text", config="split"),
    "sst2": HFDatasetSpec("stanfordnlp/sst2", "sentence", test_split="validation"),
    "imdb": HFDatasetSpec("stanfordnlp/imdb", "text"),
}


def load_hf_dataset(name: str, split: str | None = None, label_words: Sequence[str] | None = None) -> ConceptDataset:
    """Load one of the paper's datasets through HF ``datasets`` (needs the Hub or a local HF cache)."""
    if name not in HF_DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(HF_DATASETS))} (or a .csv/.jsonl path)")
    spec = HF_DATASETS[name]
    import datasets

    split = split or spec.train_split
    args = (spec.hub_id, spec.config) if spec.config else (spec.hub_id,)
    ds = datasets.load_dataset(*args, split=split)
    for col in (spec.text_column, spec.label_column):
        if col not in ds.column_names:
            raise ValueError(f"dataset {spec.hub_id}: missing column {col!r}; columns are {ds.column_names}")
    feature = ds.features[spec.label_column]
    names = list(getattr(feature, "names", []) or sorted({str(x) for x in ds[spec.label_column]}))
    words = list(label_words or spec.label_words or names)
    return ConceptDataset(
        texts=list(ds[spec.text_column]),
        labels=np.asarray(ds[spec.label_column]),
        label_names=names,
        name=name,
        label_words=words,
        source={"hub_id": spec.hub_id, "split": split},
    )


def load_local_dataset(
    path: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
    label_words: Sequence[str] | None = None,
) -> ConceptDataset:
    """Load a local ``.csv`` or ``.jsonl`` file with a text and a label column.

    Labels may be integers (indices into ``label_names``) or strings (names; sorted to give indices unless
    ``label_names`` fixes the order).
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"dataset file not found: {path}")
    rows: list[dict[str, Any]]
    if path.suffix not in (".csv", ".jsonl", ".json"):
        raise ValueError(f"unsupported dataset file {path.name!r}; use .csv or .jsonl")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            if path.suffix == ".csv":
                rows = list(csv.DictReader(f))
            else:
                rows = []
                for number, line in enumerate(f, start=1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise ValueError(f"dataset file {path}, line {number}: not JSON ({e.msg})") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"dataset file {path} is not UTF-8 text (byte {e.start})") from e
    if not rows:
        raise ValueError(f"dataset file {path} is empty")
    columns = list(rows[0])
    for col in (text_column, label_column):
        if col not in columns:
            raise ValueError(f"dataset file {path.name}: missing column {col!r}; columns are {columns}")
    raw = [r[label_column] for r in rows]
    if all(isinstance(x, int) or (isinstance(x, str) and x.strip().lstrip("-").isdigit()) for x in raw):
        labels = np.asarray([int(x) for x in raw])
        names = list(label_names) if label_names else [str(i) for i in range(int(labels.max()) + 1)]
    else:
        names = list(label_names) if label_names else sorted({str(x) for x in raw})
        unknown = sorted({str(x) for x in raw} - set(names))
        if unknown:
            raise ValueError(f"dataset file {path.name}: labels {unknown} are not in label_names {names}")
        labels = np.asarray([names.index(str(x)) for x in raw])
    return ConceptDataset(
        texts=[str(r[text_column]) for r in rows],
        labels=labels,
        label_names=names,
        name=path.stem,
        label_words=list(label_words) if label_words else None,
        source={"path": str(path)},
    )


def check_dataset_spec(spec: str) -> None:
    """Fail early (before any model loads) on a dataset that ``load_dataset`` could not load."""
    if spec == "synthetic" or spec in HF_DATASETS:
        return
    if spec.endswith((".csv", ".jsonl", ".json")):
        if not Path(spec).exists():
            raise ValueError(f"dataset file not found: {spec}")
        return
    raise ValueError(f"unknown dataset {spec!r}; choose 'synthetic', one of {', '.join(sorted(HF_DATASETS))}, "
                     "or a .csv/.jsonl path")


def load_dataset(spec: str, **kwargs: Any) -> ConceptDataset:
    """One entry point: ``synthetic``, a paper dataset name, or a local file path."""
    if spec == "synthetic":
        from .synthetic import synthetic_concepts

        return synthetic_concepts(**kwargs)
    if spec.endswith((".csv", ".jsonl", ".json")):
        return load_local_dataset(spec, **kwargs)
    if spec in HF_DATASETS:
        return load_hf_dataset(spec, **kwargs)
    raise ValueError(
        f"unknown dataset {spec!r}; choose 'synthetic', one of {', '.join(sorted(HF_DATASETS))}, "
        "or a .csv/.jsonl path"
    )


# --------------------------------------------------------------------------------------------- prompts


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
            raise ValueError(f"k (demonstrations per class) must be >= 0, got {k}")
        rng = random.Random(seed)
        demos: list[tuple[str, int]] = []
        for c in range(ds.n_concepts):
            idx = np.flatnonzero(ds.labels == c).tolist()
            if len(idx) < k:
                raise ValueError(f"concept {ds.label_names[c]!r} has {len(idx)} samples, fewer than k={k} demos")
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


def label_token_ids(tokenizer: Any, label_words: Sequence[str], context: str = "Label:") -> list[int]:
    """First token of each label word as the model would emit it right after ``context``.

    Tokenizes ``context + " " + word`` and takes the first token past the context's own tokens, which is right for
    BPE (``" World"``), SentencePiece (``"▁World"``) and word-level tokenizers alike. Label words whose first
    tokens collide cannot be told apart by a next-token prediction: that is an error naming them.
    """
    base = tokenizer(context, add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for w in label_words:
        full = tokenizer(f"{context} {w}", add_special_tokens=False)["input_ids"]
        if full[: len(base)] != base or len(full) == len(base):
            raise ValueError(f"label word {w!r} does not tokenize as a continuation of {context!r}")
        ids.append(int(full[len(base)]))
    seen: dict[int, str] = {}
    clashes: list[str] = []
    for w, t in zip(label_words, ids):
        if t in seen:
            clashes.append(f"{seen[t]!r} and {w!r} (token {tokenizer.convert_ids_to_tokens(t)!r})")
        seen.setdefault(t, w)
    if clashes:
        raise ValueError(
            "label words share their first token: " + "; ".join(clashes)
            + " (give distinct ones: --label-words w1,w2,... on the CLI, label_words in a config)"
        )
    return ids


# --------------------------------------------------------------------------------------------- general text

#: the NeuronLens authors' Wikipedia snapshot (``wikipedia`` 20220301.en); its first shard holds the first articles
WIKIPEDIA_DATA_FILES = "hf://datasets/legacy-datasets/wikipedia/data/20220301.en/train-00000-of-00041.parquet"


def wikipedia_articles(n_docs: int = 200, data_files: str = WIKIPEDIA_DATA_FILES) -> list[str]:
    """The first ``n_docs`` articles of the authors' Wikipedia snapshot (20220301.en), streamed through
    ``datasets`` (only the first shard is read)."""
    import datasets

    try:
        ds = datasets.load_dataset("parquet", data_files={"train": data_files}, split="train", streaming=True)
        return [row["text"] for row, _ in zip(ds, range(n_docs))]
    except Exception as e:  # the hub's errors are many and deep: one line that names the source
        raise ValueError(f"could not load Wikipedia articles from {data_files} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); pass data_files= a local parquet/json") from e


def cut_to_tokens(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> list[str]:
    """Each text cut to its first ``max_tokens`` tokens of ``tokenizer`` (no special tokens), decoded back."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    return [tokenizer.decode(tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens]) for t in texts]
