"""Side effects of an intervention measured with lm-eval-harness (MMLU accuracy, wikitext perplexity).

``NsLensLM`` is lm-eval's ``HFLM`` whose forward passes run *through nnsight traces* with an intervention at the
site (all positions). HFLM calls the raw HF module, where an nnsight ``edit()`` would be silently ignored, so
``_model_call`` is overridden to run the batch inside ``model.trace`` and return the logits. lm-eval right-pads
and sends no attention mask: the model is causal, so padding at the end never reaches the positions whose logits
lm-eval reads, with or without an edit (padding columns are edited too, harmlessly). The numbers are lm-eval's own.

``side_effects`` evaluates the clean model once and each intervention once: results are cached on disk by (model
fingerprint, tasks with their files, limit, shots) and, for an intervention, its site and
``intervention_fingerprint`` too, so a sweep can never report one intervention's scores for another's (lm-eval's own
request cache is keyed by the requests alone, without the model or the edit; nslens does not use it).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import json
import logging
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import WIKIPEDIA_DATA_FILES, cut_to_tokens, wikipedia_articles
from .erasure import trim_note
from .errors import NsLensError
from .files import nslens_home, write_text
from .intervene import Intervention, apply_in_trace, intervention_fingerprint
from .loglik import LoglikSweep
from .models import Site, model_fingerprint, model_id, tokenizer_fingerprint
from .remote import trace_args

__all__ = [
    "DEFAULT_TASKS",
    "LOCAL_TASKS",
    "NsLensLM",
    "SideEffectTable",
    "SideEffects",
    "local_tasks_dir",
    "default_cache_dir",
    "run_cache_key",
    "main_metric",
    "side_effect_table",
    "side_effect_tables",
    "side_effects",
    "task_metrics",
    "token_ppl_task",
    "traced_logits",
    "wikipedia_ppl_task_dir",
]

logger = logging.getLogger(__name__)

#: the generated token-perplexity task of the paper's protocol (Section 5.3; ``wikipedia_ppl_task_dir``)
WIKIPEDIA_PPL_TASK = "nslens_wikipedia_ppl"
#: the paper's side effects: zero-shot MMLU accuracy and token perplexity on Wikipedia
DEFAULT_TASKS = ("mmlu", WIKIPEDIA_PPL_TASK)
#: offline task fixtures for the embedded model (written by ``local_tasks_dir``), standing in for DEFAULT_TASKS
LOCAL_TASKS = ("nslens_synth_mc", "nslens_synth_token_ppl")
METRIC_KEYS = ("acc", "perplexity", "token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")
TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def _require_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError as e:
        raise NsLensError("side effects need lm-eval: pip install 'nslens[eval]'") from e
    return lm_eval


def _lm_class() -> type:
    _require_lm_eval()
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils import Collator
    from lm_eval.models.utils_hf import pad_and_concat
    from lm_eval.utils import get_rolling_token_windows

    class NsLensLM(HFLM):
        """lm-eval's HFLM whose log-likelihoods are computed inside nnsight traces, under interventions.

        Requests are ordered, grouped, truncated, padded and batched exactly as HFLM does it; each batch then runs
        through ``LoglikSweep``, which computes the continuation log-likelihoods and greedy flags in the trace
        (two numbers per request leave it). With ``sweep``/``index`` several evaluations share one sweep: the
        first evaluation computes every intervention's answers, the others read theirs.
        """

        def __init__(self, model: Any, site: Site | None = None,
                     interventions: Intervention | Sequence[Intervention] | None = None,
                     remote: bool | str = False, batch_size: int = 8, *, sweep: LoglikSweep | None = None,
                     index: int = 0, softmax_dtype: Any = "float32", **kwargs: Any) -> None:
            if interventions is not None and site is None:
                raise NsLensError("an intervention needs its site")
            hf = model._module
            device = str(next(hf.parameters()).device) if any(True for _ in hf.parameters()) else "cpu"
            super().__init__(pretrained=hf, tokenizer=model.tokenizer, batch_size=batch_size, device=device,
                             softmax_dtype=softmax_dtype, **kwargs)
            if self._device.type == "meta":  # a remote (NDIF) model has no local weights: inputs stay on the CPU
                self._device = torch.device("cpu")
            if sweep is None:
                sweep = LoglikSweep(model, site, [interventions], remote=remote)
            elif not 0 <= index < len(sweep.interventions):
                raise NsLensError(f"index {index} outside the sweep's {len(sweep.interventions)} interventions")
            self.nn_model, self.sweep, self.index = model, sweep, index
            self.site, self.interventions, self.remote = sweep.site, sweep.interventions[index], sweep.remote
            self.progress: Callable[[int, int], None] | None = None  # (requests answered, requests expected)
            self._done = self._expected = 0

        def _expect(self, n: int) -> None:
            self._expected += n
            if self.progress is not None:
                self.progress(self._done, self._expected)

        def _advance(self, n: int) -> None:
            self._done += n
            if self.progress is not None:
                self.progress(self._done, self._expected)

        def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                        labels: torch.Tensor | None = None) -> torch.Tensor:
            """Full logits through a trace (only lm-eval's batch-size detection still asks for them)."""
            return traced_logits(self.nn_model, self.site, self.interventions, inps, self.remote)

        def _model_generate(self, *args: Any, **kwargs: Any) -> Any:
            raise NsLensError("generative lm-eval tasks are not supported by nslens side effects; "
                             "use loglikelihood, multiple_choice or loglikelihood_rolling tasks")

        def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            self._expect(len(requests))
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
            if self.progress is not None:  # progress counts the rolling windows lm-eval will ask for
                self._expect(sum(sum(1 for _ in get_rolling_token_windows(
                    token_list=self.tok_encode(r.args[0]), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)) for r in requests))
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False,
                                  override_bs: int | None = None) -> list[tuple[float, bool]]:
            keys = [(tuple(r[1]), tuple(r[2])) for r in requests]
            known = self.sweep.answers
            if all(k in known for k in keys):
                return [known[k][self.index] for k in keys]

            # ordering, one-token-continuation grouping and batching exactly as HFLM._loglikelihood_tokens
            def collate(req: tuple) -> tuple:
                toks = req[1] + req[2]
                return -len(toks), tuple(toks)

            re_ord = Collator(requests, sort_fn=collate,
                              group_by="contexts" if self.backend == "causal" and self.logits_cache else None,
                              group_fn=lambda req: req[-2] + req[-1][:-1])
            batch_size = self.batch_size if self.batch_size != "auto" else override_bs or 0
            batch_fn = (self._batch_scheduler if self.batch_size == "auto" and len(re_ord) > 0 and not override_bs
                        else None)
            placeholder = torch.empty(1, 1, 1)
            res: list[list[tuple[float, bool]]] = []
            for chunk in re_ord.get_batched(n=batch_size, batch_fn=batch_fn):
                inps, rows = [], []
                for req_str, ctx, cont in chunk:
                    if not ctx or not cont or len(cont) > self.max_length:
                        raise NsLensError(f"lm-eval request with {len(ctx)} context and {len(cont)} continuation "
                                         f"tokens (max length {self.max_length})")
                    inp = torch.tensor((ctx + cont)[-(self.max_length + 1):][:-1], dtype=torch.long,
                                       device=self.device)
                    members = [c for _, c, _ in re_ord.get_cache(req_str=req_str, cxt_toks=ctx, cont_toks=cont,
                                                                  logits=placeholder)]
                    inps.append(inp)
                    rows.append((len(inp), len(cont), members))
                batched = pad_and_concat(max(len(x) for x in inps), inps, padding_side="right")
                res.extend(self.sweep.answer(batched, rows, self.softmax_dtype))
                self._advance(sum(len(r[2]) for r in rows))
            ordered = re_ord.get_original(res)
            for k, a in zip(keys, ordered):
                known[k] = a
            return [a[self.index] for a in ordered]

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
        with model.trace({"input_ids": input_ids}, **trace_args(model, remote)):
            if interventions is not None:
                apply_in_trace(model, site, interventions)
            logits = model.output.logits.save()
    return logits


