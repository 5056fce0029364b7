"""Skill-neuron probes on NEG features (NEG paper Section 5): Polar-Probe, Magn-Probe and Tree-Probe.

Features are NeurGrad values ``[queries, options, neurons]`` (``nslens.neg.neurgrad`` with the options' tokens).
- Polar-Probe: each neuron's global polarity is its dominant NEG sign for the correct answers in training; neurons
  with more consistent polarity rank higher. A query's prediction is the option for which the most selected neurons
  show their global polarity.
- Magn-Probe: a neuron is a skill indicator if the correct answer's NEG is consistently the highest (or the lowest)
  among the options; more consistent neurons rank higher. Each selected neuron votes for the option with its
  highest (or lowest) NEG.
- Tree-Probe: a random forest (scikit-learn defaults: 100 trees, no depth limit) on per-neuron argmax-over-options
  features.
For the majority-vote probes the number of neurons is chosen on the validation split from 2^0 ... 2^13.

Splits are 6:1:1 and cannot overlap: identical queries (after whitespace normalisation) always land in the same
split (the authors' released splits do overlap for several tasks).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MagnProbe", "PolarProbe", "ProbeResults", "evaluate_probes", "load_mceval", "split_queries",
           "tree_probe"]


def split_queries(queries: Sequence[str], seed: int = 0, ratios: tuple[int, int, int] = (6, 1, 1)
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train/valid/test indices in ``ratios``; duplicates of a query share a split, so the splits are disjoint."""
    keys = [" ".join(q.split()).lower() for q in queries]
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    order = list(groups)
    np.random.default_rng(seed).shuffle(order)
    total = sum(ratios)
    cut1 = round(len(order) * ratios[0] / total)
    cut2 = cut1 + round(len(order) * ratios[1] / total)
    parts = (order[:cut1], order[cut1:cut2], order[cut2:])
    if any(len(p) == 0 for p in parts):
        raise ValueError(f"{len(order)} distinct queries are too few for a {ratios} split")
    return tuple(np.array(sorted(i for k in p for i in groups[k]), dtype=np.int64) for p in parts)  # type: ignore


def _sizes(width: int) -> list[int]:
    return [2**n for n in range(14) if 2**n <= width] or [width]


class _VoteProbe:
    """Shared: rank neurons by consistency on train, choose how many vote on valid."""

    order: np.ndarray
    n: int

    def _votes(self, neg: np.ndarray) -> np.ndarray:  # [Q, K, W] -> per neuron vote mask [Q, K, W]
        raise NotImplementedError

    def predict(self, neg: np.ndarray, n: int | None = None) -> np.ndarray:
        sel = self.order[: n or self.n]
        return self._votes(neg[:, :, sel]).sum(-1).argmax(-1)

    def choose(self, neg_valid: np.ndarray, answers_valid: np.ndarray) -> int:
        accs = {n: float(np.mean(self.predict(neg_valid, n) == answers_valid)) for n in _sizes(len(self.order))}
        self.n = max(accs, key=lambda n: (accs[n], -n))
        return self.n


class PolarProbe(_VoteProbe):
    def fit(self, neg: np.ndarray, answers: np.ndarray) -> PolarProbe:
        s = np.sign(neg[np.arange(len(answers)), answers])  # [Q, W]
        self.polarity = np.where(s.sum(0) >= 0, 1.0, -1.0)
        consistency = np.mean(s == self.polarity, axis=0)
        self.order = np.argsort(-consistency, kind="stable")
        self.n = len(self.order)
        return self

    def _votes(self, neg: np.ndarray) -> np.ndarray:
        return np.sign(neg) == self.polarity[self.order[: neg.shape[-1]]]


class MagnProbe(_VoteProbe):
    def fit(self, neg: np.ndarray, answers: np.ndarray) -> MagnProbe:
        hi = np.mean(neg.argmax(1) == answers[:, None], axis=0)
        lo = np.mean(neg.argmin(1) == answers[:, None], axis=0)
        self.prefers_high = hi >= lo
        self.order = np.argsort(-np.maximum(hi, lo), kind="stable")
        self.n = len(self.order)
        return self

    def _votes(self, neg: np.ndarray) -> np.ndarray:
        pick = np.where(self.prefers_high[self.order[: neg.shape[-1]]], neg.argmax(1), neg.argmin(1))  # [Q, W]
        return pick[:, None, :] == np.arange(neg.shape[1])[None, :, None]


