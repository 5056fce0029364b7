"""The NEG paper's two studies as ``nslens neg`` and ``nslens probe`` run them: the linearity of neuron empirical
gradients on a dataset's test prompts (Tables 1-2), and skill-neuron probes on NeurGrad features (Section 5), each
written into an output directory (and into its report when that directory is a run)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import RunConfig
from .data import FewShotPrompter, label_token_ids
from .errors import NsLensError
from .files import write_text
from .mceval import answer_token_ids, check_mceval_task, load_mceval
from .models import load_model, resolve_site
from .neg import (
    LinearityReport,
    check_lpi_norm,
    check_neuron_kind,
    ig_alphas,
    linearity_report,
    neurgrad,
    resolve_neuron_site,
    resolve_neuron_sites,
)
from .prepare import load_concepts, prepare_data
from .probes import ProbeResults, evaluate_probes, probe_features
from .record import Progress
from .workflows import refresh_report

__all__ = ["NegConfig", "ProbeInputs", "neg_linearity", "probe_inputs", "skill_probes"]

#: samples per concept drawn for the linearity study; its prompts are the first ``NegConfig.prompts`` of the test split
NEG_PER_CLASS = 50


@dataclass
class NegConfig:
    """Which feed-forward neurons are studied, and the settings of the linearity study and of the probes."""

    kind: str = "product"
    """The neuron: product (act_fn(gate) * up, default), up_proj, act_fn or residual."""
    prompts: int = 8
    """Linearity: test prompts to sweep; those answered correctly are used."""
    neurons: int = 100
    """Linearity: neurons sampled per prompt (the paper: 100)."""
    all_layers: bool = True
    """Linearity: sample neurons from every feed-forward layer (the paper) or the config's layer only."""
    log_prob: bool = False
    """Linearity: differentiate log p instead of p."""
    ig_steps: int = 20
    """Linearity: integrated-gradients steps."""
    ig_grid: str = "linspace"
    """Linearity: IG alphas, linspace (the authors' linspace(0, 1, steps)) or right (k/steps, k = 1..steps)."""
    lpi_norm: str = "final"
    """Linearity: LPI normaliser, final (the released LPI code: one fixed rsqrt(final_var + 1e-6)) or recompute
    (the final norm on each vector)."""
    mceval: str | None = None
    """Probes: an MCEval8K task (e.g. agnews, paws, ner) instead of the dataset: its prompts, answers and option
    letters."""
    mceval_path: str | None = None
    """Probes: a local copy of the task, its folder ({train,valid,test}.json) or one split's json file."""
    zero_shot: bool = False
    """Probes: MCEval8K prompts without the demonstrations (the authors' default: one per answer label)."""
    queries: int | None = None
    """Probes: at most this many MCEval8K queries (the first after the authors' seeded shuffle)."""

    def validate(self) -> None:
        """Every setting, checked before the model loads (one line naming the valid values)."""
        check_neuron_kind(self.kind)
        for name in ("prompts", "neurons"):
            if getattr(self, name) < 1:
                raise NsLensError(f"neg {name} must be >= 1, got {getattr(self, name)}")
        ig_alphas(self.ig_steps, self.ig_grid)  # the grid's name and the steps it needs
        check_lpi_norm(self.lpi_norm)
        if self.queries is not None and self.queries < 1:
            raise NsLensError(f"queries must be >= 1, got {self.queries}")
        if self.mceval is not None:
            check_mceval_task(self.mceval)
        if self.mceval_path is not None and self.mceval is None:
            raise NsLensError("mceval_path is a local copy of an MCEval8K task: name the task too (mceval)")
        if self.mceval_path is not None and not Path(self.mceval_path).exists():  # found after the model loaded
            raise NsLensError(f"MCEval8K task copy not found: {self.mceval_path} (--mceval-path, neg.mceval_path)")