def NsLensLM(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 - a class factory that reads like the class
    """Build the lm-eval adapter (see the module docstring); lm-eval is imported only when it is needed."""
    return _lm_class()(*args, **kwargs)


# --------------------------------------------------------------------------------------------- tasks


def _write_yaml_task(base: Path, task: str, data: str, body: str) -> None:
    (base / f"{task}.yaml").write_text(
        f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {base / data}\n"
        f"test_split: test\n{body}metadata:\n  version: 1.0\n")


def local_tasks_dir(root: str | Path | None = None, n_mc: int = 120, n_ppl: int = 60) -> Path:
    """Write the offline lm-eval tasks over synthetic data (deterministic) and return their directory.

    - ``nslens_synth_mc``: an MMLU-format multiple-choice task (``question``, ``subject``, ``choices``,
      ``answer``): which topic is the text about; the choices are the four label words.
    - ``nslens_synth_cont``: a ``loglikelihood`` task whose continuations are several tokens long (the last two
      words of a sentence given the rest); metrics perplexity and acc (is-greedy).
    - ``nslens_synth_ppl``: a ``loglikelihood_rolling`` perplexity task over held-out synthetic text, with the
      wikitext metrics (word_perplexity, byte_perplexity, bits_per_byte).
    - ``nslens_synth_token_ppl``: the paper's token perplexity (``token_ppl_task``) over ``n_ppl`` synthetic
      articles of several paragraphs each (100-300 tokens), cut at 512 tokens with the embedded tokenizer: the
      offline stand-in for ``nslens_wikipedia_ppl``.
    Load them with ``TaskManager(include_path=local_tasks_dir())``.
    """
    import random

    from .synthetic import (
        EMBEDDED_VERSION,
        SYNTHETIC_LABELS,
        build_tokenizer,
        synthetic_corpus,
        synthetic_text,
    )

    base = Path(root) if root is not None else nslens_home() / f"lm_eval_tasks-{EMBEDDED_VERSION}"
    marker = base / "done"
    stamp = f"{EMBEDDED_VERSION} {n_mc} {n_ppl} tasks-2"
    if marker.exists() and marker.read_text().strip() == stamp:
        return base
    base.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1234)
    with open(base / "mc.jsonl", "w") as f:
        for _ in range(n_mc):
            c = rng.randrange(len(SYNTHETIC_LABELS))
            f.write(json.dumps({"question": f"Text: {synthetic_text(c, rng)}\nLabel:", "subject": "synthetic",
                                "choices": list(SYNTHETIC_LABELS), "answer": c}) + "\n")
    with open(base / "cont.jsonl", "w") as f:
        for _ in range(n_mc):
            words = synthetic_text(rng.choice([None, 0, 1, 2, 3]), rng).split()
            cut = max(1, len(words) - 2)
            f.write(json.dumps({"context": " ".join(words[:cut]), "continuation": " ".join(words[cut:])}) + "\n")
    corpus = synthetic_corpus(n_ppl, seed=4321)
    with open(base / "ppl.jsonl", "w") as f:
        for line in corpus:
            f.write(json.dumps({"text": line}) + "\n")
    _write_yaml_task(base, "nslens_synth_mc", "mc.jsonl",
                     'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
                     "doc_to_target: answer\n"
                     "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    _write_yaml_task(base, "nslens_synth_cont", "cont.jsonl",
                     'output_type: loglikelihood\ndoc_to_text: "{{context}}"\ndoc_to_target: "{{continuation}}"\n'
                     "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
                     "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    _write_yaml_task(base, "nslens_synth_ppl", "ppl.jsonl",
                     'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                     "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
                     "  - metric: bits_per_byte\n")
    articles = [" ".join(synthetic_corpus(rng.randint(8, 16), seed=9000 + i)) for i in range(n_ppl)]
    token_ppl_task(base, "nslens_synth_token_ppl", articles, build_tokenizer())
    marker.write_text(stamp + "\n")
    return base


