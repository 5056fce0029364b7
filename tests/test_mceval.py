"""MCEval8K: every task's prompts equal those the authors' released loader (xzhao-tkl/NEG, NeuronProbe/datasets.py and
base_dataset.py) builds from the same rows. The reference below follows their code step by step -- the hub-style
seeded ``datasets`` shuffle of every split, ``create_answers``, one demonstration per label drawn with
``random.seed(seed); random.choice(...)`` from the train split, ``make_prompt``'s joins and strips, and the second
shuffle of the test split at load -- with each task's ``make_demo`` written out from their source, independently of
nslens's builder. Malformed rows are refused with one line; answer tokens are encoded as their ``encode_token``."""

import json
import random

import datasets
import numpy as np
import pytest

from nslens.mceval import MCEVAL_TASKS, answer_token_ids, load_mceval


def _opts(item, n, key="options"):
    return "\n".join(f"{'abcde'[i]}.{item[key][i]}" for i in range(n))


# task: (instruction as in the authors' class, labels, make_demo without the answer, answer column -> _answer, seed)
AUTHORS = {
    "agnews": ("### Instruction: Determine the genre of the news article. Please choose from the following options: "
               "a.World b.Sports c.Business d.science. Select the letter corresponding to the most appropriate genre.",
               ["a", "b", "c", "d"],
               lambda it: f"### Text:{it['text']}\n### Genres:\na.World\nb.Sports\nc.Business\nd.Science\n### Answer:",
               "label", 42),
    "amazon-reviews": ("### Instruction: Analyze the sentiment of the given Amazon review and assign a score from 1 "
                       "(very negative) to 5 (very positive) based on the review. Output only the score.",
                       ["1", "2", "3", "4", "5"],
                       lambda it: f"### Input Review:{it['text']}\n### Output Score:", "label", 42),
    "imdb": ("### Instruction: Based the review, is the movie good or bad?", ["bad", "good"],
             lambda it: f"### Review:{it['text']}\n### Answer:".replace("\n\n", "\n"), "label", 42),
    "mnli": ("### Instruction: Given a premise and a hypothesis, determine the relationship.", ["a", "b", "c"],
             lambda it: f"### Premise:{it['premise']}\n" + f"### Hypothesis:{it['hypothesis']}\n"
                        + "### Options:\na.Entailment\nb.Neutral\nc.Contradiction\n" + "### Answer:", "label", 42),
    "paws": ("### Instruction: Is the second sentence a paraphrase of the first? Answer exactly 'yes' or 'no'.",
             ["no", "yes"], lambda it: f"### Sentence 1:{it['sentence1']}\n" + f"### Sentence 2:{it['sentence2']}\n"
                                       + "### Answer:", "label", 42),
    "swag": ("### Instruction: Given the context, select the most likely completion from the following choices. "
             "Please exactly answer the label.", ["a", "b", "c", "d"],
             lambda it: f"### Context:{it['text']}\n" + f"### Options:\n{_opts(it, 4)}\n" + "### Answer:", "label", 42),
    "commonsenseqa": ("### Instruction: Please select the most accurate and relevant answer based on the context.",
                      ["a", "b", "c", "d", "e"],
                      lambda it: f"### Question:{it['text']}\n### Options:\n{_opts(it, 5)}\n### Answer:", "label", 42),
    "fever": ("### Instruction: Given the factual claim, evaluate its validity and respond with either 'True' or "
              "'False' only.\nDo not provide any additional information or explanation.", ["False", "True"],
              lambda it: f"### Claim:{it['claim']}\n### Validity (True or False):", "label", 100),
    "myriadlama": ("### Instruction: Predict the [MASK] in the sentence from the options. Do not provide any "
                   "additional information or explanation.", ["a", "b", "c", "d"],
                   lambda it: f"### Question:{it['text'].replace('[Y]', '[MASK]')}\n" + f"### Options:\n{_opts(it, 4)}\n"
                              + "### Answer:", "label", 42),
    "templama": ("### Instruction: Select the correct year from the provided options that match the temporal fact in "
                 "the sentence. Output the index of the correct year.", ["a", "b", "c", "d"],
                 lambda it: f"### Question:{it['text']}\n" + f"### Options:\n{_opts(it, 4)}\n" + "### Answer:",
                 "label", 42),
    "halueval": ("### Instruction: Given the knowledge context, dialogue histroy and response, determine if any "
                 "hallucination is present.\nProvide a response of either 'yes' or 'no' only.", ["no", "yes"],
                 lambda it: (f"### Context:{it['knowledge']}\n" + f"### Dialogue history:{it['dialogue']}\n"
                             + f"### Response:{it['response']}\n" + "### Hallucination (yes or no):"
                             ).replace("\n\n", "\n"), "hallucination", 42),
    "toxicity": ("### Instruction: Determine if the provided text contains toxic content. Provide a response of "
                 "either 'yes' or 'no' only.", ["no", "yes"],
                 lambda it: (f"### Text:{it['text']}\n" + "### Toxicity (yes or no):").replace("\n\n", "\n"),
                 "toxic", 42),
    "stereoset": ("### Instruction: Given the context, identify and select the sentence that does not convey the "
                  "stereotype related to the context.", ["a", "b", "c"],
                  lambda it: (f"### Context:{it['context']}\n" + f"### Options:\n{_opts(it, 3, 'sentences')}\n"
                              + "### Answer:").replace("\n\n", "\n"), "non-stereotype", 100),
    "ner": ("### Instruction: Identify the named entity type for the specified target phrase in the give text. "
            "Choose the correct type from the provided options", ["a", "b", "c", "d"],
            lambda it: f"### Input text:{it['text']}\n" + f"### Target phrase:'{' '.join(it['target_chunk'])}'\n"
                       + f"### Options:\n{_opts(it, 4)}\n" + "### Answer:", "label", 100),
    "chunking": ("### Instruction: Identify the chunk type for the specified target phrase in the sentence and select "
                 "the correct label from the provided options. ", ["a", "b", "c", "d"],
                 lambda it: f"### Input text:{it['text']}\n" + f"### Target phrase:'{' '.join(it['target_chunk'])}'\n"
                            + f"### Options:\n{_opts(it, 4)}\n" + "### Answer:", "label", 100),
    "postag": ("### Instruction: Determine the part-of-speech (POS) tag for the highlighted target word in the given "
               "text. Choose the correct tag from the provided options.", ["a", "b", "c", "d"],
               lambda it: f"### Input text:{it['text']}\n" + f"### Target word:'{it['target_token']}'\n"
                          + f"### Options:\n{_opts(it, 4)}\n" + "### Answer:", "label", 100),
    "clang8": ("### Instruction: Which of the sentence below is linguistically acceptable?", ["a", "b"],
               lambda it: f"### Sentences:\na.{it['sentence1']}\nb.{it['sentence2']}\n### Answer:", "acceptable", 100),
}