def neg_linearity(cfg: RunConfig, neg: NegConfig, out: str | Path, *, progress: Progress | None = None
                  ) -> LinearityReport:
    """NEG linearity on the first ``neg.prompts`` test prompts of the config's dataset (no only-correct filter on
    the data: ``linearity_report`` keeps the prompts the model answers correctly); writes ``neg.md`` and
    ``neg.json`` into ``out``."""
    cfg = cfg.replace(n_per_class=NEG_PER_CLASS, only_correct=False)
    cfg.validate()
    neg.validate()
    model = load_model(cfg.model, remote=cfg.remote, quantize=cfg.quantize, dtype=cfg.dtype)
    sites = resolve_neuron_sites(model, neg.kind) if neg.all_layers \
        else [resolve_neuron_site(model, cfg.layer, neg.kind)]
    data = prepare_data(model, resolve_site(model, cfg.layer), cfg)
    sub = data.test.subset(list(range(min(neg.prompts, len(data.test)))))
    rep = linearity_report(model, sites, data.prompts(sub), data.test_gold[: len(sub)], n_neurons=neg.neurons,
                           seed=cfg.seed, log_prob=neg.log_prob, ig_steps=neg.ig_steps, ig_grid=neg.ig_grid,
                           lpi_norm=neg.lpi_norm, remote=cfg.remote, progress=progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    where = "all feed-forward layers" if neg.all_layers else f"layer {sites[0].site.layer}"
    write_text(out / "neg.md", f"NEG linearity, neurons from {where} ({neg.kind}, {sites[0].width} per layer)\n\n"
               + rep.to_markdown())
    write_text(out / "neg.json", json.dumps(rep.summary(), indent=2))
    refresh_report(out)
    return rep


@dataclass
class ProbeInputs:
    """What the probes read: prompts, the index of each prompt's answer among the options, the queries the split
    keeps apart (identical queries share a split), and each option's answer token."""

    prompts: list[str]
    answers: np.ndarray
    queries: list[str]
    option_ids: list[int]


def probe_inputs(model: Any, cfg: RunConfig, neg: NegConfig) -> ProbeInputs:
    """An MCEval8K task's prompts and option letters (``neg.mceval``), or the config's classification dataset in
    few-shot prompts with its label words as the options."""
    if neg.mceval is not None:
        task = load_mceval(neg.mceval, path=neg.mceval_path, limit=neg.queries, zero_shot=neg.zero_shot)
        return ProbeInputs(list(task.prompts), task.answers, list(task.prompts),
                           answer_token_ids(model.tokenizer, task.labels))
    ds = load_concepts(cfg)
    if ds.next_token:
        raise NsLensError(f"probe reads skills from label options; {cfg.dataset!r} holds next-token concepts (use a "
                          "classification dataset or --mceval)")
    words: Sequence[str] = ds.label_words or ds.label_names
    prompter = FewShotPrompter(list(words), max_words=cfg.max_words)
    return ProbeInputs(prompter.prompts(ds.texts), ds.labels, list(ds.texts),
                       label_token_ids(model.tokenizer, words))


def skill_probes(cfg: RunConfig, neg: NegConfig, out: str | Path, *, progress: Progress | None = None
                 ) -> ProbeResults:
    """Polar, Magn and Tree probes on NeurGrad features at the config's layer, with the LM-Prob and Act baselines;
    writes ``probes.md`` and ``probes.json`` into ``out``."""
    cfg.validate()
    neg.validate()
    model = load_model(cfg.model, remote=cfg.remote, quantize=cfg.quantize, dtype=cfg.dtype)
    ns = resolve_neuron_site(model, cfg.layer, neg.kind)
    resolve_site(model, cfg.layer)
    inputs = probe_inputs(model, cfg, neg)
    grads = neurgrad(model, ns, inputs.prompts, options=inputs.option_ids, batch_size=cfg.batch_size,
                     remote=cfg.remote, progress=progress)
    probs, acts = probe_features(model, ns, inputs.prompts, inputs.option_ids, batch_size=cfg.batch_size,
                                 remote=cfg.remote)
    res = evaluate_probes(grads, inputs.answers, inputs.queries, seed=cfg.seed, option_probs=probs,
                          activations=acts)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "probes.md", res.to_markdown())
    write_text(out / "probes.json", json.dumps(asdict(res), indent=2))
    refresh_report(out)
    return res