def tree_probe(neg_train: np.ndarray, answers_train: np.ndarray, seed: int = 0) -> Any:
    """A random forest on per-neuron argmax-over-options features (scikit-learn defaults)."""
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(random_state=seed).fit(neg_train.argmax(1), answers_train)


@dataclass
class ProbeResults:
    accuracy: dict[str, float]
    neurons: dict[str, int]
    chance: float
    sizes: dict[str, int]

    def to_markdown(self) -> str:
        lines = ["| probe | test accuracy | neurons |", "|---|---|---|", f"| chance | {self.chance:.3f} | |"]
        for k, v in self.accuracy.items():
            lines.append(f"| {k} | {v:.3f} | {self.neurons.get(k, '')} |")
        return "\n".join(lines) + f"\n\nSplits (train/valid/test queries): {self.sizes}\n"


def evaluate_probes(neg: np.ndarray, answers: np.ndarray, queries: Sequence[str], *, seed: int = 0
                    ) -> ProbeResults:
    """Train the three probes on the train split, choose sizes on valid, report test accuracy."""
    answers = np.asarray(answers, dtype=np.int64)
    if neg.ndim != 3 or neg.shape[0] != len(answers) or len(queries) != len(answers):
        raise ValueError(f"need NEG [queries, options, neurons] and one answer per query; got {neg.shape}, "
                         f"{len(answers)} answers, {len(queries)} queries")
    tr, va, te = split_queries(queries, seed)
    acc, neurons = {}, {}
    for name, probe in (("Polar-Probe", PolarProbe()), ("Magn-Probe", MagnProbe())):
        probe.fit(neg[tr], answers[tr])
        neurons[name] = probe.choose(neg[va], answers[va])
        acc[name] = float(np.mean(probe.predict(neg[te]) == answers[te]))
    forest = tree_probe(neg[tr], answers[tr], seed)
    acc["Tree-Probe"] = float(np.mean(forest.predict(neg[te].argmax(1)) == answers[te]))
    neurons["Tree-Probe"] = int((forest.feature_importances_ > 0).sum())
    return ProbeResults(acc, neurons, 1.0 / neg.shape[1], {"train": len(tr), "valid": len(va), "test": len(te)})


def load_mceval(task: str | Path, *, split: str = "train", query_column: str = "query",
                options_column: str = "options", answer_column: str = "answer") -> tuple[list[str], list[list[str]],
                                                                                        np.ndarray]:
    """MCEval8K queries: ``task`` is a local JSON/JSONL file, or ``<genre>/<task>`` of the hub dataset
    ``iszhaoxin/MCEval8K`` (files ``<genre>/<task>/{train,valid,test}.json``). Column names are parameters because
    the schema is not checked here offline. Answers may be option indices or option strings."""
    path = Path(task)
    if path.exists():
        text = path.read_text()
        rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines()
                                                                       if x.strip()]
    else:
        if task.count("/") != 1:
            raise ValueError(f"MCEval8K task {task!r}: give a local file or '<genre>/<task>' (e.g. fact/fever)")
        import datasets

        rows = list(datasets.load_dataset("iszhaoxin/MCEval8K", data_files={split: f"{task}/{split}.json"},
                                          split=split))
    if not rows:
        raise ValueError(f"no queries in {task}")
    missing = [c for c in (query_column, options_column, answer_column) if c not in rows[0]]
    if missing:
        raise ValueError(f"MCEval8K rows lack {missing}; columns are {sorted(rows[0])} (set the *_column names)")
    queries = [str(r[query_column]) for r in rows]
    options = [list(map(str, r[options_column])) for r in rows]
    answers = np.array([o.index(str(r[answer_column])) if not str(r[answer_column]).lstrip("-").isdigit()
                        else int(r[answer_column]) for r, o in zip(rows, options)])
    return queries, options, answers
