"""MCEval8K (NEG paper Section 5.2), the multiple-choice benchmark of the skill-neuron probes.

Each task is a config of the hub dataset ``iszhaoxin/MCEval8K`` (splits train / validation / test). Its rows keep
the source dataset's columns (for example ``text`` / ``label`` for agnews, ``sentence1`` / ``sentence2`` / ``label``
for paws, ``knowledge`` / ``dialogue`` / ``response`` / ``hallucination`` for halueval). Prompts follow the authors'
released loader (xzhao-tkl/NEG, ``NeuronProbe/datasets.py`` and ``base_dataset.py``) for the 17 monolingual tasks:

- a prompt is the task's instruction, a blank line, the demonstrations (one per answer label by default, drawn from
  the train split; each is a question block followed by its answer), a blank line and the question block. The
  block lists the options with letters (``a.World`` ...) where the task has options and ends with ``### Answer:``
  (or the task's own answer header); the answer follows with no space. ``zero_shot=True`` leaves the
  demonstrations out.
- The demonstration for answer label L is ``random.seed(seed); random.choice(train rows whose answer is L)``, with
  the train split in the shuffled order below, the same demonstrations for every prompt of every split.
- Every split is shuffled on load as the authors' ``datasets`` shuffle does (``numpy.random.default_rng(seed)
  .permutation``), and the test split once more at load time, as their ``load_dataset`` does; ``seed`` is 42, or
  100 for fever, stereoset and the four linguistic tasks (clang8, postag, chunking, ner). ``limit=N`` therefore
  takes the authors' first N rows. ``shuffle=False`` keeps file order.
- The probed tokens (``answer_token_ids``) are the answer labels each encoded on its own, as the authors'
  ``encode_token`` does (for Llama-2 "a" is the word-initial piece, not the one that follows ``Answer:``).

The multilingual tasks are not supported here.
"""

from __future__ import annotations

import json
import numbers
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import NsLensError

__all__ = ["MCEVAL_REPO", "MCEVAL_TASKS", "MCEvalData", "MCEvalTask", "answer_token_ids", "check_mceval_task",
           "load_mceval"]

MCEVAL_REPO = "iszhaoxin/MCEval8K"
LETTERS = ("a", "b", "c", "d", "e")


def _lettered(options: Sequence[Any], header: str = "### Options:") -> str:
    return header + "\n" + "\n".join(f"{LETTERS[i]}.{o}" for i, o in enumerate(options))


@dataclass(frozen=True)
class MCEvalTask:
    """One task: the columns its rows need, its instruction, its answer labels, how a row becomes a question block,
    which column holds the answer (``first_label``: its value for the first answer label, 1 for amazon-reviews'
    scores), the entry count of each list column, and the authors' shuffle / demonstration seed."""

    name: str
    columns: tuple[str, ...]
    instruction: str
    labels: tuple[str, ...]
    question: Callable[[dict], str]
    answer_column: str = "label"
    lists: tuple[tuple[str, int], ...] = ()
    seed: int = 42
    first_label: int = 0

    def answer(self, row: dict) -> int:
        return int(row[self.answer_column]) - self.first_label


def _options(n: int) -> tuple[tuple[str, int], ...]:
    return (("options", n),)


