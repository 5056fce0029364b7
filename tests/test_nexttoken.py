"""Next-token concepts (paper App. K): extraction rule, no leakage, tokenizer checks, per-sample gold tokens."""

import json

import numpy as np
import pytest
import torch

import nslens
from nslens.nexttoken import (
    FAMILIES,
    extract_next_token,
    find_occurrences,
    next_token_dataset,
    parse_concepts,
    parse_spec,
    samples_to_dataset,
    target_token_ids,
    write_check_sheet,
)

PLANTED = ("The coach said that he would come to the game. Mr. Smith met her in the U.S. and she left "
           "(quietly) at 3.5 pm! Did they go? They did, as the report says [12] and the set {a}. The hen and "
           "he's here, but his dog does go. J. Doe goes home.")


def _occ(text, family, **kw):
    return [(s.context, s.target, s.concept) for s in find_occurrences(text, parse_concepts(family), **kw)]


def test_planted_text_gives_exactly_the_rule_occurrences():
    got = _occ(PLANTED, "pronoun_pairs", min_words=1)
    assert [(t, c) for _, t, c in got] == [(" he", "he/his"), (" her", "she/her"), (" she", "she/her"),
                                           (" they", "they/them"), (" They", "they/them"), (" his", "he/his")]
    assert got[0][0] == "The coach said that"  # no "hen", no "he's"; the space belongs to the target
    punct = _occ(PLANTED, "punctuation", min_words=1)
    # "game." "pm!" "go?" and the final "home."; not "Mr.", "U.S.", "3.5", "J."; "{a}." follows a bracket
    assert [(c.split()[-1], t) for c, t, _ in punct] == [("game", "."), ("pm", "!"), ("go", "?"), ("{a}", "."),
                                                         ("go", "."), ("home", ".")]
    delim = _occ(PLANTED, "delimiters", min_words=1)
    assert [t for _, t, _ in delim] == [" (", " [", " {"]
    agree = _occ(PLANTED, "agreement", min_words=1)
    assert [t for _, t, _ in agree] == [" go", " does", " go", " goes"]


def test_terminal_rule_on_unicode_text():
    """The documented rule on non-ASCII text: Unicode letters before and after the mark, ” among the closing
    quotes, and a single digit is not an initial (a single letter still is)."""
    text = ("We met at the café. Then we left. He left the house. Émile stayed home. He called it “great”. "
            "Then he left. The game was won by 3. Then the fans cheered! J. Doe met Mr. Smith at the ÉCOLE. "
            "Finally ça va. “Yes,” she said, “we go.” Over.")
    punct = _occ(text, "punctuation", min_words=1)
    assert [(c.split()[-1], t) for c, t, _ in punct] == [
        ("café", "."), ("left", "."), ("house", "."), ("home", "."), ("“great”", "."), ("left", "."), ("3", "."),
        ("cheered", "!"), ("va", "."), ("Over", ".")]
    # each one ends right before its mark, which follows a lower-case letter, a digit or a closing quote
    for c, t, _ in punct:
        assert text[text.index(c) + len(c)] == t and (c[-1].islower() or c[-1].isdecimal() or c[-1] in "”")
    # not matched: "J." (initial), "Mr." (abbreviation), "ÉCOLE." (upper case), "go.”" (a quote follows)
    words = _occ("Il a dit que elle était là. Émile et lui sont partis. Ô elle rit.", "pronouns,elle,lui",
                 min_words=1)
    assert [t for _, t, _ in words] == [" elle", " lui", " elle"]


def test_contexts_are_cut_to_whole_words():
    text = " ".join(f"w{i}" for i in range(100)) + " and he"
    (s,) = find_occurrences(text, FAMILIES["pronouns"], max_words=10)
    assert s.context == " ".join(f"w{i}" for i in range(91, 100)) + " and" and s.target == " he"
    assert find_occurrences("a b and he", FAMILIES["pronouns"], min_words=5) == []
    with pytest.raises(ValueError, match="min_words <= max_words"):
        find_occurrences(text, FAMILIES["pronouns"], min_words=5, max_words=2)


