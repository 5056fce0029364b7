"""A run's data: the dataset balanced, split, prompted and (with ``only_correct``) filtered to what the clean model
gets right, and the recording of its training split. ``run_pipeline`` and the single-step commands share these."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import RunConfig
from .data import ConceptDataset, FewShotPrompter, dataset_source, label_token_ids
from .erasure import predict
from .errors import NsLensError
from .models import Site
from .nexttoken import target_token_ids
from .rank import get_ranking
from .readout import Readout, make_readout
from .record import Progress, RecordResult, record

__all__ = ["PreparedData", "load_concepts", "prepare_data", "record_stats"]

logger = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """The train/test split, prompts and gold tokens a run uses.

    Classification datasets go through the few-shot ``prompter`` and every sample's gold token is its concept's
    label token (``label_ids``). Next-token datasets (``ConceptDataset.next_token``) have neither: the texts are
    the prompts and each sample has its own gold token."""

    train: ConceptDataset
    test: ConceptDataset
    prompter: FewShotPrompter | None
    label_ids: list[int] | None
    train_gold: np.ndarray
    test_gold: np.ndarray
    readout: Readout | None = None
    """How logits become predictions (``nslens.readout``; None: the greedy token, the paper's rule)."""

    def prompts(self, ds: ConceptDataset) -> list[str]:
        return list(ds.texts) if self.prompter is None else self.prompter.prompts(ds.texts)


def load_concepts(cfg: RunConfig) -> ConceptDataset:
    """The run's dataset, balanced to ``n_per_class`` (label words from the config when given); its source's
    ``run_options`` say which of the config's settings its loader takes."""
    source = dataset_source(cfg.dataset)
    ds = source.load(cfg.dataset, **source.run_options(n_per_class=cfg.n_per_class, seed=cfg.seed,
                                                       max_words=cfg.max_words))
    if cfg.label_words:
        if ds.next_token:
            raise NsLensError(f"dataset {cfg.dataset!r} holds next-token concepts: label_words do not apply")
        ds.label_words = list(cfg.label_words)
        ds.__post_init__()
    return ds.balanced(cfg.n_per_class, seed=cfg.seed)


def _single_token_targets(tokenizer: Any, ds: ConceptDataset) -> ConceptDataset:
    """Next-token samples whose target is one token right after the context's tokens (``target_token_ids``)."""
    _, ok = target_token_ids(tokenizer, ds.texts, ds.targets or [])
    if not ok.all():
        logger.warning("dataset %s: %d of %d samples dropped (the target is not one token after the context's "
                       "tokens with this tokenizer)", ds.name, int((~ok).sum()), len(ok))
    kept = ds.subset(np.flatnonzero(ok))
    kept.source["dropped_multi_token"] = int((~ok).sum())
    return kept


def prepare_data(model: Any, site: Site, cfg: RunConfig, progress: Progress | None = None,
                 ds: ConceptDataset | None = None) -> PreparedData:
    """Balanced sampling, seeded stratified split, few-shot prompter, label tokens (checked for collisions) and,
    with ``only_correct``, the filter to samples the clean model gets right. ``ds``: the dataset, when the caller
    already loaded it (``load_concepts(cfg)``). Next-token datasets keep the samples whose target is one token
    and need no prompter."""
    ds = ds if ds is not None else load_concepts(cfg)
    tok = model.tokenizer
    if ds.next_token:
        ds = _single_token_targets(tok, ds)
    label_ids = None if ds.next_token else label_token_ids(tok, ds.label_words or ds.label_names)
    ds.check_concepts(min_samples=4)
    train, test = ds.split(cfg.test_size, seed=cfg.seed)
    prompter = None if ds.next_token else FewShotPrompter.from_dataset(train, k=cfg.k_shot, seed=cfg.seed,
                                                                        max_words=cfg.max_words)

    def gold(part: ConceptDataset) -> np.ndarray:
        return target_token_ids(tok, part.texts, part.targets or [])[0] if part.next_token \
            else np.asarray(label_ids)[part.labels]

    readout = make_readout(model, cfg.readout, label_ids, prompter, remote=cfg.remote)
    data = PreparedData(train, test, prompter, label_ids, gold(train), gold(test), readout)
    if not cfg.only_correct:
        return data
    kept: list[Any] = []
    for part, g, split, least in ((train, data.train_gold, "train", 2), (test, data.test_gold, "test", 1)):
        p = predict(model, site, data.prompts(part), g, batch_size=cfg.batch_size, remote=cfg.remote,
                    progress=progress, desc="filter correct", readout=readout)
        idx = np.flatnonzero(p.correct)
        _check_correct(part, p.correct, split, least, cfg)  # the train split fails before the test pass runs
        cap = cfg.max_correct_per_class if part is train else max(1, int(cfg.max_correct_per_class * cfg.test_size))
        keep = np.sort(np.concatenate([idx[part.labels[idx] == c][:cap] for c in range(part.n_concepts)]))
        kept += [part.subset(keep), g[keep]]
    train, train_gold, test, test_gold = kept
    train.check_concepts(min_samples=2)  # max_correct_per_class may cap below that
    return PreparedData(train, test, prompter, label_ids, train_gold, test_gold, readout)


def _check_correct(part: ConceptDataset, correct: np.ndarray, split: str, least: int, cfg: RunConfig) -> None:
    """The only-correct filter must leave ``least`` samples of every concept; if not, one line with every
    concept's count before and after the filter, its clean accuracy, and what to try."""
    before = part.class_counts()
    after = np.bincount(part.labels[correct], minlength=part.n_concepts)
    if (after >= least).all():
        return
    counts = ", ".join(f"{n} {int(b)} -> {int(a)} (clean acc {a / max(b, 1):.2f})"
                       for n, b, a in zip(part.label_names, before, after))
    hints = ["a larger n_per_class (--n-per-class; the scripts' --limit)", "--all-samples (only_correct = false)"]
    if not part.next_token:
        hints.append("other --label-words or more shots (--k-shot)")
        if cfg.readout != "calibrated":
            hints.append("--readout calibrated (the label words' scores after the prompt's prior)")
    raise NsLensError(f"dataset {cfg.dataset!r}, {split} split: the only-correct filter leaves fewer than {least} "
                     f"samples of a concept (before -> after: {counts}); try " + ", ".join(hints))


def record_stats(model: Any, site: Site, data: PreparedData, cfg: RunConfig,
                 progress: Progress | None = None, checkpoint: str | Path | None = None,
                 keep_checkpoint: bool = False) -> RecordResult:
    """Statistics of the training split at the site; raw last-token samples are kept when the ranking (its
    ``needs_samples``) or the analyses need them (never with a checkpoint, whose resumable state holds statistics
    only)."""
    keep = ((get_ranking(cfg.method).needs_samples or cfg.analyses) and cfg.record_position == "last"
            and checkpoint is None)
    return record(model, site, data.prompts(data.train), data.train.labels, data.train.label_names,
                  batch_size=cfg.batch_size, position=cfg.record_position, keep_samples=keep,
                  max_samples=cfg.max_samples, remote=cfg.remote, progress=progress, checkpoint=checkpoint,
                  keep_checkpoint=keep_checkpoint,
                  meta={"dataset": cfg.dataset, **data.train.source, "seed": cfg.seed})