MCEVAL_TASKS: dict[str, MCEvalTask] = {t.name: t for t in (
    MCEvalTask("agnews", ("text", "label"),
               "### Instruction: Determine the genre of the news article. Please choose from the following options: "
               "a.World b.Sports c.Business d.science. Select the letter corresponding to the most appropriate genre.",
               LETTERS[:4],
               lambda r: f"### Text:{r['text']}\n" + _lettered(["World", "Sports", "Business", "Science"],
                                                                "### Genres:") + "\n### Answer:"),
    MCEvalTask("amazon-reviews", ("text", "label"),
               "### Instruction: Analyze the sentiment of the given Amazon review and assign a score from 1 (very "
               "negative) to 5 (very positive) based on the review. Output only the score.",
               ("1", "2", "3", "4", "5"), lambda r: f"### Input Review:{r['text']}\n### Output Score:",
               first_label=1),
    MCEvalTask("imdb", ("text", "label"), "### Instruction: Based the review, is the movie good or bad?",
               ("bad", "good"), lambda r: f"### Review:{r['text']}\n### Answer:".replace("\n\n", "\n")),
    MCEvalTask("mnli", ("premise", "hypothesis", "label"),
               "### Instruction: Given a premise and a hypothesis, determine the relationship.", LETTERS[:3],
               lambda r: f"### Premise:{r['premise']}\n### Hypothesis:{r['hypothesis']}\n"
                         + _lettered(["Entailment", "Neutral", "Contradiction"]) + "\n### Answer:"),
    MCEvalTask("paws", ("sentence1", "sentence2", "label"),
               "### Instruction: Is the second sentence a paraphrase of the first? Answer exactly 'yes' or 'no'.",
               ("no", "yes"), lambda r: f"### Sentence 1:{r['sentence1']}\n### Sentence 2:{r['sentence2']}\n### Answer:"),
    MCEvalTask("swag", ("text", "options", "label"),
               "### Instruction: Given the context, select the most likely completion from the following choices. "
               "Please exactly answer the label.", LETTERS[:4],
               lambda r: f"### Context:{r['text']}\n" + _lettered(r["options"]) + "\n### Answer:", lists=_options(4)),
    MCEvalTask("commonsenseqa", ("text", "options", "label"),
               "### Instruction: Please select the most accurate and relevant answer based on the context.",
               LETTERS[:5], lambda r: f"### Question:{r['text']}\n" + _lettered(r["options"]) + "\n### Answer:",
               lists=_options(5)),
    MCEvalTask("fever", ("claim", "label"),
               "### Instruction: Given the factual claim, evaluate its validity and respond with either 'True' or "
               "'False' only.\nDo not provide any additional information or explanation.", ("False", "True"),
               lambda r: f"### Claim:{r['claim']}\n### Validity (True or False):", seed=100),
    MCEvalTask("myriadlama", ("text", "options", "label"),
               "### Instruction: Predict the [MASK] in the sentence from the options. Do not provide any additional "
               "information or explanation.", LETTERS[:4],
               lambda r: f"### Question:{r['text'].replace('[Y]', '[MASK]')}\n" + _lettered(r["options"])
                         + "\n### Answer:", lists=_options(4)),
    MCEvalTask("templama", ("text", "options", "label"),
               "### Instruction: Select the correct year from the provided options that match the temporal fact in "
               "the sentence. Output the index of the correct year.", LETTERS[:4],
               lambda r: f"### Question:{r['text']}\n" + _lettered(r["options"]) + "\n### Answer:", lists=_options(4)),
    MCEvalTask("halueval", ("knowledge", "dialogue", "response", "hallucination"),
               "### Instruction: Given the knowledge context, dialogue histroy and response, determine if any "
               "hallucination is present.\nProvide a response of either 'yes' or 'no' only.", ("no", "yes"),
               lambda r: (f"### Context:{r['knowledge']}\n### Dialogue history:{r['dialogue']}\n"
                          f"### Response:{r['response']}\n### Hallucination (yes or no):").replace("\n\n", "\n"),
               answer_column="hallucination"),
    MCEvalTask("toxicity", ("text", "toxic"),
               "### Instruction: Determine if the provided text contains toxic content. Provide a response of either "
               "'yes' or 'no' only.", ("no", "yes"),
               lambda r: f"### Text:{r['text']}\n### Toxicity (yes or no):".replace("\n\n", "\n"),
               answer_column="toxic"),
    MCEvalTask("stereoset", ("context", "sentences", "non-stereotype"),
               "### Instruction: Given the context, identify and select the sentence that does not convey the "
               "stereotype related to the context.", LETTERS[:3],
               lambda r: (f"### Context:{r['context']}\n" + _lettered(r["sentences"])
                          + "\n### Answer:").replace("\n\n", "\n"),
               answer_column="non-stereotype", lists=(("sentences", 3),), seed=100),
    MCEvalTask("ner", ("text", "target_chunk", "options", "label"),
               "### Instruction: Identify the named entity type for the specified target phrase in the give text. "
               "Choose the correct type from the provided options", LETTERS[:4],
               lambda r: f"### Input text:{r['text']}\n### Target phrase:'{' '.join(r['target_chunk'])}'\n"
                         + _lettered(r["options"]) + "\n### Answer:",
               lists=(("target_chunk", 0), ("options", 4)), seed=100),
    MCEvalTask("chunking", ("text", "target_chunk", "options", "label"),
               "### Instruction: Identify the chunk type for the specified target phrase in the sentence and select "
               "the correct label from the provided options.", LETTERS[:4],
               lambda r: f"### Input text:{r['text']}\n### Target phrase:'{' '.join(r['target_chunk'])}'\n"
                         + _lettered(r["options"]) + "\n### Answer:",
               lists=(("target_chunk", 0), ("options", 4)), seed=100),
    MCEvalTask("postag", ("text", "target_token", "options", "label"),
               "### Instruction: Determine the part-of-speech (POS) tag for the highlighted target word in the given "
               "text. Choose the correct tag from the provided options.", LETTERS[:4],
               lambda r: f"### Input text:{r['text']}\n### Target word:'{r['target_token']}'\n"
                         + _lettered(r["options"]) + "\n### Answer:", lists=_options(4), seed=100),
    MCEvalTask("clang8", ("sentence1", "sentence2", "acceptable"),
               "### Instruction: Which of the sentence below is linguistically acceptable?", LETTERS[:2],
               lambda r: f"### Sentences:\na.{r['sentence1']}\nb.{r['sentence2']}\n### Answer:",
               answer_column="acceptable", seed=100),
)}
_SPLITS = {"train": "train", "valid": "validation", "validation": "validation", "test": "test"}
_FILES = {"train": "train.json", "validation": "valid.json", "test": "test.json"}