def planted_row(task, i, k):
    """Row i of a split in the task's MCEval8K schema, answer index k; texts carry a blank line where the authors
    collapse it, the [Y] slot of myriadlama and clang8's null sentences (the real files hold some)."""
    t = f"text {i}\n\nmore {i}"
    rows = {
        "agnews": {"text": t, "label": k}, "imdb": {"text": t, "label": k}, "toxicity": {"text": t, "toxic": k},
        "amazon-reviews": {"text": t, "label": float(k + 1)},
        "mnli": {"premise": f"p{i}", "hypothesis": f"h{i}", "label": k},
        "paws": {"sentence1": f"s{i}", "sentence2": f"t{i}", "label": k},
        "fever": {"claim": f"claim {i}", "label": k},
        "swag": {"text": t, "options": [f"o{i}{j}" for j in range(4)], "label": k},
        "commonsenseqa": {"text": t, "options": [f"o{i}{j}" for j in range(5)], "label": k},
        "myriadlama": {"text": f"[X] is in [Y] {i}.", "options": [f"o{i}{j}" for j in range(4)], "label": k},
        "templama": {"text": t, "options": [str(1990 + i + j) for j in range(4)], "label": k},
        "halueval": {"knowledge": f"k{i}\n\nk", "dialogue": f"d{i}", "response": f"r{i}", "hallucination": k},
        "stereoset": {"context": f"c{i}\n\nc", "sentences": [f"x{i}{j}" for j in range(3)], "stereotype": 0,
                      "anti-stereotype": 1, "non-stereotype": k},
        "ner": {"text": t, "chunks": [["A", "B"]], "target_chunk": ["A", f"B{i}"], "options": ["LOC", "PER", "ORG",
                "MISC"], "label": k},
        "chunking": {"text": t, "chunks": [["A"]], "target_chunk": [f"w{i}", "x"], "options": ["NP", "VP", "PP",
                     "ADVP"], "label": k},
        "postag": {"text": t, "tokens": ["w"], "target_token": f"w{i}", "options": ["NOUN", "VERB", "ADJ", "PRON"],
                   "label": k},
        "clang8": {"sentence1": None if i == 3 else f"s{i}", "sentence2": f"t{i}", "acceptable": k},
    }
    return rows[task]


