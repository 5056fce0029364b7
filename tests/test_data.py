import json

import numpy as np
import pytest

import nslens
from nslens.data import ConceptDataset, FewShotPrompter, label_token_ids, load_dataset, load_local_dataset


def toy(n=40):
    labels = np.arange(n) % 4
    return ConceptDataset([f"text {i}" for i in range(n)], labels, ["a", "b", "c", "d"], name="toy")


def test_balanced_and_stratified_split_are_seeded():
    ds = ConceptDataset([str(i) for i in range(100)], np.r_[np.zeros(70, int), np.ones(30, int)], ["x", "y"])
    b = ds.balanced(20, seed=3)
    assert b.class_counts().tolist() == [20, 20]
    assert b.texts == ds.balanced(20, seed=3).texts and b.texts != ds.balanced(20, seed=4).texts
    tr, te = b.split(0.25, seed=0)
    assert te.class_counts().tolist() == [5, 5] and tr.class_counts().tolist() == [15, 15]
    assert not set(tr.texts) & set(te.texts)
    assert tr.texts == b.split(0.25, seed=0)[0].texts


def test_few_shot_prompt_shape():
    ds = toy()
    p = FewShotPrompter.from_dataset(ds, k=2, seed=0, max_words=3)
    text = p("one two three four five")
    assert text.startswith("Classify the text into one of these categories: a, b, c, d.\n\n")
    assert text.endswith("\nText: one two three\nLabel:")
    assert text.count("Label:") == 2 * 4 + 1
    for word in "abcd":
        assert text.count(f"Label: {word}\n") == 2
    assert p.prompts(["x"]) == [p("x")]


def test_label_tokens_and_collisions(embedded):
    ids = label_token_ids(embedded.tokenizer, ["sports", "science"])
    assert ids == embedded.tokenizer.convert_tokens_to_ids(["sports", "science"])
    # unknown words both map to <unk>: their first tokens collide
    with pytest.raises(ValueError, match=r"label words share their first token: 'zebra' and 'yak'"):
        label_token_ids(embedded.tokenizer, ["sports", "zebra", "yak"])


def test_local_csv_and_jsonl(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("text,label\nhello,pos\nbye,neg\nhi,pos\n")
    ds = load_local_dataset(csv_path)
    assert ds.label_names == ["neg", "pos"] and ds.labels.tolist() == [1, 0, 1]
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"sentence": t, "y": y}) for t, y in [("a", 0), ("b", 1), ("c", 2)]))
    ds2 = load_dataset(str(jl), text_column="sentence", label_column="y")
    assert ds2.labels.tolist() == [0, 1, 2] and ds2.texts == ["a", "b", "c"]


