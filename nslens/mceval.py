"""MCEval8K (NEG paper Section 5.2), the multiple-choice benchmark of the skill-neuron probes.

Each task is a config of the hub dataset ``iszhaoxin/MCEval8K`` (splits train / validation / test). Its rows keep
the source dataset's columns (for example ``text`` / ``label`` for agnews, ``sentence1`` / ``sentence2`` / ``label``
for paws, ``knowledge`` / ``dialogue`` / ``response`` / ``hallucination`` for halueval). A prompt is the task's
instruction, a blank line and the question block, which lists the options with letters (``a.World`` ...) where the
task has options and ends with ``### Answer:`` (or the task's own answer header). The answer follows with no space,
so the probed tokens are the option letters, or the answer words of yes/no-style tasks (paws, halueval, toxicity:
no / yes; fever: False / True; imdb: bad / good). This follows the authors' released loader (xzhao-tkl/NEG,
``NeuronProbe/datasets.py``) for the zero-shot setting; the multilingual tasks are not supported here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MCEVAL_REPO", "MCEVAL_TASKS", "MCEvalData", "MCEvalTask", "answer_token_ids", "load_mceval"]

MCEVAL_REPO = "iszhaoxin/MCEval8K"
LETTERS = ("a", "b", "c", "d", "e")


def _lettered(options: Sequence[Any], header: str = "### Options:") -> str:
    return header + "\n" + "\n".join(f"{LETTERS[i]}.{o}" for i, o in enumerate(options))


@dataclass(frozen=True)
class MCEvalTask:
    """One task: the columns its rows need, its instruction, its answer tokens and how a row becomes a question."""

    name: str
    columns: tuple[str, ...]
    instruction: str
    labels: tuple[str, ...]
    question: Callable[[dict], str]
    answer: Callable[[dict], int] = lambda r: int(r["label"])


MCEVAL_TASKS: dict[str, MCEvalTask] = {t.name: t for t in (
    MCEvalTask("agnews", ("text", "label"),
               "### Instruction: Determine the genre of the news article. Please choose from the following options: "
               "a.World b.Sports c.Business d.science. Select the letter corresponding to the most appropriate genre.",
               LETTERS[:4],
               lambda r: f"### Text:{r['text']}\n" + _lettered(["World", "Sports", "Business", "Science"],
                                                                "### Genres:") + "\n### Answer:"),
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
               lambda r: f"### Context:{r['text']}\n" + _lettered(r["options"][:4]) + "\n### Answer:"),
    MCEvalTask("commonsenseqa", ("text", "options", "label"),
               "### Instruction: Please select the most accurate and relevant answer based on the context.",
               LETTERS[:5], lambda r: f"### Question:{r['text']}\n" + _lettered(r["options"][:5]) + "\n### Answer:"),
    MCEvalTask("fever", ("claim", "label"),
               "### Instruction: Given the factual claim, evaluate its validity and respond with either 'True' or "
               "'False' only.\nDo not provide any additional information or explanation.", ("False", "True"),
               lambda r: f"### Claim:{r['claim']}\n### Validity (True or False):"),
    MCEvalTask("myriadlama", ("text", "options", "label"),
               "### Instruction: Predict the [MASK] in the sentence from the options. Do not provide any additional "
               "information or explanation.", LETTERS[:4],
               lambda r: f"### Question:{r['text'].replace('[Y]', '[MASK]')}\n" + _lettered(r["options"][:4])
                         + "\n### Answer:"),
    MCEvalTask("templama", ("text", "options", "label"),
               "### Instruction: Select the correct year from the provided options that match the temporal fact in "
               "the sentence. Output the index of the correct year.", LETTERS[:4],
               lambda r: f"### Question:{r['text']}\n" + _lettered(r["options"][:4]) + "\n### Answer:"),
    MCEvalTask("halueval", ("knowledge", "dialogue", "response", "hallucination"),
               "### Instruction: Given the knowledge context, dialogue histroy and response, determine if any "
               "hallucination is present.\nProvide a response of either 'yes' or 'no' only.", ("no", "yes"),
               lambda r: (f"### Context:{r['knowledge']}\n### Dialogue history:{r['dialogue']}\n"
                          f"### Response:{r['response']}\n### Hallucination (yes or no):").replace("\n\n", "\n"),
               lambda r: int(r["hallucination"])),
    MCEvalTask("toxicity", ("text", "toxic"),
               "### Instruction: Determine if the provided text contains toxic content. Provide a response of either "
               "'yes' or 'no' only.", ("no", "yes"),
               lambda r: f"### Text:{r['text']}\n### Toxicity (yes or no):".replace("\n\n", "\n"),
               lambda r: int(r["toxic"])),
    MCEvalTask("stereoset", ("context", "sentences", "non-stereotype"),
               "### Instruction: Given the context, identify and select the sentence that does not convey the "
               "stereotype related to the context.", LETTERS[:3],
               lambda r: (f"### Context:{r['context']}\n" + _lettered(r["sentences"][:3])
                          + "\n### Answer:").replace("\n\n", "\n"),
               lambda r: int(r["non-stereotype"])),
    MCEvalTask("ner", ("text", "target_chunk", "options", "label"),
               "### Instruction: Identify the named entity type for the specified target phrase in the give text. "
               "Choose the correct type from the provided options", LETTERS[:4],
               lambda r: f"### Input text:{r['text']}\n### Target phrase:'{' '.join(r['target_chunk'])}'\n"
                         + _lettered(r["options"][:4]) + "\n### Answer:"),
)}
_SPLITS = {"train": "train", "valid": "validation", "validation": "validation", "test": "test"}


@dataclass
class MCEvalData:
    """One split of a task: prompts, the index of each correct answer, and the answer tokens (as text)."""

    task: str
    split: str
    prompts: list[str]
    answers: np.ndarray
    labels: tuple[str, ...]


def _rows(task: str, split: str, path: str | Path | None) -> list[dict]:
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ValueError(f"MCEval8K file not found: {p}")
        text = p.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            return json.loads(text)
        return [json.loads(x) for x in text.splitlines() if x.strip()]
    import datasets

    try:
        return list(datasets.load_dataset(MCEVAL_REPO, task, split=_SPLITS[split]))
    except Exception as e:  # the hub's errors are many and deep: one line naming the source
        raise ValueError(f"could not load {MCEVAL_REPO} task {task!r} split {split!r} ({type(e).__name__}); "
                         "pass path= a local copy of its json file") from e


def load_mceval(task: str, split: str = "train", *, path: str | Path | None = None,
                limit: int | None = None) -> MCEvalData:
    """Prompts and answers of an MCEval8K task (zero-shot): from the hub config ``task``, or a local copy of one of
    its files (``path``: the ``{train,valid,test}.json`` of ``<genre>/<task>``, JSON list or JSON lines)."""
    if task not in MCEVAL_TASKS:
        raise ValueError(f"unknown MCEval8K task {task!r}; choose one of {', '.join(MCEVAL_TASKS)}")
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of train, validation, test")
    spec = MCEVAL_TASKS[task]
    rows = _rows(task, split, path)[:limit]
    if not rows:
        raise ValueError(f"no rows in MCEval8K task {task!r} ({split})")
    missing = [c for c in spec.columns if c not in rows[0]]
    if missing:
        raise ValueError(f"MCEval8K {task} rows lack {missing}; columns are {sorted(rows[0])}")
    prompts = [f"{spec.instruction.strip()}\n\n{spec.question(r).strip()}" for r in rows]
    answers = np.array([spec.answer(r) for r in rows], dtype=np.int64)
    if answers.min() < 0 or answers.max() >= len(spec.labels):
        raise ValueError(f"MCEval8K {task}: answers must index {len(spec.labels)} options, got {sorted(set(answers))}")
    return MCEvalData(task, split, prompts, answers, spec.labels)


def answer_token_ids(tokenizer: Any, prompt: str, labels: Sequence[str]) -> list[int]:
    """The token each answer becomes right after ``prompt`` (the answer follows ``Answer:`` with no space), read from
    the tokenisation of prompt + answer; distinct per answer, else an error."""
    base = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = []
    for lab in labels:
        full = tokenizer(prompt + lab, add_special_tokens=False)["input_ids"]
        if full[:len(base)] != base or len(full) == len(base):
            raise ValueError(f"the answer {lab!r} merges with the end of the prompt in this tokenizer")
        ids.append(full[len(base)])
    if len(set(ids)) != len(ids):
        raise ValueError(f"answers {list(labels)} share their first token ({ids}) in this tokenizer")
    return ids