def _bpe_tokenizer(texts):
    """A byte-level BPE tokenizer (the Llama-3 / GPT-2 kind: a word's leading space is part of its token),
    trained here on the texts so it works offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2000, special_tokens=["<s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_extracted_contexts_end_right_before_the_token_and_never_leak(family):
    from nslens.synthetic import build_tokenizer, synthetic_corpus

    texts = synthetic_corpus(300, seed=5) + [PLANTED]
    concepts = parse_concepts(family)
    samples = extract_next_token(texts, concepts, n_per_concept=40, seed=1, min_words=3)
    assert samples and {s.concept for s in samples} == {c.name for c in concepts}
    words = {c.name: {w.lower() for w in c.words} for c in concepts}
    for s in samples:
        text = texts[s.text_index]
        assert text[s.offset - len(s.context):s.offset] == s.context  # the context is what preceded the token
        assert text[s.offset:].startswith(s.target) and s.target.strip().lower() in words[s.concept]
        assert not s.context.endswith(" ")  # a word's leading space belongs to the target
    for tok in (build_tokenizer(), _bpe_tokenizer(texts)):
        gold, ok = target_token_ids(tok, [s.context for s in samples], [s.target for s in samples])
        assert ok.mean() > 0.9
        for s, g, usable in zip(samples, gold, ok):
            a = tok(s.context)["input_ids"]
            b = tok(s.context + s.target)["input_ids"]
            if usable:  # what the model reads is exactly the context; the next token is the target
                assert b == a + [int(g)] and tok.decode([int(g)]).strip() == s.target.strip()
            else:  # the target is several tokens, or unknown to the tokenizer
                assert g == -1 and (len(b) != len(a) + 1 or b[:-1] != a or b[-1] == tok.unk_token_id)


def test_multi_token_targets_are_not_usable():
    from nslens.synthetic import synthetic_corpus

    tok = _bpe_tokenizer(synthetic_corpus(50, seed=0))
    gold, ok = target_token_ids(tok, ["the team wins", "the team wins"], [".", " zyzzyva"])
    assert ok.tolist() == [True, False] and gold[1] == -1
    from nslens.synthetic import build_tokenizer

    words = build_tokenizer()  # word-level: a word outside its vocabulary is the unknown token, never a gold token
    gold, ok = target_token_ids(words, ["the team wins and", "the team wins and"], [" they", " They"])
    assert ok.tolist() == [True, False] and words.convert_ids_to_tokens(int(gold[0])) == "they"
    with pytest.raises(ValueError, match="2 contexts but 1 targets"):
        target_token_ids(tok, ["a", "b"], ["."])


def test_extraction_is_balanced_seeded_and_deduplicated():
    from nslens.synthetic import synthetic_corpus

    texts = synthetic_corpus(400, seed=9)
    a = extract_next_token(texts + texts, FAMILIES["punctuation"], n_per_concept=30, seed=3)
    b = extract_next_token(texts, FAMILIES["punctuation"], n_per_concept=30, seed=3)
    assert [s.concept for s in a].count("?") == 30 and len(a) == 90
    assert len({s.context for s in a}) == len(a)  # the duplicated texts add nothing
    assert [(s.context, s.target) for s in a] == [(s.context, s.target) for s in b]
    c = extract_next_token(texts, FAMILIES["punctuation"], n_per_concept=30, seed=4)
    assert [s.context for s in c] != [s.context for s in b]


def test_check_sheet_loads_back_as_the_dataset(tmp_path):
    from nslens.synthetic import synthetic_corpus

    ds = next_token_dataset("next:pronoun_pairs:synthetic", n_per_concept=20)
    samples = extract_next_token(synthetic_corpus(200, seed=1), FAMILIES["pronoun_pairs"], n_per_concept=20)
    jsonl, md = write_check_sheet(samples, tmp_path / "check")
    back = nslens.load_dataset(str(jsonl))
    assert back.next_token and back.texts == [s.context for s in samples]
    assert back.targets == [s.target for s in samples]
    assert [back.label_names[y] for y in back.labels] == [s.concept for s in samples]
    sheet = md.read_text()
    assert "## he/his" in sheet and f"⟦{samples[0].target}⟧" in sheet
    assert ds.next_token and ds.class_counts().tolist() == [20, 20, 20] and ds.source["rule"]
    sub = ds.subset([0, 5])
    assert sub.targets == [ds.targets[0], ds.targets[5]]
    rows = [json.loads(x) for x in jsonl.read_text().splitlines()]
    rows[0]["target"] = ""
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="empty 'target' in rows \\[1\\]"):
        nslens.load_dataset(str(tmp_path / "bad.jsonl"))


def test_specs_and_concepts_are_checked():
    assert parse_spec("next:pronouns") == ("pronouns", "wikitext")
    assert parse_spec("next:do,does:synthetic") == ("do,does", "synthetic")
    assert [c.words for c in parse_concepts("do,does,has/have")] == [("do",), ("does",), ("has", "have")]
    for spec, message in (("next:pronoun", "unknown next-token family 'pronoun'"),
                          ("next:he,He", r"\['he'\] belong to more than one concept"),
                          ("next:he's,she", "neither a word"),
                          ("next:pronouns:books", "unknown next-token source 'books'"),
                          ("next:pronouns:missing.txt", "source file not found"),
                          ("next:a,,b", "an empty concept between commas")):
        with pytest.raises(ValueError, match=message):
            parse_spec(spec)
    with pytest.raises(ValueError, match="no occurrences of \\['x', 'y'\\]"):
        samples_to_dataset([], parse_concepts("x,y"), name="t")


def test_local_source_files(tmp_path):
    from nslens.nexttoken import source_texts

    (tmp_path / "a.txt").write_text("one line and he left.\n\nsecond line\n", encoding="utf-8")
    assert source_texts(str(tmp_path / "a.txt")) == ["one line and he left.", "second line"]
    (tmp_path / "a.jsonl").write_text('{"text": "x y"}\n\n{"text": "z"}\n', encoding="utf-8")
    assert source_texts(str(tmp_path / "a.jsonl")) == ["x y", "z"]
    for name, body, message in (("b.jsonl", '{"text": "x"}\n{bad\n', "b.jsonl, line 2: not JSON"),
                                ("c.jsonl", '{"body": "x"}\n', "c.jsonl, line 1: no 'text' string"),
                                ("d.txt", "caf\u00e9".encode("latin-1"), "d.txt is not UTF-8 text")):
        path = tmp_path / name
        path.write_bytes(body if isinstance(body, bytes) else body.encode())
        with pytest.raises(ValueError, match=message):
            source_texts(str(path))


def test_wikitext_failure_is_one_line_naming_the_source(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="could not load WikiText .*Salesforce/wikitext.*ConnectionError") as e:
        next_token_dataset("next:pronouns")
    assert "\n" not in str(e.value)


def test_wikitext_lines_are_detokenized_and_headings_dropped(monkeypatch):
    import datasets

    rows = [{"text": " = Valkyria = \n"}, {"text": ""}, {"text": " The team won the match . Then he left @-@ "
                                                              "quickly ( again ) . \n"}]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: iter(rows))
    from nslens.nexttoken import source_texts

    assert list(source_texts("wikitext")) == ["The team won the match. Then he left-quickly (again)."]


@pytest.fixture(scope="module")
def pronoun_data(embedded):
    from nslens.pipeline import RunConfig, prepare_data

    cfg = RunConfig(dataset="next:pronoun_pairs:synthetic", n_per_class=60, test_size=0.3, batch_size=32)
    site = nslens.resolve_site(embedded, -1)
    return site, prepare_data(embedded, site, cfg)


def test_prepared_next_token_data_has_per_sample_gold(embedded, pronoun_data):
    site, data = pronoun_data
    assert data.prompter is None and data.label_ids is None
    assert data.prompts(data.test) == data.test.texts  # raw contexts, no classification prompt
    ids = embedded.tokenizer(data.test.texts)["input_ids"]
    full = embedded.tokenizer([c + t for c, t in zip(data.test.texts, data.test.targets)])["input_ids"]
    assert data.test_gold.tolist() == [f[len(i)] for i, f in zip(ids, full)]
    # only correct: the clean model predicts every kept sample's own token
    p = nslens.predict(embedded, site, data.test.texts, data.test_gold, batch_size=16)
    assert p.correct.all() and len(set(data.test_gold.tolist())) >= 4  # he, his, she, her, they, them


def test_next_token_erasure_equals_plain_torch_hooks(embedded, pronoun_data):
    """Acc/Conf with each sample's own gold token, under range masking, against a plain forward hook."""
    from conftest import encode, hook_reference, plain_forward

    from nslens.erasure import erasure_table

    site, data = pronoun_data
    rec = nslens.record(embedded, site, data.train.texts, data.train.labels, data.train.label_names, batch_size=32)
    masks = nslens.build_range_masks(rec.stats, method="probeless", fraction=0.2)
    tab = erasure_table(embedded, site, data.test.texts, data.test.labels, None, masks, nslens.zero(),
                        gold_token_ids=data.test_gold, batch_size=16)
    enc = encode(embedded, data.test.texts)
    mask = masks[0]
    clean = plain_forward(embedded, enc).logits[:, -1].float()
    edited = hook_reference(embedded, site, enc, mask, lambda x, mu, s: torch.zeros_like(x), True)[:, -1].float()
    gold = torch.as_tensor(data.test_gold)
    on = data.test.labels == 0
    for logits, expect in ((clean, tab.base[0]), (edited, {k: tab.base[0][k] + tab.range[0][k] for k in tab.base[0]})):
        correct = (logits.argmax(-1) == gold).numpy()
        conf = logits.softmax(-1).gather(-1, gold[:, None])[:, 0].numpy()
        others = [c for c in range(3) if c != 0]
        ref = {"acc": correct[on].mean(), "conf": conf[on].mean(),
               "cacc": np.mean([correct[data.test.labels == c].mean() for c in others]),
               "cconf": np.mean([conf[data.test.labels == c].mean() for c in others])}
        assert expect == pytest.approx(ref, abs=1e-5)
    # the model is bit-for-bit clean afterwards, and remote="local" gives the same predictions
    assert torch.equal(plain_forward(embedded, enc).logits[:, -1].float(), clean)
    from nslens.erasure import predict_many

    iv = nslens.Intervention(mask, nslens.zero(), gated=True)
    local = predict_many(embedded, site, data.test.texts[:6], data.test_gold[:6], [None, iv], batch_size=6)
    remote = predict_many(embedded, site, data.test.texts[:6], data.test_gold[:6], [None, iv], batch_size=6,
                          remote="local")
    for a, b in zip(local, remote):
        np.testing.assert_array_equal(a.pred, b.pred)
        np.testing.assert_array_equal(a.conf, b.conf)
    with pytest.raises(ValueError, match="give label_token_ids"):
        erasure_table(embedded, site, data.test.texts, data.test.labels, None, masks, nslens.zero())


