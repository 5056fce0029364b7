"""How a classification prompt's last-position logits become a prediction (the *readout*).

The paper's rule (App. H) is ``argmax``: the greedy next token over the whole vocabulary, right when it equals the
label word's first token. A small model can rank the label words well and still fail that rule, because a prior
over the labels swamps the evidence: SmolLM2-135M answers with the most recent demonstration's label for nearly
every query (``nslens.protocols``). Two readouts compare only the label words' tokens:

- ``labels``: the label token with the highest log-probability (rank classification, as lm-eval scores
  multiple choice);
- ``calibrated``: the same, after subtracting each label token's log-probability under *content-free* queries
  (``N/A``, the empty text, ``[MASK]``) in the same few-shot prompt: contextual calibration, Zhao et al. 2021,
  "Calibrate Before Use". That removes the prompt's label prior and keeps what the query's text adds.

The calibration prior is measured once, on the clean model, and then held fixed: under an intervention the
readout is the same fixed function of the logits, so every change in a prediction comes from the intervention,
not from a re-fitted instrument. The readout is computed inside the trace (``predict_token``), so it runs
remotely too and only the predictions leave the server.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .batching import tokenize
from .errors import NsLensError
from .remote import trace_args

__all__ = ["CONTENT_FREE", "READOUTS", "Readout", "label_log_probs", "make_readout", "predict_token"]

#: the readouts a run can use (``RunConfig.readout``, ``--readout``)
READOUTS = ("argmax", "labels", "calibrated")
#: the content-free queries whose mean label log-probabilities are the calibration prior (Zhao et al. 2021)
CONTENT_FREE = ("N/A", "", "[MASK]")


@dataclass(frozen=True)
class Readout:
    """A prediction rule over the label tokens: ``label_ids`` (one per concept) and the prior subtracted from
    their log-probabilities (zeros for ``labels``)."""

    kind: str
    label_ids: tuple[int, ...]
    prior: tuple[float, ...]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(label ids, prior) as the tensors a trace takes."""
        return torch.tensor(self.label_ids, dtype=torch.long), torch.tensor(self.prior, dtype=torch.float32)

    def describe(self) -> dict[str, Any]:
        return {"readout": self.kind, "label_ids": list(self.label_ids), "prior": [round(p, 6) for p in self.prior]}


def predict_token(logits: torch.Tensor, ids: torch.Tensor | None = None,
                  prior: torch.Tensor | None = None) -> torch.Tensor:
    """The predicted token per row of last-position ``logits`` (float): the argmax over the vocabulary, or, with
    ``ids``, the label token whose log-probability minus ``prior`` is highest. Tensor code: runs inside traces."""
    if ids is None:
        return logits.argmax(-1)
    ids = ids.to(logits.device)
    score = torch.log_softmax(logits, dim=-1)[:, ids] - prior.to(logits.device)
    return ids[score.argmax(-1)]


def label_log_probs(model: Any, prompts: Sequence[str], label_ids: Sequence[int], *,
                    remote: bool | str = False) -> torch.Tensor:
    """Log-probabilities of the label tokens at the last position of each prompt (clean model), shape (n, C)."""
    ids = torch.tensor(list(label_ids), dtype=torch.long)
    enc = tokenize(model, list(prompts))
    with torch.no_grad():
        with model.trace(enc, **trace_args(model, remote)):
            lp = torch.log_softmax(model.output.logits[:, -1, :].float(), dim=-1)[:, ids].cpu().save()
    return lp


def make_readout(model: Any, kind: str, label_ids: Sequence[int] | None, prompter: Any = None, *,
                 remote: bool | str = False) -> Readout | None:
    """The readout ``kind`` for a classification run (None for ``argmax``, the paper's rule). ``calibrated``
    measures the prior on the clean model from the content-free queries in ``prompter``'s prompt."""
    if kind not in READOUTS:
        raise NsLensError(f"unknown readout {kind!r}; choose one of {', '.join(READOUTS)}")
    if kind == "argmax":
        return None
    if label_ids is None:
        raise NsLensError(f"readout {kind!r} compares label words: it needs a classification dataset, not "
                          "next-token concepts (use readout argmax)")
    prior = [0.0] * len(label_ids)
    if kind == "calibrated":
        if prompter is None:
            raise NsLensError("readout 'calibrated' needs the few-shot prompter its content-free queries go into")
        lp = label_log_probs(model, [prompter(t) for t in CONTENT_FREE], label_ids, remote=remote)
        prior = [float(v) for v in lp.mean(0)]
    return Readout(kind, tuple(int(i) for i in label_ids), tuple(prior))