def token_ppl_task(base: str | Path, task: str, texts: Sequence[str], tokenizer: Any,
                   max_tokens: int = 512) -> Path:
    """Write a token-perplexity lm-eval task into ``base``: each text cut to its first ``max_tokens`` tokens with
    ``tokenizer``, scored by lm-eval's rolling log-likelihood; metric ``token_perplexity`` =
    exp(-sum(ll) / sum(tokens)) over the corpus (``nslens/tasks/token_ppl``), plus word/byte perplexity and bits
    per byte. Each document records ``n_tokens``, the number of tokens lm-eval scores for it (the cut text
    re-encoded without special tokens, as lm-eval's rolling requests encode it)."""
    import shutil

    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    rows = [{"text": cut, "n_tokens": len(tokenizer(cut, add_special_tokens=False)["input_ids"])}
            for cut in cut_to_tokens(tokenizer, texts, max_tokens)]
    rows = [r for r in rows if r["n_tokens"]]
    if not rows:
        raise NsLensError(f"no text to build the {task} task from")
    data = f"{task}.jsonl"
    (base / data).write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copyfile(TASKS_DIR / "token_ppl" / "utils.py", base / "utils.py")  # the YAML's !function hooks
    template = (TASKS_DIR / "token_ppl" / "template.yaml").read_text()
    (base / f"{task}.yaml").write_text(template.format(task=task, data_file=base / data))
    return base