def test_run_on_next_token_concepts(tmp_path, embedded):
    """The whole pipeline on a family: raw contexts in, per-concept tables and masks (file names slugged) out."""
    from nslens.pipeline import RunConfig, run_pipeline

    cfg = RunConfig(dataset="next:punctuation:synthetic", method="probeless", fraction=0.2, n_per_class=40,
                    test_size=0.25, analyses=False, batch_size=32)
    out = run_pipeline(cfg, tmp_path / "run", model=embedded)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["next_token"] is True
    assert sorted(p.name for p in (out / "ranges").glob("*.safetensors")) == [
        "00_concept.safetensors", "01_concept.safetensors", "02_concept.safetensors"]
    tab = json.loads((out / "erasure_zero.json").read_text())
    assert tab["concepts"] == ["?", "!", "."] and tab["summary"]["base"]["acc"] == 1.0
    first = json.loads((out / "train.jsonl").read_text().splitlines()[0])
    assert first["target"] in ("?", "!", ".")
    assert "next-token" in (out / "report.md").read_text()
    with pytest.raises(ValueError, match="label_words do not apply"):
        run_pipeline(RunConfig(dataset="next:punctuation:synthetic", label_words=["a", "b", "c"]),
                     tmp_path / "run2", model=embedded)


def test_nexttoken_cli_writes_the_check_sheet(tmp_path):
    from nslens.cli import main

    main(["nexttoken", "delimiters", "--source", "synthetic", "--n", "15", "-o", str(tmp_path / "d" / "x")])
    back = nslens.load_dataset(str(tmp_path / "d" / "x.jsonl"))
    assert back.class_counts().tolist() == [15, 15, 15] and set(back.targets) == {" [", " {", " ("}
    assert "## {" in (tmp_path / "d" / "x.md").read_text()


