"""Loading concept datasets (the paper's HF datasets, local files, the synthetic default) and label tokens.

A *concept* is a class label of a text-classification dataset (the paper's setting: AG News topics, DBPedia-14
entity types, emotions, sentiment). Decoder models classify through a few-shot prompt whose next token is the
label word; the activation recorded for a sample is the residual stream at that prompt's last token.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .concepts import ConceptDataset, FewShotPrompter
from .errors import NsLensError
from .fortunes import check_fortunes_spec, fortunes_dataset
from .nexttoken import next_token_dataset, parse_spec
from .registry import Registry
from .synthetic import synthetic_concepts

__all__ = [
    "DATASET_SOURCES",
    "HF_DATASETS",
    "DatasetSource",
    "dataset_source",
    "register_dataset_source",
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

# the dataset and prompt types live in nslens.concepts (shared with nslens.synthetic without an import cycle)


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
        raise NsLensError(f"unknown dataset {name!r}; known: {', '.join(sorted(HF_DATASETS))} (or a .csv/.jsonl path)")
    spec = HF_DATASETS[name]
    import datasets

    split = split or spec.train_split
    args = (spec.hub_id, spec.config) if spec.config else (spec.hub_id,)
    try:
        ds = datasets.load_dataset(*args, split=split)
    except Exception as e:  # the hub's errors are many and deep: one line that names the source
        raise NsLensError(f"could not load dataset {name!r} ({spec.hub_id}, split {split!r}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); it needs the Hub or a local HF cache, or "
                         "pass a .csv/.jsonl path") from e
    for col in (spec.text_column, spec.label_column):
        if col not in ds.column_names:
            raise NsLensError(f"dataset {spec.hub_id}: missing column {col!r}; columns are {ds.column_names}")
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


def _is_index(x: Any) -> bool:
    """A label given as a concept index: an integer, a whole float, or a string of digits."""
    if isinstance(x, bool):
        return False
    if isinstance(x, (int, float)):
        return float(x).is_integer()
    return isinstance(x, str) and x.strip().lstrip("-").isdigit()


def _file_rows(path: Path, f: Any) -> list[dict[str, Any]]:
    """The rows of a .csv (a header line), a .jsonl (an object per line) or a .json file (an array of objects, or
    an object per line): each a dict, or a one-line error naming the line."""
    if path.suffix == ".csv":
        return list(csv.DictReader(f))
    text = f.read()
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise NsLensError(f"dataset file {path}, line {e.lineno}: not JSON ({e.msg})") from e
        numbered = list(enumerate(rows, start=1))
    else:
        numbered = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    numbered.append((number, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise NsLensError(f"dataset file {path}, line {number}: not JSON ({e.msg})") from e
    for number, row in numbered:
        if not isinstance(row, dict):
            raise NsLensError(f"dataset file {path}, {'item' if path.suffix == '.json' else 'line'} {number}: a "
                              f"JSON {type(row).__name__}, not an object with the text and label")
    return [row for _, row in numbered]


def load_local_dataset(
    path: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    label_names: Sequence[str] | None = None,
    label_words: Sequence[str] | None = None,
    target_column: str = "target",
) -> ConceptDataset:
    """Load a local ``.csv`` or ``.jsonl`` file with a text and a label column.

    Labels may be integers (indices into ``label_names``) or strings (names; sorted to give indices unless
    ``label_names`` fixes the order). A ``target_column`` makes it a next-token dataset (the text is raw context,
    the target the token that followed: ``nslens.nexttoken.write_check_sheet`` writes such files).
    """
    path = Path(path)
    if not path.exists():
        raise NsLensError(f"dataset file not found: {path}")
    rows: list[dict[str, Any]]
    if path.suffix not in (".csv", ".jsonl", ".json"):
        raise NsLensError(f"unsupported dataset file {path.name!r}; use .csv or .jsonl")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
            rows = _file_rows(path, f)
    except UnicodeDecodeError as e:
        raise NsLensError(f"dataset file {path} is not UTF-8 text (byte {e.start})") from e
    if not rows:
        raise NsLensError(f"dataset file {path} is empty")
    columns = list(rows[0])
    for col in (text_column, label_column):
        if col not in columns:
            raise NsLensError(f"dataset file {path.name}: missing column {col!r}; columns are {columns}")
    for col in (text_column, label_column):  # a short CSV row, a JSON row without the key, or a null: concept 'None'
        bad = [i + 1 for i, r in enumerate(rows) if r.get(col) is None or (col == label_column and r[col] == "")]
        if bad:
            raise NsLensError(f"dataset file {path.name}: no {col!r} in rows {bad[:5]}"
                              + (" ..." if len(bad) > 5 else ""))
    raw = [r[label_column] for r in rows]
    if all(_is_index(x) for x in raw):  # 1, 1.0 and "1" are one concept, not three
        labels = np.asarray([int(float(x)) for x in raw])
        names = list(label_names) if label_names else [str(i) for i in range(int(labels.max()) + 1)]
    else:
        names = list(label_names) if label_names else sorted({str(x) for x in raw})
        unknown = sorted({str(x) for x in raw} - set(names))
        if unknown:
            raise NsLensError(f"dataset file {path.name}: labels {unknown} are not in label_names {names}")
        labels = np.asarray([names.index(str(x)) for x in raw])
    targets = None
    if target_column in columns:
        targets = [str(r.get(target_column) or "") for r in rows]
        empty = [i + 1 for i, t in enumerate(targets) if not t]
        if empty:
            raise NsLensError(f"dataset file {path.name}: empty {target_column!r} in rows {empty[:5]}")
    return ConceptDataset(
        texts=[str(r[text_column]) for r in rows],
        labels=labels,
        label_names=names,
        name=path.stem,
        label_words=list(label_words) if label_words else None,
        source={"path": str(path)},
        targets=targets,
    )


# --------------------------------------------------------------------------------------------- dataset sources


@dataclass(frozen=True)
class DatasetSource:
    """One kind of dataset spec (the string after ``--dataset`` or a config's ``dataset``): ``synthetic``, a paper
    dataset name, ``next:...``, ``fortunes:...``, a file path, or one of one's own.

    A subclass sets ``name`` and ``usage`` (how the spec is written, for the "choose ..." message) and implements
    ``matches`` (is this spec mine?), ``load`` and, where a spec can be checked without loading (before any model
    loads), ``check``. ``load_dataset`` asks the registered sources in order; the first that matches loads."""

    name: ClassVar[str] = ""
    usage: ClassVar[str] = ""

    def matches(self, spec: str) -> bool:
        """Whether ``spec`` is this source's to load."""
        raise NotImplementedError(f"{type(self).__name__} does not implement matches")

    def check(self, spec: str) -> None:
        """Fail early on a spec ``load`` could not load; the base accepts any spec it matches."""

    def load(self, spec: str, **kwargs: Any) -> ConceptDataset:
        """The dataset ``spec`` names (``kwargs``: what ``load_dataset`` passes on, e.g. ``n_per_class``)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement load")

    def run_options(self, *, n_per_class: int, seed: int, max_words: int) -> dict[str, Any]:
        """The keyword arguments a run's ``load`` gets from its config: the base passes none (the run balances
        what ``load`` returns to ``n_per_class`` itself); a source that draws its samples takes the count and
        the seed here."""
        return {}


@dataclass(frozen=True)
class SyntheticSource(DatasetSource):
    """``synthetic``: the embedded model's 4-concept task (``nslens.synthetic``), offline."""

    name: ClassVar[str] = "synthetic"
    usage: ClassVar[str] = "'synthetic'"

    def matches(self, spec: str) -> bool:
        return spec == "synthetic"

    def load(self, spec: str, **kwargs: Any) -> ConceptDataset:
        return synthetic_concepts(**kwargs)

    def run_options(self, *, n_per_class: int, seed: int, max_words: int) -> dict[str, Any]:
        return {"n_per_class": n_per_class, "seed": seed + 1}  # seed + 1, as runs have drawn it from the start