def wikipedia_ppl_task_dir(tokenizer: Any, n_docs: int = 200, max_tokens: int = 512,
                           data_files: str = WIKIPEDIA_DATA_FILES, root: str | Path | None = None) -> Path:
    """The paper's perplexity task (Section 5.3): the first 200 Wikipedia articles, each cut to 512 tokens of the
    model's tokenizer, token perplexity. Written once per tokenizer and source under ``$NSLENS_HOME``."""
    key = hashlib.sha256(json.dumps([tokenizer_fingerprint(tokenizer), n_docs, max_tokens, data_files]).encode())
    base = Path(root) if root is not None else \
        nslens_home() / "lm_eval_tasks" / f"{WIKIPEDIA_PPL_TASK}-{key.hexdigest()[:12]}"
    if not (base / f"{WIKIPEDIA_PPL_TASK}.yaml").exists():  # written last: a half-written directory is redone
        token_ppl_task(base, WIKIPEDIA_PPL_TASK, wikipedia_articles(n_docs, data_files), tokenizer, max_tokens)
    return base


def default_cache_dir() -> Path:
    """Where clean side-effect results are cached: ``$NSLENS_HOME/side_effects``."""
    return nslens_home() / "side_effects"


@functools.lru_cache(maxsize=8)
def _cached_task_manager(include: tuple[str, ...], include_defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include) or None, include_defaults=include_defaults)


def _include_paths(include_path: str | Path | Sequence[str | Path] | None) -> tuple[str, ...]:
    if include_path is None:
        return ()
    if isinstance(include_path, (str, Path)):
        return (str(include_path),)
    return tuple(str(p) for p in include_path)


def _task_manager(include_path: str | Path | Sequence[str | Path] | None, tasks: Sequence[str] = ()) -> Any:
    """lm-eval's TaskManager, built once per process. Indexing lm-eval's own tasks takes about 10 s, so when every
    requested task lives in the ``include_path`` directories only those are indexed."""
    _require_lm_eval()
    include = _include_paths(include_path)
    if include:
        light = _cached_task_manager(include, False)
        if tasks and set(tasks) <= set(light.all_tasks):
            return light
    return _cached_task_manager(include, True)


def _with_generated_tasks(model: Any, include_path: Any, tasks: Sequence[str]) -> tuple[str, ...]:
    """The include paths plus the directory of nslens's generated Wikipedia token-perplexity task, when asked for
    (it is cut with the model's own tokenizer, so it is written per tokenizer)."""
    include = _include_paths(include_path)
    if WIKIPEDIA_PPL_TASK in tasks and not any((Path(p) / f"{WIKIPEDIA_PPL_TASK}.yaml").exists() for p in include):
        include += (str(wikipedia_ppl_task_dir(model.tokenizer)),)
    return include