def planted_splits(task, sizes=(14, 7, 9), seed=0):
    n_labels = len(AUTHORS[task][1])
    rng = np.random.default_rng(seed)
    out = {}
    for name, n in zip(("train", "valid", "test"), sizes):
        ks = [i % n_labels for i in range(n)]
        rng.shuffle(ks)
        out[name] = [planted_row(task, 100 * len(out) + i, int(k)) for i, k in enumerate(ks)]
    return out


def authors_prompts(task, splits, zero_shot=False):
    """The authors' loader, step by step (BaseDataset.load_dataset with n_shot = -1 or 0, balanced='no')."""
    instruction, labels, make_demo, column, seed = AUTHORS[task]
    ds = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in
                               (("train", splits["train"]), ("validation", splits["valid"]), ("test", splits["test"]))})
    ds = ds.shuffle(seed=seed)  # download_dataset

    def create_answers(item):
        v = item[column]
        item["_answer"] = labels[int(v - 1)] if task == "amazon-reviews" else labels[v]
        return item

    ds = ds.map(create_answers, load_from_cache_file=False)
    demos = ""
    if not zero_shot:  # generate_demos / select_demos
        examples = []
        for answer in labels:
            filtered = ds["train"].filter(lambda x, answer=answer: x["_answer"] == answer, load_from_cache_file=False)
            random.seed(seed)
            examples.append(random.choice(filtered))
        demos = "\n\n".join(make_demo(it) + it["_answer"] for it in examples)

    def make_prompt(item):
        question = make_demo(item)
        item["_prompt"] = (f"{instruction.strip()}\n\n{question.strip()}" if demos == "" else
                           f"{instruction.strip()}\n\n{demos.strip()}\n\n{question.strip()}")
        return item

    ds = ds.map(make_prompt, load_from_cache_file=False)
    ds["test"] = ds["test"].shuffle(seed)
    return {k: (v["_prompt"], v["_answer"]) for k, v in ds.items()}


def write_splits(folder, splits):
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        (folder / f"{name}.json").write_text(json.dumps(rows))
    return folder


def test_every_authors_task_is_here():
    assert set(MCEVAL_TASKS) == set(AUTHORS)
    assert {t: s.seed for t, s in MCEVAL_TASKS.items()} == {t: a[4] for t, a in AUTHORS.items()}


@pytest.mark.parametrize("task", list(AUTHORS))
def test_prompts_equal_the_authors_loader(task, tmp_path):
    splits = planted_splits(task)
    folder = write_splits(tmp_path / task, splits)
    for zero_shot in (False, True):
        ref = authors_prompts(task, splits, zero_shot=zero_shot)
        for split in ("train", "validation", "test"):
            data = load_mceval(task, split, path=folder, zero_shot=zero_shot)
            prompts, answers = ref[split]
            assert data.prompts == prompts, (task, split, zero_shot)
            assert [data.labels[k] for k in data.answers] == answers
            assert len(data.demo_rows) == (0 if zero_shot else len(data.labels))
    # one split's file finds its train split next to it; limit takes the authors' first rows
    data = load_mceval(task, "test", path=folder / "test.json", limit=4)
    assert data.prompts == authors_prompts(task, splits)["test"][0][:4]


def test_file_order_and_the_first_rows(tmp_path):
    splits = planted_splits("agnews")
    folder = write_splits(tmp_path / "agnews", splits)
    plain = load_mceval("agnews", "valid", path=folder, zero_shot=True, shuffle=False)
    assert plain.answers.tolist() == [r["label"] for r in splits["valid"]]
    assert plain.prompts[0].endswith("### Text:text 100\n\nmore 100\n### Genres:\na.World\nb.Sports\nc.Business\n"
                                     "d.Science\n### Answer:")
    shuffled = load_mceval("agnews", "valid", path=folder, zero_shot=True)
    assert sorted(shuffled.prompts) == sorted(plain.prompts) and shuffled.prompts != plain.prompts
    # a lone file used as the train split demonstrates from itself
    lone = tmp_path / "agnews.json"
    lone.write_text(json.dumps(splits["train"]))
    assert load_mceval("agnews", path=lone).prompts == authors_prompts("agnews", splits)["train"][0]


