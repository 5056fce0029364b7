"""Classification protocols a given real model can do: which concepts, label words and prompt settings keep enough
samples under the paper's only-correct filter.

The paper's protocol (App. H) keeps only the samples the clean model classifies correctly, the prediction being
the argmax next token after ``Label:`` compared with the first token of the label word. A small model must
therefore be well above chance on every concept, or the filter leaves too little to record. Measured on
SmolLM2-135M-Instruct (``experiments/fortunes_protocol.py``), the obstacle is not that the model cannot tell
topics apart but a prior: with the default one demonstration per class it answers with the *most recent*
demonstration's label for nearly every query (computers/politics/science/sports: 88 of 120 queries answered
"sports" when the last demonstration was sports, 114 of 120 "politics" with another seed that put politics
last), so accuracy sits at chance although a per-label calibrated readout of the same logits is 0.6-0.8 per
concept. Larger k alone does not remove it (16 demonstrations: still 90 % "sports"), neither does the chat template
(the instruction and demonstrations as the user's turn, ``Label:`` opening the assistant's: every query
"sports"), nor a zero-shot question (the model answers " the" or the first listed option).

No setup tried keeps three concepts well above chance robustly across seeds. The best found, and registered
here, is concepts whose texts carry their topic in everyday words, answered with those words:
``fortunes:love,men-women,kids,food`` with label words ``love``, ``women``, ``children``, ``food``, two
demonstrations per class of at most 24 words (plain ``FewShotPrompter`` format, no chat template). Measured with
nslens's prediction rule on 118 samples per class (seed 0): love 0.12, men-women 0.43, kids 0.96, food 0.20
(chance 0.25; 356 of 472 queries answered "children"); on 30 per class with other demonstrations 0.77 / 0.67 /
0.90 / 0.20. Multi-turn chat (each demonstration a user/assistant exchange, the answer the assistant's first
token) balances the labels better (argmax among the four labels right 0.65 of the time) but the model then
often answers a word of its own ("life", "family"): 0.43 / 0.47 / 0.65 / 0.30 and, with another seed,
0.62 / 0.13 / 0.35 / 0.33. Either keeps enough correct samples per concept for the only-correct filter (at
least a dozen of 118), which is what a run needs, but the model is not a reliable classifier of these texts.

Where the model is used with another dataset, ``protocol_settings`` still applies its ``k_shot`` and
``max_words``; the error for too few correct samples should point at ``--all-samples`` and ``--label-words``.
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
    chance: float = 0.25
    """Accuracy of a uniform guess among the concepts."""
    measured: dict[str, Any] = field(default_factory=dict)
    """Clean accuracy per concept as measured (seeds, sample counts, mean and range)."""

    def settings(self) -> dict[str, Any]:
        """The ``RunConfig`` fields this protocol sets."""
        out: dict[str, Any] = {"k_shot": self.k_shot, "max_words": self.max_words}
        if self.label_words is not None:
            out["label_words"] = list(self.label_words)
        return out


PROTOCOLS: dict[str, ClassificationProtocol] = {
    "smollm2-135m": ClassificationProtocol(
        model="smollm2-135m", dataset="fortunes:love,men-women,kids,food", k_shot=2, max_words=24,
        label_words=None, chance=0.25,
        measured={"samples_per_class": 118, "seed": 0, "rule": "argmax next token vs first label token",
                  "acc": {"love": 0.12, "men-women": 0.43, "kids": 0.96, "food": 0.20},
                  "note": "seed-dependent: 30 per class with other demonstrations gave 0.77/0.67/0.90/0.20"},
    ),
}


def protocol_for(model: str) -> ClassificationProtocol | None:
    """The protocol registered for ``model`` (an alias such as ``smollm2-135m``), or None."""
    return PROTOCOLS.get(model)


def protocol_settings(model: str, dataset: str) -> dict[str, Any]:
    """The ``RunConfig`` fields to use for ``model`` on ``dataset`` when the user sets none of them: the model's
    ``k_shot`` and ``max_words`` for any classification dataset (none for next-token ones, which have no
    prompt); label words only come from the dataset."""
    proto = protocol_for(model)
    if proto is None or dataset.startswith("next:"):
        return {}
    return proto.settings()