def test_embedded_side_effect_tasks_map_each_default_to_its_stand_in(tmp_path):
    from nslens.harness import LOCAL_TASKS
    from nslens.lmtasks import local_tasks_dir
    from nslens.pipeline import RunConfig, side_effect_tasks

    tasks, include = side_effect_tasks(RunConfig(side_effect_tasks=["nslens_wikipedia_ppl"]))
    assert tasks == [LOCAL_TASKS[1]] and include == (str(local_tasks_dir()),)
    # the config's own include stays beside the stand-ins' (it was dropped) and is checked
    se = {"tasks": ["mmlu", "mine"], "include": str(tmp_path)}
    assert side_effect_tasks(RunConfig(side_effects=se)) == ([LOCAL_TASKS[0], "mine"],
                                                             (str(local_tasks_dir()), str(tmp_path)))
    with pytest.raises(ValueError, match="lm-eval task directory not found"):
        side_effect_tasks(RunConfig(side_effects={**se, "include": str(tmp_path / "none")}))
    assert side_effect_tasks(RunConfig(model="org/m", side_effect_tasks=["nslens_wikipedia_ppl"]))[0] == [
        "nslens_wikipedia_ppl"]


def test_tables_18_to_22_experiment_smoke(embedded, tmp_path):
    import runpy
    from pathlib import Path

    mod = runpy.run_path(str(Path(__file__).resolve().parents[1] / "experiments" / "next_token.py"))
    # 100 per concept: 20 test samples each, so a concept above the embedded model's floor (0.6) keeps some
    # correct ones whatever the training produced (at --limit 40 a weak concept could keep none)
    mod["main"](["--model", "embedded", "--limit", "100", "--lm-eval-limit", "4", "--families", "pronouns",
                 "punctuation", "--out", str(tmp_path), "--batch-size", "32"])
    text = (tmp_path / "next_token.md").read_text()
    assert "**Table 19: pronouns" in text and "**Table 20: punctuation" in text and "| she | 1.00 |" in text
    assert "**Table 18" in text and "| max |" in text and "| probeless |" in text
    assert (tmp_path / "pronouns_max" / "summary.json").exists()


