"""The lm-eval tasks of a side-effect measurement: which ones (the paper's and the offline stand-ins), the files
nslens writes for them, and lm-eval's task index.

- ``nslens_wikipedia_ppl`` (``wikipedia_ppl_task_dir``): the paper's token perplexity on the first 200 Wikipedia
  articles, cut with the model's own tokenizer, so it is written per tokenizer.
- ``local_tasks_dir``: offline fixtures over synthetic data for the embedded model (MMLU-format choice, token
  perplexity, ...), standing in for ``DEFAULT_TASKS``.
- ``token_ppl_task``: the token-perplexity task over any texts (also ``nslens.realtext``'s fortunes task).

lm-eval itself is an optional extra (``pip install 'nslens[eval]'``): ``require_lm_eval`` says so in one line, and
it is imported only by the functions that index or run tasks.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .data import WIKIPEDIA_DATA_FILES, cut_to_tokens, wikipedia_articles
from .errors import NsLensError
from .files import nslens_home, write_text
from .models import tokenizer_fingerprint
from .synthetic import EMBEDDED_VERSION, SYNTHETIC_LABELS, build_tokenizer, synthetic_corpus, synthetic_text

__all__ = [
    "DEFAULT_TASKS",
    "LOCAL_TASKS",
    "TASKS_DIR",
    "WIKIPEDIA_PPL_TASK",
    "cached_token_ppl_task",
    "check_tasks",
    "include_paths",
    "local_tasks_dir",
    "require_lm_eval",
    "task_manager",
    "token_ppl_task",
    "wikipedia_ppl_task_dir",
    "with_generated_tasks",
]

#: the generated token-perplexity task of the paper's protocol (Section 5.3; ``wikipedia_ppl_task_dir``)
WIKIPEDIA_PPL_TASK = "nslens_wikipedia_ppl"
#: the paper's side effects: zero-shot MMLU accuracy and token perplexity on Wikipedia
DEFAULT_TASKS = ("mmlu", WIKIPEDIA_PPL_TASK)
#: offline task fixtures for the embedded model (written by ``local_tasks_dir``), standing in for DEFAULT_TASKS
LOCAL_TASKS = ("nslens_synth_mc", "nslens_synth_token_ppl")
TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def require_lm_eval() -> Any:
    """The ``lm_eval`` package, or a one-line error naming the extra that installs it."""
    try:
        import lm_eval  # optional extra [eval]
    except ImportError as e:
        raise NsLensError("side effects need lm-eval: pip install 'nslens[eval]'") from e
    return lm_eval


def _write_yaml_task(base: Path, task: str, data: str, body: str) -> None:
    write_text(base / f"{task}.yaml",
               f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {base / data}\n"
               f"test_split: test\n{body}metadata:\n  version: 1.0\n")


def _jsonl(rows: Sequence[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def local_tasks_dir(root: str | Path | None = None, n_mc: int = 120, n_ppl: int = 60) -> Path:
    """Write the offline lm-eval tasks over synthetic data (deterministic) and return their directory.

    - ``nslens_synth_mc``: an MMLU-format multiple-choice task (``question``, ``subject``, ``choices``,
      ``answer``): which topic is the text about; the choices are the four label words.
    - ``nslens_synth_gen``: a generative (``generate_until``) task: the same kind of question, answered by up to
      four generated tokens cut at the first newline; metric exact_match of the first word against the label.
    - ``nslens_synth_cont``: a ``loglikelihood`` task whose continuations are several tokens long (the last two
      words of a sentence given the rest); metrics perplexity and acc (is-greedy).
    - ``nslens_synth_ppl``: a ``loglikelihood_rolling`` perplexity task over held-out synthetic text, with the
      wikitext metrics (word_perplexity, byte_perplexity, bits_per_byte).
    - ``nslens_synth_token_ppl``: the paper's token perplexity (``token_ppl_task``) over ``n_ppl`` synthetic
      articles of several paragraphs each (100-300 tokens), cut at 512 tokens with the embedded tokenizer: the
      offline stand-in for ``nslens_wikipedia_ppl``.
    Load them with ``TaskManager(include_path=local_tasks_dir())``.
    """
    base = Path(root) if root is not None else nslens_home() / f"lm_eval_tasks-{EMBEDDED_VERSION}"
    marker = base / "done"
    # the YAML files name their data files by absolute path, so a folder that has moved (a copied $NSLENS_HOME)
    # is written again
    stamp = f"{EMBEDDED_VERSION} {n_mc} {n_ppl} tasks-4 {base.resolve()}"
    if marker.exists() and marker.read_text().strip() == stamp:
        return base
    base.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1234)
    mc = []
    for _ in range(n_mc):
        c = rng.randrange(len(SYNTHETIC_LABELS))
        mc.append({"question": f"Text: {synthetic_text(c, rng)}\nLabel:", "subject": "synthetic",
                   "choices": list(SYNTHETIC_LABELS), "answer": c})
    write_text(base / "mc.jsonl", _jsonl(mc))
    gen_rng = random.Random(5678)  # its own generator: the other tasks' data stay what they were
    gen = []
    for _ in range(n_mc):
        c = gen_rng.randrange(len(SYNTHETIC_LABELS))
        gen.append({"question": f"Text: {synthetic_text(c, gen_rng)}\nLabel:", "answer": SYNTHETIC_LABELS[c]})
    write_text(base / "gen.jsonl", _jsonl(gen))
    cont = []
    for _ in range(n_mc):
        words = synthetic_text(rng.choice([None, 0, 1, 2, 3]), rng).split()
        cut = max(1, len(words) - 2)
        cont.append({"context": " ".join(words[:cut]), "continuation": " ".join(words[cut:])})
    write_text(base / "cont.jsonl", _jsonl(cont))
    write_text(base / "ppl.jsonl", _jsonl([{"text": line} for line in synthetic_corpus(n_ppl, seed=4321)]))
    _write_yaml_task(base, "nslens_synth_mc", "mc.jsonl",
                     'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
                     "doc_to_target: answer\n"
                     "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    _write_yaml_task(base, "nslens_synth_gen", "gen.jsonl",
                     'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
                     'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 4\n  do_sample: false\n'
                     "filter_list:\n  - name: first_word\n    filter:\n      - function: regex\n"
                     '        regex_pattern: "([a-z]+)"\n      - function: take_first\n'
                     "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
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
    write_text(marker, stamp + "\n")
    return base


def token_ppl_task(base: str | Path, task: str, texts: Sequence[str], tokenizer: Any,
                   max_tokens: int = 512) -> Path:
    """Write a token-perplexity lm-eval task into ``base``: each text cut to its first ``max_tokens`` tokens with
    ``tokenizer``, scored by lm-eval's rolling log-likelihood; metric ``token_perplexity`` =
    exp(-sum(ll) / sum(tokens)) over the corpus (``nslens/tasks/token_ppl``), plus word/byte perplexity and bits
    per byte. Each document records ``n_tokens``, the number of tokens lm-eval scores for it (the cut text
    re-encoded without special tokens, as lm-eval's rolling requests encode it)."""
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    rows = [{"text": cut, "n_tokens": len(tokenizer(cut, add_special_tokens=False)["input_ids"])}
            for cut in cut_to_tokens(tokenizer, texts, max_tokens)]
    rows = [r for r in rows if r["n_tokens"]]
    if not rows:
        raise NsLensError(f"no text to build the {task} task from")
    write_text(base / f"{task}.jsonl", _jsonl(rows))
    write_text(base / "utils.py", (TASKS_DIR / "token_ppl" / "utils.py").read_text())  # the YAML's !function hooks
    _token_ppl_yaml(base, task)
    return base


def _token_ppl_yaml(base: Path, task: str) -> None:
    """Write (last, so its presence means the folder is complete) the task's YAML, which names the data file by
    absolute path; unchanged files are not rewritten."""
    text = (TASKS_DIR / "token_ppl" / "template.yaml").read_text().format(task=task, data_file=base / f"{task}.jsonl")
    yaml = base / f"{task}.yaml"
    if not yaml.exists() or yaml.read_text() != text:
        write_text(yaml, text)


def cached_token_ppl_task(base: str | Path, task: str, texts: Callable[[], Sequence[str]], tokenizer: Any,
                          max_tokens: int = 512) -> Path:
    """``token_ppl_task`` written once into ``base``: a complete folder (its YAML is written last) is reused, with
    its YAML pointed at the folder's own data file if the folder has moved (a copied ``$NSLENS_HOME``; the YAML
    names the file by absolute path). ``texts`` is called only when the folder must be written."""
    base = Path(base)
    if (base / f"{task}.yaml").exists() and (base / f"{task}.jsonl").exists() and (base / "utils.py").exists():
        _token_ppl_yaml(base, task)
        return base
    return token_ppl_task(base, task, texts(), tokenizer, max_tokens)


def wikipedia_ppl_task_dir(tokenizer: Any, n_docs: int = 200, max_tokens: int = 512,
                           data_files: str = WIKIPEDIA_DATA_FILES, root: str | Path | None = None) -> Path:
    """The paper's perplexity task (Section 5.3): the first 200 Wikipedia articles, each cut to 512 tokens of the
    model's tokenizer, token perplexity. Written once per tokenizer and source under ``$NSLENS_HOME``."""
    key = hashlib.sha256(json.dumps([tokenizer_fingerprint(tokenizer), n_docs, max_tokens, data_files]).encode())
    base = Path(root) if root is not None else \
        nslens_home() / "lm_eval_tasks" / f"{WIKIPEDIA_PPL_TASK}-{key.hexdigest()[:12]}"
    return cached_token_ppl_task(base, WIKIPEDIA_PPL_TASK, lambda: wikipedia_articles(n_docs, data_files), tokenizer,
                                 max_tokens)


@functools.lru_cache(maxsize=8)
def _cached_task_manager(include: tuple[str, ...], include_defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager  # optional extra [eval]

    return TaskManager(include_path=list(include) or None, include_defaults=include_defaults)


def include_paths(include_path: str | Path | Sequence[str | Path] | None) -> tuple[str, ...]:
    """``include_path`` (none, one directory or several) as a tuple of strings: the form the task index is
    cached by. Each must be a directory: lm-eval indexes only what it finds below one, so a mistyped path was
    silently no tasks at all."""
    if include_path is None:
        return ()
    paths = (include_path,) if isinstance(include_path, (str, Path)) else tuple(include_path)
    for p in paths:
        if not Path(p).is_dir():
            raise NsLensError(f"lm-eval task directory not found: {p} (--include, side_effects.include)")
    return tuple(str(p) for p in paths)


def task_manager(include_path: str | Path | Sequence[str | Path] | None, tasks: Sequence[str] = ()) -> Any:
    """lm-eval's TaskManager, built once per process. Indexing lm-eval's own tasks takes about 10 s, so when every
    requested task lives in the ``include_path`` directories only those are indexed."""
    require_lm_eval()
    include = include_paths(include_path)
    if include:
        light = _cached_task_manager(include, False)
        if tasks and set(tasks) <= set(light.all_tasks):
            return light
    return _cached_task_manager(include, True)


def with_generated_tasks(model: Any, include_path: Any, tasks: Sequence[str]) -> tuple[str, ...]:
    """The include paths plus the directory of nslens's generated Wikipedia token-perplexity task, when asked for
    (it is cut with the model's own tokenizer, so it is written per tokenizer)."""
    include = include_paths(include_path)
    if WIKIPEDIA_PPL_TASK in tasks and not any((Path(p) / f"{WIKIPEDIA_PPL_TASK}.yaml").exists() for p in include):
        include += (str(wikipedia_ppl_task_dir(model.tokenizer)),)
    return include


def check_tasks(tm: Any, tasks: Sequence[str]) -> None:
    """Every task is known to the task index ``tm``; an unknown one is an error naming the close matches."""
    known = set(tm.all_tasks)
    for t in tasks:
        if t not in known:
            close = difflib.get_close_matches(t, sorted(known), n=5)
            raise NsLensError(f"unknown lm-eval task {t!r}" + (f"; close matches: {', '.join(close)}" if close else ""))