@dataclass(frozen=True)
class HubSource(DatasetSource):
    """A paper dataset by its short name (``HF_DATASETS``: ag_news, dbpedia_14, ...), through HF ``datasets``."""

    name: ClassVar[str] = "hub"

    @property
    def usage(self) -> str:  # type: ignore[override]
        return f"one of {', '.join(sorted(HF_DATASETS))}"

    def matches(self, spec: str) -> bool:
        return spec in HF_DATASETS

    def load(self, spec: str, **kwargs: Any) -> ConceptDataset:
        return load_hf_dataset(spec, **kwargs)


@dataclass(frozen=True)
class NextTokenSource(DatasetSource):
    """``next:<family>[:<source>]``: next-token concepts (``nslens.nexttoken``)."""

    name: ClassVar[str] = "next"
    usage: ClassVar[str] = "next:<family>[:<source>]"

    def matches(self, spec: str) -> bool:
        return spec.startswith("next:")

    def check(self, spec: str) -> None:
        parse_spec(spec)

    def load(self, spec: str, **kwargs: Any) -> ConceptDataset:
        return next_token_dataset(spec, **kwargs)

    def run_options(self, *, n_per_class: int, seed: int, max_words: int) -> dict[str, Any]:
        return {"n_per_concept": n_per_class, "seed": seed, "max_words": max_words}


