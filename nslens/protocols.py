"""Classification protocols a given real model can do: which concepts, label words, prompt settings and readout
keep enough samples under the paper's only-correct filter.

The paper's protocol (App. H) keeps only the samples the clean model classifies correctly, the prediction being
the argmax next token after ``Label:`` compared with the first token of the label word. A small model must
therefore be well above chance on every concept, or the filter leaves too little to record. Measured on
SmolLM2-135M-Instruct (``experiments/fortunes_protocol.py``), the obstacle is not that the model cannot tell
topics apart but a prior over the labels: with few-shot demonstrations it answers one or two labels for most
queries, often the most recent demonstration's (computers/politics/science/sports: 88 of 120 queries answered
"sports" when the last demonstration was sports). Larger k does not remove it (16 demonstrations: still 90 %
"sports"), nor does the chat template (every query "sports"), nor a zero-shot question (the model answers
" the" or the first listed option), nor restricting the argmax to the label words (``readout = "labels"``).

What removes it is contextual calibration (``readout = "calibrated"``, ``nslens.readout``; Zhao et al. 2021):
the label words' log-probabilities minus their mean under content-free queries (``N/A``, the empty text,
``[MASK]``) in the same prompt. Registered here, measured with nslens's ``predict`` on 40 samples per class
(all of them, train and test), three seeds of the sampling and demonstrations (seeds 0, 1, 2), one
demonstration per class of at most 24 words, no chat template, ``fortunes:computers,food,love,kids,sports,
medicine`` (chance 0.17), mean (min..max over seeds):

=========  ==================  ==================  ==================
concept    argmax (paper's)    labels              calibrated
=========  ==================  ==================  ==================
computers  0.04 (0.03..0.05)   0.10 (0.05..0.20)   0.64 (0.55..0.73)
food       0.13 (0.10..0.15)   0.16 (0.15..0.18)   0.71 (0.65..0.75)
love       0.48 (0.25..0.85)   0.50 (0.25..0.85)   0.56 (0.33..0.80)
kids       0.83 (0.68..0.98)   0.87 (0.78..1.00)   0.72 (0.35..0.98)
sports     0.33 (0.28..0.43)   0.45 (0.30..0.63)   0.60 (0.50..0.75)
medicine   0.46 (0.25..0.65)   0.56 (0.28..0.93)   0.58 (0.25..0.88)
=========  ==================  ==================  ==================

Calibrated, every concept is above chance at every seed, and computers, food and sports at least three times
chance at every seed; the argmax rule leaves computers and food a handful of samples.

Where the model is used with another dataset, ``protocol_settings`` still applies its ``k_shot``, ``max_words``
and ``readout``; the single-step commands apply them for the flags left at their defaults and say so. The error
for too few correct samples names each concept's clean accuracy and points at ``--all-samples``,
``--label-words``, ``--k-shot`` and ``--readout calibrated``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["PROTOCOLS", "ClassificationProtocol", "protocol_for", "protocol_settings"]


@dataclass(frozen=True)
class ClassificationProtocol:
    """Prompt settings under which a model classifies a dataset well above chance (the fields a ``RunConfig``
    takes), with the clean accuracy they were measured at."""

    model: str
    """The model alias or id the protocol is for."""
    dataset: str
    """The dataset spec it was measured on (the default dataset for this model)."""
    k_shot: int
    """Demonstrations per class."""
    max_words: int
    """Texts (demonstrations and query) cut to this many words."""
    label_words: tuple[str, ...] | None = None
    """Words answered with; None: the dataset's own (``nslens.fortunes.LABEL_WORDS``)."""
    readout: str = "argmax"
    """How logits become a prediction (``nslens.readout``)."""
    chance: float = 0.25
    """Accuracy of a uniform guess among the concepts."""
    measured: dict[str, Any] = field(default_factory=dict)
    """Clean accuracy per concept as measured (seeds, sample counts, mean and range)."""

    def settings(self) -> dict[str, Any]:
        """The ``RunConfig`` fields this protocol sets."""
        out: dict[str, Any] = {"k_shot": self.k_shot, "max_words": self.max_words, "readout": self.readout}
        if self.label_words is not None:
            out["label_words"] = list(self.label_words)
        return out


PROTOCOLS: dict[str, ClassificationProtocol] = {
    "smollm2-135m": ClassificationProtocol(
        model="smollm2-135m", dataset="fortunes:computers,food,love,kids,sports,medicine", k_shot=1, max_words=24,
        label_words=None, readout="calibrated", chance=1 / 6,
        measured={"samples_per_class": 40, "seeds": [0, 1, 2], "rule": "calibrated label tokens (nslens.readout)",
                  "mean": {"computers": 0.642, "food": 0.708, "love": 0.558, "kids": 0.717, "sports": 0.600,
                           "medicine": 0.575},
                  "min": {"computers": 0.550, "food": 0.650, "love": 0.325, "kids": 0.350, "sports": 0.500,
                          "medicine": 0.250},
                  "command": "python experiments/fortunes_protocol.py"},
    ),
}


def protocol_for(model: str) -> ClassificationProtocol | None:
    """The protocol registered for ``model`` (an alias such as ``smollm2-135m``), or None."""
    return PROTOCOLS.get(model)


def protocol_settings(model: str, dataset: str) -> dict[str, Any]:
    """The ``RunConfig`` fields to use for ``model`` on ``dataset`` when the user sets none of them: the model's
    ``k_shot``, ``max_words`` and ``readout`` for any classification dataset (none for next-token ones, which have
    no prompt); label words only come from the dataset."""
    proto = protocol_for(model)
    if proto is None or dataset.startswith("next:"):
        return {}
    return proto.settings()