def test_malformed_rows_are_refused_with_one_line(tmp_path):
    def refuse(task, rows, match, **kw):
        p = tmp_path / f"{task}.json"
        p.write_text(json.dumps(rows))
        with pytest.raises(ValueError, match=match) as e:
            load_mceval(task, path=p, zero_shot=True, **kw)
        assert "\n" not in str(e.value)

    good = planted_row("swag", 0, 1)
    refuse("swag", [good, {**good, "options": good["options"][:3]}],
           r"^MCEval8K swag train row 1: column 'options' holds 3 entries; the task needs a list of 4$")
    refuse("commonsenseqa", [{**planted_row("commonsenseqa", 0, 0), "options": "abcde"}],
           r"row 0: column 'options' holds a str; the task needs a list of 5$")
    refuse("ner", [{**planted_row("ner", 0, 0), "target_chunk": "Berlin"}],
           r"row 0: column 'target_chunk' holds a str; the task needs a non-empty list$")
    refuse("agnews", [{"text": "a", "label": 1}, {"text": "a"}],
           r"^MCEval8K agnews train row 1: no column 'label' \(columns: \['text'\]\)$")
    refuse("agnews", [{"text": "a", "label": 4}], r"row 0: column 'label' is 4; the task's answers are 0..3$")
    refuse("agnews", [{"text": "a", "label": -1}], r"column 'label' is -1")
    refuse("amazon-reviews", [{"text": "a", "label": 0.0}], r"column 'label' is 0.0; the task's answers are 1..5$")
    refuse("amazon-reviews", [{"text": "a", "label": 2.5}], r"column 'label' is 2.5")
    refuse("halueval", [{**planted_row("halueval", 0, 0), "hallucination": "yes"}], r"'hallucination' is 'yes'")
    with pytest.raises(ValueError, match="unknown MCEval8K task 'mlama'; choose one of agnews, amazon-reviews"):
        load_mceval("mlama")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_mceval("agnews", "dev")
    p = tmp_path / "bad.json"
    p.write_text("[{")
    with pytest.raises(ValueError, match=r"bad.json is not JSON"):
        load_mceval("agnews", path=p)
    folder = write_splits(tmp_path / "only-test", {"test": planted_splits("agnews")["test"]})
    with pytest.raises(ValueError, match=r"demonstrations come from the train split: .*train.json not found"):
        load_mceval("agnews", "test", path=folder / "test.json")
    assert len(load_mceval("agnews", "test", path=folder / "test.json", zero_shot=True).prompts) == 9


def _sentencepiece_like():
    """A Llama-2-like tokenizer: a word-initial marker on the first piece of every word and a BOS on encode, so
    "a" on its own is "▁a" while after "Answer:" it is "a"."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<s>", "<unk>", "▁###", "▁Answer", ":", "a", "b", "▁a", "▁b", "▁ab"]
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(prepend_scheme="first"),
                                                pre_tokenizers.Split(Regex(":"), behavior="isolated")])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", unk_token="<unk>")


def test_answer_tokens_are_encoded_as_the_authors_encode_them(embedded):
    tok = _sentencepiece_like()

    def encode_token(target):  # the authors' NeurGrad.encode_token, llama2 branch
        token_ids = tok.encode(target)
        assert len(token_ids) == 2 and token_ids[0] == tok.bos_token_id
        return [token_ids[1]]

    assert answer_token_ids(tok, ["a", "b"]) == [encode_token("a")[0], encode_token("b")[0]]
    assert tok.convert_ids_to_tokens(answer_token_ids(tok, ["a", "b"])) == ["▁a", "▁b"]
    # the token that follows the prompt is another one under this tokenizer
    assert tok.convert_ids_to_tokens(answer_token_ids(tok, ["a", "b"], prompt="### Answer:")) == ["a", "b"]
    with pytest.raises(ValueError, match=r"^the answer 'ab b' is 2 tokens"):
        answer_token_ids(tok, ["ab b"])
    et = embedded.tokenizer
    ids = answer_token_ids(et, ["sports", "science"])
    assert ids == [et("sports", add_special_tokens=False)["input_ids"][0],
                   et("science", add_special_tokens=False)["input_ids"][0]]
    for word, i in zip(["sports", "science"], answer_token_ids(et, ["sports", "science"], prompt="Text: the game Label:")):
        assert et("Text: the game Label:" + word, add_special_tokens=False)["input_ids"][-1] == i
    with pytest.raises(ValueError, match="share their first token"):
        answer_token_ids(et, ["sports", "sports"])