@dataclass
class MCEvalData:
    """One split of a task: prompts, the index of each correct answer, the answer labels (as text), and which train
    rows (file order) are the demonstrations (empty for zero-shot)."""

    task: str
    split: str
    prompts: list[str]
    answers: np.ndarray
    labels: tuple[str, ...]
    demo_rows: tuple[int, ...] = ()


def _read_json(p: Path) -> list[dict]:
    if not p.exists():
        raise NsLensError(f"MCEval8K file not found: {p}")
    text = p.read_text(encoding="utf-8")
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines()
                                                                       if x.strip()]
    except json.JSONDecodeError as e:
        raise NsLensError(f"MCEval8K file {p} is not JSON (list or lines): {e.msg} at line {e.lineno}") from None
    if not all(isinstance(r, dict) for r in rows):
        raise NsLensError(f"MCEval8K file {p}: every row must be a JSON object")
    return rows


def _rows(task: str, split: str, path: str | Path | None, file_split: str) -> list[dict]:
    """Rows of ``split`` in file order: from the hub, or a local copy (``path``): the task's folder holding the
    authors' ``{train,valid,test}.json``, or the file of split ``file_split``, whose sibling splits lie next to it
    under those names."""
    if path is not None:
        p = Path(path)
        f = p / _FILES[split] if p.is_dir() else p if split == file_split else p.parent / _FILES[split]
        if split == "train" and file_split != "train" and not f.exists():
            raise NsLensError(f"MCEval8K demonstrations come from the train split: {f} not found (pass the task's "
                             "folder, or zero_shot=True)")
        return _read_json(f)
    import datasets  # heavy: only a load from the Hub needs it

    try:
        return list(datasets.load_dataset(MCEVAL_REPO, task, split=split))
    except Exception as e:  # the hub's errors are many and deep: one line naming the source
        raise NsLensError(f"could not load {MCEVAL_REPO} task {task!r} split {split!r} ({type(e).__name__}); "
                         "pass path= a local copy of its json file") from e


def _check_rows(spec: MCEvalTask, rows: list[dict], where: str) -> np.ndarray:
    """Refuse a malformed row with one line naming it (0-based, file order) and its column; the answer indices."""
    answers = np.empty(len(rows), dtype=np.int64)
    for i, r in enumerate(rows):
        for c in spec.columns:
            if c not in r:
                raise NsLensError(f"MCEval8K {where} row {i}: no column {c!r} (columns: {sorted(r)})")
        for c, n in spec.lists:
            v = r[c]
            if not isinstance(v, list) or (n and len(v) != n) or not v:
                got = f"{len(v)} entries" if isinstance(v, list) else f"a {type(v).__name__}"
                need = f"a list of {n}" if n else "a non-empty list"
                raise NsLensError(f"MCEval8K {where} row {i}: column {c!r} holds {got}; the task needs {need}")
        v = r[spec.answer_column]
        ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and float(v).is_integer()
        k = int(v) - spec.first_label if ok else -1
        if not 0 <= k < len(spec.labels):
            valid = f"{spec.first_label}..{spec.first_label + len(spec.labels) - 1}"
            raise NsLensError(f"MCEval8K {where} row {i}: column {spec.answer_column!r} is {v!r}; the task's "
                             f"answers are {valid}")
        answers[i] = k
    return answers


def _order(n: int, seed: int, times: int) -> np.ndarray:
    """The row order after ``times`` seeded shuffles (each as ``datasets.Dataset.shuffle(seed=seed)``)."""
    perm = np.random.default_rng(seed).permutation(n)
    order = np.arange(n)
    for _ in range(times):
        order = order[perm]
    return order