@dataclass(frozen=True)
class FortunesSource(DatasetSource):
    """``fortunes[:<category>,...]``: Debian's fortunes categories as concepts (``nslens.fortunes``)."""

    name: ClassVar[str] = "fortunes"
    usage: ClassVar[str] = "fortunes[:<category>,...] (Debian's fortunes)"

    def matches(self, spec: str) -> bool:
        return spec == "fortunes" or spec.startswith("fortunes:")

    def check(self, spec: str) -> None:
        check_fortunes_spec(spec)

    def load(self, spec: str, **kwargs: Any) -> ConceptDataset:
        return fortunes_dataset(spec, **kwargs)


@dataclass(frozen=True)
class FileSource(DatasetSource):
    """A local ``.csv``/``.jsonl`` file with a text and a label column (``load_local_dataset``)."""

    name: ClassVar[str] = "file"
    usage: ClassVar[str] = "a .csv/.jsonl path"

    def matches(self, spec: str) -> bool:
        return spec.endswith((".csv", ".jsonl", ".json"))

    def check(self, spec: str) -> None:
        if not Path(spec).exists():
            raise NsLensError(f"dataset file not found: {spec}")

    def load(self, spec: str, **kwargs: Any) -> ConceptDataset:
        return load_local_dataset(spec, **kwargs)


DATASET_SOURCES: Registry[type[DatasetSource]] = Registry("dataset source")


def register_dataset_source(cls: type[DatasetSource], *, replace: bool = False) -> type[DatasetSource]:
    """Make ``load_dataset`` (and ``--dataset``, a config's ``dataset``) accept the specs ``cls`` matches; asked
    after the sources registered before it. Usable as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, DatasetSource)) or not cls.name:
        raise NsLensError(f"register_dataset_source needs a DatasetSource subclass with a name, got {cls!r}")
    DATASET_SOURCES.register(cls.name, cls, replace=replace)
    return cls


for _cls in (SyntheticSource, HubSource, NextTokenSource, FortunesSource, FileSource):
    register_dataset_source(_cls)


def dataset_source(spec: str) -> DatasetSource:
    """The registered source that reads ``spec`` (the first that matches), or an error listing how specs are
    written."""
    for name in DATASET_SOURCES.names():
        source = DATASET_SOURCES.get(name)()
        if isinstance(spec, str) and source.matches(spec):
            return source
    usages = [DATASET_SOURCES.get(name)().usage for name in DATASET_SOURCES.names()]
    listed = ", ".join(usages[:-1]) + f", or {usages[-1]}" if len(usages) > 1 else usages[0]
    raise NsLensError(f"unknown dataset {spec!r}; choose {listed}")


def check_dataset_spec(spec: str) -> None:
    """Fail early (before any model loads) on a dataset that ``load_dataset`` could not load."""
    dataset_source(spec).check(spec)


def load_dataset(spec: str | Path, **kwargs: Any) -> ConceptDataset:
    """One entry point: ``synthetic``, a paper dataset name, ``next:<family>[:<source>]`` (next-token concepts,
    ``nslens.nexttoken``), ``fortunes[:<category>,...]`` (Debian's fortunes categories, ``nslens.fortunes``), a
    local file path, or a spec of a registered source of one's own (``register_dataset_source``)."""
    return dataset_source(str(spec)).load(str(spec), **kwargs)  # a pathlib.Path names a file too


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
            raise NsLensError(f"label word {w!r} does not tokenize as a continuation of {context!r}")
        ids.append(int(full[len(base)]))
    seen: dict[int, str] = {}
    clashes: list[str] = []
    for w, t in zip(label_words, ids):
        if t in seen:
            clashes.append(f"{seen[t]!r} and {w!r} (token {tokenizer.convert_ids_to_tokens(t)!r})")
        seen.setdefault(t, w)
    if clashes:
        raise NsLensError(
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
        raise NsLensError(f"could not load Wikipedia articles from {data_files} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); pass data_files= a local parquet/json") from e


def cut_to_tokens(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> list[str]:
    """Each text cut to its first ``max_tokens`` tokens of ``tokenizer`` (no special tokens), decoded back."""
    if max_tokens < 1:
        raise NsLensError(f"max_tokens must be >= 1, got {max_tokens}")
    return [tokenizer.decode(tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens]) for t in texts]
