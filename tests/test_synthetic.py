
from nslens.synthetic import SYNTHETIC_LABELS, build_tokenizer, synthetic_concepts, synthetic_corpus


def test_synthetic_data_is_deterministic_and_balanced():
    a, b = synthetic_concepts(20, seed=3), synthetic_concepts(20, seed=3)
    assert a.texts == b.texts and a.label_names == SYNTHETIC_LABELS
    assert a.class_counts().tolist() == [20] * 4
    assert synthetic_concepts(20, seed=4).texts != a.texts
    assert len(synthetic_corpus(5, seed=0)) == 5


def test_tokenizer_covers_the_task():
    tok = build_tokenizer()
    ds = synthetic_concepts(10, seed=0)
    ids = tok(ds.texts[0] + "\nLabel: sports")["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.convert_ids_to_tokens(ids[-3:]) == ["Label", ":", "sports"]