def test_the_check_sheet_keeps_a_dotted_name(tmp_path):
    """Two next-token check sheets written as v1.1 and v1.2 are two pairs of files."""
    from nslens.nexttoken import NextTokenSample, write_check_sheet

    s = NextTokenSample(context="he said that", concept="he", target="he", text_index=0, offset=3, after="was")
    a = write_check_sheet([s], tmp_path / "v1.1")
    b = write_check_sheet([s], tmp_path / "v1.2")
    assert [p.name for p in a] == ["v1.1.jsonl", "v1.1.md"] and [p.name for p in b] == ["v1.2.jsonl", "v1.2.md"]
    assert [p.name for p in write_check_sheet([s], tmp_path / "sheet.md")] == ["sheet.jsonl", "sheet.md"]


def test_nexttoken_cli_refuses_a_concept_without_samples_and_a_directory_out(tmp_path):
    """Both wrote files and exited 0: a dataset a run could not use, and `-o nt/` wrote nt.jsonl beside nt."""
    from conftest import run_cli

    r = run_cli("nexttoken", "he,zzzqq", "--source", "synthetic", "--n-per-class", "8", "-o", tmp_path / "f")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: no sample of next-token concept 'zzzqq' in synthetic; check the words or choose another source "
        "(nothing written)"], r.stderr
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "nt").mkdir()
    r = run_cli("nexttoken", "delimiters", "--source", "synthetic", "--n-per-class", "8", "-o", tmp_path / "nt")
    assert r.returncode == 1 and f"cannot write {tmp_path / 'nt'}: it is a directory" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == [tmp_path / "nt"] and not list((tmp_path / "nt").iterdir())