def _check_tasks(tm: Any, tasks: Sequence[str]) -> None:
    known = set(tm.all_tasks)
    for t in tasks:
        if t not in known:
            close = difflib.get_close_matches(t, sorted(known), n=5)
            raise NsLensError(f"unknown lm-eval task {t!r}" + (f"; close matches: {', '.join(close)}" if close else ""))


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
    """``{run name: {task: {metric: value}}}`` with ``clean`` first; ``deltas()`` subtracts the clean values.
    ``batch_bytes``: what each computed batch returned from the model's traces (what crosses the network remotely);
    ``batch_shapes``: its ``(rows, tokens)``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batch_bytes: list[int] = []
        self.batch_shapes: list[tuple[int, int]] = []

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
    h.update(json.dumps([model_fingerprint(model), sorted(tasks), limit, num_fewshot]).encode())
    for inc in _include_paths(include_path):
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


@contextlib.contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """Silence lm-eval while it runs under nslens's own progress: its loggers (and datasets') at ERROR, its tqdm
    bars and datasets' progress bars off.

    A side-effect table runs 2C + 1 evaluations, so two fixed costs of each are removed (results unchanged):
    ``add_env_info``, which shells out to pip for environment metadata that nslens discards (0.25 s each), and
    the compilation of every Jinja prompt template for every document (``apply_template``; compiled templates
    are cached per template string instead). Everything is restored afterwards."""
    import datasets.utils.logging as ds_logging
    import lm_eval.evaluator as lm_evaluator
    import lm_eval.utils as lm_utils
    import tqdm as tqdm_mod

    compiled = functools.lru_cache(maxsize=1024)(lm_utils.env.from_string)

    def apply_template(template: str, doc: dict) -> str:
        return compiled(template).render(**doc)

    def silent_tqdm(*args: Any, **kwargs: Any) -> Any:
        kwargs["disable"] = True
        return tqdm_mod.tqdm(*args, **kwargs)

    patched = [(m, m.tqdm) for name, m in list(sys.modules.items())
               if name.startswith("lm_eval") and getattr(m, "tqdm", None) is tqdm_mod.tqdm]
    loggers = [logging.getLogger(n) for n in ("lm_eval", "datasets", "transformers", "evaluate")]
    levels = [lg.level for lg in loggers]
    bars_on = ds_logging.is_progress_bar_enabled()
    env_info, template = lm_evaluator.add_env_info, lm_utils.apply_template
    try:
        lm_evaluator.add_env_info = lambda results: None
        lm_utils.apply_template = apply_template
        for m, _ in patched:
            m.tqdm = silent_tqdm
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        if bars_on:
            ds_logging.disable_progress_bar()
        yield
    finally:
        lm_evaluator.add_env_info, lm_utils.apply_template = env_info, template
        for m, orig in patched:
            m.tqdm = orig
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)
        if bars_on:
            ds_logging.enable_progress_bar()


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
    lm_eval = _require_lm_eval()
    if limit is not None and not (limit > 0):
        raise NsLensError(f"limit must be > 0, got {limit}")
    if not tasks:
        raise NsLensError("no tasks given")
    include_path = _with_generated_tasks(model, include_path, tasks)
    tm = _task_manager(include_path, tuple(tasks))
    _check_tasks(tm, tasks)
    for name, ivs in interventions.items():
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


# --------------------------------------------------------------------------------------------- Table 4


def main_metric(metrics: Mapping[str, float]) -> str:
    """The column a task contributes to the Table-4 view: token perplexity (the paper's PPL) where the task has
    it, else word perplexity, else perplexity, else accuracy."""
    for k in ("token_perplexity", "word_perplexity", "perplexity"):
        if k in metrics:
            return k
    return "acc"


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
        names = [f"{t} {'PPL' if k.endswith('perplexity') else k}" for t, k in cols]
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
        lines += ["", trim_note(len(self.concepts))]
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "summary": self.summary()}, indent=2, default=str)

    def write(self, stem: str | Path) -> None:
        """``<stem>.md`` and ``<stem>.json``, each written atomically."""
        for ext, text in (("md", self.to_markdown()), ("json", self.to_json())):
            write_text(f"{stem}.{ext}", text)

    @classmethod
    def from_json(cls, text: str) -> SideEffectTable:
        d = json.loads(text)
        d.pop("summary", None)
        return cls(**d)


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
    if any(len(p) != len(masks) for p in per_mask):
        raise NsLensError(f"an operator list must hold one operator per mask ({len(masks)})")
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
