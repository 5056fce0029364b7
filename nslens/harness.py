"""Side effects of an intervention measured with lm-eval-harness (MMLU accuracy, wikitext perplexity).

``side_effects`` evaluates the clean model once and each intervention once, all in one sweep over lm-eval's
requests (the adapter ``nslens.lmadapter.NsLensLM``, the tasks ``nslens.lmtasks``). Results are cached on disk by
(model fingerprint, tasks with their files, limit, shots) and, for an intervention, its site and
``intervention_fingerprint`` too, so a sweep can never report one intervention's scores for another's (lm-eval's own
request cache is keyed by the requests alone, without the model or the edit; nslens does not use it).
``side_effect_tables`` turns the results into the paper's Table 4 (``nslens.effects.SideEffectTable``).

The names of the adapter, the tasks and the result types stay importable from here, as before.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .effects import METRIC_KEYS, SideEffects, SideEffectTable, main_metric, task_metrics
from .errors import NsLensError, check_number
from .files import nslens_home, write_text
from .intervene import Intervention, intervention_fingerprint
from .lmadapter import NsLensLM, quiet_lm_eval, traced_logits
from .lmtasks import (
    DEFAULT_TASKS,
    LOCAL_TASKS,
    TASKS_DIR,
    WIKIPEDIA_PPL_TASK,
    check_tasks,
    include_paths,
    local_tasks_dir,
    require_lm_eval,
    task_manager,
    token_ppl_task,
    wikipedia_ppl_task_dir,
    with_generated_tasks,
)
from .loglik import LoglikSweep
from .models import Site, model_fingerprint, model_id
from .ops import Operator

__all__ = [
    "DEFAULT_TASKS",
    "LOCAL_TASKS",
    "METRIC_KEYS",
    "NsLensLM",
    "SideEffectTable",
    "SideEffects",
    "TASKS_DIR",
    "WIKIPEDIA_PPL_TASK",
    "clean_cache_key",
    "default_cache_dir",
    "local_tasks_dir",
    "main_metric",
    "quiet_lm_eval",
    "run_cache_key",
    "side_effect_table",
    "side_effect_tables",
    "side_effects",
    "task_metrics",
    "token_ppl_task",
    "traced_logits",
    "wikipedia_ppl_task_dir",
]


def default_cache_dir() -> Path:
    """Where clean side-effect results are cached: ``$NSLENS_HOME/side_effects``."""
    return nslens_home() / "side_effects"


def clean_cache_key(model: Any, tasks: Sequence[str], limit: float | None, num_fewshot: int | None,
                    include_path: str | Path | None) -> str:
    """What the clean results depend on: the model (id, config and a checksum of its weights when they are
    local), the tasks with the contents of local task files, the limit and the number of shots."""
    h = hashlib.sha256()
    h.update(json.dumps([model_fingerprint(model), sorted(tasks), limit, num_fewshot]).encode())
    for inc in include_paths(include_path):
        for f in sorted(Path(inc).rglob("*")):
            if f.is_file():
                h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def run_cache_key(clean_key: str, site: Site | None, interventions: Intervention | Sequence[Intervention]) -> str:
    """What an intervention's results depend on: everything the clean results do (``clean_cache_key``), the site
    and ``intervention_fingerprint`` (mask, operator and its tensors, gating, positions, SAE), never its name."""
    h = hashlib.sha256(json.dumps([clean_key, site.describe() if site is not None else None]).encode())
    h.update(intervention_fingerprint(interventions).encode())
    return h.hexdigest()[:24]


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
    per_pass: int = 8,
    desc: str = "side effects",
) -> SideEffects:
    """lm-eval results for the clean model and every named intervention, computed in one sweep.

    Every batch of lm-eval requests is answered for all interventions at once (``LoglikSweep``: the layers up to
    the site run once, each intervention replays the layers above it, ``per_pass`` of them per forward, and only
    log-likelihoods leave the trace). Then one ``simple_evaluate`` per intervention reads its own answers, so every
    metric is lm-eval's. ``limit`` passes through to lm-eval (for the ``mmlu`` group lm-eval applies it *per
    subtask*). Results are cached in ``cache_dir``: the clean model's by model, weights, tasks, limit and shots
    (``clean_<key>.json``), each intervention's by the same plus its site and fingerprint (``run_<key>.json``,
    ``run_cache_key``), so a run over many operators computes the clean model once, a repeated sweep computes only
    what is new, and two different interventions never share an entry whatever they are named.
    ``progress(desc, done, total)`` counts lm-eval requests answered.
    """
    lm_eval = require_lm_eval()
    if limit is not None and not (check_number("lm-eval limit", limit) > 0):
        raise NsLensError(f"limit must be > 0, got {limit}")
    if batch_size != "auto":  # lm-eval's own "auto"; 0 was accepted
        check_number("batch_size", batch_size, 1, integer=True)
    if num_fewshot is not None:
        check_number("num_fewshot", num_fewshot, 0, integer=True)
    if not tasks or isinstance(tasks, str):  # a string was its letters: "unknown lm-eval task 'n'"
        raise NsLensError(f"tasks is a list of lm-eval task names, got {tasks!r}")
    include_path = with_generated_tasks(model, include_path, tasks)
    tm = task_manager(include_path, tuple(tasks))
    check_tasks(tm, tasks)
    if not isinstance(interventions, Mapping) or "clean" in interventions:  # "clean" held the edited model's metrics
        raise NsLensError("interventions is a mapping of names (any but 'clean', the clean model's) to an "
                          "Intervention or a list of them")
    for name, ivs in interventions.items():
        if not isinstance(ivs, Intervention) and not (isinstance(ivs, (list, tuple))
                                                      and all(isinstance(iv, Intervention) for iv in ivs)):
            raise NsLensError(f"interventions[{name!r}] must be an Intervention or a list of them, got "
                              f"{type(ivs).__name__}")
        for iv in [ivs] if isinstance(ivs, Intervention) else list(ivs):
            if site is None:
                raise NsLensError("interventions need the site")
            iv.mask.validate(site.describe(), source=f"mask of {name!r}")

    key = clean_cache_key(model, tasks, limit, num_fewshot, include_path)
    cache = Path(cache_dir) / f"clean_{key}.json" if cache_dir is not None else None
    cached_clean = json.loads(cache.read_text())["metrics"] if cache is not None and cache.exists() else None
    run_files = {name: Path(cache_dir) / f"run_{run_cache_key(key, site, ivs)}.json"
                 for name, ivs in interventions.items()} if cache_dir is not None else {}
    cached_runs = {name: json.loads(f.read_text())["metrics"] for name, f in run_files.items() if f.exists()}
    runs: list[str | None] = ([] if cached_clean is not None else [None]) + [n for n in interventions
                                                                              if n not in cached_runs]
    out = SideEffects()
    if not runs:  # everything was cached: no model pass, no lm-eval run
        out["clean"] = cached_clean
        for name in interventions:
            out[name] = cached_runs[name]
        return out
    sweep = LoglikSweep(model, site, [None if r is None else interventions[r] for r in runs],
                        per_pass=per_pass, remote=remote)

    with quiet_lm_eval():  # built once: every evaluation reads the same documents (lm-eval rebuilds requests)
        loaded = tm.load(list(tasks))
    built = [loaded["groups"].get(t) or loaded["tasks"][t] for t in tasks]

    def evaluate(index: int) -> dict[str, dict[str, float]]:
        with quiet_lm_eval():
            lm = NsLensLM(model, sweep=sweep, index=index, batch_size=batch_size)
            if index == 0 and progress is not None:  # the first evaluation computes every run's answers
                lm.progress = lambda done, total: progress(desc, done, total)
            res = lm_eval.simple_evaluate(model=lm, tasks=built, limit=limit, task_manager=tm,
                                          num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=0,
                                          verbosity="ERROR")
        return task_metrics(res, tasks)

    results = {run: evaluate(i) for i, run in enumerate(runs)}
    out["clean"] = cached_clean if cached_clean is not None else results[None]
    about = {"model_id": model_id(model), "tasks": list(tasks), "limit": limit, "num_fewshot": num_fewshot}
    if cached_clean is None and cache is not None:
        write_text(cache, json.dumps({**about, "metrics": out["clean"]}, indent=2))
    for name, ivs in interventions.items():
        if name in cached_runs:
            out[name] = cached_runs[name]
            continue
        out[name] = results[name]
        if name in run_files:
            described = [iv.describe() for iv in ([ivs] if isinstance(ivs, Intervention) else list(ivs))]
            write_text(run_files[name], json.dumps({**about, "site": site.describe() if site else None,
                                                    "intervention": described, "metrics": out[name]}, indent=2,
                                                   default=str))
    out.batch_bytes, out.batch_shapes = list(sweep.batch_bytes), list(sweep.batch_shapes)
    return out


def side_effect_tables(
    model: Any,
    site: Site,
    masks: Sequence[Any],
    operators: Sequence[Any],
    *,
    tasks: Sequence[str] = DEFAULT_TASKS,
    positions: str = "all",
    progress: Any = None,
    sae: Any = None,
    **kwargs: Any,
) -> dict[str, SideEffectTable]:
    """Table 4 for several operators (paper Tables 12-16) from ONE sweep over lm-eval's requests: the layers below
    the site run once per batch for all 2C x operators interventions (``kwargs`` go to ``side_effects``: limit,
    include_path, cache_dir, batch_size, remote, num_fewshot, per_pass, desc). Each entry of ``operators`` is an
    operator, or a list with one per mask (per-concept steering vectors). Keyed by operator label."""
    per_mask = [list(op) if isinstance(op, (list, tuple)) else [op] * len(masks) for op in operators]
    wrong = [type(o).__name__ for p in per_mask for o in p if not isinstance(o, Operator)]
    if wrong:  # "zero" failed as an AttributeError on its label
        raise NsLensError(f"operators are nslens operators (nslens.zero(), nslens.dampen(a), ...), got {wrong[0]}")
    if any(len(p) != len(masks) for p in per_mask):
        raise NsLensError(f"an operator list must hold one operator per mask ({len(masks)})")
    if not masks:
        raise NsLensError("no masks given")
    concepts = [m.concept for m in masks]
    if len(set(concepts)) != len(concepts):  # rows are keyed by concept: one mask's result showed in both rows
        raise NsLensError(f"one mask per concept, got {', '.join(concepts)}")
    labels = [p[0].label for p in per_mask]
    if len(set(labels)) != len(labels):
        raise NsLensError(f"operators must differ, got {', '.join(labels)}")
    ivs: dict[str, Intervention] = {}
    for label, ops in zip(labels, per_mask):
        for m, op in zip(masks, ops):
            for gated in (False, True):
                ivs[f"{label}/{m.concept}/{'range' if gated else 'neuron'}"] = Intervention(
                    m, op, gated=gated, positions=positions, sae=sae)
    kwargs.setdefault("desc", f"side effects ({', '.join(labels)})")
    res = side_effects(model, site, ivs, tasks=tasks, progress=progress, **kwargs)
    d = res.deltas()
    meta = {"limit": kwargs.get("limit"), "positions": positions, **site.describe()}
    return {label: SideEffectTable(
        concepts=[m.concept for m in masks], tasks=list(tasks), clean=res["clean"],
        neuron=[d[f"{label}/{m.concept}/neuron"] for m in masks],
        range=[d[f"{label}/{m.concept}/range"] for m in masks], operator=label, meta=meta)
        for label in labels}


def side_effect_table(model: Any, site: Site, masks: Sequence[Any], operator: Any, **kwargs: Any) -> SideEffectTable:
    """Neuron vs range masking of every concept's mask, measured with lm-eval in one sweep (see
    ``side_effect_tables``; ``operator`` may be one per mask; ``kwargs``: tasks, positions, progress, sae, limit,
    include_path, cache_dir, batch_size, remote, num_fewshot, per_pass)."""
    return next(iter(side_effect_tables(model, site, masks, [operator], **kwargs).values()))
