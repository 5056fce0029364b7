"""Side effects of an intervention measured with lm-eval-harness (MMLU accuracy, wikitext perplexity).

``NsLensLM`` is lm-eval's ``HFLM`` whose forward passes run *through nnsight traces* with an intervention at the
site (all positions). HFLM calls the raw HF module, where an nnsight ``edit()`` would be silently ignored, so
``_model_call`` is overridden to run the batch inside ``model.trace`` and return the logits. lm-eval right-pads
and sends no attention mask: the model is causal, so padding at the end never reaches the positions whose logits
lm-eval reads, with or without an edit (padding columns are edited too, harmlessly). The numbers are lm-eval's own.

``side_effects`` evaluates the clean model once (cached on disk by model + tasks + limit) and each intervention.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .intervene import Intervention, apply_in_trace
from .models import Site, model_id
from .record import prepare_remote

__all__ = [
    "DEFAULT_TASKS",
    "LOCAL_TASKS",
    "NsLensLM",
    "SideEffectTable",
    "SideEffects",
    "local_tasks_dir",
    "default_cache_dir",
    "main_metric",
    "side_effect_table",
    "side_effects",
    "task_metrics",
    "traced_logits",
]

logger = logging.getLogger(__name__)

DEFAULT_TASKS = ("mmlu", "wikitext")
#: offline task fixtures for the embedded model (written by ``local_tasks_dir``)
LOCAL_TASKS = ("nslens_synth_mc", "nslens_synth_ppl")
METRIC_KEYS = ("acc", "word_perplexity", "byte_perplexity", "bits_per_byte")


def _require_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError as e:
        raise ValueError("side effects need lm-eval: pip install 'nslens[eval]'") from e
    return lm_eval


def _lm_class() -> type:
    _require_lm_eval()
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM

    class NsLensLM(HFLM):
        """lm-eval's HFLM with every forward pass run through an nnsight trace (optionally intervened)."""

        def __init__(self, model: Any, site: Site | None = None,
                     interventions: Intervention | Sequence[Intervention] | None = None,
                     remote: bool | str = False, batch_size: int = 8, **kwargs: Any) -> None:
            if interventions is not None and site is None:
                raise ValueError("an intervention needs its site")
            hf = model._module
            device = str(next(hf.parameters()).device) if any(True for _ in hf.parameters()) else "cpu"
            super().__init__(pretrained=hf, tokenizer=model.tokenizer, batch_size=batch_size, device=device,
                             **kwargs)
            if self._device.type == "meta":  # a remote (NDIF) model has no local weights: inputs stay on the CPU
                self._device = torch.device("cpu")
            self.nn_model, self.site, self.interventions, self.remote = model, site, interventions, remote
            prepare_remote(remote)

        def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                        labels: torch.Tensor | None = None) -> torch.Tensor:
            return traced_logits(self.nn_model, self.site, self.interventions, inps, self.remote)

    try:
        register_model("nslens")(NsLensLM)
    except (AssertionError, ValueError):  # already registered in this process
        pass
    return NsLensLM


def traced_logits(model: Any, site: Site | None, interventions: Any, input_ids: torch.Tensor,
                  remote: bool | str = False) -> torch.Tensor:
    """Logits of one lm-eval batch through an nnsight trace, with the interventions applied at the site.

    Module-level (not a method) so the trace captures only the model, site, interventions and inputs: that is
    what ships to NDIF, never the lm-eval object."""
    with torch.no_grad():
        with model.trace({"input_ids": input_ids}, remote=remote):
            if interventions is not None:
                apply_in_trace(model, site, interventions)
            logits = model.output.logits.save()
    return logits