def test_bad_datasets(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("body,label\nhello,1\n")
    with pytest.raises(ValueError, match=r"missing column 'text'; columns are \['body', 'label'\]"):
        load_local_dataset(p)
    p.write_text("text,cls\nhello,1\n")
    with pytest.raises(ValueError, match="missing column 'label'"):
        load_local_dataset(p)
    with pytest.raises(ValueError, match="unknown dataset 'nope'; choose 'synthetic'"):
        load_dataset("nope")
    with pytest.raises(ValueError, match="fewer than 2 samples: b \\(1\\)"):
        ConceptDataset(["x", "y", "z"], [0, 0, 1], ["a", "b"]).check_concepts(2)
    with pytest.raises(ValueError, match="labels must lie in"):
        ConceptDataset(["x"], [3], ["a", "b"])


def test_a_paper_dataset_the_hub_cannot_give_is_a_user_error(monkeypatch):
    """Without the Hub (HF_HUB_OFFLINE, or no network) the paper's datasets fail in one line that names the
    dataset and the way out, as a user error (not the "internal error" of an unknown exception)."""
    from nslens.errors import NsLensError, is_user_error

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(NsLensError, match=r"could not load dataset 'ag_news' \(fancyzhx/ag_news, split 'train': "
                                          r".*pass a \.csv/\.jsonl path") as info:
        load_dataset("ag_news")
    assert is_user_error(info.value) and "\n" not in str(info.value)


def test_a_registered_dataset_source_is_asked_after_the_built_ins():
    from dataclasses import dataclass
    from typing import ClassVar

    from nslens.data import (
        DATASET_SOURCES,
        DatasetSource,
        check_dataset_spec,
        load_dataset,
        register_dataset_source,
    )

    assert DATASET_SOURCES.names() == ("synthetic", "hub", "next", "fortunes", "file")

    @dataclass(frozen=True)
    class Numbers(DatasetSource):
        name: ClassVar[str] = "numbers"
        usage: ClassVar[str] = "numbers:<n>"

        def matches(self, spec):
            return spec.startswith("numbers:")

        def check(self, spec):
            if not spec[8:].isdigit():
                raise nslens.NsLensError(f"numbers:<n> needs a number, got {spec!r}")

        def load(self, spec, start=0, **kwargs):
            n = int(spec[8:])
            return nslens.ConceptDataset([f"{i}" for i in range(start, start + 2 * n)],
                                         [i % 2 for i in range(2 * n)], ["even", "odd"])

        def run_options(self, *, n_per_class, seed, max_words):
            return {"start": 100 * seed}

    register_dataset_source(Numbers)
    try:
        ds = load_dataset("numbers:3")
        assert ds.texts == ["0", "1", "2", "3", "4", "5"] and ds.labels.tolist() == [0, 1, 0, 1, 0, 1]
        # a run passes its source what the source's run_options take from the config, then balances the result
        from nslens.prepare import load_concepts

        run = load_concepts(nslens.RunConfig(dataset="numbers:6", seed=2, n_per_class=4))
        assert len(run) == 8 and all(200 <= int(t) < 212 for t in run.texts)
        assert sorted(run.labels.tolist()) == [0] * 4 + [1] * 4
        with pytest.raises(ValueError, match="needs a number, got 'numbers:x'"):
            check_dataset_spec("numbers:x")
        with pytest.raises(ValueError, match=r"\(Debian's fortunes\), a \.csv/\.jsonl path, or numbers:<n>$"):
            load_dataset("nope")
    finally:
        DATASET_SOURCES.unregister("numbers")
    with pytest.raises(ValueError, match=r"fortunes\[:<category>,\.\.\.\] \(Debian's fortunes\), or a \.csv"):
        load_dataset("numbers:3")


def test_local_files_read_as_a_spreadsheet_or_a_json_tool_writes_them(tmp_path):
    """A byte-order mark hid the 'text' column; a JSON array file was 'missing column'; 1, 1.0 and "1" were three
    concepts; a pathlib.Path was an unknown dataset."""
    p = tmp_path / "bom.csv"
    p.write_bytes("\ufefftext,label\nhello,pos\nbye,neg\n".encode("utf-8"))
    assert load_dataset(p).texts == ["hello", "bye"]
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps([{"text": "a", "label": 1}, {"text": "b", "label": 1.0}, {"text": "c", "label": "0"}]))
    ds = load_local_dataset(arr)
    assert ds.labels.tolist() == [1, 1, 0] and ds.label_names == ["0", "1"]


@pytest.mark.parametrize("name, text, words", [
    ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b"}\n', r"no 'label' in rows \[2\]"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": null, "label": "x"}\n', r"no 'text' in rows \[2\]"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n[1, 2]\n', "line 2: a JSON list, not an object"),
    ("d.json", '[{"text": "a", "label": "x"}, 3]', "item 2: a JSON int, not an object"),
    ("d.csv", "text,label\nhello,pos\nshort\n", r"no 'label' in rows \[2\]"),
    ("d.csv", "text,label\nhello,pos\nbye,\n", r"no 'label' in rows \[2\]"),
])
def test_a_row_without_its_text_or_label_is_named(tmp_path, name, text, words):
    """A JSONL row without a label was an internal KeyError; a null or a short CSV row became concept 'None'."""
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(nslens.NsLensError, match=words):
        load_local_dataset(p)