def check_mceval_task(task: str, limit: int | None = None) -> None:
    """``task`` is an MCEval8K task and ``limit`` (the queries kept) None or positive; else a one-line error."""
    if task not in MCEVAL_TASKS:
        raise NsLensError(f"unknown MCEval8K task {task!r}; choose one of {', '.join(MCEVAL_TASKS)}")
    if limit is not None and limit < 1:
        raise NsLensError(f"limit must be positive, got {limit}")


def load_mceval(task: str, split: str = "train", *, path: str | Path | None = None, limit: int | None = None,
                zero_shot: bool = False, shuffle: bool = True) -> MCEvalData:
    """Prompts and answers of an MCEval8K task as the authors' loader builds them (see the module docstring): from
    the hub config ``task``, or a local copy (``path``: the task's folder holding ``{train,valid,test}.json``, or
    one split's file, JSON list or JSON lines; demonstrations come from ``train.json`` next to it, or from the file
    itself when ``split`` is train). ``zero_shot`` leaves the demonstrations out; ``shuffle=False`` keeps file
    order; ``limit`` keeps the first rows after shuffling."""
    check_mceval_task(task, limit)
    if split not in _SPLITS:
        raise NsLensError(f"unknown split {split!r}; choose one of train, validation, test")
    spec, split = MCEVAL_TASKS[task], _SPLITS[split]
    rows = _rows(task, split, path, split)
    if not rows:
        raise NsLensError(f"no rows in MCEval8K task {task!r} ({split})")
    answers = _check_rows(spec, rows, f"{task} {split}")
    order = _order(len(rows), spec.seed, 2 if split == "test" else 1) if shuffle else np.arange(len(rows))
    order = order[:limit]
    demo_rows: tuple[int, ...] = ()
    demos = ""
    if not zero_shot:
        if split == "train":
            train, train_answers = rows, answers
        else:
            train = _rows(task, "train", path, split)
            train_answers = _check_rows(spec, train, f"{task} train")
        train_order = _order(len(train), spec.seed, 1) if shuffle else np.arange(len(train))
        picked = []
        for k in range(len(spec.labels)):
            pool = [int(j) for j in train_order if train_answers[j] == k]
            if not pool:
                raise NsLensError(f"MCEval8K {task} train has no row with answer {spec.labels[k]!r} to demonstrate it"
                                 " (pass zero_shot=True)")
            picked.append(random.Random(spec.seed).choice(pool))
        demo_rows = tuple(picked)
        demos = "\n\n".join(spec.question(train[j]) + spec.labels[train_answers[j]] for j in picked).strip()
    head = spec.instruction.strip() + "\n\n" + (demos + "\n\n" if demos else "")
    prompts = [head + spec.question(rows[i]).strip() for i in order]
    return MCEvalData(task, split, prompts, answers[order], spec.labels, demo_rows)


def answer_token_ids(tokenizer: Any, labels: Sequence[str], prompt: str | None = None) -> list[int]:
    """The token id of each answer label. By default each label is encoded on its own, as the authors'
    ``encode_token`` does: ``tokenizer.encode(label)`` without the tokenizer's BOS (and EOS) must be one token.
    With ``prompt``, the token the label becomes right after the prompt instead (read from the tokenisation of
    prompt + label). Distinct per label, else an error."""
    ids = []
    for lab in labels:
        if prompt is None:
            toks = list(tokenizer.encode(lab))
            if toks and tokenizer.bos_token_id is not None and toks[0] == tokenizer.bos_token_id:
                toks = toks[1:]
            if len(toks) > 1 and tokenizer.eos_token_id is not None and toks[-1] == tokenizer.eos_token_id:
                toks = toks[:-1]
            if len(toks) != 1:
                raise NsLensError(f"the answer {lab!r} is {len(toks)} tokens in this tokenizer ({toks}); the probes "
                                 "need single-token answers")
            ids.append(int(toks[0]))
        else:
            base = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            full = tokenizer(prompt + lab, add_special_tokens=False)["input_ids"]
            if full[:len(base)] != base or len(full) == len(base):
                raise NsLensError(f"the answer {lab!r} merges with the end of the prompt in this tokenizer")
            ids.append(int(full[len(base)]))
    if len(set(ids)) != len(ids):
        raise NsLensError(f"answers {list(labels)} share their first token ({ids}) in this tokenizer")
    return ids