def NsLensLM(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 - a class factory that reads like the class
    """Build the lm-eval adapter (see the module docstring); lm-eval is imported only when it is needed."""
    return _lm_class()(*args, **kwargs)


# --------------------------------------------------------------------------------------------- tasks


def local_tasks_dir(root: str | Path | None = None, n_mc: int = 120, n_ppl: int = 60) -> Path:
    """Write the offline lm-eval tasks over synthetic data (deterministic) and return their directory.

    - ``nslens_synth_mc``: an MMLU-format multiple-choice task (``question``, ``subject``, ``choices``,
      ``answer``): which topic is the text about; the choices are the four label words.
    - ``nslens_synth_ppl``: a ``loglikelihood_rolling`` perplexity task over held-out synthetic text, with the
      wikitext metrics (word_perplexity, byte_perplexity, bits_per_byte).
    Load them with ``TaskManager(include_path=local_tasks_dir())``.
    """
    import random

    from .synthetic import EMBEDDED_VERSION, SYNTHETIC_LABELS, synthetic_corpus, synthetic_text

    base = Path(root) if root is not None else Path(os.environ.get(
        "NSLENS_HOME", Path.home() / ".cache" / "nslens")) / f"lm_eval_tasks-{EMBEDDED_VERSION}"
    marker = base / "done"
    if marker.exists() and marker.read_text().strip() == f"{EMBEDDED_VERSION} {n_mc} {n_ppl}":
        return base
    base.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1234)
    with open(base / "mc.jsonl", "w") as f:
        for _ in range(n_mc):
            c = rng.randrange(len(SYNTHETIC_LABELS))
            f.write(json.dumps({"question": f"Text: {synthetic_text(c, rng)}\nLabel:", "subject": "synthetic",
                                "choices": list(SYNTHETIC_LABELS), "answer": c}) + "\n")
    with open(base / "ppl.jsonl", "w") as f:
        for line in synthetic_corpus(n_ppl, seed=4321):
            f.write(json.dumps({"text": line}) + "\n")
    (base / "nslens_synth_mc.yaml").write_text(
        "task: nslens_synth_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {base / 'mc.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n")
    (base / "nslens_synth_ppl.yaml").write_text(
        "task: nslens_synth_ppl\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {base / 'ppl.jsonl'}\n"
        "test_split: test\n"
        "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\n'
        'doc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
        "metadata:\n  version: 1.0\n")
    marker.write_text(f"{EMBEDDED_VERSION} {n_mc} {n_ppl}\n")
    return base


def default_cache_dir() -> Path:
    """Where clean side-effect results are cached: ``$NSLENS_HOME/side_effects``."""
    return Path(os.environ.get("NSLENS_HOME", Path.home() / ".cache" / "nslens")) / "side_effects"


