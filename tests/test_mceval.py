"""MCEval8K: per-task columns and prompts (the authors' layout), answer tokens read after the prompt."""

import json

import numpy as np
import pytest

from nslens.mceval import MCEVAL_TASKS, answer_token_ids, load_mceval

ROWS = {
    "agnews": {"text": "Stocks rose today.", "label": 2},
    "paws": {"sentence1": "A cat sat.", "sentence2": "The cat was sitting.", "label": 1},
    "commonsenseqa": {"text": "Where do fish live?", "options": ["sky", "water", "tree", "car", "desk"], "label": 1},
    "halueval": {"knowledge": "Paris is in France.", "dialogue": "Where is Paris?", "response": "In Spain.",
                 "hallucination": 1},
    "ner": {"text": "Obama visited Berlin.", "target_chunk": ["Berlin"], "options": ["PER", "LOC", "ORG", "MISC"],
            "label": 1},
    "fever": {"claim": "The sun is cold.", "label": 0},
}


@pytest.mark.parametrize("task", list(ROWS))
def test_prompts_follow_the_authors_layout(task, tmp_path):
    p = tmp_path / f"{task}.json"
    p.write_text(json.dumps([ROWS[task]] * 3))
    data = load_mceval(task, path=p)
    spec = MCEVAL_TASKS[task]
    assert data.answers.tolist() == [spec.answer(ROWS[task])] * 3 and data.labels == spec.labels
    prompt = data.prompts[0]
    assert prompt.startswith(spec.instruction.split(".")[0]) and "\n\n### " in prompt
    if "options" in ROWS[task] or task == "agnews":
        assert "\na." in prompt and "\nb." in prompt and prompt.endswith("### Answer:")
        assert spec.labels[0] == "a"
    expected_end = {"paws": "### Answer:", "halueval": "### Hallucination (yes or no):",
                    "fever": "### Validity (True or False):"}
    if task in expected_end:
        assert prompt.endswith(expected_end[task])


def test_agnews_prompt_exactly():
    data_row = ROWS["agnews"]
    spec = MCEVAL_TASKS["agnews"]
    assert spec.question(data_row) == ("### Text:Stocks rose today.\n### Genres:\na.World\nb.Sports\nc.Business\n"
                                       "d.Science\n### Answer:")


def test_bad_inputs_name_the_problem(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps([{"text": "a"}]))
    with pytest.raises(ValueError, match=r"MCEval8K agnews rows lack \['label'\]; columns are \['text'\]"):
        load_mceval("agnews", path=p)
    with pytest.raises(ValueError, match="unknown MCEval8K task 'mlama'; choose one of agnews, imdb"):
        load_mceval("mlama")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_mceval("agnews", "dev")
    p.write_text(json.dumps([{"text": "a", "label": 7}]))
    with pytest.raises(ValueError, match="answers must index 4 options"):
        load_mceval("agnews", path=p)


def test_answer_tokens_follow_the_prompt(embedded):
    tok = embedded.tokenizer
    ids = answer_token_ids(tok, "Text: the game Label:", ["sports", "science"])
    for word, i in zip(["sports", "science"], ids):
        full = tok("Text: the game Label:" + word, add_special_tokens=False)["input_ids"]
        assert full[-1] == i
    with pytest.raises(ValueError, match="share their first token"):
        answer_token_ids(tok, "Text: the game Label:", ["sports", "sports"])
    assert np.unique(ids).size == 2
