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

The paper's baselines (its probe table): Rand (chance), LM-Prob (the option whose answer token the model gives the
highest probability) and Act (activation-based skill neurons, Wang et al. 2022). Act here: each neuron classifies a
query by the nearest class-conditional mean of its activation on the training split (for two options: a threshold
halfway between the class means); neurons rank by training accuracy, their number is chosen on validation from
2^0 ... 2^13, and they vote. ``probe_features`` reads both baselines' inputs in one trace per batch.

Splits are 6:1:1 and cannot overlap: identical queries (after whitespace normalisation) always land in the same
split (the authors' released splits do overlap for several tasks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .batching import batches, tokenize
from .concepts import concept_labels
from .errors import NsLensError
from .neurons import read_neurons
from .remote import maybe_retry, trace_args

__all__ = ["ActProbe", "MagnProbe", "PolarProbe", "ProbeResults", "evaluate_probes", "probe_features",
           "split_queries", "tree_probe"]


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
        raise NsLensError(f"{len(order)} distinct queries are too few for a {ratios} split")
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
    """Polar-Probe: neurons with the most consistent NEG sign for the correct answers vote for the option where
    they show that sign (features ``[queries, options, neurons]``)."""

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
    """Magn-Probe: neurons whose NEG is most consistently highest (or lowest) at the correct answer vote for the
    option with their highest (lowest) NEG."""

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


class ActProbe(_VoteProbe):
    """Activation-based skill neurons (the Act baseline): features ``[queries, neurons]``, options ``k``."""

    def __init__(self, k: int) -> None:
        self.k = k

    def fit(self, acts: np.ndarray, answers: np.ndarray) -> ActProbe:
        means = np.stack([acts[answers == c].mean(0) if (answers == c).any() else np.full(acts.shape[1], np.inf)
                          for c in range(self.k)])  # [K, W]
        self.means = means
        acc = np.mean(self._nearest(acts, means) == answers[:, None], axis=0)
        self.order = np.argsort(-acc, kind="stable")
        self.n = len(self.order)
        return self

    @staticmethod
    def _nearest(acts: np.ndarray, means: np.ndarray) -> np.ndarray:  # [Q, W]: each neuron's predicted class
        return np.abs(acts[:, None, :] - means[None]).argmin(1)

    def _votes(self, acts: np.ndarray) -> np.ndarray:
        pick = self._nearest(acts, self.means[:, self.order[: acts.shape[-1]]])
        return pick[:, None, :] == np.arange(self.k)[None, :, None]

    def predict(self, acts: np.ndarray, n: int | None = None) -> np.ndarray:
        sel = self.order[: n or self.n]
        return self._votes(acts[:, sel]).sum(-1).argmax(-1)


def probe_features(model: Any, ns: Any, prompts: Sequence[str], option_ids: Sequence[int], *, batch_size: int = 8,
                   remote: bool | str = False) -> tuple[np.ndarray, np.ndarray]:
    """The baselines' inputs, one trace per batch: the probability of each option's answer token at the last
    position ``[queries, options]`` (LM-Prob) and the neurons' last-token activations ``[queries, neurons]`` (Act)."""
    ids = torch.as_tensor(list(option_ids), dtype=torch.int64)
    probs, acts = [], []

    def run(enc: dict) -> dict:
        with torch.no_grad(), model.trace(enc, **trace_args(model, remote)):
            a = read_neurons(model, ns)[:, -1, :].float().cpu().save()
            p = torch.softmax(model.output.logits[:, -1, :].float(), -1)[:, ids].cpu().save()
        return {"p": p, "a": a}

    for i, sl in enumerate(batches(len(prompts), batch_size)):
        enc = tokenize(model, prompts[sl])
        out = maybe_retry(remote, lambda enc=enc: run(enc), what=f"probe features batch {i}")
        probs.append(out["p"])
        acts.append(out["a"])
    return torch.cat(probs).numpy().astype(np.float64), torch.cat(acts).numpy().astype(np.float64)


def tree_probe(neg_train: np.ndarray, answers_train: np.ndarray, seed: int = 0) -> Any:
    """A random forest on per-neuron argmax-over-options features (scikit-learn defaults)."""
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(random_state=seed).fit(neg_train.argmax(1), answers_train)


@dataclass
class ProbeResults:
    """Test accuracy of each probe and baseline, the neurons each chose on validation, chance, and split sizes."""

    accuracy: dict[str, float]
    neurons: dict[str, int]
    chance: float
    sizes: dict[str, int]

    def to_markdown(self) -> str:
        lines = ["| probe | test accuracy | neurons |", "|---|---|---|", f"| chance | {self.chance:.3f} | |"]
        for k, v in self.accuracy.items():
            lines.append(f"| {k} | {v:.3f} | {self.neurons.get(k, '')} |")
        return "\n".join(lines) + f"\n\nSplits (train/valid/test queries): {self.sizes}\n"


def evaluate_probes(neg: np.ndarray, answers: np.ndarray, queries: Sequence[str], *, seed: int = 0,
                    option_probs: np.ndarray | None = None, activations: np.ndarray | None = None) -> ProbeResults:
    """Train the three NEG probes on the train split, choose sizes on valid, report test accuracy; with
    ``option_probs`` ``[queries, options]`` and ``activations`` ``[queries, neurons]`` (``probe_features``) also the
    LM-Prob and Act baselines on the same test split."""
    neg = np.asarray(neg, dtype=np.float64)
    if neg.ndim != 3 or not neg.shape[2] or not np.isfinite(neg).all():  # NaN NEG gave accuracies without a word
        raise NsLensError(f"need finite NEG [queries, options, neurons], got shape {neg.shape}")
    answers = concept_labels(answers, neg.shape[1])  # an answer past the options was an IndexError; 0.5 truncated
    if neg.shape[0] != len(answers) or len(queries) != len(answers):
        raise NsLensError(f"need NEG [queries, options, neurons] and one answer per query; got {neg.shape}, "
                         f"{len(answers)} answers, {len(queries)} queries")
    tr, va, te = split_queries(queries, seed)
    acc, neurons = {}, {}
    if option_probs is not None:
        option_probs = np.asarray(option_probs)
        if option_probs.shape != neg.shape[:2]:
            raise NsLensError(f"option_probs must be [queries, options] = {neg.shape[:2]}, got {option_probs.shape}")
        acc["LM-Prob"] = float(np.mean(option_probs[te].argmax(1) == answers[te]))
    if activations is not None:
        activations = np.asarray(activations)
        if activations.ndim != 2 or activations.shape[0] != len(answers):
            raise NsLensError(f"activations must be [queries, neurons], got {activations.shape}")
        act = ActProbe(neg.shape[1]).fit(activations[tr], answers[tr])
        neurons["Act"] = act.choose(activations[va], answers[va])
        acc["Act"] = float(np.mean(act.predict(activations[te]) == answers[te]))
    for name, probe in (("Polar-Probe", PolarProbe()), ("Magn-Probe", MagnProbe())):
        probe.fit(neg[tr], answers[tr])
        neurons[name] = probe.choose(neg[va], answers[va])
        acc[name] = float(np.mean(probe.predict(neg[te]) == answers[te]))
    forest = tree_probe(neg[tr], answers[tr], seed)
    acc["Tree-Probe"] = float(np.mean(forest.predict(neg[te].argmax(1)) == answers[te]))
    neurons["Tree-Probe"] = int((forest.feature_importances_ > 0).sum())
    return ProbeResults(acc, neurons, 1.0 / neg.shape[1], {"train": len(tr), "valid": len(va), "test": len(te)})