@functools.lru_cache(maxsize=8)
def _cached_task_manager(include_path: str | None, include_defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def _task_manager(include_path: str | Path | None, tasks: Sequence[str] = ()) -> Any:
    """lm-eval's TaskManager, built once per process. Indexing lm-eval's own tasks takes about 10 s, so when every
    requested task lives in ``include_path`` only that directory is indexed."""
    _require_lm_eval()
    if include_path is not None:
        light = _cached_task_manager(str(include_path), False)
        if tasks and set(tasks) <= set(light.all_tasks):
            return light
    return _cached_task_manager(str(include_path) if include_path else None, True)


def _check_tasks(tm: Any, tasks: Sequence[str]) -> None:
    known = set(tm.all_tasks)
    for t in tasks:
        if t not in known:
            close = difflib.get_close_matches(t, sorted(known), n=5)
            raise ValueError(f"unknown lm-eval task {t!r}" + (f"; close matches: {', '.join(close)}" if close else ""))


def task_metrics(results: Mapping[str, Any], tasks: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` for the metrics nslens reports (acc, perplexities, bits per byte)."""
    out: dict[str, dict[str, float]] = {}
    for t in tasks:
        r = results["results"].get(t) or results.get("groups", {}).get(t, {})  # groups such as mmlu
        vals = {k.split(",")[0]: float(v) for k, v in r.items()
                if "," in k and k.split(",")[0] in METRIC_KEYS and isinstance(v, (int, float))}
        out[t] = vals
    return out


class SideEffects(dict):
    """``{run name: {task: {metric: value}}}`` with ``clean`` first; ``deltas()`` subtracts the clean values."""

    def deltas(self) -> dict[str, dict[str, dict[str, float]]]:
        clean = self["clean"]
        return {name: {t: {k: v - clean[t][k] for k, v in ms.items() if k in clean.get(t, {})}
                       for t, ms in res.items()} for name, res in self.items() if name != "clean"}

    def to_markdown(self) -> str:
        rows = ["| run | task | metric | value | Δ vs clean |", "|---|---|---|---|---|"]
        d = self.deltas()
        for name, res in self.items():
            for t, ms in res.items():
                for k, v in ms.items():
                    delta = "" if name == "clean" else f"{d[name][t].get(k, float('nan')):+.4f}"
                    rows.append(f"| {name} | {t} | {k} | {v:.4f} | {delta} |")
        return "\n".join(rows) + "\n"


def clean_cache_key(model: Any, tasks: Sequence[str], limit: float | None, num_fewshot: int | None,
                    include_path: str | Path | None) -> str:
    """What the clean results depend on: the model (id, config and a checksum of its weights when they are
    local), the tasks with the contents of local task files, the limit and the number of shots."""
    h = hashlib.sha256()
    h.update(json.dumps([model_id(model), sorted(tasks), limit, num_fewshot]).encode())
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_json_string"):
        h.update(cfg.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for p in list(model._module.parameters())[:: 7]:
            if p.device.type != "meta":
                h.update(p.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    if include_path is not None:
        for f in sorted(Path(include_path).rglob("*")):
            if f.is_file():
                h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def side_effects(
    model: Any,
    site: Site | None,
    interventions: Mapping[str, Intervention | Sequence[Intervention]],
    *,
    tasks: Sequence[str] = DEFAULT_TASKS,
    limit: int | float | None = None,
    include_path: str | Path | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 8,
    remote: bool | str = False,
    num_fewshot: int | None = 0,
    progress: Any = None,
) -> SideEffects:
    """lm-eval results for the clean model and every named intervention.

    ``limit`` passes through to lm-eval (for the ``mmlu`` group lm-eval applies it *per subtask*). The clean
    results are cached in ``cache_dir`` keyed by model id, tasks and limit, so a run over many concepts computes
    them once.
    """
    lm_eval = _require_lm_eval()
    if limit is not None and not (limit > 0):
        raise ValueError(f"limit must be > 0, got {limit}")
    if not tasks:
        raise ValueError("no tasks given")
    tm = _task_manager(include_path, tuple(tasks))
    _check_tasks(tm, tasks)
    for name, ivs in interventions.items():
        for iv in [ivs] if isinstance(ivs, Intervention) else list(ivs):
            if site is None:
                raise ValueError("interventions need the site")
            iv.mask.validate(site.describe(), source=f"mask of {name!r}")

    def evaluate(ivs: Intervention | Sequence[Intervention] | None) -> dict[str, dict[str, float]]:
        lm = NsLensLM(model, site, ivs, remote=remote, batch_size=batch_size)
        res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=tm,
                                      num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=0,
                                      verbosity="WARNING")
        return task_metrics(res, tasks)

    out = SideEffects()
    key = clean_cache_key(model, tasks, limit, num_fewshot, include_path)
    cache = Path(cache_dir) / f"clean_{key}.json" if cache_dir is not None else None
    if cache is not None and cache.exists():
        out["clean"] = json.loads(cache.read_text())["metrics"]
    else:
        out["clean"] = evaluate(None)
        if cache is not None:
            from .ranges import atomic_path

            with atomic_path(cache) as tmp:
                Path(tmp).write_text(json.dumps({"model_id": model_id(model), "tasks": list(tasks), "limit": limit,
                                                 "num_fewshot": num_fewshot, "metrics": out["clean"]}, indent=2))
    for i, (name, ivs) in enumerate(interventions.items()):
        out[name] = evaluate(ivs)
        if progress is not None:
            progress("side effects", i + 1, len(interventions))
    return out


# --------------------------------------------------------------------------------------------- Table 4


def main_metric(metrics: Mapping[str, float]) -> str:
    """The column a task contributes to the Table-4 view: perplexity for rolling tasks, else accuracy."""
    return "word_perplexity" if "word_perplexity" in metrics else "acc"


@dataclass
class SideEffectTable:
    """Paper Table 4: per concept, each task's main metric under neuron vs range masking (deltas vs clean)."""

    concepts: list[str]
    tasks: list[str]
    clean: dict[str, dict[str, float]]
    neuron: list[dict[str, dict[str, float]]]
    range: list[dict[str, dict[str, float]]]
    operator: str = "zero"
    meta: dict[str, Any] = field(default_factory=dict)

    def _cols(self) -> list[tuple[str, str]]:
        return [(t, main_metric(self.clean[t])) for t in self.tasks]

    def summary(self) -> dict[str, dict[str, float]]:
        """10 % trimmed mean across concepts of every delta."""
        from scipy.stats import trim_mean

        return {part: {f"{t}/{k}": float(trim_mean([row[t][k] for row in getattr(self, part)], 0.1))
                       for t, k in self._cols()} for part in ("neuron", "range")}

    def to_markdown(self) -> str:
        cols = self._cols()
        names = [f"{t} {'PPL' if k == 'word_perplexity' else k}" for t, k in cols]
        head = ["Concept", *(f"neuron Δ{n}" for n in names), *(f"range Δ{n}" for n in names)]
        clean = ", ".join(f"{n} = {self.clean[t][k]:.4f}" for n, (t, k) in zip(names, cols))
        lines = [f"Operator: `{self.operator}`. Clean model: {clean}. Deltas vs clean.", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        rows = [(c, self.neuron[i], self.range[i]) for i, c in enumerate(self.concepts)]
        for c, n, r in rows:
            lines.append("| " + " | ".join([c, *(f"{n[t][k]:+.4f}" for t, k in cols),
                                            *(f"{r[t][k]:+.4f}" for t, k in cols)]) + " |")
        s = self.summary()
        lines.append("| trimmed mean (10%) | " + " | ".join(
            [*(f"{s['neuron'][f'{t}/{k}']:+.4f}" for t, k in cols),
             *(f"{s['range'][f'{t}/{k}']:+.4f}" for t, k in cols)]) + " |")
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "summary": self.summary()}, indent=2, default=str)

    @classmethod
    def from_json(cls, text: str) -> SideEffectTable:
        d = json.loads(text)
        d.pop("summary", None)
        return cls(**d)


def side_effect_table(
    model: Any,
    site: Site,
    masks: Sequence[Any],
    operator: Any,
    *,
    tasks: Sequence[str] = DEFAULT_TASKS,
    positions: str = "all",
    progress: Any = None,
    sae: Any = None,
    **kwargs: Any,
) -> SideEffectTable:
    """Neuron vs range masking of every concept's mask, measured with lm-eval (``kwargs`` go to
    ``side_effects``: limit, include_path, cache_dir, batch_size, remote, num_fewshot)."""
    ivs: dict[str, Intervention] = {}
    for m in masks:
        for gated in (False, True):
            iv = Intervention(m, operator, gated=gated, positions=positions, sae=sae)
            ivs[f"{m.concept}/{'range' if gated else 'neuron'}"] = iv
    res = side_effects(model, site, ivs, tasks=tasks, progress=progress, **kwargs)
    d = res.deltas()
    return SideEffectTable(
        concepts=[m.concept for m in masks], tasks=list(tasks), clean=res["clean"],
        neuron=[d[f"{m.concept}/neuron"] for m in masks], range=[d[f"{m.concept}/range"] for m in masks],
        operator=operator.label, meta={"limit": kwargs.get("limit"), "positions": positions, **site.describe()})
